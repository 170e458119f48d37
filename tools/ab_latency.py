"""Two ONNX files, batch-1 latency in one process: plain sessions (intra_op_num_threads only), ROUNDS
rounds of cora_onnx.onnx.verify.measure_latency (each round runs both files in a random order).
Prints both medians and their ratio (first / second). Run it with nothing else on the machine.

    python tools/ab_latency.py A.onnx B.onnx [ROUNDS=300] [THREADS=2]
"""

from __future__ import annotations

import sys

from cora_onnx.onnx.verify import measure_latency


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    a, b = sys.argv[1:3]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 300
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    lat = measure_latency({"a": a, "b": b}, (3, 224, 224), warmup=10, runs=rounds, threads=threads)
    ma, mb = (lat[k]["batch_1"]["median_ms"] for k in ("a", "b"))
    print(f"{a}: {ma:.2f} ms; {b}: {mb:.2f} ms; ratio {ma / mb:.3f} ({rounds} rounds, {threads} threads)")


if __name__ == "__main__":
    main()
