"""The `quantize` command (PyTorch model in, quantized ONNX model and report out). Its options
come from the registered search methods, which need torch: cora_onnx.cli.main loads this module only
when the command is used."""

from __future__ import annotations

from pathlib import Path

import click

from cora_onnx.cli.main import _common_logging, _guard, _int8_options, _preprocess_options, _setup_logging, log

__all__ = ["quantize"]


def _methods():
    from cora_onnx.torch.search import METHODS

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
            # None in a settings class means "the preset decides"
            defaults.append(f"{name}: {'preset' if f.default is None else f.default}")
    text = re.sub(r"\s*\[[^\]]*\]\.?$", "", o.help)
    return f"{text} [{'; '.join(defaults)}] ({', '.join(names)})"


def _method_settings(method: str, given: dict) -> dict:
    """Settings fields from the method options the user set; options of other methods are refused."""
    from cora_onnx.core.errors import SettingsError

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


DEPRECATED_ADAPTER_LAYOUTS = {"fold": "merge"}  # old name -> name; "fold" now means only constant folding


def _adapter_layout(value: str) -> str:
    """--adapter-layout: a deprecated name is accepted, said on stderr, and mapped to its new name."""
    if value in DEPRECATED_ADAPTER_LAYOUTS:
        new = DEPRECATED_ADAPTER_LAYOUTS[value]
        click.echo(f"warning: --adapter-layout {value} is deprecated, use --adapter-layout {new}", err=True)
        return new
    return value

@click.command()
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
@click.option("--float-out", type=click.Path(path_type=Path), default=None, help="Also write the float (BN-fused) ONNX model.")
@_method_options
@click.option("--keep", default=None, help="Layers kept at --keep-bits: any of first,last,depthwise, or none "
              "[rtn: first,last; cora: first,last,depthwise].")
@click.option("--keep-bits", type=int, default=None, help="Bits of the layers named by --keep [8].")
@_int8_options
@click.option("--adapter-layout", type=click.Choice(["auto", "branch", "merge", "fold"]), default="auto", show_default=True,
              callback=lambda ctx, param, value: _adapter_layout(value),
              help="CoRa adapters as branch convolutions beside each Conv, or (with --act-bits 8) merged into the Conv's "
                   "integer weight when ONNX Runtime loads the file (the file keeps the low-bit grid and the factors; no branch latency). auto: merge "
                   "with --act-bits, branch without. fold: deprecated name of merge.")
@_preprocess_options
@click.option("--batch-size", type=int, default=32, show_default=True, help="Batch size for evaluation.")
@click.option("--latency-runs", type=int, default=30, show_default=True, help="Timed runs per model (after 5 warm-up runs); 0 skips the timing.")
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
    from cora_onnx.run.api import quantize as run
    from cora_onnx.core.errors import SettingsError
    from cora_onnx.torch.models import build_model, default_normalization, packaged_weights
    from cora_onnx.torch.search import LayerSelection
    from cora_onnx.torch.search.layers import default_selection
    from cora_onnx.core.options import parse_keep

    if arch is None and weights is None and calib is None and val is None:
        from cora_onnx.torch.embedded import digits_default

        d = digits_default()
        arch, weights, calib, val = d.arch, d.weights, d.calib_dir, d.val_dir
        input_size = input_size or d.input_size
        mean = mean or ",".join(map(str, d.mean))
        std = std or ",".join(map(str, d.std))
        log.info("no model given: using the embedded default (%s on scikit-learn digits, cached in %s)",
                 d.arch, d.weights.parent)
    if arch is None:
        raise SettingsError("--model is required (a torchvision architecture name, efficientnet_lite0 or digits_cnn)")
    if weights is None:  # an architecture whose ImageNet weights come with a pip package
        try:
            weights = packaged_weights(arch)
        except FileNotFoundError as exc:
            raise SettingsError(f"--weights FILE is required with --model {arch} unless its package is installed: "
                                f"{exc}") from None
        if weights is not None:
            log.info("weights: %s (packaged with %s)", weights, arch)
    if weights is None:
        raise SettingsError("--weights FILE is required with --model")
    defaults = default_selection(_methods()[method].settings)
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
    from cora_onnx.onnx.report import format_table

    click.echo(format_table(result.report))
