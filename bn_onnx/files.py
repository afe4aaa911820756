"""Safe output files: checked paths, temporary file then rename, never the input overwritten."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from bn_onnx.errors import InputFileError, UsageError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create owner-only entries; a finished output gets the usual permissions.
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


def check_input_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """Return `path` as a Path after checking it names an existing, non-empty regular file."""
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{what} not found: {p}")
    if p.is_dir():
        raise InputFileError(f"{what} is a directory, not a file: {p}")
    if p.stat().st_size == 0:
        raise InputFileError(f"{what} is empty: {p}")
    return p


def check_output_path(
    path: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    *,
    in_place: bool = False,
) -> Path:
    """Check that `path` can be written: its folder exists and it is none of `inputs`.

    `in_place=True` allows the output to be one of the inputs (the write is still atomic).
    """
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise InputFileError(f"output folder does not exist: {parent}")
    if not parent.is_dir():
        raise InputFileError(f"output folder is not a directory: {parent}")
    if p.is_dir():
        raise InputFileError(f"output path is a directory: {p}")
    if not in_place:
        for src in inputs:
            s = Path(src)
            if s.exists() and p.exists() and os.path.samefile(s, p):
                raise UsageError(
                    f"output {p} is the input file; choose another path (or pass --in-place)"
                )
    return p


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A failure (or Ctrl-C) leaves no partial file and the old `path`, if any, untouched.
    """
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=suffix + ".tmp", dir=p.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside `path` for several files that must appear together.

    On success every file in it is moved onto the same name in `path`'s folder, the file named
    like `path` last, so that a reader never sees the main file without its companions.
    """
    p = Path(path)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent or "."))
    try:
        yield tmp_dir
        names = sorted(os.listdir(tmp_dir), key=lambda n: n == p.name)
        for name in names:
            os.replace(tmp_dir / name, p.parent / name)
    finally:
        for leftover in tmp_dir.glob("*"):
            with contextlib.suppress(OSError):
                leftover.unlink()
        with contextlib.suppress(OSError):
            tmp_dir.rmdir()
