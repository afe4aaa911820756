"""The forward fold keeps an exact centring when the input sits far from zero
(`bn_onnx.fold.centring`): the folded model's error against float64 stays within the unfolded
model's, and inputs near zero fold as before, with no new node."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fold_testing import model_from_text, op_count
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bn_onnx.cli import main
from bn_onnx.fold import centring, fold_model

PENGUINS = Path(__file__).parent / "data" / "penguins.csv"
CENTRED_ABOVE = 32.0  # mean/std: the documented threshold (`centring.MIN_RATIO`)

BN_MLP = """<ir_version: 8, opset_import: ["" : 18]>
g (float[N, 6] x) => (float[N, 3] y) {
  n = BatchNormalization <epsilon: float = 1e-5> (x, s, b, mu, var)
  h = Gemm <transB: int = 1> (n, w1, b1)
  r = Relu(h)
  y = Gemm <transB: int = 1> (r, w2, b2)
}"""

SUB_DIV_MLP = """<ir_version: 8, opset_import: ["" : 18]>
g (float[N, 6] x) => (float[N, 3] y) {
  d = Sub(x, mu)
  n = Div(d, sd)
  y = Gemm <transB: int = 1> (n, w1, b1)
}"""

MUL_ADD_MLP = """<ir_version: 8, opset_import: ["" : 18]>
g (float[N, 6] x) => (float[N, 3] y) {
  m = Mul(x, k)
  n = Add(m, c)
  y = Gemm <transB: int = 1> (n, w1, b1)
}"""

BN_CONV = """<ir_version: 8, opset_import: ["" : 18]>
g (float[N, 4, 5, 5] x) => (float[N, 3, 5, 5] y) {
  n = BatchNormalization <epsilon: float = 1e-5> (x, s, b, mu, var)
  y = Conv (n, w, wb)
}"""


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _bn_mlp(rng: np.random.Generator, ratios: np.ndarray, affine: bool):
    """BN -> Gemm -> Relu -> Gemm with running means `ratios` x std; inputs drawn around the
    mean; the numpy float64 oracle of its outputs."""
    std = rng.uniform(0.05, 20.0, 6)
    p = {
        "s": rng.normal(1.0, 0.5, 6) if affine else np.ones(6),
        "b": rng.normal(0.0, 0.5, 6) if affine else np.zeros(6),
        "mu": ratios * std * rng.choice([-1.0, 1.0], 6),
        "var": std**2,
        "w1": rng.normal(0, 0.4, (16, 6)),
        "b1": rng.normal(0, 0.1, 16),
        "w2": rng.normal(0, 0.3, (3, 16)),
        "b2": rng.normal(0, 0.1, 3),
    }
    p = {k: v.astype(np.float32) for k, v in p.items()}
    x = (p["mu"] + rng.normal(0, 1, (256, 6)) * std).astype(np.float32)
    q = {k: v.astype(np.float64) for k, v in p.items()}
    a = q["s"] / np.sqrt(q["var"] + 1e-5)
    n = (x.astype(np.float64) - q["mu"]) * a + q["b"]
    h = np.maximum(n @ q["w1"].T + q["b1"], 0.0)
    return model_from_text(BN_MLP, p), x, h @ q["w2"].T + q["b2"]


def _errors(model, x, oracle):
    result = fold_model(model)
    unfolded = np.abs(_ort(model, x) - oracle).max()
    folded = np.abs(_ort(result.model, x) - oracle).max()
    return result, unfolded, folded


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    log_ratios=st.lists(st.floats(-2.0, 4.0), min_size=6, max_size=6),
    affine=st.booleans(),
)
def test_folded_input_norm_stays_within_the_unfolded_error(seed, log_ratios, affine):
    rng = np.random.default_rng(seed)
    ratios = 10.0 ** np.asarray(log_ratios)  # |mean| / std per feature, 0.01 to 1e4
    model, x, oracle = _bn_mlp(rng, ratios, affine)
    result, unfolded, folded = _errors(model, x, oracle)
    assert op_count(result.model, "BatchNormalization") == 0
    if ratios.max() > CENTRED_ABOVE * 1.01:  # 1%: eps and float32 move the ratio
        assert op_count(result.model, "Sub") == 1
        assert "centred by Sub" in (result.report.entries[0].note or "")
        assert folded <= 2 * unfolded + 1e-6, (folded, unfolded)
    elif ratios.max() < CENTRED_ABOVE * 0.99:  # no new node; the plain fold costs about a bit
        assert [n.op_type for n in result.model.graph.node] == ["Gemm", "Relu", "Gemm"]
        assert result.report.entries[0].note is None
        assert folded <= 4 * unfolded + 1e-6, (folded, unfolded)


def test_small_means_fold_exactly_as_without_centring(monkeypatch):
    model, _, _ = _bn_mlp(np.random.default_rng(0), np.full(6, 3.0), affine=True)
    before = fold_model(model).model.SerializeToString()
    monkeypatch.setattr(centring, "MIN_RATIO", np.inf)
    assert fold_model(model).model.SerializeToString() == before


def test_far_means_cost_a_sub_and_beat_the_plain_fold(monkeypatch):
    model, x, oracle = _bn_mlp(np.random.default_rng(1), np.full(6, 2500.0), affine=False)
    result, unfolded, folded = _errors(model, x, oracle)
    sub = next(n for n in result.model.graph.node if n.op_type == "Sub")
    assert sub.input[0] == "x" and sub.doc_string == centring.MARK
    monkeypatch.setattr(centring, "MIN_RATIO", np.inf)
    plain = np.abs(_ort(fold_model(model).model, x) - oracle).max()
    assert folded * 10 < plain  # measured: about 1000x
    assert folded <= unfolded


def test_sub_div_normalization_is_centred_and_mul_add_is_not():
    rng = np.random.default_rng(2)
    std = rng.uniform(0.5, 2.0, 6)
    mu = 2008.0 + rng.normal(0, 1, 6)
    w, b = rng.normal(0, 0.4, (3, 6)), rng.normal(0, 0.1, 3)
    x = (mu + rng.normal(0, 1, (256, 6)) * std).astype(np.float32)
    f32 = {"w1": w.astype(np.float32), "b1": b.astype(np.float32)}
    mu32, sd32 = mu.astype(np.float32), std.astype(np.float32)
    oracle = (x - mu32.astype(np.float64)) / sd32.astype(np.float64) @ f32["w1"].T.astype(
        np.float64
    ) + f32["b1"]
    model = model_from_text(SUB_DIV_MLP, {"mu": mu32, "sd": sd32, **f32})
    result, unfolded, folded = _errors(model, x, oracle)
    assert [n.op_type for n in result.model.graph.node] == ["Sub", "Gemm"]
    assert folded <= 2 * unfolded + 1e-6, (folded, unfolded)
    # x * k + c (FrozenBatchNorm's form) adds the large terms at run time already: as before
    k, c = (1 / sd32).astype(np.float32), (-mu32 / sd32).astype(np.float32)
    plain = fold_model(model_from_text(MUL_ADD_MLP, {"k": k, "c": c, **f32})).model
    assert [n.op_type for n in plain.graph.node] == ["Gemm"]


def test_bn_before_an_unpadded_conv_is_centred_per_channel():
    rng = np.random.default_rng(3)
    std = rng.uniform(0.5, 2.0, 4)
    p = {
        "s": np.ones(4),
        "b": np.zeros(4),
        "mu": 1000.0 * std,
        "var": std**2,
        "w": rng.normal(0, 0.4, (3, 4, 1, 1)),
        "wb": rng.normal(0, 0.1, 3),
    }
    p = {k: v.astype(np.float32) for k, v in p.items()}
    x = (p["mu"][:, None, None] + rng.normal(0, 1, (8, 4, 5, 5)) * std[:, None, None]).astype(
        np.float32
    )
    q = {k: v.astype(np.float64) for k, v in p.items()}
    n = (x - q["mu"][:, None, None]) / np.sqrt(q["var"] + 1e-5)[:, None, None]
    oracle = np.einsum("nchw,oc->nohw", n, q["w"][:, :, 0, 0]) + q["wb"][:, None, None]
    result, unfolded, folded = _errors(model_from_text(BN_CONV, p), x, oracle)
    graph = result.model.graph
    assert [node.op_type for node in graph.node] == ["Sub", "Conv"]
    mean = next(i for i in graph.initializer if i.name == graph.node[0].input[1])
    assert list(mean.dims) == [4, 1, 1]
    assert folded <= 2 * unfolded + 1e-6, (folded, unfolded)


def test_folding_a_folded_model_keeps_the_centring():
    model, x, _ = _bn_mlp(np.random.default_rng(4), np.full(6, 500.0), affine=False)
    once = fold_model(model)
    twice = fold_model(once.model)
    assert [n.op_type for n in twice.model.graph.node] == ["Sub", "Gemm", "Relu", "Gemm"]
    assert "exact centring kept for precision" in twice.report.entries[0].reason
    np.testing.assert_array_equal(_ort(twice.model, x), _ort(once.model, x))


def test_fold_summary_says_the_site_was_centred(tmp_path, capsys):
    model, _, _ = _bn_mlp(np.random.default_rng(5), np.full(6, 100.0), affine=False)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    assert main(["fold", str(src), "-o", str(tmp_path / "f.onnx")]) == 0
    out = capsys.readouterr().out
    assert "following -> " in out and "(scale only; centred by Sub: mean/std up to 100)" in out


@pytest.mark.slow
def test_penguins_folded_export_passes_verify(tmp_path):
    """Penguins' `year` (2008 +- 0.8, mean/std about 2500) made the plain fold fail verify."""
    ckpt, onnx_path = tmp_path / "pen", tmp_path / "pen.folded.onnx"
    train = ["train", "--dataset", str(PENGUINS), "--target", "species", "--quiet"]
    assert main([*train, "--test-fraction", "0", "--epochs", "15", "--out", str(ckpt)]) == 0
    assert main(["export", str(ckpt), "-o", str(onnx_path), "--fold"]) == 0
    folded = onnx.load(onnx_path)
    assert op_count(folded, "BatchNormalization") == 0 and op_count(folded, "Sub") == 1
    assert main(["verify", str(onnx_path), "--checkpoint", str(ckpt)]) == 0
