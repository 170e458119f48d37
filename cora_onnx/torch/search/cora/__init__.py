"""CoRa (Luo et al., BMVC 2024): low-bit weights plus low-rank convolutional adapters that reclaim
the quantization residual, with ranks searched by a differentiable Butterworth cutoff per layer.

The search is cheap: a layer's Butterworth-weighted correction is merged into its conv weight in
the forward pass (W_q + B diag(T(c)^2) A, one conv per layer) instead of running two extra
full-rank convolutions, and only the cutoffs c_l are trained. Beyond the paper (the `default`
preset; `reference` reproduces the paper's choices):

- grid: per-channel symmetric, each channel's range the one with the least layer-output error on
  the input statistics, instead of per-tensor mean +/- k std;
- rounding: error-feedback (GPTQ, act-order) rounding on the layer's input statistics (full rank:
  every output position of 512 images, streamed by search/stats.py) instead of nearest;
- residual: decomposed in the metric of the layer's inputs (SVD of R C with C C^T the input
  second moment), so the top singular directions are those that matter for the layer *output*;
- statistics: each quantized layer's output is corrected toward the float network's per-channel
  mean and std (absorbed into the per-channel scales and the bias), instead of BatchNorm
  re-estimation on the calibration images;
- fine-tuning: after the ranks are fixed, the adapter factors and biases are fine-tuned by
  distillation for the rest of the iteration budget.

Grouped and depthwise convs get no adapter (the low-rank factorization of a grouped weight is a
different object); by default depthwise convs stay at 8 bits (--keep), where they cost little.

Modules: settings (PRESETS, the choice tuples, CoraSettings, CORA_OPTIONS), layer (butterworth, the
search-time `SearchLayer`, `set_module`), grids (input statistics, grids, residual decomposition, the
statistics correction), search (`search_cora` and its optimization phases), result (the Plan,
`cora_report`).
"""

from __future__ import annotations

from cora_onnx.torch.search.distill import augment_batch
from cora_onnx.torch.search.cora.layer import SearchLayer, set_module, butterworth
from cora_onnx.torch.search.cora.result import cora_report
from cora_onnx.torch.search.cora.search import rehearsal_cora, search_cora
from cora_onnx.torch.search.cora.settings import CORA_OPTIONS, PRESETS, CoraSettings

__all__ = ["CoraSettings", "search_cora", "rehearsal_cora", "cora_report", "CORA_OPTIONS", "PRESETS", "butterworth", "augment_batch",
           "SearchLayer", "set_module"]
