"""Walk steps through Cast (`bn_onnx.fold.casts`) and Split (`bn_onnx.fold.splits`).

The autocast sandwich Conv(float16) -> Cast(float32) -> BN -> Cast(float16) folds into the
float16 Conv; its error against a float64 oracle (onnx.reference on the same graph in float64)
stays within verify's bound for folding (at most twice the original's: the folded weights and
bias are rounded to float16 once more). A BN on one output of a Split folds into the producer's
output channels of that slice; the other outputs keep their values bit for bit. onnxruntime
runs with its graph optimizations off.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from fold_testing import bn_params, model_from_text, op_count, reasons
from onnx.reference import ReferenceEvaluator
from test_fold_constants import run_plain

from bn_onnx.fold import fold_model

SANDWICH = """
<ir_version: 8, opset_import: ["" : 18]>
g (float16[2, 3, 8, 8] x) => (float16[2, 8, 6, 6] y) {{
  c = Conv(x, w, wb)
  c32 = Cast<to=1>(c)
  n = BatchNormalization(c32, s, b, mu, var)
  y = {after}
}}
"""
FLOAT64 = """
<ir_version: 8, opset_import: ["" : 18]>
g (double[2, 3, 8, 8] x) => (double[2, 8, 6, 6] y) {
  c = Conv(x, w, wb)
  y = BatchNormalization(c, s, b, mu, var)
}
"""


def _sandwich(rng, after="Cast<to=10>(n)"):
    inits = {
        "w": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float16),
        "wb": rng.normal(size=8).astype(np.float16),
        **bn_params(rng, 8),
    }
    return model_from_text(SANDWICH.format(after=after), inits), inits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cast_bn_cast_around_a_float16_conv_folds_into_it_within_the_original_error(seed):
    rng = np.random.default_rng(seed)
    model, inits = _sandwich(rng)
    result = fold_model(model)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report.n_folded == 1 and op_count(result.model, "BatchNormalization") == 0
    conv = next(n for n in result.model.graph.node if n.op_type == "Conv")
    w = next(t for t in result.model.graph.initializer if t.name == conv.input[1])
    assert w.data_type == onnx.TensorProto.FLOAT16  # folded into the float16 Conv
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float16)
    oracle = model_from_text(FLOAT64, {k: v.astype(np.float64) for k, v in inits.items()})
    (exact,) = ReferenceEvaluator(oracle).run(None, {"x": x.astype(np.float64)})
    (orig,) = run_plain(model, {"x": x})
    (got,) = run_plain(result.model, {"x": x})
    assert got.dtype == np.float16
    err_orig = np.abs(orig.astype(np.float64) - exact).max()
    err_fold = np.abs(got.astype(np.float64) - exact).max()
    assert err_fold <= 2 * err_orig, (err_fold, err_orig)
    np.testing.assert_allclose(
        got.astype(np.float64), orig.astype(np.float64), atol=2e-2, rtol=1e-2
    )


def test_a_widening_cast_without_a_cast_back_is_left_with_the_reason():
    """Without the Cast back, the original keeps the BN's output in float32."""
    model, _ = _sandwich(np.random.default_rng(3), after="Relu(n)")
    model.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    result = fold_model(model)
    assert result.report.n_folded == 0
    assert "which the original does not (no Cast back to FLOAT16 after it)" in reasons(result)[0]


def test_bn_before_a_widening_cast_folds_into_the_following_gemm_and_a_narrowing_one_is_left():
    rng = np.random.default_rng(4)
    text = """
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[3, 5] x) => (float[3, 4] y) {{
      n = BatchNormalization(x, s, b, mu, var)
      h = Cast<to={to}>(n)
      y32 = Gemm(h, w)
      y = Cast<to=1>(y32)
    }}
    """
    x = {"x": rng.normal(size=(3, 5)).astype(np.float32)}
    params = bn_params(rng, 5)
    wide = model_from_text(
        text.format(to=11), {**params, "w": rng.normal(size=(5, 4)).astype(np.float64)}
    )
    result = fold_model(wide)
    assert op_count(result.model, "BatchNormalization") == 0
    np.testing.assert_allclose(run_plain(result.model, x)[0], run_plain(wide, x)[0], rtol=1e-5)
    narrow = model_from_text(
        text.format(to=10), {**params, "w": rng.normal(size=(5, 4)).astype(np.float16)}
    )
    result = fold_model(narrow)
    assert result.report.n_folded == 0
    assert "narrows FLOAT to FLOAT16" in reasons(result)[0]


SPLIT = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[2, 3, 6, 6] x) => (float[2, 2, 4, 4] y0, float[2, 4, 4, 4] y1, float[2, 2, 4, 4] y2) {
  c = Conv(x, w, wb)
  y0, s1, s2 = Split<axis=1>(c, sp)
  y1 = BatchNormalization(s1, s, b, mu, var)
  y2 = BatchNormalization(s2, s_, b_, mu_, var_)
}
"""


def test_bn_on_split_outputs_folds_into_the_producers_channels_of_each_slice():
    rng = np.random.default_rng(5)
    inits = {
        "w": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
        "wb": rng.normal(size=8).astype(np.float32),
        "sp": np.array([2, 4, 2], np.int64),
        **bn_params(rng, 4),
        **{f"{k}_": v for k, v in bn_params(rng, 2).items()},
    }
    model = model_from_text(SPLIT, inits)
    onnx.checker.check_model(model, full_check=True)
    result = fold_model(model)
    onnx.checker.check_model(result.model, full_check=True)
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Split"]
    feeds = {"x": rng.normal(size=(2, 3, 6, 6)).astype(np.float32)}
    want, got = run_plain(model, feeds), run_plain(result.model, feeds)
    np.testing.assert_array_equal(got[0], want[0])  # channels 0-1: scaled by exactly 1
    for g, w in zip(got[1:], want[1:], strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


def test_bn_on_a_split_along_another_axis_is_left_and_a_bn_before_a_split_folds_after_it():
    rng = np.random.default_rng(6)
    text = """
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[4, 5] x) => (float[2, 3] y0, float[4, 3] y1) {
      h = Gemm(x, w)
      a, b2 = Split<axis=0, num_outputs=2>(h)
      y0 = BatchNormalization(a, s, b, mu, var)
      n = BatchNormalization(x, s5, b5, mu5, var5)
      p, q = Split<axis=1>(n, sp)
      g2 = Gemm(p, w2)
      g3 = Gemm(q, w3)
      y1 = Add(g2, g3)
    }
    """
    inits = {
        "w": rng.normal(size=(5, 3)).astype(np.float32),
        "w2": rng.normal(size=(2, 3)).astype(np.float32),
        "w3": rng.normal(size=(3, 3)).astype(np.float32),
        "sp": np.array([2, 3], np.int64),
        **bn_params(rng, 3),
        **{f"{k}5": v for k, v in bn_params(rng, 5).items()},
    }
    model = model_from_text(text, inits)
    onnx.checker.check_model(model, full_check=True)
    result = fold_model(model)
    left = [e for e in result.report.entries if e.status == "left"]
    assert len(left) == 1 and "splits axis 0, the channels are on axis 1" in left[0].reason
    feeds = {"x": rng.normal(size=(4, 5)).astype(np.float32)}
    for g, w in zip(run_plain(result.model, feeds), run_plain(model, feeds), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)
