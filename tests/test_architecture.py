"""The layer rule of docs/architecture.md: the import contracts hold (import-linter, configured in
pyproject.toml), and the ONNX-side commands run end to end where torch cannot be imported."""

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    pytest.importorskip("importlinter", reason="import-linter is in the dev extra: pip install -e .[dev]")
    res = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                          "sys.exit(lint_imports_command())", "--no-cache"],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert re.search(r"Contracts: (\d+) kept, 0 broken", res.stdout) and " KEPT" in res.stdout



def test_every_module_sits_in_a_layer_folder():
    """A module's layer is the folder it sits in: cora_onnx's top holds only the package itself, and
    every layer folder named in the layers contract exists (a new folder must be placed in the order)."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    folders = {f"cora_onnx.{p.name}" for p in (ROOT / "cora_onnx").iterdir() if (p / "__init__.py").exists()}
    assert folders == {name for name in layers if name.startswith("cora_onnx.")}
    top = sorted(p.name for p in (ROOT / "cora_onnx").glob("*.py"))
    assert len(top) <= 8 and set(top) <= {"__init__.py", "__main__.py"}, top


def test_importing_passes_loads_only_the_ground_floor():
    """At run time too: `import passes` (every pass) loads from cora_onnx only its package
    __init__ (which imports nothing) and ground-floor modules, and neither torch nor ONNX Runtime."""
    code = ("import json, sys, passes; print(json.dumps(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('cora_onnx', 'torch', 'torchvision', 'onnxruntime'))))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    loaded = set(json.loads(res.stdout))
    assert {"cora_onnx", "cora_onnx.core.plan", "cora_onnx.core.errors", "cora_onnx.core.npgrid"} <= loaded
    assert {m for m in loaded if m not in ("cora_onnx", "cora_onnx.core") and not m.startswith("cora_onnx.core.")} == set()


@pytest.fixture(scope="module")
def blocked(tmp_path_factory):
    """Environment for a subprocess in which importing torch or torchvision fails (and is logged)."""
    d = tmp_path_factory.mktemp("no_torch")
    log = d / "attempts.log"
    for name in ("torch", "torchvision"):
        (d / name).mkdir()
        (d / name / "__init__.py").write_text(
            f"import os\nwith open(os.environ['CORA_TORCH_BLOCK_LOG'], 'a') as f:\n    f.write('{name}\\n')\n"
            f"raise ImportError('{name} is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(d), str(ROOT)]), "CORA_TORCH_BLOCK_LOG": str(log),
           "OMP_NUM_THREADS": "1"}
    return env, log


def _cli(env, *args):
    return subprocess.run([sys.executable, "-m", "cora_onnx.cli.main", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_blocker_blocks(blocked):
    env, log = blocked
    res = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "torch is blocked in this test" in res.stderr
    assert log.read_text() == "torch\n"
    log.unlink()


def test_onnx_commands_run_without_torch(blocked, digits, tmp_path):
    """rewrite (weight-only and with integer activations), eval, bench and inspect on a float ONNX
    file exported here (with torch, in this process), each run where torch cannot be imported."""
    from cora_onnx.torch.archs.digits import digits_cnn

    env, log = blocked
    net = digits_cnn()
    net.load_state_dict(torch.load(digits.weights))
    src = tmp_path / "float.onnx"
    from cora_onnx.core.modelfile import onnx_bytes
    from cora_onnx.torch.export import export_onnx

    src.write_bytes(onnx_bytes(export_onnx(net.eval(), 8)))  # the dynamo exporter: input "input", dynamic batch
    norm = ["--mean", ",".join(map(str, digits.mean)), "--std", ",".join(map(str, digits.std))]

    w8, a8 = tmp_path / "w8.onnx", tmp_path / "a8.onnx"
    res = _cli(env, "rewrite", src, "--out", w8, "--bits", 8, "--report", tmp_path / "w8.json", "--threads", 1, "-q")
    assert res.returncode == 0, res.stderr
    assert w8.is_file() and json.loads((tmp_path / "w8.json").read_text())["bits"] == 8
    res = _cli(env, "rewrite", src, "--out", a8, "--bits", 8, "--act-bits", 8, "--calib", digits.calib_dir, *norm,
               "--report", tmp_path / "a8.json", "--threads", 1, "-q")
    assert res.returncode == 0, res.stderr
    act = json.loads((tmp_path / "a8.json").read_text())["activations"]
    assert act["onnxruntime_kernels"]["integer"] >= 1

    accs = {}
    for f in (src, w8, a8):
        res = _cli(env, "eval", f, "--data", digits.val_dir, *norm, "--threads", 1, "-q")
        assert res.returncode == 0, res.stderr
        accs[f.stem] = float(re.search(r"top-1 ([\d.]+)%", res.stdout).group(1))
    assert accs["float"] > 80 and abs(accs["w8"] - accs["float"]) <= 2 and abs(accs["a8"] - accs["float"]) <= 5, accs

    res = _cli(env, "bench", src, w8, a8, "--runs", 3, "--warmup", 1, "--threads", 1, "--report", tmp_path / "b.json",
               "-q")
    assert res.returncode == 0, res.stderr
    bench = json.loads((tmp_path / "b.json").read_text())
    assert all(bench["latency"][str(f)]["batch_1"]["runs"] == 3 for f in (src, w8, a8)), bench
    assert bench["environment"]["torch"] == metadata.version("torch")  # from its metadata, not imported

    res = _cli(env, "inspect", a8, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["ops"].get("QuantizeLinear", 0) >= 1 and info["ops"].get("DequantizeLinear", 0) >= 1

    assert not log.exists(), log.read_text()  # the ONNX-side commands never tried to import torch

    for args in (["rewrite", "--help"], ["eval", "--help"], ["bench", "--help"], ["inspect", "--help"]):
        res = _cli(env, *args)
        assert res.returncode == 0 and "Usage:" in res.stdout, (args, res.stderr)
    assert not log.exists(), log.read_text()
    res = _cli(env, "--help")  # lists quantize, which tries torch
    assert res.returncode == 0 and "quantize   (unavailable: needs PyTorch)" in res.stdout, res.stderr
    log.unlink(missing_ok=True)


TORCH_COMMANDS = {
    "quantize": ["--bits", 4],
    "export": ["--model", "resnet18", "--weights", "w.pt", "--plan", "p.json", "--out", "e.onnx"],
    "import-pq": ["ckpt.pth", "--out", "e.onnx"],
    "sweep": ["config.toml", "--out", "sweep"],
}


@pytest.mark.parametrize("command", list(TORCH_COMMANDS))
def test_torch_commands_say_they_need_torch(blocked, command, tmp_path):
    """Where torch cannot be imported, each torch-side command is one line naming what it needs
    and how to install it, exit 2, and leaves no file (its --help still works)."""
    env, log = blocked
    res = subprocess.run([sys.executable, "-m", "cora_onnx.cli.main", command, *map(str, TORCH_COMMANDS[command])],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"error: {command} needs PyTorch, which cannot be imported here (torch is blocked in this test); install the "
        "CPU build with: pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"], res.stderr
    assert "Traceback" not in res.stderr and log.read_text().startswith("torch\n")
    assert list(tmp_path.iterdir()) == []
    log.unlink()
    if command != "quantize":  # quantize's options come from the (torch) search methods
        res = _cli(env, command, "--help")
        assert res.returncode == 0 and "Usage:" in res.stdout, res.stderr
        assert not log.exists(), log.read_text()


MAX_PARAMETERS = 12  # a run option is a field of cora_onnx.core.options.RunOptions, not one more parameter


def test_no_function_takes_more_than_twelve_parameters():
    """Run options travel as one RunOptions object: no function of the library (self and cls not
    counted, *args and **kwargs one each) takes more than MAX_PARAMETERS parameters."""
    import ast

    root = Path(__file__).resolve().parents[1]
    over = []
    for path in sorted([*root.joinpath("cora_onnx").rglob("*.py"), *root.joinpath("passes").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
                n = len(names) + (a.vararg is not None) + (a.kwarg is not None) - (names[:1] in (["self"], ["cls"]))
                if n > MAX_PARAMETERS:
                    over.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({n})")
    assert not over, over
