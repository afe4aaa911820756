"""Time `bn-onnx inspect`, `fold` and `verify` on graphs of 10k and 100k nodes (issue 19, item 7).

Builds, in a temporary folder, long chains that stress the per-node work rather than the
weights (`bn_onnx.graphs.chain_model`):

  identity   Identity -> Identity -> ... (the cleanup removes all but one)
  mlp        Gemm -> BatchNormalization -> Relu blocks of width 8 (`bn_onnx.graphs.build_mlp`)
  muladd     Gemm then alternating per-channel Mul/Add by constants (folded into the Gemm)
  KIND-inputs  the same with every initializer also listed as a graph input (old exporters)

and runs each command in a fresh process, interleaved over `--repeats` rounds (`verify IN OUT`
compares the model with its fold; `locate` is `verify IN BAD --locate` against the fold with
its last Gemm's weight scaled by 1.5, so verify fails and locates). Prints, per graph and
command, the median wall time with min-max and the median CPU time (user + system of the
child), and the load average, since the machine may be shared. Not a test: nothing here
asserts a time.

    python tools/bench_graph_size.py                       # identity 10k/100k, mlp/muladd 10k
    python tools/bench_graph_size.py --graphs identity:100000 --commands inspect,fold
    python tools/bench_graph_size.py --graphs muladd-inputs:20000,mlp:8000 --commands inspect,locate
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx
from onnx import numpy_helper

from bn_onnx.graphs import chain_model

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GRAPHS = "identity:10000,identity:100000,mlp:10000,muladd:10000"


def _tamper(src: Path, dst: Path) -> None:
    """`src` with the weight of its last Gemm scaled by 1.5, written to `dst`."""
    model = onnx.load(src)
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    for t in model.graph.initializer:
        if gemms and t.name == gemms[-1].input[1]:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.5, t.name))
    onnx.save(model, dst)


def _time(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of `cmd` in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t0
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graphs", default=DEFAULT_GRAPHS, help="KIND:NODES,... (%(default)s)")
    ap.add_argument("--commands", default="inspect,fold,verify")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench_graph_size."))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bn = [sys.executable, "-m", "bn_onnx"]
    cases: dict[str, list[str]] = {}
    for spec in args.graphs.split(","):
        kind, n = spec.split(":")
        src, dst = tmp / f"{kind}{n}.onnx", tmp / f"{kind}{n}.folded.onnx"
        base = kind.removesuffix("-inputs")
        model = chain_model(base, int(n), initializers_as_inputs=base != kind)
        onnx.save(model, src)
        bad = tmp / f"{kind}{n}.bad.onnx"
        cmds = {
            "inspect": [*bn, "inspect", str(src)],
            "fold": [*bn, "fold", str(src), "-o", str(dst), "-q"],
            "verify": [*bn, "verify", str(src), str(dst)],
            "locate": [*bn, "verify", str(src), str(bad), "--locate"],
        }
        subprocess.run(cmds["fold"], env=env, check=True, capture_output=True)  # for verify
        _tamper(dst, bad)
        for c in args.commands.split(","):
            size = f"{int(n) // 1000}k" if int(n) % 1000 == 0 else n
            cases[f"{kind} {size} {c}"] = cmds[c]
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name, cmd in cases.items():
            w, c = _time(cmd, env)
            wall[name].append(w)
            cpu[name].append(c)
        load.append(os.getloadavg()[0])
    shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"{args.repeats} interleaved rounds, fresh processes; 1-min load average "
        f"{min(load):.1f}-{max(load):.1f} on {os.cpu_count()} CPUs"
    )
    for k in cases:
        w, c = wall[k], cpu[k]
        print(
            f"  {k:26s} wall median {statistics.median(w):6.2f} s "
            f"({min(w):.2f}-{max(w):.2f}); CPU median {statistics.median(c):6.2f} s "
            f"({min(c):.2f}-{max(c):.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
