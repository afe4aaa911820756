"""Checkpoint directories: exact round trip, atomic writes, refusal of bad or hostile files."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from bn_onnx.checkpoint import (
    CONFIG_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from bn_onnx.errors import CheckpointError, OutputFileError
from bn_onnx.model import MLP, MLPConfig


def random_model(config: MLPConfig, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    model = MLP(config)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.dtype == torch.float32:
                value.copy_(torch.rand_like(value) + 0.1)
            else:
                value.fill_(seed + 3)
    return model


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    model = random_model(MLPConfig(5, 3, hidden=(4, 6), bn="post", activation="silu"))
    return save_checkpoint(
        model, tmp_path / "ck", {"class_names": ["a", "b", "c"]}, {"test_accuracy": 0.5}
    )


@pytest.mark.parametrize("bn", ["pre", "post", "none"])
@pytest.mark.parametrize("input_norm", [True, False])
def test_round_trip_is_bit_exact(tmp_path, bn, input_norm):
    config = MLPConfig(7, 2, hidden=(5, 3), bn=bn, input_norm=input_norm, task="regression")
    model = random_model(config, seed=4)
    save_checkpoint(model, tmp_path / "c", {"dataset": {"name": "x"}}, {"test_rmse": 1.5})
    loaded, ck = load_model(tmp_path / "c")
    assert ck.config == config
    assert not loaded.training
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert torch.equal(a[name], b[name]), name
    x = torch.randn(4, 7)
    model.eval()
    assert torch.equal(model(x), loaded(x))
    assert ck.meta["dataset"] == {"name": "x"}
    assert ck.metrics == {"test_rmse": 1.5}


def test_read_checkpoint_gives_numpy_tensors_and_meta(ckpt):
    ck = read_checkpoint(ckpt)
    assert ck.meta["format"] == "bn-onnx-checkpoint"
    assert ck.meta["format_version"] == 1
    assert ck.meta["model"]["hidden"] == [4, 6]
    assert ck.class_names == ["a", "b", "c"]
    assert all(isinstance(v, np.ndarray) for v in ck.tensors.values())
    assert ck.tensors["blocks.1.bn.running_var"].shape == (6,)
    assert ck.tensors["input_norm.num_batches_tracked"].dtype == np.int64
    assert "versions" in ck.meta and "bn_onnx" in ck.meta["versions"]


def test_read_checkpoint_does_not_import_torch(ckpt):
    code = (
        "import sys; from bn_onnx.checkpoint import read_checkpoint; "
        f"ck = read_checkpoint({str(ckpt)!r}); "
        "assert 'torch' not in sys.modules, 'torch imported'; print(len(ck.tensors))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(len(read_checkpoint(ckpt).tensors))


def test_save_into_existing_dir_keeps_other_files_and_leaves_no_temp(ckpt):
    (ckpt / "model.onnx").write_bytes(b"exported")
    model = random_model(MLPConfig(5, 3, hidden=(2,)), seed=9)
    save_checkpoint(model, ckpt, {}, {})
    assert (ckpt / "model.onnx").read_bytes() == b"exported"
    assert read_checkpoint(ckpt).config.hidden == (2,)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ck"]


def test_new_checkpoint_directory_is_not_owner_only(ckpt):
    from bn_onnx.files import DIR_MODE

    assert ckpt.stat().st_mode & 0o777 == DIR_MODE
    assert DIR_MODE & 0o055  # listable by others under the usual umask


def test_failed_save_leaves_no_partial_directory(tmp_path, monkeypatch):
    model = random_model(MLPConfig(5, 3, hidden=(4,)))

    def broken_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("bn_onnx.checkpoint.os.rename", broken_rename)
    with pytest.raises(OutputFileError, match="cannot write checkpoint .*: disk full"):
        save_checkpoint(model, tmp_path / "new", {}, {})
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_is_refused_not_mixed(ckpt, monkeypatch):
    # config.json goes first and comes back last: a half-replaced checkpoint reads as
    # incomplete instead of pairing the old config with new weights.
    calls = []
    real_replace = os.replace

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("interrupted")
        real_replace(src, dst)

    monkeypatch.setattr("bn_onnx.checkpoint.os.replace", flaky_replace)
    model = random_model(MLPConfig(5, 3, hidden=(9,)), seed=2)
    with pytest.raises(OutputFileError, match="interrupted"):
        save_checkpoint(model, ckpt, {}, {})
    with pytest.raises(CheckpointError, match="incomplete"):
        read_checkpoint(ckpt)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ck"]


def _rewrite_config(path: Path, change) -> None:
    data = json.loads((path / CONFIG_FILE).read_text())
    change(data)
    (path / CONFIG_FILE).write_text(json.dumps(data))


def _rewrite_tensors(path: Path, change) -> None:
    tensors = load_file(str(path / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(path / WEIGHTS_FILE))


CASES = {
    "missing config": (lambda p: (p / CONFIG_FILE).unlink(), "config.json missing"),
    "empty config": (lambda p: (p / CONFIG_FILE).write_text(""), "config.json is empty"),
    "bad json": (lambda p: (p / CONFIG_FILE).write_text("{nope"), "not valid JSON"),
    "not a checkpoint": (lambda p: (p / CONFIG_FILE).write_text("[1, 2]"), "not a bn-onnx"),
    "future version": (
        lambda p: _rewrite_config(p, lambda d: d.update(format_version=99)),
        "format_version 99",
    ),
    "bad model config": (
        lambda p: _rewrite_config(p, lambda d: d["model"].update(bn="sideways")),
        "unknown bn placement",
    ),
    "unknown model key": (
        lambda p: _rewrite_config(p, lambda d: d["model"].update(layers=3)),
        "unknown key",
    ),
    "missing weights": (lambda p: (p / WEIGHTS_FILE).unlink(), "model.safetensors missing"),
    "empty weights": (lambda p: (p / WEIGHTS_FILE).write_bytes(b""), "is empty"),
    "garbage weights": (lambda p: (p / WEIGHTS_FILE).write_bytes(b"\x00" * 7), "cannot read"),
    "truncated weights": (
        lambda p: (p / WEIGHTS_FILE).write_bytes((p / WEIGHTS_FILE).read_bytes()[:-9]),
        "cannot read",
    ),
    "pickle as weights": (
        lambda p: (p / WEIGHTS_FILE).write_bytes(pickle.dumps({"head.weight": [1.0]})),
        "cannot read",
    ),
    "tensor missing": (
        lambda p: _rewrite_tensors(p, lambda t: t.pop("blocks.1.bn.running_var")),
        "'blocks.1.bn.running_var' is missing",
    ),
    "tensor extra": (
        lambda p: _rewrite_tensors(p, lambda t: t.update(evil=np.zeros(2, np.float32))),
        "'evil' is not part",
    ),
    "tensor shape": (
        lambda p: _rewrite_tensors(
            p, lambda t: t.update({"blocks.0.linear.weight": np.zeros((4, 6), np.float32)})
        ),
        "'blocks.0.linear.weight' has shape [4, 6], config expects [4, 5]",
    ),
    "tensor dtype": (
        lambda p: _rewrite_tensors(
            p, lambda t: t.update({"head.bias": t["head.bias"].astype(np.float64)})
        ),
        "'head.bias' has dtype float64",
    ),
    "nan weight": (
        lambda p: _rewrite_tensors(
            p, lambda t: t.update({"head.bias": np.full(3, np.nan, np.float32)})
        ),
        "'head.bias' holds non-finite",
    ),
    "negative variance": (
        lambda p: _rewrite_tensors(
            p, lambda t: t.update({"blocks.0.bn.running_var": -np.ones(4, np.float32)})
        ),
        "'blocks.0.bn.running_var' holds negative",
    ),
    "corrupt metrics": (lambda p: (p / METRICS_FILE).write_text("{"), "metrics.json"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_checkpoint_is_a_one_line_checkpoint_error(ckpt, case):
    damage, fragment = CASES[case]
    damage(ckpt)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(ckpt)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_missing_and_non_directory_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="must be a directory"):
        read_checkpoint(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="incomplete"):
        read_checkpoint(tmp_path / "empty")


def test_a_folder_around_a_checkpoint_names_the_checkpoint_subfolder(tmp_path, capsys):
    from bn_onnx.cli import main

    shipped = Path(__file__).parent.parent / "models" / "digits"
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(shipped)
    assert str(info.value).endswith(f"the checkpoint is its subfolder {shipped / 'checkpoint'}")
    assert main(["export", str(shipped), "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
    assert err.count("\n") == 1 and f"subfolder {shipped / 'checkpoint'}" in err


def test_reading_never_changes_the_checkpoint(ckpt):
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    read_checkpoint(ckpt)
    load_model(ckpt)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


def test_load_model_refuses_a_copied_checkpoint_with_a_different_config(ckpt, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    _rewrite_config(other, lambda d: d["model"].update(hidden=[4, 7]))
    with pytest.raises(CheckpointError, match="blocks.1.linear.weight"):
        load_model(other)
    assert os.path.isdir(ckpt)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    in_features=st.integers(1, 6),
    out_features=st.integers(1, 4),
    hidden=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    bn=st.sampled_from(["pre", "post", "none"]),
    input_norm=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_round_trip_property(tmp_path, in_features, out_features, hidden, bn, input_norm, seed):
    config = MLPConfig(
        in_features, out_features, hidden=tuple(hidden), bn=bn, input_norm=input_norm
    )
    model = random_model(config, seed)
    out = tmp_path / f"p{seed}-{bn}-{input_norm}-{len(hidden)}"
    save_checkpoint(model, out, {}, {})
    ck = read_checkpoint(out)
    assert ck.config == config
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(ck.tensors[name], value.numpy())
        assert ck.tensors[name].dtype == value.numpy().dtype
