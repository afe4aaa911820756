"""Time `bn-onnx export` of a checkpoint: fresh processes, and repeated exports in one process.

    python tools/bench_export.py [CHECKPOINT_DIR] [--cold 5] [--warm 7] [--json OUT.json]

Cold: `bn-onnx export --fold` in a new process each time (wall and CPU seconds of the child).
Warm: `export_checkpoint(fold=True)` repeated in this process, alternating rounds with torch's
registry reused (bn-onnx's default) and rebuilt (torch's own behaviour), so the ratio of the
two is measured under the same load. Prints medians with min-max; the machine may be shared.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _fmt(s: dict[str, float], unit: str = "s") -> str:
    return f"{s['median']:.2f} {unit} ({s['min']:.2f}-{s['max']:.2f}, n={s['n']})"


def cold(ckpt: Path, out_dir: Path, runs: int) -> dict[str, dict[str, float]]:
    """Wall and CPU seconds of `bn-onnx export --fold` in fresh processes."""
    walls, cpus = [], []
    for i in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "bn_onnx", "export", str(ckpt), "-o"]
            + [str(out_dir / f"cold{i}.onnx"), "--fold", "-q"],
            check=True,
        )
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return {"wall": _summary(walls), "cpu": _summary(cpus)}


def warm(ckpt: Path, out_dir: Path, rounds: int) -> dict[str, dict[str, float]]:
    """Repeated in-process exports, registry reused vs rebuilt, interleaved."""
    import bn_onnx.export as export_mod

    reuse = export_mod._reuse_torchlib_registry
    export_mod.export_checkpoint(ckpt, out_dir / "warmup.onnx", fold=True)
    times: dict[str, list[float]] = {"reused": [], "rebuilt": [], "fold": []}
    for i in range(rounds):
        for mode in ("reused", "rebuilt"):
            export_mod._reuse_torchlib_registry = (
                reuse if mode == "reused" else contextlib.nullcontext
            )
            start = time.perf_counter()
            result = export_mod.export_checkpoint(ckpt, out_dir / f"{mode}{i}.onnx", fold=True)
            times[mode].append(time.perf_counter() - start)
            if mode == "reused":
                times["fold"].append(result.fold_seconds)
    export_mod._reuse_torchlib_registry = reuse
    ratios = [r / b for r, b in zip(times["reused"], times["rebuilt"], strict=True)]
    out = {k: _summary(v) for k, v in times.items()}
    out["ratio_reused_over_rebuilt"] = _summary(ratios)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default=str(ROOT / "models/digits/checkpoint"))
    ap.add_argument("--cold", type=int, default=5, help="fresh-process runs (5)")
    ap.add_argument("--warm", type=int, default=7, help="in-process rounds (7)")
    ap.add_argument("--json", help="write the figures as JSON")
    args = ap.parse_args(argv)
    ckpt = Path(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        figures = {
            "cpus": os.cpu_count(),
            "load_before": os.getloadavg()[0],
            "cold": cold(ckpt, Path(tmp), args.cold),
            "warm": warm(ckpt, Path(tmp), args.warm),
            "load_after": os.getloadavg()[0],
        }
    c, w = figures["cold"], figures["warm"]
    print(f"cold bn-onnx export --fold: wall {_fmt(c['wall'])}, CPU {_fmt(c['cpu'])}")
    print(f"warm export_checkpoint(fold=True), registry reused:  {_fmt(w['reused'])}")
    print(f"warm export_checkpoint(fold=True), registry rebuilt: {_fmt(w['rebuilt'])}")
    print(f"  ratio reused/rebuilt per round: {_fmt(w['ratio_reused_over_rebuilt'], 'x')}")
    print(f"  fold part: {_fmt(w['fold'])}")
    print(f"load average {figures['load_before']:.1f} -> {figures['load_after']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
