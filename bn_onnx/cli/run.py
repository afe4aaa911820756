"""`bn-onnx run`: run a model over an input file and write the outputs (.npy or .csv)."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

from bn_onnx.cli._common import positive_int

# Show progress only when there is something to wait for.
PROGRESS_MIN_ROWS = 100_000


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `run`."""
    p = subparsers.add_parser(
        "run",
        help="run a model over an input file (.npy or .csv) and write its outputs",
        description=(
            "Run MODEL with onnxruntime over every row of the input and write the first output "
            "(logits or predictions). .npy inputs are memory-mapped and streamed in chunks, so "
            "inputs larger than memory work; the output appears only when complete."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="ONNX model file")
    p.add_argument(
        "--input", "-i", required=True, metavar="X", help="input rows: .npy (2-D) or .csv"
    )
    p.add_argument("--output", "-o", required=True, metavar="Y", help="output file: .npy or .csv")
    p.add_argument(
        "--provider",
        default="auto",
        help="execution provider: auto (CUDA if available), cpu, cuda (default: auto)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=8192,
        metavar="N",
        help="rows per onnxruntime call (default: 8192)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="intra-op threads (default: onnxruntime's choice)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    return p


class _Progress:
    """A rich progress bar on a terminal, a plain line per ~10% otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled and total >= PROGRESS_MIN_ROWS
        self.bar = None
        self.next_mark = 0.1
        if self.enabled and sys.stderr.isatty():
            from rich.progress import Progress

            self.bar = Progress(transient=True)
            self.bar.start()
            self.task = self.bar.add_task("running", total=total)

    def __call__(self, done: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
        elif done / self.total >= self.next_mark or done == self.total:
            print(
                f"bn-onnx run: {done}/{self.total} rows ({100 * done // self.total}%)",
                file=sys.stderr,
                flush=True,
            )
            while self.next_mark <= done / self.total:
                self.next_mark += 0.1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run(args: argparse.Namespace) -> int:
    """Check everything before writing, then stream the input through the model."""
    from bn_onnx.arrays import array_format, iter_chunks, open_output, read_array
    from bn_onnx.errors import InputDataError, UsageError
    from bn_onnx.files import check_input_file, check_output_path
    from bn_onnx.runtime import Predictor, ProviderWarning

    check_input_file(args.model, "model file")
    array_format(args.input, "input")
    array_format(args.output, "output")
    for src in (args.input, args.model):
        if (
            os.path.exists(src)
            and os.path.exists(args.output)
            and os.path.samefile(src, args.output)
        ):
            raise UsageError(f"output {args.output} is the input file {src}; choose another path")
    check_output_path(args.output, [args.input, args.model])
    X = read_array(args.input)
    with warnings.catch_warnings():  # a fallback is printed below as one plain line
        warnings.simplefilter("ignore", ProviderWarning)
        predictor = Predictor(
            args.model, provider=args.provider, threads=args.threads, batch_size=args.batch_size
        )
    for note in predictor.info.warnings:
        print(f"bn-onnx run: warning: {note}", file=sys.stderr)
    if X.ndim != 2:
        raise InputDataError(
            f"input {args.input} must be 2-D [rows, features], got shape {tuple(X.shape)}"
        )
    if predictor.n_features is not None and X.shape[1] != predictor.n_features:
        raise InputDataError(
            f"input {args.input} has {X.shape[1]} features (columns), the model expects "
            f"{predictor.n_features}"
        )
    rows = X.shape[0]
    # The output's row shape and dtype, from a run of the first row (or an empty batch).
    probe = predictor.predict(X[:1])
    start = time.perf_counter()
    progress = _Progress(rows, not args.quiet)
    try:
        with open_output(args.output, rows, probe.shape[1:], probe.dtype) as writer:
            # Chunks are views of a mapping (or one reused buffer): predict checks each once
            # and returns a new array, so nothing holds on to a chunk.
            for lo, chunk in iter_chunks(X, predictor.batch_size, reuse=True):
                writer.write(predictor.predict(chunk, row_offset=lo))
                progress(writer.done)
    finally:
        progress.close()
    if not args.quiet:
        took = time.perf_counter() - start
        print(
            f"wrote {args.output}: {' x '.join(str(d) for d in (rows, *probe.shape[1:]))} "
            f"{probe.dtype} on {predictor.info.describe()} in {took:.2f} s"
        )
    return 0
