"""Product quantization: "And the Bit Goes Down" (Stock et al., ICLR 2020) on a BN-fused model.

Per Conv/Linear layer every output filter, flattened in (C_in/groups, kh, kw) order, is cut into
sub-vectors of `block_size` values (the layout of `plan.Codebook`); one codebook of up to 256
codewords per layer (uint8 codes). The codebook is fitted by an EM whose objective is the error
on the layer's outputs for in-domain inputs, sum_j (w_j - w^_j)^T H_b (w_j - w^_j), H_b the second
moment of the inputs that sub-vector j multiplies (the diagonal d x d blocks of the unfolded-input
second moment; the paper's objective ||x W - x W^||^2 without the cross terms between blocks).
With bias correction (the default) H is the covariance instead: the bias absorbs the shift of the
output mean, so only the error on the inputs' variation is left, and the codebook is not spent on
the mean response that dominates the second moment of post-ReLU inputs.

- E-step: every sub-vector to its best codeword under its own H_b, as batched matrix products.
- M-step: codeword c = (sum_j H_bj)^-1 sum_j H_bj w_j over the sub-vectors assigned to c (the
  sums are index_add / one matrix product over the distinct blocks; then a batched solve).
- S-step (our addition, `channel_scale`): a float16 scale per output channel, fitted in closed form.
  The paper quantizes weights *before* BatchNorm, whose per-channel scale stays in float; a
  BN-fused weight carries that scale inside, and codewords shared across channels of very
  different magnitude would waste the codebook. The scale restores the paper's setting.

Layers are quantized in order, each one's input statistics measured on the network whose earlier
layers are already quantized. Then the codewords (and channel scales and biases) are fine-tuned
by distillation from the float network, a codeword's gradient being the mean of the gradients of
the sub-vectors assigned to it. BatchNorm is fused into the convs in our models, so instead of re-estimating
BN statistics each layer's bias is corrected so that the mean of its outputs (on the partially
quantized network) matches the float network's: b = E_float[y] - W^ E_q[patch]; the fine-tuning
then trains the biases too.

Modules: settings (PqSettings, block sizes, CLI options), codebook (the EM, the sequential
assignment, the float target), statistics (streamed K x K input moments, `SecondMoment`), search
(`search_pq`, `fit_layers`), finetune (distillation), report (`pq_report`).
"""

from __future__ import annotations

from cora_onnx.torch.search.pq.codebook import (PqFit, assign_with_feedback, fit_codebook, float_output_error, float_target, full_error,
                       weighted_error)
from cora_onnx.torch.search.pq.summary import pq_report
from cora_onnx.torch.search.pq.search import pq_layers, rehearsal_pq, search_pq
from cora_onnx.torch.search.pq.settings import BLOCK_PRESETS, DAMPING, PQ_OPTIONS, TARGETS, PqSettings, block_kind, parse_block_size
from cora_onnx.torch.search.pq.statistics import Geom, SecondMoment, input_stats

__all__ = ["PqSettings", "PqFit", "search_pq", "pq_layers", "rehearsal_pq", "fit_codebook", "weighted_error", "block_kind", "parse_block_size",
           "pq_report", "PQ_OPTIONS", "BLOCK_PRESETS", "assign_with_feedback", "full_error", "float_target",
           "float_output_error", "TARGETS", "DAMPING", "Geom", "SecondMoment", "input_stats"]
