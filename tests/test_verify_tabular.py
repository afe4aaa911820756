"""`bn-onnx verify` on the shipped tabular model: raw-column inputs (float with NaN, strings),
the checkpoint's test split as raw columns, the random probe scaled by the checkpoint's input
statistics, the torch and float64 checkpoint oracles; a changed weight in the first Gemm's
column of a continuous feature fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bn_onnx.checkpoint import read_checkpoint
from bn_onnx.cli import main
from bn_onnx.verify import oracles

ROOT = Path(__file__).resolve().parent.parent
TABULAR = ROOT / "models" / "tabular"


@pytest.fixture
def at_root(monkeypatch):
    # The shipped checkpoint records its data file relative to the repository root.
    monkeypatch.chdir(ROOT)


def test_test_split_of_a_tabular_checkpoint_is_its_raw_columns(at_root):
    ckpt = read_checkpoint(TABULAR / "checkpoint")
    feeds, source = oracles.test_split(ckpt)
    assert set(feeds) == {"continuous", "categorical"}
    assert feeds["continuous"].dtype == np.float32
    assert np.isnan(feeds["continuous"]).any()  # the raw columns keep their gaps
    assert feeds["categorical"].shape[0] == feeds["continuous"].shape[0]
    assert "raw columns" in source


def test_input_stats_of_a_tabular_checkpoint_are_the_continuous_slice_of_the_input_bn():
    ckpt = read_checkpoint(TABULAR / "checkpoint")
    spec = ckpt.config.tabular
    mean, var = oracles.input_stats(ckpt)["continuous"]
    assert mean.shape == var.shape == (spec.n_continuous,)
    # the input BN's mean of each continuous column is near its training median (the fill)
    fills = np.array([c.fill for c in spec.continuous])
    assert np.all(np.abs(mean - fills) < 3 * np.sqrt(var))


def test_verify_passes_the_shipped_pair_with_data_and_random_probes(at_root, capsys):
    rc = main(
        [
            "verify",
            str(TABULAR / "model.onnx"),
            str(TABULAR / "model.folded.onnx"),
            "--checkpoint",
            str(TABULAR / "checkpoint"),
            "--provider",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "rows of raw columns" in out
    assert "input statistics" in out
    for run in ("float64 checkpoint", "float64 reference", "torch eval"):
        assert run in out


def test_verify_fails_on_a_changed_continuous_weight_and_locates_it(tmp_path, at_root, capsys):
    model = onnx.load(TABULAR / "model.folded.onnx")
    spec = read_checkpoint(TABULAR / "checkpoint").config.tabular
    init = {t.name: t for t in model.graph.initializer}
    w = numpy_helper.to_array(init["blocks.0.linear.weight"]).copy()
    w[3, spec.embedding_width] += 0.5  # the first continuous column's weight, one unit
    init["blocks.0.linear.weight"].CopyFrom(numpy_helper.from_array(w, "blocks.0.linear.weight"))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, bad)
    rc = main(
        [
            "verify",
            str(TABULAR / "model.onnx"),
            str(bad),
            "--checkpoint",
            str(TABULAR / "checkpoint"),
            "--locate",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "node_linear" in out
