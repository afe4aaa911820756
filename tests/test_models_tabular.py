"""The shipped tabular model under models/tabular: raw CSV rows in, the expected outputs out,
no BatchNormalization after folding, and `tools/make_models.py` reproduces it."""

from __future__ import annotations

import csv
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bn_onnx import onnx_meta
from bn_onnx.checkpoint import read_checkpoint
from bn_onnx.columns import feeds_from_columns, read_columns
from bn_onnx.reference import checkpoint_forward

ROOT = Path(__file__).resolve().parent.parent
TABULAR = ROOT / "models" / "tabular"
ATOL, RTOL = 1e-5, 1e-4


def _make_models():
    spec = importlib.util.spec_from_file_location("make_models", ROOT / "tools" / "make_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plain_ort(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], feeds)[0]


def _csv_columns(path: Path) -> dict[str, list[str]]:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {k: [r[k] for r in rows] for k in rows[0]}


def _schema(path: Path):
    return read_columns(onnx_meta.get_metadata(onnx.load(path)))


def test_shipped_files_are_all_there_and_small():
    for name in [*_make_models().TABULAR_FILES, "MODEL_CARD.md"]:
        assert (TABULAR / name).is_file(), name
    total = sum(p.stat().st_size for p in TABULAR.rglob("*") if p.is_file())
    assert total < 400_000


@pytest.mark.parametrize("name", ["model.folded.onnx", "model.onnx"])
def test_sample_rows_by_column_name_give_the_expected_outputs(name):
    path = TABULAR / name
    feeds = feeds_from_columns(_schema(path), _csv_columns(TABULAR / "sample_rows.csv"))
    expected = np.load(TABULAR / "sample_output.npy", allow_pickle=False)
    assert expected.dtype == np.float32 and expected.shape == (16, 2)
    got = _plain_ort(path, feeds)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)
    exact = checkpoint_forward(TABULAR / "checkpoint", feeds).output
    np.testing.assert_allclose(got, exact, atol=ATOL, rtol=RTOL)
    # the samples include empty cells: gaps go through the graph, not around it
    assert np.isnan(feeds["continuous"]).any() and (feeds["categorical"] == "").any()


def test_folded_scores_held_out_raw_rows_as_training_reported_and_has_no_bn():
    from bn_onnx.data import split_indices

    ckpt = read_checkpoint(TABULAR / "checkpoint")
    meta = ckpt.meta["dataset"]
    cells = _csv_columns(TABULAR / "people.csv")
    # the held-out rows as raw CSV cells: the test split of the recorded seed and fractions
    _, y = np.unique(cells["label"], return_inverse=True)
    _, _, test, _ = split_indices(
        y, len(y), meta["seed"], meta["val_fraction"], meta["test_fraction"]
    )
    held_out = {k: [v[i] for i in test] for k, v in cells.items()}
    folded = TABULAR / "model.folded.onnx"
    feeds = feeds_from_columns(_schema(folded), held_out)
    assert np.isnan(feeds["continuous"]).any() and (feeds["categorical"] == "").any()
    logits = _plain_ort(folded, feeds)
    labels = [ckpt.class_names[k] for k in logits.argmax(1)]
    accuracy = float(np.mean(np.array(labels) == np.array(held_out["label"])))
    assert len(test) == ckpt.metrics["n_test"]
    assert accuracy == pytest.approx(ckpt.metrics["test_accuracy"], abs=1e-9)
    assert accuracy > 0.85
    assert onnx_meta.bn_nodes(onnx.load(folded)) == []
    assert len(onnx_meta.bn_nodes(onnx.load(TABULAR / "model.onnx"))) == 3
    card = (TABULAR / "MODEL_CARD.md").read_text()
    assert f"| `model.folded.onnx`, onnxruntime CPU, raw columns | {accuracy:.4f} |" in card


def test_reexport_from_shipped_checkpoint_reproduces_the_shipped_files(tmp_path):
    make_models = _make_models()
    shutil.copytree(TABULAR / "checkpoint", tmp_path / "tabular" / "checkpoint")
    make_models.make_tabular(tmp_path, retrain=False, log=lambda *_: None)
    new = tmp_path / "tabular"
    for name in ("people.csv", "sample_rows.csv"):
        assert (new / name).read_bytes() == (TABULAR / name).read_bytes(), name
    for name in ("model.onnx", "model.folded.onnx"):
        a, b = onnx.load(TABULAR / name), onnx.load(new / name)
        assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
        assert onnx_meta.get_metadata(a) == onnx_meta.get_metadata(b)
        a_init = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
        b_init = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
        assert a_init.keys() == b_init.keys()
        for key, value in a_init.items():
            np.testing.assert_allclose(b_init[key], value, atol=ATOL, rtol=RTOL, err_msg=key)
    np.testing.assert_allclose(
        np.load(new / "sample_output.npy"),
        np.load(TABULAR / "sample_output.npy"),
        atol=ATOL,
        rtol=RTOL,
    )

    def card(path: Path) -> list[str]:
        return [
            line
            for line in path.read_text(encoding="utf-8").splitlines()
            if not line.startswith("Versions:")
        ]

    assert card(new / "MODEL_CARD.md") == card(TABULAR / "MODEL_CARD.md")


@pytest.mark.slow
def test_retraining_with_the_same_seed_reproduces_the_checkpoint(tmp_path):
    make_models = _make_models()
    make_models.make_tabular(tmp_path, log=lambda *_: None)
    new = read_checkpoint(tmp_path / "tabular" / "checkpoint")
    shipped = read_checkpoint(TABULAR / "checkpoint")
    assert new.meta["model"] == shipped.meta["model"]
    assert new.meta["dataset"] == shipped.meta["dataset"]
    for name, value in shipped.tensors.items():
        # bit-identical on the platform that made it; a tolerance for other CPUs' kernels
        np.testing.assert_allclose(new.tensors[name], value, atol=ATOL, rtol=RTOL, err_msg=name)
