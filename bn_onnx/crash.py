"""Containing a native crash: a command that runs onnxruntime runs in a forked child.

onnxruntime is C++: a malformed model it does not refuse can kill the process with a signal
(a BatchNormalization-9 whose optional outputs are listed with empty names segfaults
onnxruntime 1.32), which Python cannot catch. `bn-onnx verify`, `run` and `bench` therefore
fork once, right after parsing their arguments and before importing anything heavy: the
child does the work (and is the only process that ever starts onnxruntime, so no thread is
forked), the parent waits and turns a death by signal into one line and exit code 2, naming
the model the child was working on (`note`). A fork costs about a millisecond. The child dies
with the parent (Linux: PR_SET_PDEATHSIG), so a `kill -9` of the command leaves no output;
SIGINT, SIGTERM and SIGHUP to the parent are forwarded to the child.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence

_AREA_BYTES = 4096
_area: mmap.mmap | None = None  # shared with the watching parent; set in the child only


def note(what: str) -> None:
    """Tell the watching parent (if any) what the child works on now, e.g. a model's path."""
    if _area is None:
        return
    data = what.encode("utf-8", "replace")[: _AREA_BYTES - 4]
    _area[4 : 4 + len(data)] = data
    _area[:4] = len(data).to_bytes(4, "little")


def _noted(area: mmap.mmap) -> str | None:
    n = int.from_bytes(area[:4], "little")
    return area[4 : 4 + n].decode("utf-8", "replace") if 0 < n <= _AREA_BYTES - 4 else None


def crash_message(sig: int, noted: str | None, models: Sequence[str]) -> str:
    """The one line for a child killed by signal `sig` while working on `noted`."""
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    if noted:
        subject = noted
    elif len(models) == 1:
        subject = models[0]
    else:
        subject = "one of " + ", ".join(models)
    if sig == signal.SIGKILL:
        return f"killed by {name} (out of memory?) while running {subject}"
    return (
        f"onnxruntime crashed ({name}) on {subject}: the model is malformed or hits a bug in "
        "onnxruntime; check it with `bn-onnx inspect`"
    )


def _interrupt_once(signum: int, frame: object) -> None:
    """The child's SIGINT handler: a KeyboardInterrupt once, later SIGINTs ignored (a terminal
    Ctrl-C reaches the child twice: from the terminal and forwarded by the parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


_prctl: Callable[..., int] | None = None


def _load_prctl() -> None:
    global _prctl
    if _prctl is None and sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            _prctl = ctypes.CDLL(None, use_errno=True).prctl


def _mask(how: int) -> bool:
    """Block or unblock SIGINT; False where the platform cannot."""
    if not hasattr(signal, "pthread_sigmask"):
        return False
    signal.pthread_sigmask(how, {signal.SIGINT})
    return True


def _die_with_parent(parent: int) -> None:
    """In the child: be killed when the parent dies (a `kill -9` of the command must not
    leave the child writing its output), and exit if the parent is gone already."""
    if _prctl is not None:
        with contextlib.suppress(Exception):
            _prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(128 + signal.SIGKILL)


def run_watched(command: str, models: Sequence[str], work: Callable[[], int]) -> int:
    """Run `work` in a forked child and return its exit code; a child killed by a signal is
    one line on stderr and exit 2 (a SIGINT: 130). The child exits when `work` returns: it
    never comes back to the caller.

    Without `os.fork` (Windows) `work` runs here.
    """
    global _area
    if not hasattr(os, "fork"):
        return work()
    area = mmap.mmap(-1, _AREA_BYTES)
    _load_prctl()  # before the fork: the child has no time to import ctypes
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    # SIGINT waits (blocked) until each side has its own handler
    masked = _mask(signal.SIG_BLOCK)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGINT, _interrupt_once)
            if masked:
                _mask(signal.SIG_UNBLOCK)
            _die_with_parent(parent)
            _area = area
            code = work()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except KeyboardInterrupt:  # before `work` caught it
            print("bn-onnx: interrupted", file=sys.stderr)
            code = 130
        except BaseException:
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)
    forwarded: list[int] = []

    def forward(signum: int, frame: object) -> None:
        forwarded.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    # SIGINT (`kill -INT PID` or Ctrl-C, which reaches the child from the terminal too) is
    # forwarded: the child stops on the first one and exits 130 itself.
    old = {
        signal.SIGINT: signal.signal(signal.SIGINT, forward),
        signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
    }
    if hasattr(signal, "SIGHUP"):
        old[signal.SIGHUP] = signal.signal(signal.SIGHUP, forward)
    if masked:
        _mask(signal.SIG_UNBLOCK)
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    sig = os.WTERMSIG(status)
    if sig == signal.SIGINT:
        print("bn-onnx: interrupted", file=sys.stderr)
        return 130
    if sig in forwarded:
        return 128 + sig
    print(f"bn-onnx {command}: error: {crash_message(sig, _noted(area), models)}", file=sys.stderr)
    return 2
