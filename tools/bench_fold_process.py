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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _time(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=tempfile.gettempdir())
    return time.perf_counter() - t0


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
    for _ in range(args.repeats):
        for name, (cmd, e) in cases.items():
            times[name].append(_time(cmd, e))
    shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{Path(src).name}, {args.repeats} interleaved rounds, load average {os.getloadavg()}")
    for k, v in times.items():
        print(
            f"  {k:13s} median {med[k] * 1e3:7.0f} ms "
            f"(min {min(v) * 1e3:.0f}, max {max(v) * 1e3:.0f})"
        )
    print(f"  fold / ir load+save = {med['fold'] / med['ir load+save']:.2f}x")
    if args.other:
        print(f"  fold (other) / ir load+save = {med['fold (other)'] / med['ir load+save']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
