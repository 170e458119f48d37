"""The `cora-onnx` command line (click). Library errors become one-line messages, exit code 2
(3 when the written model fails its parity check against PyTorch)."""

from __future__ import annotations

import functools
import importlib
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
    """Turn library errors into `error: ...` on stderr and their exit code (2 for bad input, 3 when
    ONNX Runtime disagrees with PyTorch)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CoraError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

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


class _LazyGroup(click.Group):
    """A group whose torch-side commands are imported when they are used: `quantize` builds its
    options from the search methods (torch), so it lives in cora_onnx.cli_quantize and the ONNX-side
    commands (rewrite, eval, bench, inspect) run without importing torch."""

    LAZY = {"quantize": "cora_onnx.cli_quantize"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.LAZY))

    def get_command(self, ctx: click.Context, name: str):
        if name in self.LAZY and name not in self.commands:
            try:
                command = getattr(importlib.import_module(self.LAZY[name]), name)
            except ImportError as exc:  # no torch: the command says so when used, the others run
                if exc.name is not None and exc.name.split(".")[0] not in ("torch", "torchvision"):
                    raise
                return _unavailable(name, exc)
            self.add_command(command, name)
        return super().get_command(ctx, name)


def _unavailable(name: str, exc: ImportError) -> click.Command:
    def run(args) -> None:
        click.echo(f"error: {name} needs PyTorch, which cannot be imported here ({exc})", err=True)
        sys.exit(2)

    return click.Command(name, callback=run, help=f"(unavailable: needs PyTorch) {exc}", add_help_option=False,
                         params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)],
                         context_settings={"ignore_unknown_options": True})


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cora-onnx")
def main() -> None:
    """Make ConvNets small (low-bit weights, CoRa adapters, product quantization) and verify them in ONNX Runtime."""


@main.command(name="import-pq")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--model", "arch", default="resnet18", show_default=True,
              help="Architecture of the checkpoint: resnet18, resnet34 or resnet50 (torchvision).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output ONNX file [<checkpoint name>.onnx].")
@click.option("--val", type=click.Path(path_type=Path), default=None, help="Labelled images, one folder per class: top-1 and parity.")
@click.option("--calib", type=click.Path(path_type=Path), default=None, help="Images for parity when --val is not given.")
@click.option("--class-map", type=click.Path(path_type=Path), default=None, help="JSON folder name -> class index, when --val's folders are a subset of the classes.")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Write the report as JSON here.")
@_preprocess_options
@click.option("--batch-size", type=int, default=32, show_default=True, help="Batch size for evaluation.")
@click.option("--latency-runs", type=int, default=30, show_default=True, help="Timed runs per model (after 5 warm-up runs).")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads [all cores].")
@click.option("--seed", type=int, default=0, show_default=True)
@_common_logging
@_guard
def import_pq(checkpoint, arch, out, val, calib, class_map, report, input_size, crop_ratio, mean, std, batch_size,
              latency_runs, threads, seed, verbose, quiet):
    """Product-quantized checkpoint ("And the bit goes down" format) in, exact ONNX out: codes and
    codewords decoded in the graph, checked in ONNX Runtime against the decoded PyTorch model."""
    _setup_logging(verbose, quiet)
    from .data import IMAGENET_MEAN, IMAGENET_STD
    from .pq_import import import_pq as run
    from .report import format_import_table

    out = out or Path(f"{Path(checkpoint).stem}.onnx")
    result = run(checkpoint, arch, out, val=val, calib=calib, class_map=class_map, input_size=input_size or 224,
                 crop_ratio=crop_ratio, mean=mean or IMAGENET_MEAN, std=std or IMAGENET_STD, report=report,
                 batch_size=batch_size, latency_runs=latency_runs, threads=threads, seed=seed)
    click.echo(format_import_table(result.report))


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
    """Quantize a float ONNX model exported elsewhere (no PyTorch model): BatchNorm fusion, weight
    QDQ and, with --act-bits 8, calibrated activation QDQ for integer kernels."""
    _setup_logging(verbose, quiet)
    from .errors import SettingsError, check_bits
    from .rewrite import rewrite_onnx
    from .options import parse_keep

    kept = parse_keep(keep)
    if any(k not in ("first", "last") for k in kept):
        raise SettingsError(f"rewrite --keep takes first, last or none, got {keep!r}")
    check_bits(keep_bits, "--keep-bits")
    res = rewrite_onnx(onnx_in, out, bits, act_bits=int(act_bits) if act_bits else None, calib=list(calib) or None,
                       act_calib=act_calib, mean=mean, std=std, input_size=input_size, crop_ratio=crop_ratio,
                       keep=kept, keep_bits=keep_bits, clip=clip, out_format=out_format, threads=threads, report=report)
    r = res.report
    src_ext = " with its external data" if r.get("input_external_data") else ""
    out_ext = f" + {r['external_data']['file']}" if r.get("external_data") else ""
    line = (f"wrote {out}{out_ext} ({r['output_bytes'] / 1e6:.2f} MB from {r['input_bytes'] / 1e6:.2f} MB{src_ext}, "
            f"{r['file_bits_per_weight']:.2f} file bits per weight; "
            f"{len(r['layers'])} weights at {r['bits']} bits, {r['batchnorm_fused']} BatchNorm fused")
    if "activations" in r:
        k = r["activations"]["onnxruntime_kernels"]
        line += f"; 8-bit activations: {k['integer']} integer kernels, {k['float_compute']} float Conv/Gemm/MatMul"
    click.echo(line + ")")
    if r.get("opset_upgrade"):
        u = r["opset_upgrade"]
        click.echo(f"note: opset {u['from']} upgraded to {u['to']} (onnx.version_converter); the upgraded float model "
                   f"matches the original in ONNX Runtime on {u['check_images']} random images "
                   f"(max |diff| {u['max_abs_diff']:.2g})")
    t = r["input_tensor"]
    if t["layout"] == "NHWC" or t["fixed_batch"] is not None:
        notes = (["NHWC input"] if t["layout"] == "NHWC" else []) + \
            ([f"batch fixed at {t['fixed_batch']} in the model (kept; calibration ran {t['fixed_batch']} image(s) at a "
              "time)"] if t["fixed_batch"] is not None else [])
        click.echo(f"note: input {t['name']!r}: " + "; ".join(notes))


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
    from .data import load_class_map
    from .io import check_output_path
    from .modelfile import read_model
    from .report import write_report
    from .verify import image_input, predict_onnx, session, top1

    if report is not None:
        check_output_path(report, "report")
    mf = read_model(onnx_model)
    sess = session(mf, threads=threads)
    spec = image_input(sess, str(onnx_model))
    pre = _model_preprocess(sess, spec, str(onnx_model), input_size=input_size, crop_ratio=crop_ratio, mean=mean,
                            std=std)
    cmap = load_class_map(class_map) if class_map else None
    images = _classifier_images(sess, str(onnx_model), list(data), pre, cmap)
    acc = top1(_classifier_logits(predict_onnx(sess, images, batch_size), images.labels, str(onnx_model), data),
               images.labels)
    result = {"model": str(onnx_model), "format": mf.format, "top1": acc, "images": len(images),
              "input": {"name": spec.name, "layout": spec.layout, "fixed_batch": spec.batch}}
    if report is not None:
        write_report(result, report)
    note = spec.describe()
    click.echo(f"{onnx_model}: top-1 {acc:.2f}% on {len(images)} images" + (f" ({note})" if note else ""))


def _preprocess_meta(sess) -> dict:
    """The preprocessing cora-onnx stored in the model's metadata (ONNX or ORT format), or {}."""
    props = sess.get_modelmeta().custom_metadata_map
    try:
        meta = json.loads(props.get("cora_onnx.preprocess", "{}"))
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _model_preprocess(sess, spec, what: str, *, input_size=None, crop_ratio=None, mean=None, std=None):
    """Preprocess for a session: options first, then the model's metadata, then its input shape
    (ImageNet mean/std and 224 px when nothing says otherwise). An --input-size the model's
    fixed input cannot take is a SettingsError."""
    from .data import Preprocess, parse_floats
    from .errors import SettingsError
    from .data import IMAGENET_MEAN, IMAGENET_STD

    meta = _preprocess_meta(sess)
    size = input_size or meta.get("input_size") or spec.size or 224
    if spec.size is not None and size != spec.size:
        raise SettingsError(f"{what} takes {spec.size}x{spec.size} images (fixed in the model), got input size {size}")
    return Preprocess(input_size=int(size), crop_ratio=crop_ratio if crop_ratio is not None else
                      float(meta.get("crop_ratio", 1.0)),
                      mean=parse_floats(mean or meta.get("mean") or IMAGENET_MEAN, what="mean"),
                      std=parse_floats(std or meta.get("std") or IMAGENET_STD, what="std"))


def _classifier_images(sess, what: str, data: Path, pre, cmap: dict | None):
    """The labelled images of `data` for a classifier session: DataError naming the model when its
    output is not N x classes logits covering the classes of the folder."""
    from .data import load_images
    from .errors import DataError

    out = sess.get_outputs()[0]
    shape = out.shape
    if shape is not None and len(shape) != 2:
        raise DataError(f"{what}: output {out.name!r} has shape {list(shape)}, not N x classes logits: the model is "
                        f"not a classifier, so it has no top-1 on {data}")
    n = shape[-1] if shape and isinstance(shape[-1], int) else None
    roots = [Path(d) for d in (data if isinstance(data, (list, tuple)) else [data])]
    data = ", ".join(map(str, roots))
    if n is not None and cmap is not None:
        folders = [d.name for r in roots if r.is_dir() for d in r.iterdir() if d.is_dir() and d.name in cmap]
        top = max((cmap[f] for f in folders), default=-1)
        if top >= n:
            raise DataError(f"{what}: output {out.name!r} gives {n} values per image, so it is not a classifier over "
                            f"the classes of {data} (class map indices up to {top})")
    return load_images(roots if len(roots) > 1 else roots[0], pre, labelled=True, class_map=cmap, num_classes=n,
                       what="data folder")


def _classifier_logits(logits, labels, what: str, data):
    from .errors import DataError

    if logits.ndim != 2:
        raise DataError(f"{what}: output has shape {list(logits.shape)}, not N x classes logits: the model is not a "
                        "classifier")
    if int(labels.max()) >= logits.shape[1]:
        raise DataError(f"{what}: output gives {logits.shape[1]} values per image, so it is not a classifier over the "
                        f"classes of {data} (labels up to {int(labels.max())})")
    return logits


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
    from .modelfile import read_model
    from .verify import cpu_threads, image_input, measure_latency, session

    if report is not None:
        check_output_path(report, "report")
    if runs < 1 or warmup < 0 or any(b < 1 for b in batches):
        from .errors import SettingsError

        raise SettingsError("--runs must be >= 1, --warmup >= 0 and --batch >= 1")
    threads = threads or cpu_threads()
    sessions, shapes, specs, notes = {}, set(), {}, []
    for p in onnx_models:
        s = session(read_model(p), threads=threads, fold_weight_dq=fold_weight_dq)
        sessions[str(p)] = s
        specs[str(p)] = spec = image_input(s, str(p))
        shapes.add(tuple(d if isinstance(d, int) else -1 for d in s.get_inputs()[0].shape[1:]))
        if spec.batch is not None and any(b != spec.batch for b in batches):
            from .errors import SettingsError

            raise SettingsError(f"{p}: the batch size is fixed at {spec.batch} in the model; it cannot be timed at "
                                f"--batch {', '.join(str(b) for b in batches if b != spec.batch)}")
        if spec.describe():
            notes.append(f"{p}: {spec.describe()}")
    if len(shapes) != 1 or -1 in next(iter(shapes)):
        from .errors import OnnxModelError

        raise OnnxModelError(f"models need one fixed input shape (besides batch) to be compared, got {sorted(shapes)}")
    accuracy = _bench_top1(sessions, specs, list(data), class_map) if data else {}
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
    for note in notes:
        click.echo(f"note: {note}")
    if report is not None:
        write_report({"latency": res, **({"top1": accuracy} if accuracy else {}), "environment": environment(threads)},
                     report)


def _bench_top1(sessions: dict, specs: dict, data: list[Path], class_map: Path | None) -> dict:
    from .data import load_class_map
    from .verify import predict_onnx, top1

    cmap = load_class_map(class_map) if class_map else None
    out = {}
    for k, s in sessions.items():
        images = _classifier_images(s, k, data, _model_preprocess(s, specs[k], k), cmap)
        out[k] = top1(_classifier_logits(predict_onnx(s, images), images.labels, k, data), images.labels)
    return out


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder [the config's out, else sweep-<config name>]; a rerun into it resumes.")
@click.option("--executor", type=click.Choice(["inprocess", "ray"]), default="inprocess", show_default=True,
              help="Run the points one after another here, or one Ray task per point (pip install 'cora-onnx[ray]').")
@click.option("--address", default=None, help="Address of an existing Ray cluster [start a local Ray].")
@_common_logging
@_guard
def sweep(config, out, executor, address, verbose, quiet):
    """Run many quantize points on one model (a TOML config: model, data, [grid] and/or [[points]]):
    one ONNX file and report per point, results.jsonl, a table, sweep.png and sweep.html."""
    _setup_logging(verbose, quiet)
    from .sweeps import sweep as run

    res = run(config, out, executor=executor, address=address)
    click.echo(res.table)
    click.echo("wrote " + ", ".join(str(p) for p in res.files.values()))


@main.command()
@click.argument("onnx_model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_guard
def inspect(onnx_model, as_json):
    """Operators, initializer dtypes and sizes, and what each cora-onnx pass added (ONNX with its
    external data files, or an ORT-format file)."""
    from .inspect import format_inspection, inspect_file
    from .modelfile import read_model

    info = inspect_file(read_model(onnx_model))
    click.echo(json.dumps(info, indent=2) if as_json else format_inspection(info, str(onnx_model)))


if __name__ == "__main__":
    main()
