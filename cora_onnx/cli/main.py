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

from cora_onnx.core.errors import CoraError

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
    from cora_onnx.onnx.calibrate import CALIB_METHODS, DEFAULT_CALIB

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
    options from the search methods (torch), so it lives in cora_onnx.cli.quantize and the ONNX-side
    commands (rewrite, eval, bench, inspect) run without importing torch."""

    LAZY = {"quantize": "cora_onnx.cli.quantize"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.LAZY))

    def get_command(self, ctx: click.Context, name: str):
        if name in self.LAZY and name not in self.commands:
            try:
                command = getattr(importlib.import_module(self.LAZY[name]), name)
            except ImportError as exc:  # no torch: the command says so when used, the others run
                if not _no_torch(exc):
                    raise
                return _unavailable(name, exc)
            self.add_command(command, name)
        return super().get_command(ctx, name)


TORCH_INSTALL = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"


def _no_torch(exc: ImportError) -> bool:
    """Whether an ImportError means torch (or torchvision) cannot be imported."""
    return exc.name is None or exc.name.split(".")[0] in ("torch", "torchvision")


def _torch_refusal(name: str, exc: ImportError) -> None:
    click.echo(f"error: {name} needs PyTorch, which cannot be imported here ({exc}); install the CPU build with: "
               f"{TORCH_INSTALL}", err=True)
    sys.exit(2)


def _torch_side(name: str, module: str):
    """The torch-side module a command runs on; without torch, one line saying so, exit 2."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if not _no_torch(exc):
            raise
        _torch_refusal(name, exc)


def _unavailable(name: str, exc: ImportError) -> click.Command:
    def run(args) -> None:
        _torch_refusal(name, exc)

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
    run = _torch_side("import-pq", "cora_onnx.run.pq_import").import_pq
    from cora_onnx.onnx.data import IMAGENET_MEAN, IMAGENET_STD
    from cora_onnx.onnx.report import format_import_table

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
    from cora_onnx.core.errors import SettingsError, check_bits
    from cora_onnx.onnx.rewrite import rewrite_onnx
    from cora_onnx.core.options import parse_keep

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
    export_plan = _torch_side("export", "cora_onnx.run.api").export_plan
    from cora_onnx.torch.models import build_model
    from cora_onnx.core.plan import Plan

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
    from cora_onnx.onnx.evaluate import evaluate

    r = evaluate(onnx_model, list(data), class_map, input_size=input_size, crop_ratio=crop_ratio, mean=mean, std=std,
                 batch_size=batch_size, threads=threads, report=report)
    click.echo(f"{onnx_model}: top-1 {r['top1']:.2f}% on {r['images']} images" + (f" ({r['note']})" if r["note"] else ""))


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
    """Size and latency of ONNX models in one interleaved run: median and p10-p90 per batch size,
    the ratio to the first model, the CPU's features, and top-1 with --data."""
    _setup_logging(verbose, quiet)
    from cora_onnx.onnx.bench import bench as run, format_bench

    click.echo(format_bench(run(onnx_models, batches, runs, warmup, threads, fold_weight_dq, data, class_map, report)))


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
    _torch_side("sweep", "cora_onnx.run.api")  # every point runs cora_onnx.quantize
    from cora_onnx.run.sweeps import sweep as run

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
    from cora_onnx.onnx.inspection import format_inspection, inspect_file
    from cora_onnx.core.modelfile import read_model

    info = inspect_file(read_model(onnx_model))
    click.echo(json.dumps(info, indent=2) if as_json else format_inspection(info, str(onnx_model)))


if __name__ == "__main__":
    main()
