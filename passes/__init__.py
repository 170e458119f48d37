"""ONNX graph rewriting passes on onnx_ir. Pure ONNX: nothing here imports torch."""

from .adapter_merge import AdapterMergePass
from .activation_layout import ActivationLayout, QuantScheme, activation_layout, activation_qparams
from .activation_qdq import ActivationQDQPass
from .bias_update import BiasUpdatePass
from .codebook_decode import CodebookDecodePass
from .compact_names import CompactNamesPass
from .group_scale_merge import GroupScaleMergePass
from .integer_forms import IntegerFormsPass
from ._packing import pack_grid, packs, unpack_grid
from .low_rank_branch import LowRankBranchPass
from .strip_metadata import StripExportMetadataPass
from .weight_decode import WeightDecodePass
from .weight_names import WeightNamesPass, locate_weight
from .weight_qdq import WeightQDQPass

__all__ = ["ActivationLayout", "ActivationQDQPass", "AdapterMergePass", "BiasUpdatePass", "CodebookDecodePass",
           "CompactNamesPass", "GroupScaleMergePass", "IntegerFormsPass", "LowRankBranchPass", "QuantScheme",
           "StripExportMetadataPass", "WeightDecodePass", "WeightNamesPass", "WeightQDQPass", "activation_layout",
           "activation_qparams", "locate_weight", "pack_grid", "packs", "unpack_grid"]
