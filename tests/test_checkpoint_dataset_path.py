"""A checkpoint's relative dataset path is found from any working folder (fresh-user item 9).

The shipped tabular checkpoint records `models/tabular/people.csv`, relative to the
repository: it is tried in the working folder, then in the checkpoint folder and each of its
ancestors; the sha256 recorded at training is still checked.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bn_onnx.checkpoint import read_checkpoint
from bn_onnx.data import load_split_from_checkpoint_meta, resolve_dataset_path
from bn_onnx.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
TABULAR = ROOT / "models" / "tabular"


def test_shipped_tabular_checkpoint_loads_its_data_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    here = load_split_from_checkpoint_meta(read_checkpoint("models/tabular/checkpoint").meta)
    elsewhere = tmp_path / "w"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ckpt = read_checkpoint(TABULAR / "checkpoint")
    assert Path(ckpt.meta["dataset"]["path"]) == TABULAR / "people.csv"
    data = load_split_from_checkpoint_meta(ckpt.meta)
    np.testing.assert_array_equal(data.y_test, here.y_test)
    np.testing.assert_array_equal(data.x_test, here.x_test)


def test_working_folder_first_then_checkpoint_ancestors(tmp_path, monkeypatch):
    ck = tmp_path / "repo" / "models" / "t" / "checkpoint"
    ck.mkdir(parents=True)
    (tmp_path / "repo" / "models" / "t" / "d.csv").write_text("a\n1\n")
    name = "models/t/d.csv"
    monkeypatch.chdir(tmp_path)
    assert resolve_dataset_path(name, ck) == str(tmp_path / "repo" / name)
    (tmp_path / "models" / "t").mkdir(parents=True)
    (tmp_path / name).write_text("a\n2\n")  # the working folder wins
    assert resolve_dataset_path(name, ck) == name
    assert resolve_dataset_path("nowhere.csv", ck) == "nowhere.csv"


def test_a_changed_file_found_by_ancestor_is_still_refused(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    shutil.copytree(TABULAR / "checkpoint", repo / "models" / "tabular" / "checkpoint")
    csv = repo / "models" / "tabular" / "people.csv"
    csv.write_bytes((TABULAR / "people.csv").read_bytes() + b"\n")
    monkeypatch.chdir(tmp_path)
    ckpt = read_checkpoint(repo / "models" / "tabular" / "checkpoint")
    with pytest.raises(CheckpointError, match="changed since training"):
        load_split_from_checkpoint_meta(ckpt.meta)
