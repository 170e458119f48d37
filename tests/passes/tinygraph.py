"""TinyGraph, a tiny float ONNX graph built in the test (onnx.helper, no torch), for single-pass tests in the
style of onnx-ir's own pass tests: build the graph, run one pass, assert on the resulting graph
and on what ONNX Runtime computes with it. Every test under tests/passes runs with torch absent:

    python -c 'import sys; sys.modules["torch"] = None; import pytest; sys.exit(pytest.main(["tests/passes"]))'
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cora_onnx.core.errors import PlanError
from cora_onnx.core.plan import UniformWeights


class TinyGraph:
    """input [N, 3, 6, 6] -> Conv conv1 (3x3, pads 1, bias) -> Relu -> Conv pw (1x1, bias optional)
    -> MaxPool 2x2 -> GlobalAveragePool -> Flatten -> Gemm fc (transB, bias) -> logits [N, 5].
    Initializers are named as the exporter names them (`<layer>.weight`, `<layer>.bias`), so plan
    layers "conv1", "pw", "fc" find them."""

    SHAPES = {"conv1.weight": (8, 3, 3, 3), "conv1.bias": (8,), "pw.weight": (6, 8, 1, 1), "pw.bias": (6,),
              "fc.weight": (5, 6), "fc.bias": (5,)}

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.weights = {k: (rng.normal(size=s) * (0.5 if k.endswith("bias") else 1.0)).astype(np.float32)
                        for k, s in self.SHAPES.items()}
        self.x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)

    def proto(self, opset: int = 21, pw_bias: bool = True, **weights: np.ndarray) -> onnx.ModelProto:
        """The float model; keyword arguments replace weights by name with dots as '__'
        (conv1__weight=...)."""
        w = dict(self.weights)
        w.update({k.replace("__", "."): v for k, v in weights.items()})
        if not pw_bias:
            del w["pw.bias"]
        nodes = [
            helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["conv1_out"], name="conv1",
                             kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv1_out"], ["relu_out"], name="relu"),
            helper.make_node("Conv", ["relu_out", "pw.weight"] + (["pw.bias"] if pw_bias else []), ["pw_out"],
                             name="pw", kernel_shape=[1, 1]),
            helper.make_node("MaxPool", ["pw_out"], ["pool_out"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("GlobalAveragePool", ["pool_out"], ["gap_out"], name="gap"),
            helper.make_node("Flatten", ["gap_out"], ["flat_out"], name="flatten"),
            helper.make_node("Gemm", ["flat_out", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
        ]
        graph = helper.make_graph(
            nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 6, 6])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
            [numpy_helper.from_array(v, k) for k, v in w.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 10
        onnx.checker.check_model(model, full_check=True)
        return model

    def model(self, **kw) -> ir.Model:
        return ir.serde.deserialize_model(self.proto(**kw))

    def run(self, model: ir.Model | onnx.ModelProto, optimize: bool = False) -> np.ndarray:
        """ONNX Runtime output on self.x, graph optimizations off (the graph as written) or all on."""
        proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
        so = ort.SessionOptions()
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return sess.run(None, {"input": self.x})[0]


    @staticmethod
    def uniform(w: np.ndarray, bits: int, symmetric: bool = True, per_channel: bool = True) -> UniformWeights:
        """A min/max grid for w (numpy; the torch quantizers are not needed to make a plan by hand)."""
        w2 = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
        if symmetric:
            qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
            scale = (np.abs(w2).max(axis=1) / qmax).astype(np.float32)
            zp = np.zeros(scale.shape, np.int8)
            q = np.clip(np.round(w2 / scale[:, None]), qmin, qmax).astype(np.int8)
        else:
            qmin, qmax = 0, (1 << bits) - 1
            lo, hi = np.minimum(w2.min(axis=1), 0), np.maximum(w2.max(axis=1), 0)
            scale = ((hi - lo) / (qmax - qmin)).astype(np.float32)
            zp = np.clip(np.round(qmin - lo / scale), qmin, qmax).astype(np.uint8)
            q = np.clip(np.round(w2 / scale[:, None]) + zp[:, None], qmin, qmax).astype(np.uint8)
        return UniformWeights(bits, symmetric, per_channel, q.reshape(w.shape), scale, zp)

    @staticmethod
    def grouped(w: np.ndarray, bits: int, group: int) -> UniformWeights:
        """A symmetric grid with one float16-exact scale per `group` consecutive weights of an output
        channel (the last group of a row shorter when `group` does not divide it)."""
        c = w.shape[0]
        w2 = w.reshape(c, -1)
        k, ng = w2.shape[1], -(-w2.shape[1] // group)
        qmax = (1 << (bits - 1)) - 1
        padded = np.zeros((c, ng * group), np.float32)
        padded[:, :k] = w2
        peak = np.abs(padded.reshape(c, ng, group)).max(axis=2)
        scale = np.maximum(peak / qmax, 1e-3).astype(np.float16).astype(np.float32)
        q = np.clip(np.round(w2 / np.repeat(scale, group, axis=1)[:, :k]), -qmax - 1, qmax).astype(np.int8)
        return UniformWeights(bits, True, True, q.reshape(w.shape), scale, np.zeros(scale.shape, np.int8), group=group)

    @staticmethod
    def ops(model: ir.Model) -> list[str]:
        return [n.op_type for n in model.graph]

    @staticmethod
    def nodes(model: ir.Model) -> dict[str, ir.Node]:
        return {n.name: n for n in model.graph}


def depthwise_model(channels: int = 4) -> tuple[ir.Model, np.ndarray]:
    """A graph of one depthwise 3x3 Conv `dw` (group = channels) and its weight `dw.weight`."""
    w = np.ones((channels, 1, 3, 3), np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "dw.weight"], ["y"], name="dw", group=channels)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, 3, 3])],
                          [numpy_helper.from_array(w, "dw.weight")])
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])), w


def plan_error(call) -> PlanError:
    """The PlanError that `call()` raises, unwrapped from the pass infrastructure's errors."""
    with pytest.raises(Exception) as err:
        call()
    cause = err.value
    while not isinstance(cause, PlanError) and cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, PlanError), repr(err.value)
    return cause
