"""`bn-onnx run`: run a model over an input file and write the outputs (.npy or .csv).

Inputs: rows of numbers (.npy memory-mapped, .csv) for a model with one 2-D float input; rows
by column name (.csv with a header, .parquet) for a tabular model and for a plain model trained
from a file with a header (metadata `bn_onnx.columns`; other columns, the target included, are
ignored). Both stream in chunks of --batch-size rows.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

from bn_onnx.cli._common import add_command, positive_int

# Show progress only when there is something to wait for.
PROGRESS_MIN_ROWS = 100_000


HELP = "run a model over an input file (.npy, .csv or .parquet) and write its outputs"
DESCRIPTION = """\
Run MODEL with onnxruntime over every row of the input and write the first output (logits or
predictions). A tabular model (one with a column schema) reads its columns by name from a
.csv with a header or a .parquet file; other models read rows of numbers (.npy, .csv, or a
.parquet of numeric columns). Inputs stream in chunks, so inputs larger than memory work;
the output appears only when complete."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `run`."""
    p = add_command(subparsers, "run", HELP, DESCRIPTION)
    p.add_argument("model", metavar="MODEL", help="ONNX model file")
    p.add_argument(
        "--input",
        "-i",
        required=True,
        metavar="X",
        help="input rows: .npy (2-D), .csv (a header names columns) or .parquet (needs pyarrow)",
    )
    p.add_argument("--output", "-o", required=True, metavar="Y", help="output file: .npy or .csv")
    p.add_argument(
        "--labels",
        action="store_true",
        help=(
            "classifiers, .csv output: write a header and, per row, the predicted class and "
            "each class's probability (label,proba_<class>,...) instead of the logits"
        ),
    )
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
    from bn_onnx.arrays import array_format, input_format
    from bn_onnx.errors import UsageError
    from bn_onnx.files import check_input_file, check_output_path, check_outputs, model_files
    from bn_onnx.runtime import Predictor, ProviderWarning

    check_input_file(args.model, "model file")
    fmt = input_format(args.input)
    out_fmt = array_format(args.output, "output")
    if args.labels and out_fmt != ".csv":
        raise UsageError("--labels writes a .csv table; give -o Y.csv")
    check_output_path(args.output)
    check_outputs(
        [("output", args.output)],
        lambda: [("the input file", args.input), *model_files(args.model)],
    )
    check_input_file(args.input, "input file")
    with warnings.catch_warnings():  # a fallback is printed below as one plain line
        warnings.simplefilter("ignore", ProviderWarning)
        predictor = Predictor(
            args.model, provider=args.provider, threads=args.threads, batch_size=args.batch_size
        )
    for note in predictor.info.warnings:
        print(f"bn-onnx run: warning: {note}", file=sys.stderr)
    if args.labels and predictor.task == "regression":
        raise UsageError("--labels needs a classifier; this model is a regressor")
    line_of = None
    named = predictor.columns is not None and not (
        predictor.array_input and (fmt == ".npy" or not _csv_has_header(args.input, fmt))
    )
    if named or fmt == ".parquet":
        rows, chunks, line_of = _named_chunks(args.input, fmt, predictor)
    else:
        rows, chunks = _array_chunks(args.input, predictor)
        if fmt == ".csv":
            from bn_onnx.arrays import csv_data_line

            line_of = functools.partial(csv_data_line, args.input)
    start = time.perf_counter()
    progress = _Progress(rows, not args.quiet)
    try:
        shape, dtype = _write(
            args, _Located(predictor, args.input, line_of), rows, chunks, progress
        )
    finally:
        progress.close()
    if not args.quiet:
        took = time.perf_counter() - start
        what = f"{' x '.join(str(d) for d in (rows, *shape))} {dtype}"
        if args.labels:
            what = f"{rows} labels and {shape[0]} class probabilities each"
        print(f"wrote {args.output}: {what} on {predictor.info.describe()} in {took:.2f} s")
    return 0


Chunks = Iterator[tuple[int, Any]]


def _csv_has_header(path: str, fmt: str) -> bool:
    """Whether a .csv input starts with a header line (a cell that is not a number)."""
    import csv

    if fmt != ".csv":
        return False
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
        first = next(csv.reader(fh), [])
    for cell in first:
        try:
            float(cell)
        except ValueError:
            return True
    return False


def _array_chunks(path: str, predictor: Any) -> tuple[int, Chunks]:
    """Rows of numbers (.npy memory-mapped, .csv) for a model with one 2-D float input."""
    from bn_onnx.arrays import iter_chunks, read_array
    from bn_onnx.errors import InputDataError

    if not predictor.array_input:
        raise InputDataError(
            f"bn-onnx run needs a model with one 2-D float input or a column schema; "
            f"{predictor.describe_inputs()}"
        )
    X = read_array(path)
    if X.ndim != 2:
        raise InputDataError(
            f"input {path} must be 2-D [rows, features], got shape {tuple(X.shape)}"
        )
    if predictor.n_features is not None and X.shape[1] != predictor.n_features:
        raise InputDataError(
            f"input {path} has {X.shape[1]} features (columns), the model expects "
            f"{predictor.n_features}"
        )
    if X.shape[0] == 0:  # one empty chunk: the output is 0 rows of the model's output shape
        return 0, iter([(0, X)])
    # Chunks are views of a mapping (or one reused buffer): predict checks each once and
    # returns a new array, so nothing holds on to a chunk.
    return X.shape[0], iter_chunks(X, predictor.batch_size, reuse=True)


class _Located:
    """The predictor, with a bad cell named by its file line where the reader knows it."""

    def __init__(self, predictor: Any, path: str, line_of: Any) -> None:
        self.predictor, self.name, self.line_of = predictor, os.path.basename(path), line_of

    def __getattr__(self, name: str) -> Any:
        return getattr(self.predictor, name)

    def predict(self, chunk: Any, *, row_offset: int) -> Any:
        from bn_onnx.errors import CellError, InputDataError, NonFiniteError

        try:
            return self.predictor.predict(chunk, row_offset=row_offset)
        except CellError as exc:
            if self.line_of is None:
                raise
            line = self.line_of(exc.row)
            message = f"{self.name} line {line}: column {exc.column!r}: {exc.what}"
            raise InputDataError(message) from None
        except NonFiniteError as exc:
            line = self.line_of(exc.row) if self.line_of is not None else None
            if line is None:
                raise
            message = (
                f"{self.name} line {line}, column {exc.column + 1}: {exc.value!r} is not a "
                "finite number; clean the data"
            )
            raise InputDataError(message) from None


def _named_chunks(path: str, fmt: str, predictor: Any) -> tuple[int, Chunks, Any]:
    """Rows by column name (.csv with a header, .parquet), read only for the columns needed.

    Returns the row count, the chunks and, for a CSV, the file line of a row of the chunk last
    yielded (else None).
    """
    from bn_onnx.arrays import CsvColumns, open_columns
    from bn_onnx.columns import missing_columns_error
    from bn_onnx.errors import InputDataError

    if fmt == ".npy":
        names = ", ".join(c.name for c in predictor.columns)
        raise InputDataError(
            f"this model takes named columns ({names}): give a .csv with a header or a "
            ".parquet file, not .npy"
        )
    reader = open_columns(path)
    names = None
    if predictor.columns is not None:
        names = [c.name for c in predictor.columns]
        missing = [n for n in names if n not in reader.header]
        if missing:
            raise missing_columns_error(predictor.columns, missing)
    elif predictor.n_features is not None and len(reader.header) != predictor.n_features:
        raise InputDataError(
            f"input {os.path.basename(path)} has {len(reader.header)} columns, the model "
            f"expects {predictor.n_features} features"
        )
    if reader.rows == 0:
        raise InputDataError(f"input {os.path.basename(path)} has no data rows")
    line_of = reader.line_of if isinstance(reader, CsvColumns) else None
    return reader.rows, reader.chunks(predictor.batch_size, names), line_of


def _write(
    args: argparse.Namespace, predictor: Any, rows: int, chunks: Chunks, progress: _Progress
) -> tuple[tuple[int, ...], Any]:
    """Run every chunk (there is at least one) and write the outputs; return row shape, dtype."""
    from bn_onnx.arrays import open_label_output, open_output

    lo, chunk = next(chunks)
    y = predictor.predict(chunk, row_offset=lo)
    if args.labels:
        names = predictor.class_names or [str(i) for i in range(y.shape[1])]
        output = open_label_output(args.output, names)
    else:
        output = open_output(args.output, rows, y.shape[1:], y.dtype)
    with output as writer:
        while True:
            if args.labels:
                writer.write(predictor.labels_of(y), predictor.proba_of(y))
            else:
                writer.write(y)
            progress(writer.done)
            nxt = next(chunks, None)
            if nxt is None:
                break
            y = predictor.predict(nxt[1], row_offset=nxt[0])
        if writer.done != rows:
            raise RuntimeError(f"wrote {writer.done} of {rows} rows")
    return y.shape[1:], y.dtype
