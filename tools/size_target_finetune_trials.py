"""Fine-tuning variants of the size-targeted search on one fitted choice (issue 26), EfficientNet-Lite0.

Reads the measured menu cached by `tools/size_target_probe.py --model efficientnet_lite0 --cache
/tmp/tgt/probe/lite0-measured.pt` (the path below), chooses the encodings for RATIO exactly as
`cora-onnx quantize --target-ratio RATIO` does, fits them once (kept in /tmp/ft15/fit-RATIO.pt
and reused), then for every VARIANT (a JSON dict of AutoSettings fields, e.g.
'{"finetune_steps":150,"distill":"kl"}') fine-tunes a copy and scores the PyTorch model on
imagenet-sample/even (crop 0.875): agreement with float, KL, top-1. Rows go to stdout and
/tmp/ft15/rows.jsonl. In the environment: COSINE=N, the learning rate decays on a cosine over N
steps; TEMPERATURE=T, the KL loss at temperature T; FREEZE=a,b, those layers are not fine-tuned.

    mkdir -p /tmp/ft15 && python tools/size_target_finetune_trials.py THREADS RATIO VARIANT...
"""
import copy, dataclasses, json, logging, sys, tempfile, time
from pathlib import Path
import torch
sys.argv_orig = list(sys.argv)
from cora_onnx.core.budget import choose
from cora_onnx.core.encoding import Encoding
from cora_onnx.onnx.data import load_class_map, load_images
from cora_onnx.onnx.verify import fidelity, top1
from cora_onnx.run.stages import check_options, size_budget
from cora_onnx.torch.models import build_model, default_normalization, packaged_weights
from cora_onnx.core.plan import Plan
from cora_onnx.torch.export import apply_plan_torch, quantizable_layers
from cora_onnx.torch.search.auto import finetune_choice, fit_choice, harm_table, plan_layers
from cora_onnx.torch.verify import predict_torch
logging.basicConfig(level=logging.INFO, format="[ft] %(message)s", stream=sys.stderr)
torch.set_num_threads(int(sys.argv[1]))
ratio = float(sys.argv[2])
variants = [json.loads(v) for v in sys.argv[3:]]
import math, os
if os.environ.get("COSINE"):
    _Adam = torch.optim.Adam
    class CosAdam(_Adam):
        def __init__(self, groups, **kw):
            super().__init__(groups, **kw); self.base = [g["lr"] for g in self.param_groups]; self.t = 0
            self.T = int(os.environ["COSINE"])
        def step(self, closure=None):
            f = 0.5 * (1 + math.cos(math.pi * self.t / self.T))
            for g, b in zip(self.param_groups, self.base): g["lr"] = b * f
            self.t += 1
            return super().step(closure)
    torch.optim.Adam = CosAdam
if os.environ.get("TEMPERATURE"):  # KL at temperature T (times T^2, as Hinton et al.)
    import torch.nn.functional as F
    from cora_onnx.torch.search import distill as _distill
    T = float(os.environ["TEMPERATURE"])
    _distill.kd_loss = lambda s, t: -(F.softmax(t / T, 1) * F.log_softmax(s / T, 1)).sum(1).mean() * T * T
FREEZE = set(filter(None, os.environ.get("FREEZE", "").split(",")))  # layers left out of the fine-tuning
SH = Path(__file__).resolve().parents[2] / "shared"
model_name = "efficientnet_lite0"
model = build_model(model_name, packaged_weights(model_name)).eval()
mean, std = default_normalization(model_name)
calib_dir = SH / "data/imagenette/calib"; sample_dir = SH / "data/imagenet-sample/even"
with tempfile.TemporaryDirectory() as tmp:
    opts = check_options(calib=calib_dir, val=sample_dir, out=Path(tmp) / "m.onnx", mean=mean, std=std,
                         crop_ratio=0.875, target_ratio=ratio, model_name=model_name)
    budget = size_budget(model, opts)
sample = load_images(sample_dir, opts.pre, labelled=True, class_map=load_class_map(sample_dir.parent / "class_map.json"), num_classes=1000)
calib = load_images(calib_dir, opts.pre)
fused = budget.fused
float_logits = predict_torch(fused, sample)
measured = torch.load("/tmp/tgt/probe/lite0-measured.pt", weights_only=False)
live = quantizable_layers(fused)
measured = dataclasses.replace(measured, layers={n: live[n] for n in measured.layers})
fitc = Path(f"/tmp/ft15/fit-{ratio:g}.pt")
costs = budget.table.costs
harm = harm_table(measured, "kl")
cost = {n: {e.label: int(costs[n][e.label]) for e in measured.menus[n]} for n in measured.layers}
limit = int(budget.float_bytes // ratio)
choice = choose(harm, cost, limit - budget.table.fixed)
chosen = {n: Encoding.parse(choice.options[n]) for n in measured.layers}
settings = budget.settings
if fitc.exists():
    student, results = torch.load(fitc, weights_only=False)
else:
    t = time.perf_counter()
    student, results = fit_choice(fused, measured, chosen, settings, calib)
    print("fit s", time.perf_counter() - t, flush=True)
    torch.save((student, results), fitc)
for v in variants:
    res = copy.deepcopy(results)
    t = time.perf_counter()
    ft = {}
    if v.get("finetune_steps"):
        ft = finetune_choice(fused, copy.deepcopy(student), {n: r for n, r in res.items() if n not in FREEZE},
                             dataclasses.replace(settings, **v), calib)
    dt = time.perf_counter() - t
    plan = Plan("auto", {}, plan_layers(measured, chosen, res))
    logits = predict_torch(apply_plan_torch(fused, plan), sample)
    fid = fidelity(logits, float_logits)
    row = {"ratio": ratio, "v": v, "agreement": fid["top1_agreement"], "kl": fid["kl_divergence"],
           "top1": top1(logits, sample.labels), "ft": ft, "seconds": dt, "threads": torch.get_num_threads(), "cosine": os.environ.get("COSINE"),
           "temperature": os.environ.get("TEMPERATURE"), "freeze": sorted(FREEZE)}
    print(json.dumps(row), flush=True)
    with open("/tmp/ft15/rows.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
