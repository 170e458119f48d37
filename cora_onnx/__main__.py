"""`python -m cora_onnx` runs the command line, as `cora-onnx` does."""

from cora_onnx.cli.main import main

if __name__ == "__main__":
    main()
