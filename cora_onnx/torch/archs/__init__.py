"""Built-in network architectures shipped with cora-onnx."""
