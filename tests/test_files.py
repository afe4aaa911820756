"""Atomic outputs and path checks: no partial files, never the input overwritten."""

from __future__ import annotations

import pytest

from bn_onnx.errors import InputFileError, UsageError
from bn_onnx.files import (
    FILE_MODE,
    atomic_output,
    atomic_output_dir,
    check_input_file,
    check_output_path,
)


def test_atomic_output_renames_on_success(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"new")
        assert not target.exists()
    assert target.read_bytes() == b"new"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_output_gets_umask_permissions_not_owner_only(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.stat().st_mode & 0o777 == FILE_MODE
    assert FILE_MODE & 0o044  # readable by others under the usual umask


def test_atomic_output_leaves_old_file_and_no_temp_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_output_dir_moves_companions_and_cleans_up(tmp_path):
    target = tmp_path / "m.onnx"
    with atomic_output_dir(target) as d:
        (d / "m.onnx").write_bytes(b"model")
        (d / "m.onnx.data").write_bytes(b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_atomic_output_dir_failure_leaves_nothing(tmp_path):
    target = tmp_path / "m.onnx"
    with pytest.raises(ValueError), atomic_output_dir(target) as d:
        (d / "m.onnx.data").write_bytes(b"data")
        raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_check_input_file_errors(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        check_input_file(tmp_path / "nope")
    with pytest.raises(InputFileError, match="directory"):
        check_input_file(tmp_path)
    empty = tmp_path / "empty"
    empty.touch()
    with pytest.raises(InputFileError, match="empty"):
        check_input_file(empty)


def test_check_output_path_refuses_missing_folder_and_the_input(tmp_path):
    with pytest.raises(InputFileError, match="folder does not exist"):
        check_output_path(tmp_path / "missing" / "out.onnx")
    src = tmp_path / "in.onnx"
    src.write_bytes(b"x")
    with pytest.raises(UsageError, match="is the input"):
        check_output_path(src, [src])
    assert check_output_path(src, [src], in_place=True) == src
    assert check_output_path(tmp_path / "other.onnx", [src]) == tmp_path / "other.onnx"
