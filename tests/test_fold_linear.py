"""Fold rules 1, 2, 5, 6 (Gemm / MatMul before and after the BN) on tiny models in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from fold_testing import bn_params, fold_and_compare, model_from_text, op_count, reasons

HEAD = '<ir_version: 8, opset_import: ["" : 18]>'


def _x(rng, n=4, k=5):
    return rng.normal(size=(7, k) if n is None else (n, k)).astype(np.float32)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (-1.5, 0.0)])
@pytest.mark.parametrize("bias", ["none", "vector", "row", "scalar", "column", "full"])
@pytest.mark.parametrize("trans_a", [0, 1])
def test_fold_into_preceding_gemm_respects_alpha_beta_transb(trans_b, alpha, beta, bias, trans_a):
    rng = np.random.default_rng(1)
    m, k, n = 4, 5, 3
    w = rng.normal(size=(n, k) if trans_b else (k, n)).astype(np.float32)
    shapes = {"vector": (n,), "row": (1, n), "scalar": (), "column": (m, 1), "full": (m, n)}
    inits = {"W": w, **bn_params(rng, n)}
    c_in = ""
    if bias != "none":
        inits["C"] = rng.normal(size=shapes[bias]).astype(np.float32)
        c_in = ", C"
    x_shape = f"[{k}, {m}]" if trans_a else f"[{m}, {k}]"
    model = model_from_text(
        f"""{HEAD}
        g (float{x_shape} x) => (float[{m}, {n}] y) {{
          h = Gemm <transA={trans_a}, transB={trans_b}, alpha={alpha}, beta={beta}> (x, W{c_in})
          y = BatchNormalization (h, s, b, mu, var)
        }}""",
        inits,
    )
    x = rng.normal(size=(k, m) if trans_a else (m, k)).astype(np.float32)
    result = fold_and_compare(model, {"x": x})
    entry = result.report.entries[0]
    assert entry.direction == "preceding" and entry.target_op == "Gemm"
    assert op_count(result.model, "Gemm") == 1
    assert result.report.nodes_after == 1
    # BN parameters are gone; only the weight and the bias remain
    assert result.report.initializers_after == 2


@pytest.mark.parametrize("bias_pos", [None, 0, 1])
def test_fold_into_preceding_matmul_and_matmul_add(bias_pos):
    rng = np.random.default_rng(2)
    inits = {"W": rng.normal(size=(5, 3)).astype(np.float32), **bn_params(rng, 3)}
    if bias_pos is None:
        body = "h = MatMul (x, W)"
    else:
        inits["B"] = rng.normal(size=(3,)).astype(np.float32)
        args = "(z, B)" if bias_pos == 0 else "(B, z)"
        body = f"z = MatMul (x, W)\n h = Add {args}"
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => (float[N, 3] y) {{
          {body}
          y = BatchNormalization (h, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng)})
    assert op_count(result.model, "MatMul") == 1 and op_count(result.model, "Add") == 1
    assert result.report.entries[0].direction == "preceding"


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (2.0, 0.0)])
@pytest.mark.parametrize("with_c", [False, True])
@pytest.mark.parametrize("before", ["Relu", "input"])
def test_fold_into_following_gemm_respects_alpha_beta_transb(trans_b, alpha, beta, with_c, before):
    rng = np.random.default_rng(3)
    k, n = 5, 3
    inits = {
        "W": rng.normal(size=(n, k) if trans_b else (k, n)).astype(np.float32),
        **bn_params(rng, k),
    }
    c_in = ""
    if with_c:
        inits["C"] = rng.normal(size=(n,)).astype(np.float32)
        c_in = ", C"
    pre = "r = Relu (x)" if before == "Relu" else "r = Identity (x)"
    src = "r" if before == "Relu" else "x"
    model = model_from_text(
        f"""{HEAD}
        g (float[N, {k}] x) => (float[N, {n}] y, float[N, {k}] r) {{
          {pre}
          t = BatchNormalization ({src}, s, b, mu, var)
          y = Gemm <transB={trans_b}, alpha={alpha}, beta={beta}> (t, W{c_in})
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, k=k)})
    assert result.report.entries[0].direction == "following"


@pytest.mark.parametrize("add_bias", [False, True])
def test_fold_into_following_matmul(add_bias):
    rng = np.random.default_rng(4)
    inits = {"W": rng.normal(size=(5, 3)).astype(np.float32), **bn_params(rng, 5)}
    tail = "y = MatMul (t, W)"
    if add_bias:
        inits["B"] = rng.normal(size=(1, 3)).astype(np.float32)
        tail = "z = MatMul (t, W)\n y = Add (B, z)"
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => (float[N, 3] y) {{
          r = Sigmoid (x)
          t = BatchNormalization (r, s, b, mu, var)
          {tail}
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng)})
    assert op_count(result.model, "Add") == 1


def test_fold_into_several_following_readers_sharing_a_weight():
    rng = np.random.default_rng(5)
    inits = {
        "W": rng.normal(size=(5, 3)).astype(np.float32),
        "V": rng.normal(size=(3, 5)).astype(np.float32),
        **bn_params(rng, 5),
    }
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => (float[N, 3] y1, float[N, 3] y2, float[N, 3] y3) {{
          r = Tanh (x)
          t = BatchNormalization (r, s, b, mu, var)
          y1 = MatMul (t, W)
          y2 = Gemm (t, W)
          y3 = Gemm <transB=1, alpha=0.3> (t, V)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng)})
    assert result.report.entries[0].direction == "following"
    assert "," in result.report.entries[0].target


def test_shared_weight_is_cloned_not_changed_under_the_other_node():
    rng = np.random.default_rng(6)
    inits = {"W": rng.normal(size=(5, 5)).astype(np.float32), **bn_params(rng, 5)}
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => (float[N, 5] y, float[N, 5] other) {{
          h = Gemm (x, W)
          y = BatchNormalization (h, s, b, mu, var)
          other = MatMul (x, W)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng)})
    names = {t.name for t in result.model.graph.initializer}
    assert "W" in names and len(names) == 3  # W kept for the other node, clone + bias


def test_bn_before_rank3_matmul_is_left():
    rng = np.random.default_rng(7)
    inits = {"W": rng.normal(size=(5, 3)).astype(np.float32), **bn_params(rng, 4)}
    model = model_from_text(
        f"""{HEAD}
        g (float[2, 4, 5] x) => (float[2, 4, 3] y) {{
          r = Relu (x)
          t = BatchNormalization (r, s, b, mu, var)
          y = MatMul (t, W)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": rng.normal(size=(2, 4, 5)).astype(np.float32)}, folded=0)
    assert "rank 3" in reasons(result)[0]


def test_bn_after_rank3_matmul_is_left():
    rng = np.random.default_rng(8)
    inits = {"W": rng.normal(size=(5, 3)).astype(np.float32), **bn_params(rng, 4)}
    model = model_from_text(
        f"""{HEAD}
        g (float[2, 4, 5] x) => (float[2, 4, 3] y) {{
          h = MatMul (x, W)
          y = BatchNormalization (h, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": rng.normal(size=(2, 4, 5)).astype(np.float32)}, folded=0)
    assert "rank 3" in reasons(result)[0]


def test_following_gemm_with_trans_a_is_left():
    rng = np.random.default_rng(9)
    inits = {"W": rng.normal(size=(4, 3)).astype(np.float32), **bn_params(rng, 5)}
    model = model_from_text(
        f"""{HEAD}
        g (float[4, 5] x) => (float[5, 3] y) {{
          r = Relu (x)
          t = BatchNormalization (r, s, b, mu, var)
          y = Gemm <transA=1> (t, W)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng)}, folded=0)
    assert "transA=1" in reasons(result)[0]
