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
from cora_onnx.core.options import IMAGENET_MEAN, IMAGENET_STD

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


def run_option(name: str, extra_help: str = "", **overrides):
    """The click option of the run option `name` (a field of cora_onnx.core.options.RunOptions:
    its flag, help and type come from the field), under the field's name, so a command's options
    build RunOptions(**given) directly. overrides: click keywords of this command (default,
    help, type...); extra_help is added to the field's help. A tuple type is a click.Choice."""
    import dataclasses

    from cora_onnx.core.options import RunOptions

    f = {f.name: f for f in dataclasses.fields(RunOptions)}[name]
    kw = {"help": f.metadata["help"], **f.metadata["click"], **overrides}
    kw["help"] += extra_help
    if isinstance(kw.get("type"), tuple):
        kw["type"] = click.Choice(list(kw["type"]))
    if kw.get("type") is Path:
        kw["type"] = click.Path(path_type=Path)
    if "default" not in kw and not kw.get("multiple"):  # an empty tuple (no layers, no folders) is not given
        kw["default"] = f.default if f.default not in (dataclasses.MISSING, ()) else None
    return click.option(f.metadata["flag"], name, **kw)


def _options(*names: str, **overrides):
    """run_option for each name, in order (overrides: name -> click keywords)."""

    def decorate(fn):
        for name in reversed(names):
            fn = run_option(name, **overrides.get(name, {}))(fn)
        return fn

    return decorate


def _int8_options(fn):
    return _options("act_bits", "act_calib", "out_format")(fn)


def _preprocess_options(fn):
    """Preprocessing options; mean and std default to None: the model's own (or ImageNet's)."""
    return _options("input_size", "crop_ratio", "mean", "std", mean={"default": None}, std={"default": None})(fn)


class _UsageLine(click.ClickException):
    """A usage error shown as the library's errors are: one line `error: ...`, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class _LazyGroup(click.Group):
    """A group whose torch-side commands are imported when they are used: `quantize` builds its
    options from the search methods (torch), so it lives in cora_onnx.cli.quantize and the ONNX-side
    commands (rewrite, eval, bench, inspect) run without importing torch."""

    LAZY = {"quantize": "cora_onnx.cli.quantize"}

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # a command's bad option value or missing argument: one line
            raise _UsageLine(exc.format_message()) from None

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
@run_option("out", help="Output ONNX file [<checkpoint name>.onnx].")
@run_option("val", multiple=False, default=None, help="Labelled images, one folder per class: top-1 and parity.")
@run_option("calib", multiple=False, default=None, help="Images for parity when --val is not given.")
@_options("class_map", "report")
@_preprocess_options
@_options("batch_size", "latency_runs", "threads", "seed")
@_common_logging
@_guard
def import_pq(checkpoint, arch, verbose, quiet, **given):
    """Product-quantized checkpoint ("And the bit goes down" format) in, exact ONNX out: codes and
    codewords decoded in the graph, checked in ONNX Runtime against the decoded PyTorch model."""
    _setup_logging(verbose, quiet)
    from cora_onnx.core.options import RunOptions

    opts = RunOptions(**{**given, "out": given["out"] or Path(f"{Path(checkpoint).stem}.onnx"),
                         "mean": given["mean"] or IMAGENET_MEAN, "std": given["std"] or IMAGENET_STD})
    run = _torch_side("import-pq", "cora_onnx.run.pq_import").import_pq
    from cora_onnx.onnx.report import format_import_table

    result = run(checkpoint, arch, options=opts)
    click.echo(format_import_table(result.report))


@main.command()
@click.argument("onnx_in", type=click.Path(path_type=Path))
@run_option("out", required=True, help="Output model file.")
@run_option("bits", default=8, help="Weight bits of Conv and Gemm weights, 2-8.")
@run_option("calib", extra_help=" Needed with --act-bits.")
@run_option("keep", default="first,last", show_default=True, help="Layers kept at --keep-bits: first,last or none.")
@run_option("keep_bits", default=8, show_default=True)
@click.option("--clip", type=click.Choice(["mse", "minmax"]), default=None,
              help="Weight range search [mse below 7 bits, minmax at 7-8].")
@_int8_options
@run_option("weight_layout")
@_preprocess_options
@_options("threads", "report")
@_common_logging
@_guard
def rewrite(onnx_in, clip, verbose, quiet, **given):
    """Quantize a float ONNX model exported elsewhere (no PyTorch model): BatchNorm fusion, weight
    QDQ and, with --act-bits 8, calibrated activation QDQ for integer kernels."""
    _setup_logging(verbose, quiet)
    from cora_onnx.core.options import RunOptions
    from cora_onnx.onnx.rewrite import rewrite_onnx

    from cora_onnx.onnx.report import format_table

    res = rewrite_onnx(onnx_in, RunOptions(**given, method_options={"clip": clip}))
    click.echo(format_table(res.report))


@main.command()
@click.option("--model", "arch", required=True, help="Architecture the plan was made for.")
@click.option("--weights", type=click.Path(path_type=Path), required=True, help="state_dict file.")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), required=True, help="Plan saved by `quantize --plan-out`.")
@run_option("out", required=True, help="Output ONNX file.")
@run_option("input_size", help="Input size [from the plan].")
@run_option("out_format")
@run_option("weight_layout", help="decode or qdq (see quantize --weight-layout); auto: the plan's.")
@_common_logging
@_guard
def export(arch, weights, plan_path, verbose, quiet, **given):
    """Export a model with a saved plan applied (no search): the file `quantize --plan-out` wrote
    (weights, adapter layout, integer activations with their calibrated ranges, preprocessing)."""
    _setup_logging(verbose, quiet)
    from cora_onnx.core.options import RunOptions
    from cora_onnx.core.plan import Plan

    opts = RunOptions(**given, model_name=arch)
    export_plan = _torch_side("export", "cora_onnx.run.api").export_plan
    from cora_onnx.torch.models import build_model

    plan = Plan.load(plan_path)
    from cora_onnx.onnx.report import format_table

    click.echo(format_table(export_plan(build_model(arch, weights), plan, options=opts)))


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
