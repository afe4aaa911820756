"""Peak memory and time of `bn-onnx run` on an input larger than you want in memory.

Writes a ROWS x FEATURES float32 .npy (default 1,000,000 x 784 = 3.1 GB) and a folded
FEATURES-128-64-10 MLP into a temporary folder, then, interleaved REPEATS times, measures in
child processes (peak RSS from wait4):

- `bn-onnx run MODEL --input X.npy -o Y.npy` (memory-mapped input read in chunks, output
  written chunk by chunk);
- the baseline: `np.load` the whole array, run the same chunks through a bare onnxruntime
  session, `np.save` the result.

Prints medians and spread and checks that both outputs are identical. Needs disk space for
the input (ROWS * FEATURES * 4 bytes). This process imports nothing heavy and does all the work
in children: Linux carries a parent's peak RSS into a child it forks (and through exec), so a
parent holding the input would inflate every measurement.

    python tools/bench_run_memory.py [--rows 1000000] [--features 784] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASELINE = """
import sys, numpy as np, onnxruntime as ort
x = np.load(sys.argv[1])
s = ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
n = int(sys.argv[4])
y = np.concatenate([s.run(None, {"input": x[i:i + n]})[0] for i in range(0, len(x), n)])
np.save(sys.argv[3], y)
"""


PREPARE = """
import sys, numpy as np, onnx
from bn_onnx import graphs
d, rows, features = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
onnx.save(graphs.build_mlp([features, 128, 64, 10], "folded", seed=0), d + "/m.onnx")
x = np.lib.format.open_memmap(d + "/x.npy", mode="w+", dtype=np.float32, shape=(rows, features))
rng = np.random.default_rng(0)
for s in range(0, rows, 50_000):
    n = min(50_000, rows - s)
    x[s : s + n] = rng.standard_normal((n, features), dtype=np.float32)
x.flush()
"""

SAME = """
import sys, numpy as np
sys.exit(0 if np.array_equal(np.load(sys.argv[1]), np.load(sys.argv[2])) else 1)
"""


def measure(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def print_results(results: dict[str, list[tuple[float, float]]]) -> None:
    """One line per command: median peak RSS and wall time with their spread."""
    width = max(len(name) for name in results)
    for name, runs in results.items():
        walls = [w for w, _ in runs]
        rss = [r for _, r in runs]
        print(
            f"  {name:{width}s} peak RSS median {statistics.median(rss):,.0f} MB "
            f"(min {min(rss):,.0f}, max {max(rss):,.0f}); wall median "
            f"{statistics.median(walls):.1f} s (min {min(walls):.1f}, max {max(walls):.1f})"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=784)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8192)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bn_onnx_run_mem_") as tmp:
        d = Path(tmp)
        model = d / "m.onnx"
        subprocess.run(
            [sys.executable, "-c", PREPARE, tmp, str(args.rows), str(args.features)], check=True
        )
        size_mb = (d / "x.npy").stat().st_size / 2**20
        ours = [
            sys.executable,
            "-m",
            "bn_onnx",
            "run",
            str(model),
            "--input",
            str(d / "x.npy"),
            "-o",
            str(d / "y.npy"),
            "--provider",
            "cpu",
            "--quiet",
            "--batch-size",
            str(args.batch_size),
        ]
        base = [
            sys.executable,
            "-c",
            BASELINE,
            str(d / "x.npy"),
            str(model),
            str(d / "b.npy"),
            str(args.batch_size),
        ]
        results: dict[str, list[tuple[float, float]]] = {"bn-onnx run": [], "np.load + run": []}
        for _ in range(args.repeats):
            results["bn-onnx run"].append(measure(ours))
            results["np.load + run"].append(measure(base))
        cmd = [sys.executable, "-c", SAME, str(d / "y.npy"), str(d / "b.npy")]
        same = subprocess.run(cmd).returncode == 0
    print(
        f"input {args.rows} x {args.features} float32 = {size_mb:,.0f} MB; "
        f"{args.repeats} interleaved repeats; outputs identical: {same}"
    )
    print_results(results)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
