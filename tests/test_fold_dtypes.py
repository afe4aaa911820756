"""Rule 10 and the dtype policy: float16 and bfloat16 models, float64 math rounded once."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from fold_testing import (
    ATOL_BF16,
    ATOL_F16,
    RTOL_BF16,
    RTOL_F16,
    bn_params,
    fold_and_compare,
    model_from_text,
    run_ort,
)
from onnx import numpy_helper

from bn_onnx.fold import fold_model

HEAD = '<ir_version: 8, opset_import: ["" : 18]>'


@pytest.mark.parametrize("placement", ["preceding", "following"])
def test_float16_model_folds_within_float16_tolerance(placement):
    rng = np.random.default_rng(30)
    inits = {"W": rng.normal(size=(5, 5)).astype(np.float16), **bn_params(rng, 5, np.float16)}
    inits["C"] = rng.normal(size=(5,)).astype(np.float16)
    body = (
        "h = Gemm <transB=1> (x, W, C)\n y = BatchNormalization (h, s, b, mu, var)"
        if placement == "preceding"
        else "r = Relu (x)\n t = BatchNormalization (r, s, b, mu, var)\n y = MatMul (t, W)"
    )
    model = model_from_text(
        f"""{HEAD}
        g (float16[N, 5] x) => (float16[N, 5] y) {{
          {body}
        }}""",
        inits,
    )
    x = rng.normal(size=(6, 5)).astype(np.float16)
    result = fold_and_compare(model, {"x": x}, atol=ATOL_F16, rtol=RTOL_F16)
    for t in result.model.graph.initializer:
        assert numpy_helper.to_array(t).dtype == np.float16


def _numpy_forward_bf16(model, x):
    """A numpy float64 oracle for Gemm(transB=1) -> BN or a single Gemm, bfloat16 weights."""
    arrays = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    out = x.astype(np.float64)
    for node in model.graph.node:
        if node.op_type == "Gemm":
            out = out @ arrays[node.input[1]].T + arrays[node.input[2]]
        elif node.op_type == "BatchNormalization":
            s, b, mu, var = (arrays[n] for n in node.input[1:])
            out = s * (out - mu) / np.sqrt(var + 1e-5) + b
    return out


def test_bfloat16_model_folds_and_keeps_bfloat16():
    rng = np.random.default_rng(31)
    bf16 = ml_dtypes.bfloat16
    inits = {"W": rng.normal(size=(3, 5)).astype(bf16), **bn_params(rng, 3, bf16)}
    inits["C"] = rng.normal(size=(3,)).astype(bf16)
    model = model_from_text(
        f"""{HEAD}
        g (bfloat16[N, 5] x) => (bfloat16[N, 3] y) {{
          h = Gemm <transB=1> (x, W, C)
          y = BatchNormalization (h, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_model(model)
    assert result.n_folded == 1
    for t in result.model.graph.initializer:
        assert t.data_type == 16  # BFLOAT16
    x = rng.normal(size=(6, 5)).astype(bf16)
    want = _numpy_forward_bf16(model, x)
    got = _numpy_forward_bf16(result.model, x)
    np.testing.assert_allclose(got, want, atol=ATOL_BF16, rtol=RTOL_BF16)


def test_float32_fold_rounds_once_from_float64():
    """The folded weight equals the float64 product rounded once, bit for bit."""
    rng = np.random.default_rng(32)
    w = rng.normal(size=(5, 3)).astype(np.float32)
    p = bn_params(rng, 3)
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => (float[N, 3] y) {{
          h = MatMul (x, W)
          y = BatchNormalization (h, s, b, mu, var)
        }}""",
        {"W": w, **p},
    )
    result = fold_model(model)
    folded_w = numpy_helper.to_array(
        next(t for t in result.model.graph.initializer if t.name == "W")
    )
    a = p["s"].astype(np.float64) / np.sqrt(p["var"].astype(np.float64) + np.float32(1e-5))
    np.testing.assert_array_equal(folded_w, (w.astype(np.float64) * a).astype(np.float32))
    x = rng.normal(size=(4, 5)).astype(np.float32)
    np.testing.assert_allclose(
        run_ort(result.model, {"x": x})[0], run_ort(model, {"x": x})[0], atol=1e-5, rtol=1e-4
    )
