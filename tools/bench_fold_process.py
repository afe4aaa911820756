"""Time whole processes: `bn-onnx fold` against one that only loads and saves with onnx-ir.

Issue 12's target: the `bn-onnx fold` process on a small model takes at most 1.5x a process
that only does `onnx_ir.load` + `onnx_ir.save` of it, and `bn-onnx --help` stays under 0.5 s.
Runs, interleaved over REPEATS rounds, each in a fresh process:

  ir load+save   python -c "import onnx_ir; onnx_ir.save(onnx_ir.load(IN), OUT)"
  fold           bn-onnx fold IN -o OUT -q
  help           bn-onnx --help
  fold (other), help (other)   the same with PYTHONPATH=OTHER (e.g. /work/main), if given

and prints medians with min-max and the ratios of medians, and the load average.

    python tools/bench_fold_process.py [--model models/digits/model.onnx] [--repeats 15]
        [--other /path/to/other/checkout]
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

ROOT = Path(__file__).resolve().parent.parent


def _time(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of `cmd` in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "digits" / "model.onnx"))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--other", help="another checkout to compare (its folder goes on PYTHONPATH)")
    args = ap.parse_args(argv)

    src = str(Path(args.model).resolve())
    tmp = Path(tempfile.mkdtemp(prefix="bench_fold_process."))
    exe = shutil.which("bn-onnx") or ""
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cases: dict[str, tuple[list[str], dict[str, str]]] = {
        "ir load+save": (
            [
                py,
                "-c",
                f"import onnx_ir as ir; ir.save(ir.load({src!r}), {str(tmp / 'ls.onnx')!r})",
            ],
            env,
        ),
        "fold": ([exe, "fold", src, "-o", str(tmp / "f.onnx"), "-q"], env),
        "help": ([exe, "--help"], env),
    }
    if args.other:
        other = {**os.environ, "PYTHONPATH": str(Path(args.other).resolve())}
        cases["fold (other)"] = ([exe, "fold", src, "-o", str(tmp / "g.onnx"), "-q"], other)
        cases["help (other)"] = ([exe, "--help"], other)
    for cmd, e in cases.values():  # warm-up: page cache, .pyc files
        _time(cmd, e)
    times: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, (cmd, e) in cases.items():
            wall, cpu_s = _time(cmd, e)
            times[name].append(wall)
            cpu[name].append(cpu_s)
    shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    mcpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(
        f"{Path(src).name}, {args.repeats} interleaved rounds, "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    for k, v in times.items():
        print(
            f"  {k:13s} median {med[k] * 1e3:6.0f} ms (min {min(v) * 1e3:.0f}, "
            f"max {max(v) * 1e3:.0f}); CPU median {mcpu[k] * 1e3:.0f} ms "
            f"(min {min(cpu[k]) * 1e3:.0f}, max {max(cpu[k]) * 1e3:.0f})"
        )
    base = "ir load+save"
    for k in ("fold", "fold (other)"):
        if k in med:
            print(
                f"  {k} / {base} = {med[k] / med[base]:.2f}x (CPU time {mcpu[k] / mcpu[base]:.2f}x)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
