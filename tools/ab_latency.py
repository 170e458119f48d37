"""Two ONNX files, batch-1 latency, A/B in one process: plain sessions (intra_op_num_threads only),
ROUNDS rounds, each running both files, the order alternating every round so neither always runs
first. Prints both medians and their ratio (first / second). Run it with nothing else on the machine.

    python tools/ab_latency.py A.onnx B.onnx [ROUNDS=300] [THREADS=2]
"""

from __future__ import annotations

import sys
import time

import numpy as np
import onnxruntime as ort


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    files = sys.argv[1:3]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 300
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    sessions = []
    for f in files:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sessions.append(ort.InferenceSession(f, so, providers=["CPUExecutionProvider"]))
    feeds = []
    for s in sessions:
        i = s.get_inputs()[0]
        shape = [1] + [d if isinstance(d, int) else 224 for d in i.shape[1:]]
        feeds.append({i.name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)})
    for s, f in zip(sessions, feeds):
        for _ in range(10):
            s.run(None, f)
    times: list[list[float]] = [[], []]
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            sessions[i].run(None, feeds[i])
            times[i].append(time.perf_counter() - t0)
    a, b = (np.median(t) * 1e3 for t in times)
    print(f"{files[0]}: {a:.2f} ms; {files[1]}: {b:.2f} ms; ratio {a / b:.3f} ({rounds} rounds, {threads} threads)")


if __name__ == "__main__":
    main()
