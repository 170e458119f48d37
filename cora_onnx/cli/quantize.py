"""The `quantize` command (PyTorch model in, quantized ONNX model and report out). Its options
come from the registered search methods, which need torch: cora_onnx.cli.main loads this module only
when the command is used."""

from __future__ import annotations

from pathlib import Path

import click

from cora_onnx.cli.main import (_common_logging, _guard, _int8_options, _options, _preprocess_options, _setup_logging, log,
                                run_option)

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
        settings = _methods()[name].settings
        f = {f.name: f for f in dataclasses.fields(settings)}.get(o.field)
        if f is not None and f.default is not dataclasses.MISSING:
            # None in a settings class means "the preset decides", or what its NONE_MEANS says
            shown = getattr(settings, "NONE_MEANS", {}).get(o.field, "preset") if f.default is None else f.default
            defaults.append(f"{name}: {shown}")
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
            if method == "auto":
                raise SettingsError(f"{flag} does not apply with a size target, which chooses every layer's encoding "
                                    f"itself (it is an option of {', '.join(names)})")
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
@click.option("--model", "arch", default=None, help="torchvision architecture (resnet18, ...), efficientnet_lite0/1/2 or digits_cnn. "
              "Without --model/--weights/--calib/--val: the embedded default (a digits ConvNet trained on first use).")
@click.option("--weights", type=click.Path(path_type=Path), default=None, help="state_dict file (or checkpoint with 'state_dict').")
@_options("calib", "val", "class_map", "bits")
@run_option("method", type=click.Choice(list(_methods())), default=None,
            help="Search method [rtn; auto with a size target]: " + "; ".join(f"{k}: {m.help}" for k, m in
                                                                            _methods().items()) + ".")
@_options("target_ratio", "target_size")
@run_option("out", help="Output ONNX file [<model>-<method>-w<bits>.onnx].")
@_options("report", "plan_out", "float_out")
@_method_options
@run_option("keep", help="Layers kept at --keep-bits: any of first,last,depthwise, or none [rtn: first,last; cora: "
            "first,last,depthwise].")
@run_option("keep_bits")
@run_option("skip", default=None)
@_int8_options
@run_option("adapter_layout", type=click.Choice(["auto", "branch", "merge", "fold"]),
            callback=lambda ctx, param, value: _adapter_layout(value),
            extra_help=" fold: deprecated name of merge.")
@run_option("weight_layout")
@_preprocess_options
@_options("batch_size", "latency_runs", "latency_batch", "threads", "seed")
@_common_logging
@_guard
def quantize(arch, weights, verbose, quiet, **given):
    """Search, export and verify: PyTorch model in, quantized ONNX model and report out."""
    _setup_logging(verbose, quiet)
    from cora_onnx.core.errors import SettingsError
    from cora_onnx.core.options import RunOptions
    from cora_onnx.run.api import quantize as run
    from cora_onnx.run.stages import check_options
    from cora_onnx.torch.models import build_model, default_input_size, default_normalization, packaged_weights

    method_cli = {k: given.pop(k) for k in _option_table()}
    if arch is None and weights is None and not given["calib"] and not given["val"]:
        from cora_onnx.torch.embedded import digits_default

        d = digits_default()
        arch, weights, given["calib"], given["val"] = d.arch, d.weights, (d.calib_dir,), (d.val_dir,)
        given["input_size"] = given["input_size"] or d.input_size
        given["mean"], given["std"] = given["mean"] or d.mean, given["std"] or d.std
        log.info("no model given: using the embedded default (%s on scikit-learn digits, cached in %s)",
                 d.arch, d.weights.parent)
    if arch is None:
        raise SettingsError("--model is required (a torchvision architecture name, efficientnet_lite0 or digits_cnn)")
    dmean, dstd = default_normalization(arch)
    given["input_size"] = given["input_size"] or default_input_size(arch)
    method = given["method"] or "rtn"
    targeted = given["target_ratio"] is not None or given["target_size"] is not None
    tag = f"{given['target_ratio']:g}x" if given["target_ratio"] is not None else str(given["target_size"] or "")
    out = given["out"] or Path(f"{arch}-{given['method'] or 'auto'}-{tag.replace(' ', '')}.{given['out_format']}"
                               if targeted else
                               f"{arch}-{method}-w{given['bits']}{'a8' if given['act_bits'] else ''}."
                               f"{given['out_format']}")
    # every option is checked here, before the weights load
    opts = check_options(RunOptions(**{**given, "out": out, "mean": given["mean"] or dmean,
                                       "std": given["std"] or dstd, "model_name": arch,
                                       "method_options": _method_settings("auto" if targeted else method,
                                                                          method_cli)}))
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
    result = run(build_model(arch, weights), opts)
    from cora_onnx.onnx.report import format_table

    click.echo(format_table(result.report))
