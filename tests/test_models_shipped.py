"""The shipped digits model under models/digits: it loads, it gives the expected outputs, and
`tools/make_models.py` reproduces it."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bn_onnx import onnx_meta
from bn_onnx.checkpoint import read_checkpoint
from bn_onnx.reference import checkpoint_forward

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "digits"
ATOL, RTOL = 1e-5, 1e-4
FILES = [
    "checkpoint/config.json",
    "checkpoint/model.safetensors",
    "checkpoint/metrics.json",
    "model.onnx",
    "model.folded.onnx",
    "sample_input.npy",
    "sample_output.npy",
    "MODEL_CARD.md",
]


def _plain_ort(path: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime with nothing from bn-onnx: what an app that only installs ORT does."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def _load_npy(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def _make_models_module():
    spec = importlib.util.spec_from_file_location("make_models", ROOT / "tools" / "make_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_files_are_all_there_and_small():
    for name in FILES:
        assert (DIGITS / name).is_file(), name
    for name in ("model.onnx", "model.folded.onnx", "checkpoint/model.safetensors"):
        assert (DIGITS / name).stat().st_size < 100_000, name
    total = sum(p.stat().st_size for p in DIGITS.rglob("*") if p.is_file())
    assert total < 400_000


def test_sample_input_is_the_start_of_the_test_split():
    from bn_onnx.data import load_split_from_checkpoint_meta

    x = _load_npy(DIGITS / "sample_input.npy")
    assert x.dtype == np.float32 and x.shape == (16, 64)
    data = load_split_from_checkpoint_meta(read_checkpoint(DIGITS / "checkpoint").meta)
    np.testing.assert_array_equal(x, data.x_test[:16])
    assert x.min() >= 0 and x.max() <= 16  # raw pixel counts, not normalized


@pytest.mark.parametrize("name", ["model.folded.onnx", "model.onnx"])
def test_shipped_onnx_gives_the_expected_outputs_in_plain_onnxruntime(name):
    x = _load_npy(DIGITS / "sample_input.npy")
    expected = _load_npy(DIGITS / "sample_output.npy")
    assert expected.dtype == np.float32 and expected.shape == (16, 10)
    got = _plain_ort(DIGITS / name, x)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)
    # and both agree with an independent float64 forward of the shipped checkpoint
    exact = checkpoint_forward(DIGITS / "checkpoint", x).output
    np.testing.assert_allclose(got, exact, atol=ATOL, rtol=RTOL)


def test_folded_equals_unfolded_on_the_whole_test_split_and_accuracy_matches_card():
    from bn_onnx.data import load_split_from_checkpoint_meta

    ckpt = read_checkpoint(DIGITS / "checkpoint")
    data = load_split_from_checkpoint_meta(ckpt.meta)
    x = np.ascontiguousarray(data.x_test, dtype=np.float32)
    unfolded = _plain_ort(DIGITS / "model.onnx", x)
    folded = _plain_ort(DIGITS / "model.folded.onnx", x)
    np.testing.assert_allclose(folded, unfolded, atol=ATOL, rtol=RTOL)
    accuracy = float(np.mean(folded.argmax(1) == data.y_test))
    assert accuracy == pytest.approx(ckpt.metrics["test_accuracy"], abs=1e-9)
    assert accuracy > 0.95
    card = (DIGITS / "MODEL_CARD.md").read_text()
    assert f"| `model.folded.onnx`, onnxruntime CPU | {accuracy:.4f} |" in card


def test_shipped_graphs_bn_kept_and_folded_with_metadata():
    unfolded = onnx.load(DIGITS / "model.onnx")
    folded = onnx.load(DIGITS / "model.folded.onnx")
    assert len(onnx_meta.bn_nodes(unfolded)) == 3  # input norm + two hidden layers
    assert onnx_meta.bn_nodes(folded) == []
    assert onnx_meta.op_counts(folded) == {"Gemm": 3, "Relu": 2}
    for model, flag in ((unfolded, "false"), (folded, "true")):
        onnx.checker.check_model(model, full_check=True)
        meta = onnx_meta.get_metadata(model)
        assert meta[onnx_meta.FOLDED] == flag
        assert json.loads(meta[onnx_meta.CLASS_NAMES]) == [str(i) for i in range(10)]
        assert json.loads(meta[onnx_meta.CONFIG])["hidden"] == [128, 64]


def test_shipped_model_metadata_drives_the_predictor():
    from bn_onnx.runtime import Predictor

    predictor = Predictor(DIGITS / "model.folded.onnx", provider="cpu")
    x = _load_npy(DIGITS / "sample_input.npy")
    expected = _load_npy(DIGITS / "sample_output.npy")
    assert predictor.task == "classification" and predictor.n_features == 64
    assert predictor.predict_labels(x) == [str(i) for i in expected.argmax(1)]


def _assert_same_onnx(a_path: Path, b_path: Path) -> None:
    a, b = onnx.load(a_path), onnx.load(b_path)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert onnx_meta.get_metadata(a) == onnx_meta.get_metadata(b)
    a_init = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    b_init = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    assert a_init.keys() == b_init.keys()
    for name, value in a_init.items():
        np.testing.assert_allclose(b_init[name], value, atol=ATOL, rtol=RTOL, err_msg=name)


def test_reexport_from_shipped_checkpoint_reproduces_the_shipped_files(tmp_path):
    make_models = _make_models_module()
    shutil.copytree(DIGITS / "checkpoint", tmp_path / "digits" / "checkpoint")
    make_models.make_digits(tmp_path, retrain=False, log=lambda *_: None)
    new = tmp_path / "digits"
    for name in ("model.onnx", "model.folded.onnx"):
        _assert_same_onnx(DIGITS / name, new / name)
    np.testing.assert_array_equal(
        _load_npy(new / "sample_input.npy"), _load_npy(DIGITS / "sample_input.npy")
    )
    np.testing.assert_allclose(
        _load_npy(new / "sample_output.npy"),
        _load_npy(DIGITS / "sample_output.npy"),
        atol=ATOL,
        rtol=RTOL,
    )

    # the card differs at most in its versions line (another machine, another onnxruntime)
    def card(path: Path) -> list[str]:
        lines = path.read_text(encoding="utf-8").splitlines()
        return [line for line in lines if not line.startswith("Versions:")]

    assert card(new / "MODEL_CARD.md") == card(DIGITS / "MODEL_CARD.md")


@pytest.mark.slow
def test_retraining_with_the_same_seed_reproduces_the_checkpoint(tmp_path):
    # make_models' training step alone: the ONNX steps after it are the re-export test's.
    from bn_onnx.train import TrainSettings, train

    make_models = _make_models_module()
    train(TrainSettings(**make_models.DIGITS_SETTINGS), tmp_path / "checkpoint")
    new = read_checkpoint(tmp_path / "checkpoint")
    shipped = read_checkpoint(DIGITS / "checkpoint")
    assert new.tensors.keys() == shipped.tensors.keys()
    for name, value in shipped.tensors.items():
        # bit-identical on the platform that made it; a tolerance for other CPUs' kernels
        np.testing.assert_allclose(new.tensors[name], value, atol=ATOL, rtol=RTOL, err_msg=name)
    assert new.meta["model"] == shipped.meta["model"]
    assert new.meta["preprocessing"] == shipped.meta["preprocessing"]
    assert new.metrics["test_accuracy"] == shipped.metrics["test_accuracy"]
