"""An ONNX file as a new user has it, through the ONNX side of cora-onnx (issue 18).

Exports the shared ImageNet ResNet-18 with torch.onnx's dynamo exporter at its defaults
(`torch.onnx.export(m, (x,), path, dynamo=True)`: batch fixed at 1, weights in `<name>.onnx.data`
beside the model), then runs, each as a separate `cora-onnx` process started from another working
directory:

    cora-onnx rewrite <model> --out <q> --bits 8 --act-bits 8 --calib <calib> --threads 1
    cora-onnx eval <model> --data <val> --class-map <map> --threads 1      (float)
    cora-onnx eval <q> --data <val> --class-map <map> --threads 1          (quantized)
    cora-onnx inspect <model>

and prints each command's output, the file sizes on disk (the external data counted) and the
top-1 figures. Run from a checkout with ../shared present:

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python tools/check_foreign_onnx.py [--workdir DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def export_dynamo_defaults(weights: Path, path: Path) -> None:
    import torch
    import torchvision

    torch.set_num_threads(1)
    m = torchvision.models.resnet18()
    m.load_state_dict(torch.load(weights, map_location="cpu"))
    m.eval()
    x = torch.zeros(1, 3, 224, 224)
    torch.onnx.export(m, (x,), str(path), dynamo=True)


def cli(args: list, cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "cora_onnx.cli.main", *map(str, args)]
    print("$ cora-onnx " + " ".join(map(str, args)), flush=True)
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    out = res.stdout + "".join(line + "\n" for line in res.stderr.splitlines() if "Traceback" in line or
                                line.startswith("error"))
    print(out.rstrip(), flush=True)
    if res.returncode != 0:
        raise SystemExit(f"exit code {res.returncode}:\n{res.stderr[-2000:]}")
    return res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, default=SHARED / "models" / "resnet18-imagenet.pt")
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "imagenette")
    ap.add_argument("--workdir", type=Path, default=None, help="Where the files go [a temporary folder].")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="Also write the figures as JSON here.")
    args = ap.parse_args()
    if not args.weights.is_file():
        raise SystemExit(f"{args.weights} not found (needs ../shared, see ../shared/README.md)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="foreign-onnx-"))
    (work / "export").mkdir(parents=True, exist_ok=True)
    elsewhere = work / "elsewhere"  # every command runs from here, not from the model's folder
    elsewhere.mkdir(exist_ok=True)
    model = work / "export" / "resnet18.onnx"
    export_dynamo_defaults(args.weights, model)
    files = {p.name: p.stat().st_size for p in sorted(model.parent.iterdir())}
    print(f"exported (dynamo defaults): {files}", flush=True)
    q = work / "resnet18-w8a8.onnx"
    t = ["--threads", args.threads]
    cmap = ["--class-map", args.data / "class_map.json"]
    rewrite_out = cli(["rewrite", model, "--out", q, "--bits", 8, "--act-bits", 8, "--calib", args.data / "calib",
                       "--report", work / "rewrite.json", *t], elsewhere)
    float_out = cli(["eval", model, "--data", args.data / "dev-val", *cmap, *t, "-q"], elsewhere)
    quant_out = cli(["eval", q, "--data", args.data / "dev-val", *cmap, *t, "-q"], elsewhere)
    cli(["inspect", model], elsewhere)
    top1 = {k: float(re.search(r"top-1 ([\d.]+)%", o).group(1)) for k, o in (("float", float_out), ("w8a8", quant_out))}
    rep = json.loads((work / "rewrite.json").read_text())
    result = {"export_files_bytes": files, "export_total_bytes": sum(files.values()),
              "rewrite_input_bytes": rep["input_bytes"], "rewrite_output_bytes": rep["output_bytes"],
              "top1_dev_val": top1, "integer_kernels": rep["activations"]["onnxruntime_kernels"]["integer"],
              "float_kernels": rep["activations"]["onnxruntime_kernels"]["float_compute"],
              "scheme": rep["activations"]["scheme"]["reason"], "rewrite_line": rewrite_out.splitlines()[0]}
    assert result["rewrite_input_bytes"] == result["export_total_bytes"], "rewrite did not count the external data"
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
