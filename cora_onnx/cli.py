"""The `cora-onnx` command line (click). Library errors become one-line messages, exit code 2."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from .errors import CoraError

log = logging.getLogger("cora_onnx")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[cora-onnx] %(message)s"))
    root = logging.getLogger("cora_onnx")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _guard(fn):
    """Turn library errors into `error: ...` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CoraError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


def _common_logging(fn):
    fn = click.option("-v", "--verbose", count=True, help="More log output (debug).")(fn)
    return click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")(fn)


def _int8_options(fn):
    from .calibrate import CALIB_METHODS, DEFAULT_CALIB

    for opt in reversed([
        click.option("--act-bits", type=click.Choice(["8"]), default=None,
                     help="Integer activations (static, calibrated): quantized Conv/Gemm/Add run as ONNX Runtime integer "
                          "kernels; weights use the width this CPU's kernels take (7 bits on AVX2 without VNNI)."),
        click.option("--act-calib", type=click.Choice(list(CALIB_METHODS)), default=DEFAULT_CALIB, show_default=True,
                     help="Activation ranges: min/max, 99.99th percentile, or the histogram range of least 8-bit error."),
        click.option("--format", "out_format", type=click.Choice(["onnx", "ort"]), default="onnx", show_default=True,
                     help="Output format: ONNX, or ONNX Runtime's ORT format (mobile/minimal builds; operator report "
                          "in the JSON report)."),
    ]):
        fn = opt(fn)
    return fn


def _preprocess_options(fn):
    for opt in reversed([
        click.option("--input-size", type=int, default=None, help="Square input size in pixels [224; model default]."),
        click.option("--crop-ratio", type=float, default=1.0, show_default=True,
                     help="Resize the shorter side to input-size/crop-ratio, then center-crop (0.875 = classic eval)."),
        click.option("--mean", default=None, help="Normalization mean on a 0-1 pixel scale: 0.485,0.456,0.406 or 127/255."),
        click.option("--std", default=None, help="Normalization std on a 0-1 pixel scale: 0.229,0.224,0.225 or 128/255."),
    ]):
        fn = opt(fn)
    return fn


def _methods():
    from .search import METHODS

    return METHODS


def _option_table() -> dict[str, tuple]:
    """click parameter name -> (CliOption, methods declaring it), over every registered method."""
    table: dict[str, tuple] = {}
    for name, m in _methods().items():
        for o in m.options:
            pname = o.decls.split("/")[0].lstrip("-").replace("-", "_")
            prev = table.get(pname)
            if prev is not None and (prev[0].type != o.type or prev[0].field != o.field):
                raise RuntimeError(f"methods declare {o.decls} differently ({prev[1][0]} and {name})")
            table[pname] = (prev[0] if prev else o, (prev[1] if prev else ()) + (name,))
    return table


def _method_options(fn):
    """One click option per method option (default None: the method's settings default applies)."""
    for pname, (o, names) in reversed(list(_option_table().items())):
        kind = {"type": click.Choice(list(o.type))} if isinstance(o.type, tuple) else \
            ({} if o.type is bool else {"type": o.type})
        fn = click.option(o.decls, pname, default=None, help=_option_help(o, names), **kind)(fn)
    return fn


def _option_help(o, names: tuple[str, ...]) -> str:
    """An option's help; one declared by several methods shows each method's own default."""
    if len(names) == 1:
        return f"{o.help} ({names[0]})"
    import dataclasses
    import re

    defaults = []
    for name in names:
        f = {f.name: f for f in dataclasses.fields(_methods()[name].settings)}.get(o.field)
        if f is not None and f.default is not dataclasses.MISSING:
            defaults.append(f"{name}: {f.default}")
    text = re.sub(r"\s*\[[^\]]*\]\.?$", "", o.help)
    return f"{text} [{'; '.join(defaults)}] ({', '.join(names)})"


def _default_selection(settings_cls):
    import dataclasses

    from .search import LayerSelection

    f = {f.name: f for f in dataclasses.fields(settings_cls)}.get("selection")
    if f is not None and f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return LayerSelection()


def _method_settings(method: str, given: dict) -> dict:
    """Settings fields from the method options the user set; options of other methods are refused."""
    from .errors import SettingsError

    out = {}
    for pname, value in given.items():
        if value is None:
            continue
        o, names = _option_table()[pname]
        if method not in names:
            flag = o.decls.split("/")[0] if value is not False or "/" not in o.decls else "--" + o.decls.split("/--")[1]
            raise SettingsError(f"{flag} does not apply to --method {method} (it is an option of {', '.join(names)})")
        out[o.field] = o.convert(value) if o.convert else value
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cora-onnx")
def main() -> None:
    """Make ConvNets small (low-bit weights, CoRa adapters, product quantization) and verify them in ONNX Runtime."""


@main.command()
@click.option("--model", "arch", default=None, help="torchvision architecture (resnet18, ...), efficientnet_lite0 or digits_cnn. "
              "Without --model/--weights/--calib/--val: the embedded default (a digits ConvNet trained on first use).")
@click.option("--weights", type=click.Path(path_type=Path), default=None, help="state_dict file (or checkpoint with 'state_dict').")
@click.option("--calib", type=click.Path(path_type=Path), multiple=True,
              help="Calibration images: flat folder or one folder per class (repeatable: the folders are mixed).")
@click.option("--val", type=click.Path(path_type=Path), multiple=True,
              help="Labelled images, one folder per class, for top-1 (repeatable: the folders are mixed).")
@click.option("--class-map", type=click.Path(path_type=Path), default=None,
              help="JSON folder name -> class index, when --val's folders are a subset of the classes (not needed "
                   "for ImageNet WordNet-id folders with a 1000-class model: a built-in map applies).")
@click.option("--bits", type=int, default=4, show_default=True, help="Weight bits, 2-8.")
@click.option("--method", type=click.Choice(list(_methods())), default="rtn", show_default=True,
              help="Search method: " + "; ".join(f"{k}: {m.help}" for k, m in _methods().items()) + ".")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output ONNX file [<model>-<method>-w<bits>.onnx].")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Write the report as JSON here.")
@click.option("--plan-out", type=click.Path(path_type=Path), default=None, help="Save the plan (PLAN.json + PLAN.npz) for `export --plan`.")
@click.option("--float-out", type=click.Path(path_type=Path), default=None, help="Also write the float (BN-folded) ONNX model.")
@_method_options
@click.option("--keep", default=None, help="Layers kept at --keep-bits: any of first,last,depthwise, or none "
              "[rtn: first,last; cora: first,last,depthwise].")
@click.option("--keep-bits", type=int, default=None, help="Bits of the layers named by --keep [8].")
@_int8_options
@click.option("--adapter-layout", type=click.Choice(["auto", "branch", "fold"]), default="auto", show_default=True,
              help="CoRa adapters as branch convolutions beside each Conv, or (with --act-bits 8) folded into the Conv's "
                   "integer weight when ONNX Runtime loads the file (the file keeps the low-bit grid and the factors; no branch latency). auto: fold "
                   "with --act-bits, branch without.")
@_preprocess_options
@click.option("--batch-size", type=int, default=32, show_default=True, help="Batch size for evaluation.")
@click.option("--latency-runs", type=int, default=30, show_default=True, help="Timed runs per model (after 5 warm-up runs).")
@click.option("--latency-batch", type=int, default=None, help="Also time this batch size (batch 1 is always timed).")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads [all cores].")
@click.option("--seed", type=int, default=0, show_default=True)
@_common_logging
@_guard
def quantize(arch, weights, calib, val, class_map, bits, method, out, report, plan_out, float_out, keep, keep_bits,
             act_bits, act_calib, out_format, adapter_layout, input_size, crop_ratio, mean, std, batch_size, latency_runs,
             latency_batch, threads, seed, verbose, quiet, **method_cli):
    """Search, export and verify: PyTorch model in, quantized ONNX model and report out."""
    _setup_logging(verbose, quiet)
    calib, val = list(calib) or None, list(val) or None
    from .api import quantize as run
    from .errors import SettingsError
    from .models import build_model, default_normalization
    from .search import LayerSelection
    from .search.options import parse_keep

    if arch is None and weights is None and calib is None and val is None:
        from .embedded import digits_default

        d = digits_default()
        arch, weights, calib, val = d.arch, d.weights, d.calib_dir, d.val_dir
        input_size = input_size or d.input_size
        mean = mean or ",".join(map(str, d.mean))
        std = std or ",".join(map(str, d.std))
        log.info("no model given: using the embedded default (%s on scikit-learn digits, cached in %s)",
                 d.arch, d.weights.parent)
    if arch is None:
        raise SettingsError("--model is required (a torchvision architecture name, efficientnet_lite0 or digits_cnn)")
    if weights is None:
        raise SettingsError("--weights FILE is required with --model")
    defaults = _default_selection(_methods()[method].settings)
    selection = LayerSelection(keep=defaults.keep if keep is None else parse_keep(keep),
                               keep_bits=defaults.keep_bits if keep_bits is None else keep_bits)
    out = out or Path(f"{arch}-{method}-w{bits}{'a8' if act_bits else ''}.{out_format}")
    dmean, dstd = default_normalization(arch)
    model = build_model(arch, weights)
    options = {"selection": selection, **_method_settings(method, method_cli)}
    result = run(model, calib=calib, val=val, class_map=class_map, bits=bits, method=method, out=out,
                 mean=mean or dmean, std=std or dstd, input_size=input_size or 224, crop_ratio=crop_ratio,
                 report=report, plan_out=plan_out, float_out=float_out, model_name=arch, batch_size=batch_size,
                 latency_runs=latency_runs, latency_batch=latency_batch, threads=threads, seed=seed,
                 act_bits=int(act_bits) if act_bits else None, act_calib=act_calib, out_format=out_format, adapter_layout=adapter_layout, **options)
    from .report import format_table

    click.echo(format_table(result.report))


@main.command()
@click.argument("onnx_in", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output model file.")
@click.option("--bits", type=int, default=8, show_default=True, help="Weight bits, 2-8 (Conv and Gemm weights).")
@click.option("--calib", type=click.Path(path_type=Path), multiple=True,
              help="Calibration images (needed with --act-bits; repeatable: the folders are mixed).")
@click.option("--keep", default="first,last", show_default=True, help="Layers kept at --keep-bits: first,last or none.")
@click.option("--keep-bits", type=int, default=8, show_default=True, help="Bits of the layers named by --keep.")
@click.option("--clip", type=click.Choice(["mse", "minmax"]), default="mse", show_default=True, help="Weight range search.")
@_int8_options
@_preprocess_options
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads [all cores].")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Write the report as JSON here.")
@_common_logging
@_guard
def rewrite(onnx_in, out, bits, calib, keep, keep_bits, clip, act_bits, act_calib, out_format, input_size, crop_ratio,
            mean, std, threads, report, verbose, quiet):
    """Quantize a float ONNX model exported elsewhere (no PyTorch model): BatchNorm folding, weight
    QDQ and, with --act-bits 8, calibrated activation QDQ for integer kernels."""
    _setup_logging(verbose, quiet)
    from .errors import SettingsError
    from .rewrite import rewrite_onnx
    from .search.options import parse_keep

    kept = parse_keep(keep)
    if any(k not in ("first", "last") for k in kept):
        raise SettingsError(f"rewrite --keep takes first, last or none, got {keep!r}")
    if not 2 <= keep_bits <= 8:
        raise SettingsError(f"--keep-bits must be from 2 to 8, got {keep_bits}")
    res = rewrite_onnx(onnx_in, out, bits, act_bits=int(act_bits) if act_bits else None, calib=list(calib) or None,
                       act_calib=act_calib, mean=mean, std=std, input_size=input_size, crop_ratio=crop_ratio,
                       keep=kept, keep_bits=keep_bits, clip=clip, out_format=out_format, threads=threads, report=report)
    r = res.report
    line = (f"wrote {out} ({len(res.data) / 1e6:.2f} MB from {r['input_bytes'] / 1e6:.2f} MB, "
            f"{r['file_bits_per_weight']:.2f} file bits per weight; {len(r['layers'])} weights "
            f"at {r['bits']} bits, {r['batchnorm_folded']} BatchNorm folded")
    if "activations" in r:
        k = r["activations"]["onnxruntime_kernels"]
        line += f"; 8-bit activations: {k['integer']} integer kernels, {k['float_compute']} float Conv/Gemm/MatMul"
    click.echo(line + ")")


@main.command()
@click.option("--model", "arch", required=True, help="Architecture the plan was made for.")
@click.option("--weights", type=click.Path(path_type=Path), required=True, help="state_dict file.")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), required=True, help="Plan saved by `quantize --plan-out`.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output ONNX file.")
@click.option("--input-size", type=int, default=None, help="Input size [from the plan].")
@_common_logging
@_guard
def export(arch, weights, plan_path, out, input_size, verbose, quiet):
    """Export a model with a saved plan applied (no search)."""
    _setup_logging(verbose, quiet)
    from .api import export_plan
    from .models import build_model
    from .plan import Plan

    plan = Plan.load(plan_path)
    n = export_plan(build_model(arch, weights), plan, out, input_size)
    click.echo(f"wrote {out} ({n / 1e6:.2f} MB, {len(plan.layers)} planned layers)")


@main.command(name="eval")
@click.argument("onnx_model", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), required=True, multiple=True,
              help="Labelled folder, one folder per class (repeatable: the folders are mixed).")
@click.option("--class-map", type=click.Path(path_type=Path), default=None, help="JSON folder name -> class index.")
@_preprocess_options
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads [all cores].")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Write the result as JSON here.")
@_common_logging
@_guard
def eval_cmd(onnx_model, data, class_map, input_size, crop_ratio, mean, std, batch_size, threads, report, verbose, quiet):
    """Top-1 of an ONNX classifier on a labelled image folder, in ONNX Runtime."""
    _setup_logging(verbose, quiet)
    from .data import Preprocess, load_class_map, load_images, parse_floats
    from .io import check_output_path
    from .models import IMAGENET_MEAN, IMAGENET_STD
    from .report import write_report
    from .verify import load_onnx_bytes, predict_onnx, session, top1

    if report is not None:
        check_output_path(report, "report")
    blob = load_onnx_bytes(onnx_model)
    meta = _preprocess_meta(blob)
    sess = session(blob, threads=threads)
    shape = sess.get_inputs()[0].shape
    size = input_size or meta.get("input_size") or (shape[-1] if isinstance(shape[-1], int) else 224)
    pre = Preprocess(input_size=size, crop_ratio=crop_ratio,
                     mean=parse_floats(mean or meta.get("mean") or IMAGENET_MEAN, what="mean"),
                     std=parse_floats(std or meta.get("std") or IMAGENET_STD, what="std"))
    n_classes = sess.get_outputs()[0].shape[-1]
    images = load_images(list(data), pre, labelled=True, class_map=load_class_map(class_map) if class_map else None,
                         num_classes=n_classes if isinstance(n_classes, int) else None, what="data folder")
    acc = top1(predict_onnx(sess, images, batch_size), images.labels)
    result = {"model": str(onnx_model), "top1": acc, "images": len(images)}
    if report is not None:
        write_report(result, report)
    click.echo(f"{onnx_model}: top-1 {acc:.2f}% on {len(images)} images")


def _preprocess_meta(blob: bytes) -> dict:
    import onnx

    props = {p.key: p.value for p in onnx.load_from_string(blob).metadata_props}
    try:
        return json.loads(props.get("cora_onnx.preprocess", "{}"))
    except ValueError:
        return {}


@main.command()
@click.argument("onnx_models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--batch", "batches", type=int, multiple=True, default=(1,), show_default=True, help="Batch size (repeatable).")
@click.option("--runs", type=int, default=50, show_default=True, help="Timed runs per model and batch size.")
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads [all cores].")
@click.option("--fold-weight-dq", is_flag=True, help="Session config session.disable_quant_qdq=1: fold weight DequantizeLinear at load.")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Write the timings as JSON here.")
@click.option("--data", type=click.Path(path_type=Path), multiple=True,
              help="Labelled folder (one folder per class; repeatable): adds a top-1 column (preprocessing from each "
                   "model's metadata).")
@click.option("--class-map", type=click.Path(path_type=Path), default=None, help="JSON folder name -> class index for --data.")
@_common_logging
@_guard
def bench(onnx_models, batches, runs, warmup, threads, fold_weight_dq, report, data, class_map, verbose, quiet):
    """Latency of ONNX models in one interleaved run: median and p10-p90 per batch size, the
    ratio to the first model, and top-1 with --data."""
    _setup_logging(verbose, quiet)
    from .io import check_output_path
    from .report import environment, write_report
    from .verify import cpu_threads, load_onnx_bytes, measure_latency, session

    if report is not None:
        check_output_path(report, "report")
    if runs < 1 or warmup < 0 or any(b < 1 for b in batches):
        from .errors import SettingsError

        raise SettingsError("--runs must be >= 1, --warmup >= 0 and --batch >= 1")
    threads = threads or cpu_threads()
    sessions, shapes, blobs = {}, set(), {}
    for p in onnx_models:
        blobs[str(p)] = load_onnx_bytes(p)
        s = session(blobs[str(p)], threads=threads, fold_weight_dq=fold_weight_dq)
        sessions[str(p)] = s
        shapes.add(tuple(d if isinstance(d, int) else -1 for d in s.get_inputs()[0].shape[1:]))
    if len(shapes) != 1 or -1 in next(iter(shapes)):
        from .errors import OnnxModelError

        raise OnnxModelError(f"models need one fixed input shape (besides batch) to be compared, got {sorted(shapes)}")
    accuracy = _bench_top1(sessions, blobs, list(data), class_map) if data else {}
    res = measure_latency(sessions, next(iter(shapes)), batch_sizes=batches, warmup=warmup, runs=runs, threads=threads)
    width = max(len(k) for k in sessions)
    first = next(iter(sessions))
    head = f"{'model':<{width}}  " + "  ".join(f"{'batch ' + str(b) + ' median (p10-p90) ms':>34}  {'ratio':>6}"
                                              for b in batches)
    click.echo(head + ("  top-1" if accuracy else ""))
    for k in sessions:
        cells = [f"{res[k][f'batch_{b}']['median_ms']:8.2f} ({res[k][f'batch_{b}']['p10_ms']:.2f}-{res[k][f'batch_{b}']['p90_ms']:.2f})"
                 f"  {res[k][f'batch_{b}']['median_ms'] / res[first][f'batch_{b}']['median_ms']:5.2f}x"
                 for b in batches]
        row = f"{k:<{width}}  " + "  ".join(f"{c:>42}" for c in cells)
        click.echo(row + (f"  {accuracy[k]:.2f}%" if accuracy else ""))
    click.echo(f"{threads} threads, {runs} runs after {warmup} warm-up, interleaved; ratio = median / first model's")
    if report is not None:
        write_report({"latency": res, **({"top1": accuracy} if accuracy else {}), "environment": environment(threads)},
                     report)


def _bench_top1(sessions: dict, blobs: dict, data: list[Path], class_map: Path | None) -> dict:
    from .data import Preprocess, load_class_map, load_images, parse_floats
    from .models import IMAGENET_MEAN, IMAGENET_STD
    from .verify import predict_onnx, top1

    cmap = load_class_map(class_map) if class_map else None
    out = {}
    for k, s in sessions.items():
        meta = _preprocess_meta(blobs[k])
        pre = Preprocess(input_size=meta.get("input_size") or s.get_inputs()[0].shape[-1],
                         crop_ratio=meta.get("crop_ratio", 1.0),
                         mean=parse_floats(meta.get("mean") or IMAGENET_MEAN, what="mean"),
                         std=parse_floats(meta.get("std") or IMAGENET_STD, what="std"))
        n = s.get_outputs()[0].shape[-1]
        images = load_images(data, pre, labelled=True, class_map=cmap, num_classes=n if isinstance(n, int) else None,
                             what="data folder")
        out[k] = top1(predict_onnx(s, images), images.labels)
    return out


@main.command()
@click.argument("onnx_model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_guard
def inspect(onnx_model, as_json):
    """Operators, initializer dtypes and sizes, and what each cora-onnx pass added."""
    from .inspect import inspect_model, format_inspection
    from .verify import load_onnx_bytes

    info = inspect_model(load_onnx_bytes(onnx_model))
    click.echo(json.dumps(info, indent=2) if as_json else format_inspection(info, str(onnx_model)))


if __name__ == "__main__":
    main()
