"""Reading input arrays (.npy memory-mapped, .csv) and writing outputs atomically, chunk by chunk.

`.npy` files are opened with `mmap_mode="r"` and `allow_pickle=False`: an input larger than
memory is never loaded whole and never unpickled. Outputs go to a temporary file beside the
target and are renamed onto it only when every chunk is written.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

from bn_onnx.errors import InputDataError, InputFileError
from bn_onnx.files import atomic_output, check_input_file

FORMATS = (".npy", ".csv")


def array_format(path: str | os.PathLike[str], what: str = "input") -> str:
    """`.npy` or `.csv` from the file name, else an `InputFileError`."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InputFileError(
            f"{what} {Path(path)} must be a .npy or .csv file (got {suffix or 'no extension'!r})"
        )
    return suffix


def read_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """Open a .npy file read-only as a memory map (no pickles); numeric dtypes only."""
    p = check_input_file(path, "input file")
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise InputFileError(
            f"not a readable .npy array: {p} ({str(exc).splitlines()[0]})"
        ) from None
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
        raise InputDataError(
            f"cannot read {p.name} as numbers: {str(exc).splitlines()[0]}"
        ) from None
    if arr.size == 0:
        raise InputDataError(f"input {p.name} has no data rows")
    return arr


def read_array(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an input array: .npy as a read-only memmap, .csv into memory as float32."""
    return read_npy(path) if array_format(path) == ".npy" else read_csv(path)


def iter_chunks(X: np.ndarray, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield `(start, chunk)` over the rows of `X`, `rows` at a time.

    A memory-mapped .npy input is read with plain file reads instead of through the mapping:
    pages touched through a mapping stay in the process's memory, so a 3 GB input would end up
    resident; read chunk by chunk, the process holds about one chunk.
    """
    n = X.shape[0] if X.ndim else 0
    if isinstance(X, np.memmap) and X.filename and X.ndim == 2 and X.flags.c_contiguous:
        width = X.shape[1]
        row_bytes = width * X.dtype.itemsize
        with open(X.filename, "rb") as f:
            for start in range(0, n, rows):
                count = min(rows, n - start)
                f.seek(X.offset + start * row_bytes)
                chunk = np.fromfile(f, dtype=X.dtype, count=count * width)
                if chunk.size != count * width:
                    raise InputFileError(f"input file {X.filename} is truncated")
                yield start, chunk.reshape(count, width)
        return
    for start in range(0, n, rows):
        yield start, X[start : start + rows]


class ChunkWriter:
    """Receives output chunks in order and writes them to the open temporary file."""

    def __init__(self, fmt: str, target: np.ndarray | IO[str], rows: int) -> None:
        self.fmt = fmt
        self.target = target
        self.rows = rows
        self.done = 0

    def write(self, chunk: np.ndarray) -> None:
        """Append `chunk` (rows in order)."""
        n = len(chunk)
        if self.fmt == ".npy":
            assert isinstance(self.target, np.ndarray)
            self.target[self.done : self.done + n] = chunk
        else:
            np.savetxt(self.target, chunk.reshape(n, -1), delimiter=",", fmt="%.9g")
        self.done += n


@contextlib.contextmanager
def open_output(
    path: str | os.PathLike[str], rows: int, row_shape: tuple[int, ...], dtype: np.dtype
) -> Iterator[ChunkWriter]:
    """Write an output array chunk by chunk into a temp file; rename it onto `path` at the end.

    A failure leaves no partial file. `.npy` outputs are a memmap of the final size, so the
    whole output never has to sit in memory either.
    """
    fmt = array_format(path, "output")
    with atomic_output(path, suffix=fmt) as tmp:
        if fmt == ".npy":
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(rows, *row_shape))
            writer = ChunkWriter(fmt, mm, rows)
            yield writer
            mm.flush()
            del writer.target, mm
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                writer = ChunkWriter(fmt, f, rows)
                yield writer
        if writer.done != rows:
            raise RuntimeError(f"wrote {writer.done} of {rows} rows")


def write_array(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a whole array to .npy or .csv atomically."""
    array = np.asarray(array)
    with open_output(path, array.shape[0], array.shape[1:], array.dtype) as w:
        w.write(array)
