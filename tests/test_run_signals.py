"""Signals to a watched `bn-onnx run` (fresh-user items 6 and 7).

`kill -9` of the command kills its forked worker too (PR_SET_PDEATHSIG), so no output appears
later; SIGINT to the parent alone, or to the whole process group (a terminal Ctrl-C), stops the
run: exit 130, "interrupted", no output, no traceback. Real processes, real signals.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bn_onnx import files

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits" / "model.folded.onnx"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="needs fork, /proc and PR_SET_PDEATHSIG"
)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("in") / "big.npy"
    rng = np.random.default_rng(0)
    np.save(path, rng.standard_normal((200_000, 64)).astype(np.float32))
    return path


def _start(out: Path, big: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "bn_onnx", "run", str(MODEL), "-i", str(big), "-o", str(out)]
    return subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _child_of(pid: int) -> int:
    """The pid of `pid`'s forked worker, once it exists."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for _ in range(2000):
        found = children.read_text().split() if children.exists() else []
        if found:
            return int(found[0])
        time.sleep(0.005)
    raise AssertionError("the watched child never appeared")


def _gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie that no one reaps counts as gone)."""
    for _ in range(1000):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.01)
    return False


def test_kill_9_of_run_kills_the_worker_and_leaves_no_output(tmp_path, big):
    out = tmp_path / "out.csv"
    proc = _start(out, big)
    child = _child_of(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert _gone(child), "the worker outlived its killed parent"
    time.sleep(0.2)
    assert not out.exists()
    # at most a named temporary of the dead process, which the next writer removes
    files._swept.discard(os.path.realpath(tmp_path))
    files.sweep_stale(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["parent", "group"])
def test_sigint_stops_run_with_130_and_no_output(tmp_path, big, how):
    out = tmp_path / "out.csv"
    proc = _start(out, big)
    child = _child_of(proc.pid)
    if how == "parent":
        os.kill(proc.pid, signal.SIGINT)  # `kill -INT PID`
    else:
        os.killpg(proc.pid, signal.SIGINT)  # a terminal Ctrl-C: parent and child
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert _gone(child)
    assert not out.exists()
    files._swept.discard(os.path.realpath(tmp_path))
    files.sweep_stale(tmp_path)
    assert list(tmp_path.iterdir()) == []
