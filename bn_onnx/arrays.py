"""Reading inputs (.npy memory-mapped, .csv, Parquet) and writing outputs atomically, by chunks.

`.npy` files are opened with `mmap_mode="r"` and `allow_pickle=False`: an input larger than
memory is never loaded whole and never unpickled. Rows by column name stream too: a CSV file
with a header through the `csv` module, Parquet through pyarrow's `ParquetFile.iter_batches`
(pyarrow is an optional dependency, imported only for Parquet). Outputs go to a temporary file
beside the target and are renamed onto it only when every chunk is written.
"""

from __future__ import annotations

import contextlib
import csv
import mmap
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from bn_onnx.errors import InputDataError, InputFileError, one_line
from bn_onnx.files import OutputGroup, check_input_file

FORMATS = (".npy", ".csv")
# What `bn-onnx run` reads: the array formats and Parquet (rows by column name or numbers).
PARQUET = (".parquet", ".pq")
INPUT_FORMATS = (*FORMATS, *PARQUET)


def array_format(path: str | os.PathLike[str], what: str = "input") -> str:
    """`.npy` or `.csv` from the file name, else an `InputFileError`."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InputFileError(
            f"{what} {Path(path)} must be a .npy or .csv file (got {suffix or 'no extension'!r})"
        )
    return suffix


def input_format(path: str | os.PathLike[str]) -> str:
    """`.npy`, `.csv` or `.parquet` (also for `.pq`) from an input file's name.

    Raises:
        InputFileError: another extension.
    """
    suffix = Path(path).suffix.lower()
    if suffix in PARQUET:
        return ".parquet"
    if suffix not in FORMATS:
        raise InputFileError(
            f"input {Path(path)} must be a .npy, .csv or .parquet file "
            f"(got {suffix or 'no extension'!r})"
        )
    return suffix


def read_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """Open a .npy file read-only as a memory map (no pickles); numeric dtypes only."""
    p = check_input_file(path, "input file")
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise InputFileError(f"not a readable .npy array: {p} ({one_line(exc)})") from None
    except (OSError, EOFError) as exc:
        raise InputFileError(f"not a readable .npy array: {p} ({type(exc).__name__})") from None
    if not isinstance(arr, np.ndarray):
        raise InputFileError(f"{p} holds no single array")
    if arr.dtype.kind not in "iuf":
        raise InputDataError(f"input {p.name} has dtype {arr.dtype}; expected numbers (float32)")
    return arr


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_csv(path: str | os.PathLike[str]) -> np.ndarray:
    """Read comma-separated numbers as float32 [rows, columns]; one header line is allowed."""
    p = check_input_file(path, "input file")
    with open(p, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    cells = [c.strip() for c in first.split(",")]
    skip = 0 if all(_is_number(c) for c in cells if c) else 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": below
            arr = np.loadtxt(p, delimiter=",", dtype=np.float32, ndmin=2, skiprows=skip)
    except ValueError as exc:
        why = str(exc).splitlines()[0]
        # numpy counts rows from 0 after the skipped header and columns from 1: say the line
        at = re.search(r" at row (\d+), column (\d+)\.?$", why)
        if at:
            line, column = int(at.group(1)) + skip + 1, int(at.group(2))
            text = re.match(r"could not convert string (.*) to float32", why)
            if text:  # a text column: a model of numbers, not one of named columns
                name = f" ({cells[column - 1]!r})" if skip and column <= len(cells) else ""
                raise InputDataError(
                    f"{p.name} line {line}, column {column}{name}: {text.group(1)} is not a "
                    "number; this model takes numbers only"
                ) from None
            why = why[: at.start()] + f" on line {line}, column {column}"
        raise InputDataError(f"cannot read {p.name} as numbers: {why}") from None
    if arr.size == 0:
        raise InputDataError(f"input {p.name} has no data rows")
    return arr


def csv_data_line(path: str | os.PathLike[str], row: int) -> int | None:
    """The file line (from 1) of data row `row` (from 0) of a CSV that `read_csv` read.

    The same lines count as for `read_csv` (numpy's loadtxt): a header line is skipped, and so
    are blank lines and `#` comments. Reads the file again: for error messages only.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline()
        skip = 0 if all(_is_number(c.strip()) for c in first.split(",") if c.strip()) else 1
        f.seek(0)
        seen = 0
        for number, line in enumerate(f, 1):
            if number <= skip or not line.split("#", 1)[0].strip():
                continue
            if seen == row:
                return number
            seen += 1
    return None


def read_array(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an input array: .npy as a read-only memmap, .csv into memory as float32."""
    return read_npy(path) if array_format(path) == ".npy" else read_csv(path)


# Linux and macOS: pages of a mapping can be handed back once a chunk is done.
_MADV_DONTNEED: int | None = getattr(mmap, "MADV_DONTNEED", None)


def iter_chunks(
    X: np.ndarray, rows: int, *, reuse: bool = False
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield `(start, chunk)` over the rows of `X`, `rows` at a time.

    A memory-mapped .npy input must not end up resident: pages touched through a mapping stay
    in the process's memory, so a 3 GB input would. Where the OS allows, each chunk is a view
    of its own read-only mapping whose pages are released (`MADV_DONTNEED`) when the next
    chunk is asked for: no copy, and the process holds about one chunk. Elsewhere chunks are
    read with plain file reads; with `reuse=True` into one buffer per call, so a chunk is then
    valid only until the next one is yielded (a fresh buffer per chunk costs page faults).
    """
    n = X.shape[0] if X.ndim else 0
    if isinstance(X, np.memmap) and X.filename and X.ndim == 2 and X.flags.c_contiguous:
        if _MADV_DONTNEED is not None:
            yield from _mapped_chunks(X, rows, _MADV_DONTNEED)
        else:
            yield from _read_chunks(X, rows, reuse)
        return
    for start in range(0, n, rows):
        yield start, X[start : start + rows]


def _truncated(X: np.memmap) -> InputFileError:
    return InputFileError(f"input file {X.filename} is truncated")


def _mapped_chunks(X: np.memmap, rows: int, advice: int) -> Iterator[tuple[int, np.ndarray]]:
    n, width = X.shape
    row_bytes = width * X.dtype.itemsize
    with open(X.filename, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < X.offset + n * row_bytes:
            raise _truncated(X)
        if n == 0 or size == 0:
            return
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        for start in range(0, n, rows):
            count = min(rows, n - start)
            lo = X.offset + start * row_bytes
            hi = lo + count * row_bytes
            # A file cut short after it was opened would crash the process (SIGBUS) when the
            # missing pages are read; check before every chunk.
            if os.fstat(f.fileno()).st_size < hi:
                raise _truncated(X)
            chunk = np.ndarray((count, width), dtype=X.dtype, buffer=mapping, offset=lo)
            yield start, chunk
            page_lo = lo - lo % mmap.PAGESIZE
            mapping.madvise(advice, page_lo, hi - page_lo)
        # Views handed out may still be alive; the mapping closes when the last one goes.


def _read_full(f: IO[bytes], out: np.ndarray) -> int:
    """Fill `out` (C-contiguous) from `f`; the number of bytes read, short only at the end."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _read_chunks(X: np.memmap, rows: int, reuse: bool) -> Iterator[tuple[int, np.ndarray]]:
    n, width = X.shape
    buf = np.empty((min(rows, n), width), dtype=X.dtype) if reuse else None
    with open(X.filename, "rb", buffering=0) as f:
        f.seek(X.offset)
        for start in range(0, n, rows):
            count = min(rows, n - start)
            chunk = np.empty((count, width), X.dtype) if buf is None else buf[:count]
            if _read_full(f, chunk) != chunk.nbytes:
                raise _truncated(X)
            yield start, chunk


class ChunkWriter:
    """Receives output chunks in order and writes them to the open temporary file."""

    def __init__(self, fmt: str, target: IO[Any], rows: int, dtype: Any = None) -> None:
        self.fmt = fmt
        self.target = target
        self.rows = rows
        self.dtype = dtype
        self.done = 0

    def write(self, chunk: np.ndarray) -> None:
        """Append `chunk` (rows in order)."""
        n = len(chunk)
        if self.done + n > self.rows:
            raise RuntimeError(f"more than the {self.rows} rows announced")
        if self.fmt == ".npy":
            # Plain buffered writes, not a memory map: a full disk is an OSError (ENOSPC)
            # here, where a mapped page would kill the process with SIGBUS.
            self.target.write(np.ascontiguousarray(chunk, dtype=self.dtype).data)
        else:
            np.savetxt(self.target, chunk.reshape(n, -1), delimiter=",", fmt="%.9g")
        self.done += n


def _npy_header(f: IO[bytes], shape: tuple[int, ...], dtype: np.dtype) -> None:
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": shape,
    }
    np.lib.format.write_array_header_1_0(f, header)


@contextlib.contextmanager
def open_output(
    path: str | os.PathLike[str],
    rows: int,
    row_shape: tuple[int, ...],
    dtype: np.dtype,
    group: OutputGroup | None = None,
) -> Iterator[ChunkWriter]:
    """Write an output array chunk by chunk into a temporary file, renamed onto `path` at the
    end (by `group` when it commits, if one is given).

    A failure leaves no partial file; a write error (no space, EIO) is an `OutputFileError`.
    `.npy` rows are written as they come, so the whole output never has to sit in memory.
    """
    fmt = array_format(path, "output")
    with contextlib.nullcontext(group) if group is not None else OutputGroup() as g:
        if fmt == ".npy":
            f = g.open(path, "wb")
            _npy_header(f, (rows, *row_shape), dtype)
            writer = ChunkWriter(fmt, f, rows, dtype)
        else:
            writer = ChunkWriter(fmt, g.open(path, "w"), rows)
        yield writer
        if writer.done != rows:
            raise RuntimeError(f"wrote {writer.done} of {rows} rows")


# --- rows by column name: CSV with a header, Parquet ----------------------------------------


class CsvColumns:
    """A CSV file with a header, read in chunks of rows as column name -> list of cell texts.

    The file is read twice: once to count the rows (so that an output of the right size can be
    opened before any row is run), then chunk by chunk; only one chunk is in memory at a time.
    A UTF-8 byte order mark is dropped; blank lines are skipped; cells keep their text (the
    model's column kinds decide what they mean, see `bn_onnx.columns`).

    Attributes:
        path: the file.
        header: the column names, in file order.
        rows: the number of data rows.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = check_input_file(path, "input file")
        with self._open() as f:
            reader = csv.reader(f)
            try:
                header = next(reader)
            except StopIteration:
                header = []
            except csv.Error as exc:
                raise InputDataError(f"{self.path.name} line 1: {exc}") from None
            self.header = [h.strip() for h in header]
            if not any(self.header):
                raise InputDataError(f"input {self.path.name} has no header line")
            self.rows = sum(1 for _ in self._rows(reader))
        self._lines: list[int] = []  # file line of each row of the chunk last yielded
        self._start = 0

    def _open(self) -> IO[str]:
        return open(self.path, encoding="utf-8-sig", errors="replace", newline="")

    def line_of(self, row: int) -> int:
        """The file line (from 1, the header's) of data row `row` of the chunk last yielded."""
        return self._lines[row - self._start]

    def _rows(self, reader: Any) -> Iterator[list[str]]:
        width = len(self.header)
        try:
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != width:
                    raise InputDataError(
                        f"{self.path.name} line {reader.line_num}: {len(row)} cells, the header "
                        f"has {width}"
                    )
                yield row
        except csv.Error as exc:
            raise InputDataError(f"{self.path.name} line {reader.line_num}: {exc}") from None

    def chunks(
        self, rows: int, names: Sequence[str] | None = None
    ) -> Iterator[tuple[int, dict[str, list[str]]]]:
        """Yield `(first_row, {column: cells})` for `rows` rows at a time.

        Args:
            rows: rows per chunk.
            names: the columns wanted (all when None); those the header lacks are left out,
                for the caller to report by name.

        Raises:
            InputDataError: a wanted column named twice in the header, a row whose number of
                cells differs from the header's.
        """
        wanted = list(self.header if names is None else names)
        where: dict[str, int] = {}
        for name in wanted:
            hits = [i for i, h in enumerate(self.header) if h == name]
            if len(hits) > 1:
                raise InputDataError(f"column {name!r} appears {len(hits)} times in the header")
            if hits:
                where[name] = hits[0]
        with self._open() as f:
            reader = csv.reader(f)
            next(reader)
            start = 0
            block: list[list[str]] = []
            lines: list[int] = []
            for row in self._rows(reader):
                block.append(row)
                lines.append(reader.line_num)  # the row's last line (a quoted cell may span)
                if len(block) == rows:
                    self._start, self._lines = start, lines
                    yield start, {n: [r[i] for r in block] for n, i in where.items()}
                    start += len(block)
                    block, lines = [], []
            if block:
                self._start, self._lines = start, lines
                yield start, {n: [r[i] for r in block] for n, i in where.items()}


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputFileError(
            "reading Parquet needs pyarrow: pip install pyarrow (or bn-onnx[parquet])"
        ) from None
    return pq


class ParquetColumns:
    """A Parquet file read in record batches with pyarrow (`ParquetFile.iter_batches`).

    Only the wanted columns are read, one batch at a time, so a file larger than memory
    streams through; the file is closed when the batches are done.

    Attributes:
        path: the file.
        header: the column names in the file's schema.
        rows: the number of rows (from the file's metadata).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = check_input_file(path, "input file")
        pq = _pyarrow_parquet()
        import pyarrow as pa

        self._errors = (pa.ArrowException, OSError)
        try:
            # pre_buffer (pyarrow's default) keeps every column chunk it has read cached for the
            # file's lifetime: memory then grows with the file (16 bytes a row for two float64
            # columns, measured). Without it memory stays at about a row group.
            self._file = pq.ParquetFile(self.path, pre_buffer=False)
            self.header = list(self._file.schema_arrow.names)
            self.rows = int(self._file.metadata.num_rows)
        except self._errors as exc:
            raise InputFileError(
                f"not a readable Parquet file: {self.path} ({one_line(exc)})"
            ) from None

    def chunks(self, rows: int, names: Sequence[str] | None = None) -> Iterator[tuple[int, Any]]:
        """Yield `(first_row, pyarrow.RecordBatch)` of `rows` rows (the last may be shorter).

        Args:
            rows: rows per batch.
            names: the columns to read (those the file lacks are left out), or None for all.

        Raises:
            InputFileError: the file cannot be decoded (a corrupt page).
        """
        wanted = None if names is None else [n for n in names if n in self.header]
        start = 0
        try:
            for batch in self._file.iter_batches(batch_size=rows, columns=wanted):
                yield start, batch
                start += batch.num_rows
        except self._errors as exc:
            raise InputFileError(
                f"cannot read {self.path.name} after row {start}: {one_line(exc)}"
            ) from None
        finally:
            self._file.close()


def open_columns(path: str | os.PathLike[str]) -> CsvColumns | ParquetColumns:
    """The named-column reader for a .csv (with a header) or .parquet input."""
    if input_format(path) == ".parquet":
        return ParquetColumns(path)
    return CsvColumns(path)


@contextlib.contextmanager
def open_label_output(
    path: str | os.PathLike[str], class_names: Sequence[str]
) -> Iterator[LabelWriter]:
    """Write a CSV with a header `label,proba_<class>,...` atomically (see `LabelWriter`)."""
    if array_format(path, "output") != ".csv":
        raise InputFileError(f"output {Path(path)} must be a .csv file for labels")
    with OutputGroup() as group:
        yield LabelWriter(group.open(path, "w", newline=""), class_names)


class LabelWriter:
    """Writes rows `label,proba_0,...`: the predicted class and each class's probability."""

    def __init__(self, f: IO[str], class_names: Sequence[str]) -> None:
        self._csv = csv.writer(f, lineterminator="\n")
        self._csv.writerow(["label", *(f"proba_{c}" for c in class_names)])
        self.done = 0

    def write(self, labels: Sequence[Any], proba: np.ndarray) -> None:
        """Append rows: `labels[i]` then the probabilities of row i (`%.9g`)."""
        for label, p in zip(labels, proba.tolist(), strict=True):
            self._csv.writerow([label, *(f"{v:.9g}" for v in p)])
        self.done += len(proba)
