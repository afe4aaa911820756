"""Rewritten weights computed when written (`bn_onnx.fold.lazy`): the same bytes as the eager
fold, the checks before the fold, external data written block by block."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from fold_testing import fold_and_compare, random_mlp, run_ort
from onnx import numpy_helper

from bn_onnx.fold import affine_math as fm
from bn_onnx.fold import fold_file, fold_model, lazy
from bn_onnx.fold.model_io import load_model
from bn_onnx.graphs import build_mlp


@pytest.fixture
def small_blocks(monkeypatch):
    """Every weight lazy (as if memory-mapped), in blocks of 64 elements: the lazy path on
    tiny models."""
    monkeypatch.setattr(lazy, "LAZY_ELEMENTS", 0)
    monkeypatch.setattr(lazy, "is_mapped", lambda array: True)
    monkeypatch.setattr(fm, "CHUNK", 64)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("shape, axis", [((37, 20), 0), ((37, 20), 1), ((9, 4, 3, 3), 0)])
def test_scaled_tensor_equals_scale_rounded_in_every_form(small_blocks, dtype, shape, axis):
    rng = np.random.default_rng(0)
    w = rng.normal(size=shape).astype(dtype)
    f = rng.normal(size=shape[axis])
    factor = f.reshape([-1 if i == axis else 1 for i in range(len(shape))])
    eager = fm.scale_rounded(w, factor)
    t = lazy.scaled(w, factor)
    assert isinstance(t, lazy.ScaledTensor) and repr(t).startswith("ScaledTensor<")
    assert (t.dtype.numpy(), tuple(t.shape.numpy())) == (np.dtype(dtype), shape)
    assert t.numpy().tobytes() == eager.tobytes()
    assert t.tobytes() == eager.tobytes()
    buf = io.BytesIO()
    t.tofile(buf)
    assert buf.getvalue() == eager.tobytes()
    raw = eager.tobytes()
    for n in (1, 7, 100, 4096):
        assert t.end_bytes(n) == raw[:n] + raw[-n:]


@pytest.mark.parametrize(
    "scale, match",
    [(np.float32(1e30), "overflows float32"), (np.float32(1e-30), "underflow to zero")],
)
def test_checks_are_made_before_the_fold_in_blocks(small_blocks, scale, match):
    w = np.ones((50, 10), np.float32) * np.float32(1e10 if scale > 1 else 1e-20)
    factor = np.ones((1, 10))
    factor[0, 3] = scale
    with pytest.raises(ValueError, match=match):
        lazy.scaled(w, factor)


def test_small_weights_and_weights_in_memory_are_computed_at_once(monkeypatch):
    w = np.ones((4, 3), np.float32)
    out = lazy.scaled(w, np.full((1, 3), 2.0))
    assert isinstance(out, np.ndarray) and (out == 2).all()
    monkeypatch.setattr(lazy, "LAZY_ELEMENTS", 0)
    out = lazy.scaled(w, np.full((1, 3), 2.0))  # not memory-mapped: nothing to save
    assert isinstance(out, np.ndarray) and (out == 2).all()


@pytest.mark.parametrize("seed", range(6))
def test_lazy_fold_gives_the_eager_folds_bytes(monkeypatch, seed):
    rng = np.random.default_rng(seed)
    model, n_in = random_mlp(
        lambda lo, hi: int(rng.integers(lo, hi + 1)),
        lambda lo, hi: float(rng.choice([lo, 1.0, hi])),
        lambda: bool(rng.integers(0, 2)),
    )
    x = rng.normal(size=(3, n_in)).astype(np.float32)
    eager = fold_model(model).model.SerializeToString()
    monkeypatch.setattr(lazy, "LAZY_ELEMENTS", 0)
    monkeypatch.setattr(lazy, "is_mapped", lambda array: True)
    monkeypatch.setattr(fm, "CHUNK", 16)
    result = fold_and_compare(model, {"x": x})
    assert result.model.SerializeToString() == eager


def _external(model: onnx.ModelProto, path) -> None:
    """Save with external data (onnx.save would point `model` itself at the data file)."""
    onnx.save(
        onnx.ModelProto.FromString(model.SerializeToString()),
        str(path),
        save_as_external_data=True,
        location=path.name + ".data",
        size_threshold=1024,
    )


def test_external_data_fold_writes_the_same_weights_block_by_block(tmp_path, monkeypatch):
    monkeypatch.setattr(lazy, "LAZY_ELEMENTS", 1000)  # the hidden weights are lazy
    # 600 x 600 float32: above the 1 MB under which external tensors are read as copies
    model = build_mlp([40, 600, 600, 600, 10], "unfolded", bn="pre", seed=2)
    src = tmp_path / "m.onnx"
    _external(model, src)
    written: list[lazy.ScaledTensor] = []
    real = lazy.ScaledTensor.tofile

    def spy(self, file):
        written.append(self)
        real(self, file)

    monkeypatch.setattr(lazy.ScaledTensor, "tofile", spy)
    out = tmp_path / "f.onnx"
    fold_file(src, out, external_data=True)
    assert len(written) >= 2  # the hidden weights went through tofile
    expected = fold_model(model).model
    got = onnx.load(str(out))
    want = {t.name: numpy_helper.to_array(t) for t in expected.graph.initializer}
    have = {t.name: numpy_helper.to_array(t) for t in got.graph.initializer}
    assert want.keys() == have.keys()
    for name, array in want.items():
        assert have[name].tobytes() == array.tobytes(), name
    x = np.random.default_rng(0).normal(size=(5, 40)).astype(np.float32)
    np.testing.assert_allclose(
        run_ort(got, {"input": x})[0], run_ort(model, {"input": x})[0], atol=1e-5, rtol=1e-4
    )


def test_release_pages_keeps_a_mapped_weight_readable(tmp_path):
    model = build_mlp([40, 64, 10], "unfolded", seed=1)
    src = tmp_path / "m.onnx"
    _external(model, src)
    ir_model = load_model(src)
    value = next(v for v in ir_model.graph.initializers.values() if v.const_value.size > 1000)
    array = value.const_value.numpy()
    assert lazy.is_mapped(array) and lazy.is_mapped(array[3:5].T)
    before = array.copy()
    lazy.release_pages(array)
    np.testing.assert_array_equal(array, before)
    assert not lazy.is_mapped(before)
    lazy.release_pages(np.ones(3))  # anonymous memory: nothing to do


def test_identical_rewritten_weights_are_merged_without_computing_them_twice(
    small_blocks, monkeypatch
):
    from fold_testing import bn_params, model_from_text

    # one weight read by two Gemms, each followed by a BN with the same parameters: the fold
    # gives each Gemm its own scaled copy, and the two copies are identical
    rng = np.random.default_rng(5)
    params = bn_params(rng, 64)
    inits = {"W": rng.normal(size=(64, 64)).astype(np.float32), **params}
    inits.update({f"{k}2": v for k, v in params.items()})
    model = model_from_text(
        """<ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 64] x) => (float[N, 64] y1, float[N, 64] y2) {
          h1 = Gemm (x, W)
          y1 = BatchNormalization (h1, s, b, mu, var)
          h2 = Gemm (x, W)
          y2 = BatchNormalization (h2, s2, b2, mu2, var2)
        }""",
        inits,
    )
    computed: list[int] = []
    real = lazy.ScaledTensor._compute

    def counting(self):
        computed.append(id(self))
        return real(self)

    monkeypatch.setattr(lazy.ScaledTensor, "_compute", counting)
    x = rng.normal(size=(3, 64)).astype(np.float32)
    result = fold_and_compare(model, {"x": x})
    gemms = [n for n in result.model.graph.node if n.op_type == "Gemm"]
    assert len({g.input[1] for g in gemms}) == 1  # one weight again (and one Gemm: the same)
    assert result.report.cleanup["deduplicated"] >= 1
    # each copy computed whole once for the byte-for-byte comparison, then once when written
    assert len(computed) == 3


def test_in_place_fold_with_lazy_weights_reads_the_input_before_replacing_it(tmp_path, monkeypatch):
    monkeypatch.setattr(lazy, "LAZY_ELEMENTS", 1000)
    model = build_mlp([40, 600, 600, 600, 10], "unfolded", bn="pre", seed=4)
    src = tmp_path / "m.onnx"
    _external(model, src)
    fold_file(src, src, in_place=True, external_data=True)
    got = onnx.load(str(src))
    assert not [n for n in got.graph.node if n.op_type == "BatchNormalization"]
    want = {t.name: numpy_helper.to_array(t) for t in fold_model(model).model.graph.initializer}
    for t in got.graph.initializer:
        assert numpy_helper.to_array(t).tobytes() == want[t.name].tobytes(), t.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
