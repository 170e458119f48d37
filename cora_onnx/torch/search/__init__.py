"""Searches that turn a BN-fused torch model (and calibration images) into a Plan.

Every method registers a `Method` in METHODS: a frozen settings dataclass (validated at
construction), a `run(model, settings, calib)` returning a Plan, the command-line options that
map onto its settings fields (plain data: the CLI builds click options from them, so adding a
method never edits cli.py), optionally `report(plan) -> dict`, extra report sections, and
`rehearsal(model, settings)`: skeleton plans (zero-filled, layers.skeleton_layer) of every layout
the search may give each layer, which the run applies to the exported graph before the search
(cora_onnx.run.stages.rehearse; auto has none: its size target measures every encoding it may
choose on skeletons already).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from cora_onnx.torch.search.auto import AUTO_OPTIONS, AutoSettings, auto_report, search_auto
from cora_onnx.torch.search.layers import LayerSelection, select_layers, uniform_from
from cora_onnx.torch.search.cli_options import CliOption
from cora_onnx.torch.search.cora import CORA_OPTIONS, CoraSettings, cora_report, rehearsal_cora, search_cora
from cora_onnx.torch.search.pq import PQ_OPTIONS, PqSettings, pq_report, rehearsal_pq, search_pq
from cora_onnx.torch.search.rtn import GRID_OPTIONS, RTN_OPTIONS, RtnSettings, rehearsal_rtn, search_rtn

__all__ = ["Method", "METHODS", "CliOption", "LayerSelection", "select_layers", "uniform_from", "RtnSettings",
           "search_rtn", "CoraSettings", "search_cora", "PqSettings", "search_pq", "AutoSettings", "search_auto"]


@dataclass(frozen=True)
class Method:
    name: str
    settings: type
    run: Callable[..., Any]
    needs_calib: bool
    options: tuple[CliOption, ...] = ()
    report: Callable[..., dict] | None = None
    help: str = ""
    rehearsal: Callable[..., tuple] | None = None


METHODS: dict[str, Method] = {
    "rtn": Method("rtn", RtnSettings, search_rtn, needs_calib=False, options=RTN_OPTIONS,
                  help="round to nearest on a uniform grid, no data needed", rehearsal=rehearsal_rtn),
    "cora": Method("cora", CoraSettings, search_cora, needs_calib=True, options=GRID_OPTIONS + CORA_OPTIONS,
                   report=cora_report, help="low-bit weights + searched low-rank adapters (Luo et al. 2024)",
                   rehearsal=rehearsal_cora),
    "pq": Method("pq", PqSettings, search_pq, needs_calib=True, options=PQ_OPTIONS, report=pq_report,
                 help="product quantization (And the Bit Goes Down): uint8 codes into per-layer codebooks fitted "
                      "to calibration activations (use --keep first: --keep last stores the classifier at 8 bits)",
                 rehearsal=rehearsal_pq),
    "auto": Method("auto", AutoSettings, search_auto, needs_calib=True, options=AUTO_OPTIONS, report=auto_report,
                   help="every layer's encoding (2-8-bit grids, codebooks, adapters) chosen under the byte budget of "
                        "--target-ratio / --target-size (the default method with a size target)"),
}
