"""Sweeps: one model and its data, many points (method, bits, activation bits, method options),
each point one `quantize` run; results in one JSONL file, a table, a PNG and an HTML page.

A sweep config (TOML, or YAML when PyYAML is installed) holds the model and its data as for
`quantize`, then `[grid]` (method x bits x act_bits x budget) and/or `[[points]]`, and
`[options.<method>]` tables of method options applied to every point of that method:

    model = "resnet18"                      # omit model/weights/calib/val: the embedded default
    weights = "resnet18.pt"                 # relative paths: relative to the config file
    calib = "calib"
    val = "val"
    class_map = "class_map.json"
    crop_ratio = 0.875
    latency_runs = 5                        # per point (replaced by the final interleaved run)
    final_latency_runs = 50
    [options.cora]
    iters = 100
    [grid]
    method = ["rtn"]
    bits = [4, 8]
    [[points]]
    method = "cora"
    bits = 4
    budget = 0.05
    act_bits = 8

The whole config is validated before any job starts (SettingsError / InputError naming the
entry, e.g. "points[2].bits: ..."). The float reference (float ONNX file and the float model's
logits on the validation images) is computed once and handed to every point. Points whose
report exists are skipped (a rerun resumes); a point that fails is recorded with its one-line
error and the sweep goes on. Executors: "inprocess" (one point after another) or "ray" (one
Ray task per point, on a local Ray or an existing cluster; data paths must be readable on the
workers, the driver writes every output file).

Modules: points (`Point`, the grid and listed points, their checks), config (`load_config`,
`SweepConfig`, the sweep folder's file names), jobs (`Job`, `run_job`, the in-process and Ray
executors), runner (`sweep`, `read_rows`, `SweepResult`), report (latency run, table, PNG, HTML).
"""

from __future__ import annotations

from cora_onnx.run.sweeps.config import (EXECUTORS, FLOAT_NAME, MODEL_NAME, REFERENCE_NAME, REPORT_NAME, RESULTS_NAME, SETUP_NAME,
                     SweepConfig, load_config)
from cora_onnx.run.sweeps.jobs import Job, run_job
from cora_onnx.run.sweeps.points import Point
from cora_onnx.run.sweeps.runner import SweepResult, read_rows, sweep

__all__ = ["Point", "SweepConfig", "SweepResult", "load_config", "sweep", "EXECUTORS", "RESULTS_NAME", "REPORT_NAME",
           "MODEL_NAME", "FLOAT_NAME", "REFERENCE_NAME", "SETUP_NAME", "Job", "run_job", "read_rows"]
