import onnx
import onnx_ir as ir

from passes import StripExportMetadataPass


def _model():
    proto = onnx.parser.parse_model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[2] x) => (float[2] y) { t = Relu(x)  y = Neg(t) }""")
    model = ir.from_proto(proto)
    relu, neg = model.graph
    relu.metadata_props.update({"pkg.torch.onnx.stack_trace": "File /home/x.py, line 3", "namespace": "m: M",
                                "cora_onnx.pass": "SomePass"})
    neg.metadata_props["pkg.torch.onnx.fx_node"] = "%neg = call_function[...]"
    return model


def test_drops_exporter_debug_metadata_and_keeps_provenance():
    model = _model()
    assert StripExportMetadataPass()(model).modified
    relu, neg = model.graph
    assert dict(relu.metadata_props) == {"cora_onnx.pass": "SomePass"} and dict(neg.metadata_props) == {}
    assert [n.op_type for n in model.graph] == ["Relu", "Neg"]
    assert not StripExportMetadataPass()(model).modified  # nothing left to drop


def test_other_prefixes():
    model = _model()
    assert StripExportMetadataPass(prefixes=("cora_onnx.",))(model).modified
    relu, _ = model.graph
    assert "cora_onnx.pass" not in relu.metadata_props and "namespace" in relu.metadata_props
