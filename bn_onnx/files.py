"""Safe output files: checked paths, outputs written as a group, never an input overwritten.

Two rules every command that writes follows:

1. `check_outputs` before anything is written: no output path is (by resolved path or by
   inode, so symlinks and hard links count) a file the command reads, and no two outputs are
   the same file. A clash is a `UsageError` naming both paths.
2. `OutputGroup` for the writing: each output goes to a temporary file in its own folder
   (unnamed, `O_TMPFILE`, where the file system allows; otherwise a name
   `.NAME.bn-onnx-tmp-HOST-PID-...` that a later run removes once that process is gone),
   and all are renamed into place only when every one is complete. An `OSError` while
   writing is an `OutputFileError` (one line: the path and the system's reason) and leaves
   neither an output nor a temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import shutil
import stat
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from bn_onnx.errors import InputFileError, OutputFileError, UsageError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create owner-only entries; a finished output gets the usual permissions.
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()

PathLike = str | os.PathLike[str]
Named = tuple[str, PathLike]  # (what it is, for messages; the path)

TEMP_MARK = ".bn-onnx-tmp-"
_HOST = re.sub(r"[^A-Za-z0-9]", "", os.uname().nodename)[:32] or "host"
_TEMP_RE = re.compile(rf"^\..*{re.escape(TEMP_MARK)}(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-")


def check_input_file(path: PathLike, what: str = "file") -> Path:
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
    path: PathLike, inputs: Iterable[PathLike] = (), *, in_place: bool = False
) -> Path:
    """Check that `path` can be written: its folder exists and it is none of `inputs`.

    `in_place=True` allows the output to be one of the inputs (the write is still atomic).

    Raises:
        InputFileError: the folder is missing, not a folder or read-only; `path` is a folder.
        UsageError: `path` is one of `inputs` (see `check_outputs`).
    """
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise InputFileError(f"output folder does not exist: {parent}")
    if not parent.is_dir():
        raise InputFileError(f"output folder is not a directory: {parent}")
    if p.is_dir():
        raise InputFileError(f"output path is a directory: {p}")
    check_regular("output", p)
    real_parent = Path(os.path.realpath(p)).parent if p.is_symlink() else parent
    for folder in dict.fromkeys([parent, real_parent]):
        if not os.access(folder, os.W_OK):  # EROFS stops root too
            raise OutputFileError(f"cannot write {p}: output folder {folder} is not writable")
    if not in_place:
        check_outputs([("output", p)], [("the input file", s) for s in inputs])
    return p


def probe_writable(folder: PathLike, what: PathLike) -> None:
    """Check, by creating and removing a temporary folder in it, that `folder` (or, where it
    does not exist yet, its nearest existing ancestor, in which it will be made) can be
    written; `os.access` alone lets root pass a read-only mount.

    Raises:
        OutputFileError: one line naming `what`, the folder and the system's reason.
    """
    here = Path(os.path.abspath(folder))
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        raise OutputFileError(f"cannot write {what}: {here} is not a directory")
    probe = temp_name(here / "probe", ".d")
    try:
        os.mkdir(probe, 0o700)
        os.rmdir(probe)
    except OSError as exc:
        raise OutputFileError(
            f"cannot write {what}: output folder {here} is not writable ({_reason(exc)})"
        ) from None


# --- 1. no output lands on an input -----------------------------------------------------------


def check_regular(what: str, path: PathLike) -> None:
    """Refuse an existing `path` (symlinks followed) that is neither a regular file nor a
    folder: a rename onto a device, FIFO or socket would replace the node itself.

    Raises:
        UsageError: one line naming `what` and `path`.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UsageError(
            f"{what} {path} is not a regular file (a device, FIFO or socket); choose a file path"
        )


def check_not_linked_with_data(path: PathLike) -> None:
    """Refuse a symlinked model output written with external data: onnx finds `NAME.data`
    beside the path it loads, and a link and its target sit in different folders (or under
    different names), so one of the two would load a model without its data.

    Raises:
        UsageError: one line naming the link and its target.
    """
    p = Path(path)
    if p.is_symlink():
        raise UsageError(
            f"output {p} is a symbolic link, and the model is written with external data "
            f"({p.name}.data), which onnx looks for beside the path it loads; give the link's "
            f"target ({os.path.realpath(p)}) instead"
        )


def _identity(path: PathLike) -> tuple[str, tuple[int, int] | None]:
    """(resolved path, (st_dev, st_ino) or None where nothing exists there yet)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return real, None
    return real, (st.st_dev, st.st_ino)


def _same(a: tuple[str, tuple[int, int] | None], b: tuple[str, tuple[int, int] | None]) -> bool:
    return a[0] == b[0] or (a[1] is not None and a[1] == b[1])


def check_outputs(
    outputs: Sequence[Named],
    inputs: Sequence[Named] | Callable[[], Sequence[Named]] = (),
    *,
    may_replace: Collection[str] = (),
    in_place_hint: bool = False,
) -> None:
    """Refuse outputs that are a file the command reads, or the same file as another output.

    Files are compared by resolved path (symlinks followed, also for files not yet there) and
    by device and inode (hard links). `inputs` may be a function, called only when an output
    path exists already (an input that does not exist cannot be overwritten), so that finding
    a model's external-data files costs nothing in the usual case.

    Args:
        outputs: (what, path) of every file the command will write, e.g. ("--report", p).
        inputs: (what, path) of every file it reads, e.g. ("the external data of m.onnx", d).
        may_replace: the `what` of outputs allowed to land on an input (`fold --in-place`).
        in_place_hint: name `--in-place` when "output" is "the input model".

    Raises:
        UsageError: one line naming both paths.
    """
    for what, path in outputs:
        check_regular(what, path)
    ids = [(what, path, _identity(path)) for what, path in outputs]
    for i, (what, path, ident) in enumerate(ids):
        for what2, path2, ident2 in ids[:i]:
            if _same(ident, ident2):
                raise UsageError(
                    f"{what2} {path2} and {what} {path} are the same file; choose different paths"
                )
    if not any(ident[1] is not None for _, _, ident in ids):
        return
    for in_what, in_path in inputs() if callable(inputs) else inputs:
        in_ident = _identity(in_path)
        if in_ident[1] is None:
            continue
        for what, path, ident in ids:
            if what not in may_replace and _same(ident, in_ident):
                hint = in_place_hint and (what, in_what) == ("output", "the input model")
                raise UsageError(
                    f"{what} {path} is {in_what} {in_path}; choose another path"
                    + (" (or pass --in-place)" if hint else "")
                )


def external_data_locations(model_path: PathLike) -> list[str]:
    """The external-data locations a model file references (subgraphs and functions included),
    read without loading any tensor data; [] for a file that is not a readable model (the
    command's own load reports that)."""
    import onnx
    from onnx import external_data_helper as edh

    try:
        proto = onnx.load(os.fspath(model_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - any unreadable file: the command's load says why
        return []
    found: dict[str, None] = {}
    for tensor in edh._get_all_tensors(proto):
        if edh.uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value:
                    found[entry.value] = None
    return list(found)


def model_files(
    model_path: PathLike, locations: Iterable[str] | None = None, *, what: str = "the input model"
) -> list[Named]:
    """(what, path) of a model file and each external-data file it references.

    `locations`: the references when the caller has loaded the model already; read from the
    file otherwise.
    """
    p = Path(model_path)
    found: list[Named] = [(what, p)]
    for location in external_data_locations(p) if locations is None else locations:
        if location and "\0" not in location:
            found.append((f"the external data of {p.name}", p.parent / location))
    return found


def checkpoint_files(ckpt_dir: PathLike | None, names: Iterable[str]) -> list[Named]:
    """(what, path) of the files `names` that a command reads from a checkpoint directory."""
    if ckpt_dir is None:
        return []
    return [(f"the checkpoint's {name}", Path(ckpt_dir) / name) for name in names]


# --- 2. outputs written as a group ------------------------------------------------------------


def temp_name(target: PathLike, suffix: str = "") -> Path:
    """A fresh temporary name beside `target` that `sweep_stale` recognizes."""
    p = Path(target)
    tag = f"{_HOST}-{os.getpid()}-{os.urandom(4).hex()}"
    return p.parent / f".{p.name[:120]}{TEMP_MARK}{tag}{suffix}"  # (names stay < 255 bytes)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


_swept: set[str] = set()


def sweep_stale(folder: PathLike) -> list[Path]:
    """Remove the temporary files and folders of bn-onnx writers on this host that died
    (`kill -9`, power cut) in `folder`; return what was removed. Once per folder a process."""
    key = os.path.realpath(folder)
    if key in _swept:
        return []
    _swept.add(key)
    removed = []
    try:
        entries = [e for e in os.scandir(folder) if TEMP_MARK in e.name]
    except OSError:
        return []
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_link_ways: dict[str, str | None] = {}


@functools.cache
def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _libc_linkat(fd: int, dest: str) -> None:
    if _libc().linkat(fd, b"", _AT_FDCWD, os.fsencode(dest), _AT_EMPTY_PATH) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dest)


def _link_fd(fd: int, dest: str, way: str) -> None:
    """Give the unnamed file `fd` the name `dest`."""
    if way == "empty_path":  # linkat(fd, "", AT_EMPTY_PATH): needs CAP_DAC_READ_SEARCH
        _libc_linkat(fd, dest)
    else:  # the documented unprivileged way (open(2), O_TMPFILE)
        os.link(f"/proc/self/fd/{fd}", dest, follow_symlinks=True)


def _open_unnamed(folder: str) -> tuple[int, str] | None:
    """An unnamed file in `folder` and the way to link it, or None where that cannot work."""
    if not hasattr(os, "O_TMPFILE"):
        return None
    key = os.path.realpath(folder)
    if key in _link_ways and _link_ways[key] is None:
        return None
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            _link_ways[key] = None
            return None
        raise
    if key not in _link_ways:  # probe once a folder which way of linking works here
        # (on a file of its own: a temporary file linked once cannot be linked again)
        probe_fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o666)
        probe = os.fspath(temp_name(Path(folder) / "probe"))
        _link_ways[key] = None
        try:
            for way in ("empty_path", "proc"):
                try:
                    _link_fd(probe_fd, probe, way)
                except OSError:
                    continue
                os.unlink(probe)
                _link_ways[key] = way
                break
        finally:
            os.close(probe_fd)
        if _link_ways[key] is None:
            os.close(fd)
            return None
    return fd, _link_ways[key]  # type: ignore[return-value]


class _Staged:
    """One output being written: an open temporary file, or a temporary folder."""

    def __init__(self, target: Path) -> None:
        self.target = target  # the path as given (messages, `staged`)
        # where the contents go: a symlink's target, so that the link stays a link
        self.dest = Path(os.path.realpath(target)) if target.is_symlink() else target
        self.file: IO[Any] | None = None
        self.fd: int | None = None  # unnamed file, linked at commit
        self.way: str | None = None
        self.path: Path | None = None  # named temporary file or folder
        self.folder = False

    def discard(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError, ValueError):
                self.file.close()
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                if self.folder:
                    shutil.rmtree(self.path)
                else:
                    os.unlink(self.path)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


class OutputGroup:
    """The outputs of one command: written to temporary files, renamed together at the end.

    Use as a context manager; leaving the block normally commits (every output renamed into
    place, a folder's companions before its main file, the outputs in the order they were
    staged), an exception discards every temporary file. An `OSError` (EROFS, ENOSPC, EIO,
    ...) while staging, writing or committing becomes an `OutputFileError` naming the
    output and the system's reason.

        with OutputGroup() as group:
            with group.open("out.json", "w") as f:
                f.write(text)
            tmp = group.folder("m.onnx")              # for APIs that take a path
            ir.save(model, tmp / "m.onnx", external_data="m.onnx.data")
    """

    def __init__(self) -> None:
        self._staged: list[_Staged] = []
        self._current: Path | None = None

    def __enter__(self) -> OutputGroup:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.commit()
            return
        self.discard()
        if isinstance(exc, OSError) and not isinstance(exc, (BrokenPipeError, InterruptedError)):
            raise self._error(exc) from None

    def _error(self, exc: OSError) -> OutputFileError:
        where = self._current
        name = getattr(exc, "filename", None)
        for s in self._staged:
            if (
                name is not None
                and s.path is not None
                and os.fspath(name).startswith(os.fspath(s.path))
            ):
                where = s.target
        return OutputFileError(f"cannot write {where}: {_reason(exc)}")

    def _stage(self, target: PathLike) -> _Staged:
        p = Path(target)
        if p.parent == Path(""):
            p = Path(".") / p
        self._current = p
        staged = _Staged(p)
        try:
            check_regular("output", staged.dest)
        except UsageError:
            self.discard()
            raise
        sweep_stale(staged.dest.parent)
        self._staged.append(staged)
        return staged

    def open(self, target: PathLike, mode: str = "wb", **kwargs: Any) -> IO[Any]:
        """A file object for `target`'s contents ("wb" or "w" with `encoding`/`newline`)."""
        staged = self._stage(target)
        try:
            unnamed = _open_unnamed(os.fspath(staged.dest.parent))
            if unnamed is not None:
                staged.fd, staged.way = unnamed
                fd = staged.fd
            else:
                staged.path = temp_name(staged.dest, ".tmp")
                fd = os.open(staged.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                os.fchmod(fd, FILE_MODE)
            if "b" not in mode:
                kwargs.setdefault("encoding", "utf-8")
            staged.file = os.fdopen(fd, mode, closefd=staged.fd is None, **kwargs)
        except OSError as exc:
            self.discard()
            raise self._error(exc) from None
        return staged.file

    def path(self, target: PathLike, suffix: str = "") -> Path:
        """A named temporary path beside `target`, for an API that writes a path itself."""
        staged = self._stage(target)
        staged.path = temp_name(staged.dest, suffix + ".tmp")
        return staged.path

    def folder(self, target: PathLike) -> Path:
        """A temporary folder beside `target`: the files written in it are moved to the same
        names in `target`'s folder, the one named like `target` last."""
        staged = self._stage(target)
        try:
            staged.path = temp_name(staged.target, ".d")
            os.mkdir(staged.path, 0o700)
        except OSError as exc:
            self.discard()
            raise self._error(exc) from None
        staged.folder = True
        return staged.path

    def staged(self, target: PathLike) -> Path | None:
        """Where `target`'s contents are now, if under a name (a `folder` or `path` output)."""
        for s in self._staged:
            if s.target == Path(target) and s.path is not None:
                return s.path / s.target.name if s.folder else s.path
        return None

    def commit(self) -> None:
        """Name every temporary file first, then rename them all into place."""
        moves: list[tuple[str, Path, Path]] = []
        try:
            for s in self._staged:
                self._current = s.target
                if s.file is not None:
                    s.file.close()  # flushes: a write error shows here
                    s.file = None
                if s.fd is not None:
                    s.path = temp_name(s.dest, ".tmp")
                    _link_fd(s.fd, os.fspath(s.path), s.way or "proc")
                    os.close(s.fd)
                    s.fd = None
                if s.folder and s.path is not None:
                    names = sorted(os.listdir(s.path), key=lambda n: n == s.target.name)
                    moves += [
                        (
                            os.fspath(s.target),
                            s.path / n,
                            s.dest if n == s.target.name else s.target.parent / n,
                        )
                        for n in names
                    ]
                elif s.path is not None:
                    if s.fd is None and not s.path.exists():
                        raise FileNotFoundError(
                            errno.ENOENT, "nothing was written", os.fspath(s.path)
                        )
                    os.chmod(s.path, FILE_MODE)
                    moves.append((os.fspath(s.target), s.path, s.dest))
            for target, src, dest in moves:
                self._current = Path(target)
                os.replace(src, dest)
        except OSError as exc:
            self.discard()
            raise self._error(exc) from None
        self.discard()  # the emptied temporary folders

    def discard(self) -> None:
        """Remove every temporary file (nothing is renamed)."""
        for s in self._staged:
            s.discard()
        self._staged = []


@contextlib.contextmanager
def atomic_output(path: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A failure (or Ctrl-C) leaves no partial file and the old `path`, if any, untouched.
    """
    with OutputGroup() as group:
        tmp = group.path(path, suffix)
        yield tmp


@contextlib.contextmanager
def atomic_output_dir(path: PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path` for several files that must appear together.

    On success every file in it is moved onto the same name in `path`'s folder, the file named
    like `path` last, so that a reader never sees the main file without its companions.
    """
    with OutputGroup() as group:
        yield group.folder(path)


def make_temp_dir(target: PathLike) -> Path:
    """A temporary folder beside `target` with a name `sweep_stale` recognizes."""
    sweep_stale(Path(target).parent)
    tmp = temp_name(target, ".d")
    os.mkdir(tmp, 0o700)
    return tmp


__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "OutputGroup",
    "atomic_output",
    "atomic_output_dir",
    "check_input_file",
    "check_output_path",
    "check_outputs",
    "external_data_locations",
    "make_temp_dir",
    "model_files",
    "probe_writable",
    "sweep_stale",
    "temp_name",
]
