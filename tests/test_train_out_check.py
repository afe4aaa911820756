"""`train --out` into a folder that cannot be written fails before training (fresh-user item 16).

The tests run as root, which a chmod does not stop, so a read-only mount is simulated by making
`os.mkdir` in bn_onnx.files fail with EROFS there; training itself is replaced by a module
that fails the test if it is reached.
"""

from __future__ import annotations

import errno
import os
import sys
import types
from pathlib import Path

import pytest

from bn_onnx import files
from bn_onnx.cli import main


@pytest.fixture
def no_training(monkeypatch):
    def train(*args, **kwargs):
        raise AssertionError("training started before the output check")

    monkeypatch.setitem(sys.modules, "bn_onnx.train", types.SimpleNamespace(train=train))


def _read_only(monkeypatch, ro: Path) -> None:
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).parent == ro:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(files.os, "mkdir", mkdir)


@pytest.mark.parametrize("out", ["run", "missing/deeper/run", "."])
def test_train_into_a_read_only_folder_fails_before_training(
    tmp_path, capsys, monkeypatch, no_training, out
):
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    target = ro / out
    rc = main(["train", "--dataset", "iris", "--out", str(target)])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"output folder {ro} is not writable (Read-only file system)" in lines[0], lines[0]
    assert list(ro.iterdir()) == []


def test_train_out_under_a_file_fails_before_training(tmp_path, capsys, no_training):
    (tmp_path / "f").write_text("x")
    rc = main(["train", "--dataset", "iris", "--out", str(tmp_path / "f" / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "is not a directory" in err, err


def test_probe_leaves_nothing_in_a_writable_folder(tmp_path):
    files.probe_writable(tmp_path / "not" / "yet", "x")
    assert list(tmp_path.iterdir()) == []
