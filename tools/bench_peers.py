"""W8A8 against the quantizers people reach for: ONNX Runtime's `quantize_static` and NNCF's
`nncf.quantize`, on the same calibration images, in one interleaved latency run (issue 28).

Models: ResNet-18 (../shared weights) and EfficientNet-Lite0 (packaged weights), scored against
their float model on ../shared/data/imagenet-sample/even (500 classes, one image each, resize and
centre crop 0.875): top-1 agreement with float and mean KL(float || quantized), then 1000-way
top-1; MobileNetV2 with random weights and BatchNorm statistics measured on 64 calibration images
(latency only: its decisions mean nothing). Every quantizer calibrates on the same images (the
1,600 of ../shared/data/imagenette/calib by default, preprocessed as the scored images).

Rows per model:
- float: the BN-fused float model;
- ort-static: `onnxruntime.quantization.quantize_static` (QDQ, per-channel s8 weights, u8
  activations, MinMax, reduce_range only on x86 without VNNI: the CPU-aware settings) on the
  model as `torch.onnx.export(..., dynamo=False)` writes it (GlobalAveragePool, Flatten: the
  export ONNX Runtime's tooling expects) after `quant_pre_process`;
- nncf: `nncf.quantize` (default preset) on the same legacy export, subset_size = all images;
- cora: `cora_onnx.quantize(method="rtn", bits=8, act_bits=8)` (its own dynamo export; weights
  at the CPU's integer width, activation ranges --act-calib minmax), as the CLI writes it; with
  --cora-calib more range methods are added as rows.

Latency: batch 1 and batch 8, plain sessions (`onnxruntime.InferenceSession(path, so)` with only
intra_op_num_threads = --threads, 2 by default), all files of all models interleaved round robin,
--runs rounds. Prints a markdown table per model with the commands' settings and the CPU features.

NNCF is a benchmark dependency only (`pip install -e ".[peers]"`), never imported by the library.

    python tools/bench_peers.py --dir DIR [--models resnet18 efficientnet_lite0 mobilenet_v2]
        [--calib-images 1600] [--runs 100] [--threads 2] [--torch-threads 1] [--out DIR/peers.json]
    python tools/bench_peers.py --dir DIR --reuse --runs 300     # time the files already made
    python tools/bench_peers.py --dir DIR --reuse --remake cora  # make our rows again, then time all
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from imagenette import SHARED, weights_path  # noqa: E402

REAL = ("resnet18", "efficientnet_lite0")
MODELS = REAL + ("mobilenet_v2",)


def log(msg: str) -> None:
    print(f"[bench_peers {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def images(arch: str, args):
    """(calibration ImageSet, scored ImageSet or None) with the architecture's normalization."""
    from cora_onnx.onnx.data import Preprocess, load_images
    from cora_onnx.torch.models import default_normalization

    mean, std = default_normalization(arch)
    pre = Preprocess(224, args.crop_ratio, mean, std)
    calib = load_images(args.shared / "data/imagenette/calib", pre, what="calibration folder")
    calib = calib.subset(args.calib_images, 0) if args.calib_images < len(calib) else calib
    val = load_images(args.shared / "data/imagenet-sample/even", pre, labelled=True, num_classes=1000,
                      what="scored folder") if arch in REAL else None
    return calib, val


def build_model(arch: str, calib, shared: Path):
    """The real-weight model, or (MobileNetV2) random weights, seed 0, with BatchNorm statistics
    measured on the first 64 calibration images."""
    import torch
    import torchvision

    from cora_onnx.torch.models import build_model as build, measure_batchnorm

    if arch in REAL:
        return build(arch, weights_path(arch, shared))
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)()
    return measure_batchnorm(model, (torch.from_numpy(b) for b in calib.batches(16)), max_images=64)


def calib_folder(calib, args) -> Path:
    """The calibration images as a folder for cora_onnx.quantize: the calibration folder itself, or
    (--calib-images below all) a folder of links to the same subset the peers calibrate on."""
    folder = args.shared / "data/imagenette/calib"
    if args.calib_images >= sum(1 for p in folder.rglob("*") if p.is_file()):
        return folder
    sub = args.dir / f"calib-{len(calib)}"
    sub.mkdir(exist_ok=True)
    for i, p in enumerate(calib.paths):
        link = sub / f"{i:05d}{Path(p).suffix}"
        if not link.exists():
            link.symlink_to(Path(p).resolve())
    return sub


def legacy_export(model, path: Path) -> None:
    """The export ONNX Runtime's and NNCF's tutorials use: TorchScript, opset 17, dynamic batch,
    then onnxruntime.quantization's pre-processing (shape inference, ORT basic optimizations)."""
    import torch
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from cora_onnx.torch.export import fuse_batchnorm

    raw = path.with_suffix(".raw.onnx")
    torch.onnx.export(fuse_batchnorm(model.eval(), 224), (torch.zeros(1, 3, 224, 224),), str(raw), dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    quant_pre_process(str(raw), str(path))
    raw.unlink()


def ort_static(src: Path, dst: Path, calib, scheme) -> dict:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = calib.batches(16)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"input": x}

    reduce_range = scheme.weight_bits == 7  # x86 without VNNI: u8 x s8 saturates unless weights use 7 bits
    # No CalibMaxIntermediateOutputs (it drops the buffered batches in ORT 1.32: docs/onnxruntime.md).
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return {"settings": f"QDQ, per-channel s8 weights, u8 activations, MinMax, reduce_range={reduce_range}"}


def nncf_quantize(src: Path, dst: Path, calib) -> dict:
    import nncf
    import numpy as np
    import onnx

    model = onnx.load(str(src))
    data = [x[None] for b in calib.batches(64) for x in b]  # one image per item, as NNCF's examples feed it
    dataset = nncf.Dataset(data, lambda x: {"input": np.ascontiguousarray(x)})
    q = nncf.quantize(model, dataset, subset_size=len(data))
    onnx.save(q, str(dst))
    return {"settings": f"nncf {nncf.__version__} default preset, subset_size={len(data)}"}


def cora(model, arch: str, dst: Path, args, calib_method: str, calib) -> dict:
    import cora_onnx
    from cora_onnx.torch.models import default_normalization

    from cora_onnx.core.errors import ParityError

    mean, std = default_normalization(arch)
    calib_dir = calib_folder(calib, args)
    try:
        res = cora_onnx.quantize(model, method="rtn", bits=8, act_bits=8, act_calib=calib_method, calib=calib_dir,
                                 out=dst, mean=mean, std=std, crop_ratio=args.crop_ratio, latency_runs=0,
                                 threads=args.threads, model_name=arch, parity_images=100)
    except ParityError as exc:
        if arch in REAL:
            raise
        # latency only (random weights): the refused file has the same graph; time it, say so
        failed = dst.with_name(dst.stem + ".failed.onnx")
        failed.replace(dst)
        return {"settings": f"cora_onnx.quantize(method='rtn', bits=8, act_bits=8, act_calib='{calib_method}')",
                "refused": " ".join(str(exc).split())[:300]}
    k = res.report["activations"]["onnxruntime_kernels"]
    return {"settings": f"cora_onnx.quantize(method='rtn', bits=8, act_bits=8, act_calib='{calib_method}'): "
                        f"{res.report['activations']['scheme']['reason']}",
            "kernels": {"integer": k["integer"], "float_compute": k["float_compute"]},
            "parity": res.report["parity"]}


def make(arch: str, args, scheme, only: tuple[str, ...] = ()) -> dict:
    """Write DIR/<arch>-<row>.onnx for every row (only: just these rows, the float and legacy
    files kept); returns row -> facts."""
    from cora_onnx.core.modelfile import onnx_bytes
    from cora_onnx.torch.export import export_onnx, fuse_batchnorm

    calib, _ = images(arch, args)
    if args.calib_images < 1600:
        log(f"{arch}: calibrating on {len(calib)} images (--calib-images)")
    model = build_model(arch, calib, args.shared)
    d = args.dir
    rows: dict[str, dict] = {}
    legacy = d / f"{arch}-legacy.onnx"
    if not only:
        (d / f"{arch}-float.onnx").write_bytes(onnx_bytes(export_onnx(fuse_batchnorm(model.eval(), 224), 224)))
        rows["float"] = {"settings": "BN-fused float (dynamo export)"}
        legacy_export(model, legacy)
    for name, fn in (("ort-static", lambda p: ort_static(legacy, p, calib, scheme)),
                     ("nncf", lambda p: nncf_quantize(legacy, p, calib)),
                     *((f"cora-{m}" if m != "minmax" else "cora", lambda p, m=m: cora(model, arch, p, args, m, calib))
                       for m in args.cora_calib)):
        if (name.startswith("nncf") and args.no_nncf) or (only and name not in only):
            continue
        t0 = time.perf_counter()
        log(f"{arch}: {name} ...")
        rows[name] = fn(d / f"{arch}-{name}.onnx")
        rows[name]["seconds"] = time.perf_counter() - t0
        log(f"{arch}: {name} done in {rows[name]['seconds']:.0f} s")
    return rows


def score(arch: str, rows: dict, args) -> None:
    """Agreement with float, KL, top-1 on the scored images (real-weight models), in ONNX Runtime."""
    from cora_onnx.onnx.verify import fidelity, predict_onnx, session, top1

    _, val = images(arch, args)
    if val is None:
        return
    ref = None
    for name in rows:
        s = session(str(args.dir / f"{arch}-{name}.onnx"), threads=args.threads)
        logits = predict_onnx(s, val, 50, f"{arch} {name}")
        ref = logits if ref is None else ref  # float first
        rows[name].update(fidelity=fidelity(logits, ref).to_json(), top1=top1(logits, val.labels))


def kernels(path: Path) -> dict:
    from cora_onnx.onnx.inspection import inspect_model

    info = inspect_model(path.read_bytes()).get("onnxruntime")
    if info is None or "error" in info:
        return {}
    return {"integer": info["integer_kernels"], "float_ops": [f["op"] for f in info["float_ops"]
                                                              if f["after_first_quantize"]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--calib-images", type=int, default=1600)
    ap.add_argument("--crop-ratio", type=float, default=0.875)
    ap.add_argument("--cora-calib", nargs="+", default=["minmax"], choices=["minmax", "percentile", "mse"])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--no-nncf", action="store_true", help="skip NNCF (not installed)")
    ap.add_argument("--reuse", action="store_true", help="time and score the files already in --dir "
                                                         "(facts from --dir/peers.json)")
    ap.add_argument("--remake", nargs="+", default=[], metavar="ROW",
                    help="with --reuse: make these rows' files again first (e.g. cora after a change)")
    ap.add_argument("--out", type=Path, default=None, help="JSON of every figure [--dir/peers.json]")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import onnxruntime as ort
    import torch

    from cora_onnx.onnx.int8 import choose_scheme
    from cora_onnx.onnx.report import cpu_flags, describe_cpu
    from cora_onnx.onnx.verify import measure_latency

    torch.set_num_threads(args.torch_threads)
    args.dir.mkdir(parents=True, exist_ok=True)
    out = args.out or args.dir / "peers.json"
    scheme = choose_scheme()
    log(f"cpu: {describe_cpu()}; onnxruntime {ort.__version__}; scheme: {scheme.reason}")
    facts = json.loads(out.read_text())["models"] if args.reuse and out.exists() else {}
    for arch in args.models:
        if not args.reuse:
            facts[arch] = make(arch, args, scheme)
        elif args.remake:
            facts.setdefault(arch, {}).update(make(arch, args, scheme, tuple(args.remake)))
        if args.reuse and arch not in facts:  # files of a run that stopped before writing its JSON: rows from the file names
            names = ["float", "ort-static", "nncf", "cora"] + [f"cora-{m}" for m in args.cora_calib if m != "minmax"]
            facts[arch] = {n: {} for n in names if (args.dir / f"{arch}-{n}.onnx").exists()}
        score(arch, facts[arch], args)
        for name, row in facts[arch].items():
            row.update(bytes=(args.dir / f"{arch}-{name}.onnx").stat().st_size,
                       runtime=kernels(args.dir / f"{arch}-{name}.onnx"))
    sessions = {}
    for arch in args.models:
        for name in facts[arch]:
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            sessions[f"{arch}/{name}"] = ort.InferenceSession(str(args.dir / f"{arch}-{name}.onnx"), so)
    log(f"latency: {len(sessions)} files, {args.runs} interleaved rounds per batch size, {args.threads} threads")
    lat = measure_latency(sessions, (3, 224, 224), batch_sizes=tuple(args.batches), warmup=args.warmup,
                          runs=args.runs, threads=args.threads)
    for key, s in sessions.items():
        arch, name = key.split("/")
        facts[arch][name]["latency"] = lat[key]
    out.write_text(json.dumps({"cpu": cpu_flags(), "cpu_text": describe_cpu(), "onnxruntime": ort.__version__,
                               "runs": args.runs, "threads": args.threads, "calib_images": args.calib_images,
                               "models": facts}, indent=1))
    print(f"\ncpu: {describe_cpu()}; onnxruntime {ort.__version__}; {args.threads} threads, plain sessions; "
          f"{args.runs} interleaved rounds; calibration on {args.calib_images} images\n")
    for arch in args.models:
        print(table(arch, facts[arch], args.batches))
    return 0


def table(arch: str, rows: dict, batches) -> str:
    lines = [f"\n{arch}\n", "| row | agreement with float | KL | top-1 | MB | " +
             " | ".join(f"batch {b} ms (p10-p90) | x float | x fastest peer" for b in batches) +
             " | integer kernels | float ops after the first quantize |",
             "|" + " --- |" * (7 + 3 * len(batches))]
    peers = [n for n in rows if n in ("ort-static", "nncf")]
    for name, r in rows.items():
        fid = r.get("fidelity")
        cells = [f"{fid['top1_agreement']:.1f}%" if fid else "-", f"{fid['kl_divergence']:.4f}" if fid else "-",
                 f"{r['top1']:.1f}%" if fid else "-", f"{r['bytes'] / 1e6:.2f}"]
        for b in batches:
            t = r["latency"][f"batch_{b}"]
            f = rows["float"]["latency"][f"batch_{b}"]["median_ms"]
            best = min((rows[p]["latency"][f"batch_{b}"]["median_ms"] for p in peers), default=None)
            cells += [f"{t['median_ms']:.2f} ({t['p10_ms']:.2f}-{t['p90_ms']:.2f})", f"{t['median_ms'] / f:.3f}",
                      f"{t['median_ms'] / best:.3f}" if best else "-"]
        rt = r.get("runtime") or {}
        cells += [str(rt.get("integer", "-")), ", ".join(rt.get("float_ops", [])) or "none"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [f"\nnote: {name}: cora-onnx refused its own file ({r['refused']}); timed anyway (latency only)"
              for name, r in rows.items() if r.get("refused")]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
