"""`bn-onnx bench`: time models side by side, interleaved, as medians and ratios."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bn_onnx.cli._common import add_command, int_list, positive_int

EPILOG = """\
Each batch size gets one random input, untimed warm-up rounds, then timed rounds that run the
models in turn (A B A B ...). The table shows the median and 90th percentile latency, the
quartiles (IQR), rows per second and the median latency as a ratio to the first model, with
the quartiles of the per-round ratios. Session creation and first-run times are listed too.

example:
  bn-onnx bench models/digits/model.onnx models/digits/model.folded.onnx \\
      --batch-sizes 1,32,1024 --threads 1 --json bench.json --plot bench.png
"""


HELP = "time ONNX models side by side (median, p90, ratios)"
DESCRIPTION = """\
Time one or more ONNX models side by side with interleaved repeats."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `bench`."""
    p = add_command(subparsers, "bench", HELP, DESCRIPTION, EPILOG)
    p.add_argument("model", metavar="MODEL", help="ONNX model; the baseline of the ratio column")
    p.add_argument("others", metavar="OTHER", nargs="*", help="more ONNX models to compare")
    p.add_argument(
        "--batch-sizes",
        type=int_list,
        default=[1, 32, 1024],
        metavar="N,N,...",
        help="rows per call (default 1,32,1024)",
    )
    p.add_argument(
        "--provider", default="cpu", help="execution provider: cpu, cuda or auto (default cpu)"
    )
    p.add_argument(
        "--threads", type=positive_int, default=None, help="intra-op threads (default: ORT's)"
    )
    p.add_argument(
        "--graph-opt",
        choices=["all", "extended", "basic", "disable"],
        default="all",
        help="onnxruntime graph optimization level (default all)",
    )
    p.add_argument(
        "--repeats", type=positive_int, default=30, help="timed rounds per batch size (30)"
    )
    p.add_argument(
        "--warmup", type=positive_int, default=3, help="untimed rounds per batch size (3)"
    )
    p.add_argument(
        "--order",
        choices=["round_robin", "shuffle", "alternate"],
        default="round_robin",
        help="order within each round: round_robin (A B C A B C, default), alternate (A B C "
        "C B A A B C ...: no position favoured), shuffle (a fresh seeded order each round, "
        "never one model twice in a row: best for 3+ models)",
    )
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="also record the calling thread's CPU time per call and show its ratio (less "
        "disturbed by other processes; counts no other thread, so use it with --threads 1)",
    )
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="also time torch eager eval of this checkpoint (imports torch)",
    )
    p.add_argument("--json", metavar="OUT.json", help="write every figure as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="write a latency/ratio plot (matplotlib)")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the table")
    return p


def _labels(paths: list[str]) -> list[str]:
    """Short, unique labels: file names, or full paths where names collide."""
    from pathlib import Path

    names = [Path(p).name for p in paths]
    return [
        names[i] if names.count(names[i]) == 1 else f"{paths[i]}#{i}" for i in range(len(paths))
    ]


def run(args: argparse.Namespace) -> int:
    """Build the subjects, time them, print the table, write JSON/plot if asked."""
    import time

    from bn_onnx import bench
    from bn_onnx.checkpoint import CHECKPOINT_FILES
    from bn_onnx.errors import UsageError
    from bn_onnx.files import (
        OutputGroup,
        check_input_file,
        check_output_path,
        check_outputs,
        checkpoint_files,
        model_files,
    )

    paths = [args.model, *args.others]
    for path in paths:
        check_input_file(path, "model file")
    outputs = [(name, out) for name, out in (("--json", args.json), ("--plot", args.plot)) if out]
    for _, out in outputs:
        check_output_path(out)
    if args.json and args.plot and args.json == args.plot:
        raise UsageError("--json and --plot must be different files")
    check_outputs(
        outputs,
        lambda: [
            *(f for p in paths for f in model_files(p)),
            *checkpoint_files(args.checkpoint, CHECKPOINT_FILES),
        ],
    )
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))

    subjects = []
    for path, label in zip(paths, _labels(paths), strict=True):
        log(f"loading {path}")
        subjects.append(
            bench.ort_subject(
                path,
                label,
                provider=args.provider,
                threads=args.threads,
                graph_optimization_level=args.graph_opt,
            )
        )
    if args.checkpoint:
        from pathlib import Path

        if not Path(args.checkpoint).is_dir():
            raise UsageError(f"checkpoint is not a directory: {args.checkpoint}")
        device = "cuda" if any("CUDA" in p for p in subjects[0].info["providers"]) else "cpu"
        log(f"loading checkpoint {args.checkpoint} (torch, {device})")
        subjects.append(
            bench.checkpoint_subject(args.checkpoint, device=device, threads=args.threads)
        )

    bar = None
    if not args.quiet and sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import Progress

        bar = Progress(console=Console(stderr=True), transient=True)
        task = bar.add_task("timing", total=len(args.batch_sizes))
        bar.start()

    def progress(done: int, total: int, label: str) -> None:
        if bar is not None:
            bar.update(task, completed=done, description=f"timing ({label} done)")
        else:
            log(f"[{done}/{total}] {label} done")

    try:
        result = bench.run_benchmark(
            subjects,
            args.batch_sizes,
            repeats=args.repeats,
            warmup=args.warmup,
            cpu_clock=time.thread_time if args.cpu_time else None,
            order=args.order,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.stop()
    result.settings.update(
        provider=args.provider, threads=args.threads, graph_optimization_level=args.graph_opt
    )
    for line in bench.format_table(result):
        print(line)
    if not args.quiet:
        print()
        for line in bench.format_subjects(result):
            print(line)
        load = result.machine.get("loadavg")
        print(
            f"{result.machine['processor']}, {result.machine['cpu_count']} cores"
            + (f", load {load[0]}" if load else "")
            + "; ratios are medians of this run (interleaved), quartiles in brackets"
        )
    with OutputGroup() as group:  # both files appear, or neither
        if args.json:
            bench.save_json(result, args.json, group=group)
        if args.plot:
            bench.plot_result(result, args.plot, group=group)
    for _, out in outputs:
        log(f"wrote {out}")
    return 0
