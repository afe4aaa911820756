"""Rule 18 (issue 12, 2i): float16 underflow is flushed where the output provably stays the same.

Provable case: a channel that the unfolded model itself rounds to one value r for every input
(its scale is too small to move the rounded output off r). That channel folds as the constant
r: folded weights exactly zero, bias r. Any other underflow leaves the site, with the reason.
`math.constant_channels` is checked against brute force over every float16 value.
"""

from __future__ import annotations

import numpy as np
import pytest
from fold_testing import ATOL_F16, RTOL_F16, fold_and_compare, model_from_text, reasons, run_ort
from onnx import numpy_helper

from bn_onnx.fold import affine_math as fm
from bn_onnx.fold import fold_model

HEAD = '<ir_version: 8, opset_import: ["" : 18]>'
F16 = np.float16
ALL_F16 = np.arange(1 << 16, dtype=np.uint16).view(F16)
FINITE_F16 = ALL_F16[np.isfinite(ALL_F16)].astype(np.float64)


def _bn(n, rng):
    return {
        "s": rng.uniform(0.5, 1.5, n).astype(F16),
        "b": rng.uniform(-1, 1, n).astype(F16),
        "mu": rng.uniform(-1, 1, n).astype(F16),
        "var": rng.uniform(0.5, 2, n).astype(F16),
    }


def _dead_channel(p, k, beta):
    """Channel k: scale 2**-24 over sqrt(60000) (a ~ 2.4e-10): a * 65504 ~ 1.6e-5 is below
    half an ulp of `beta`, so the BN outputs fl16(beta) for every finite input."""
    p["s"][k] = 2.0**-24
    p["var"][k] = 60000
    p["b"][k] = beta
    p["mu"][k] = 0.25


def _gemm_bn(p, w):
    return model_from_text(
        f"""{HEAD}
        g (float16[N, 5] x) => (float16[N, 4] y) {{
          h = Gemm (x, W)
          y = BatchNormalization (h, s, b, mu, var)
        }}""",
        {"W": w, **p},
    )


def test_constant_channel_is_flushed_and_folds_exactly():
    rng = np.random.default_rng(80)
    p = _bn(4, rng)
    _dead_channel(p, 2, beta=0.5)
    w = rng.normal(size=(5, 4)).astype(F16)
    model = _gemm_bn(p, w)
    x = rng.normal(0, 3, size=(64, 5)).astype(F16)
    x[0, :] = 60000  # the largest inputs do not move channel 2 either
    result = fold_and_compare(model, {"x": x}, atol=ATOL_F16, rtol=RTOL_F16)
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    w_new = next(v for v in inits.values() if v.shape == (5, 4))
    c_new = next(v for v in inits.values() if v.shape == (4,))
    assert (w_new[:, 2] == 0).all() and (w_new[:, [0, 1, 3]] != 0).all()
    assert c_new[2] == F16(0.5)
    # the unfolded model (onnxruntime, float16) outputs 0.5 on channel 2 for every row, and
    # so does the folded one, exactly
    before, after = run_ort(model, {"x": x})[0], run_ort(result.model, {"x": x})[0]
    assert (before[:, 2] == F16(0.5)).all() and (after[:, 2] == F16(0.5)).all()


def test_underflow_in_a_channel_that_varies_is_left_with_the_reason():
    rng = np.random.default_rng(81)
    p = _bn(4, rng)
    _dead_channel(p, 2, beta=0.0)  # around 0 the ulp is 2**-24: the channel varies
    p["mu"][2] = 0
    model = _gemm_bn(p, rng.normal(size=(5, 4)).astype(F16))
    result = fold_model(model)
    assert result.report.n_folded == 0
    assert "underflow to zero in float16" in reasons(result)[0]
    assert "not provably exact" in reasons(result)[0]


@pytest.mark.parametrize(("act", "folds"), [("Sigmoid", True), ("Tanh", True), ("Relu", False)])
def test_bounded_activation_before_the_bn_makes_a_small_scale_constant(act, folds):
    # a = 2**-20: over Sigmoid's [0, 1] (Tanh's [-1, 1]) the BN output stays fl16(1) = 1;
    # over Relu's [0, 65504] it moves. Row 1 of W is small: a * W[1] underflows.
    rng = np.random.default_rng(82)
    p = _bn(4, rng)
    p["s"][1], p["var"][1], p["b"][1], p["mu"][1] = 2.0**-20, 1.0, 1.0, 0.0
    w = rng.normal(size=(4, 3)).astype(F16)
    w[1] = 0.01
    model = model_from_text(
        f"""{HEAD}
        g (float16[N, 4] x) => (float16[N, 3] y) {{
          r = {act} (x)
          t = BatchNormalization <epsilon=0.0> (r, s, b, mu, var)
          y = MatMul (t, W)
        }}""",
        {"W": w, **p},
    )
    x = rng.normal(0, 3, size=(32, 4)).astype(F16)
    if folds:
        result = fold_and_compare(model, {"x": x}, atol=ATOL_F16, rtol=RTOL_F16)
        w_new = next(
            numpy_helper.to_array(t)
            for t in result.model.graph.initializer
            if tuple(t.dims) == (4, 3)
        )
        assert (w_new[1] == 0).all()
    else:
        result = fold_model(model)
        assert result.report.n_folded == 0 and "underflow" in reasons(result)[0]


def test_frozen_bn_chain_in_float16_with_a_constant_channel_folds():
    rng = np.random.default_rng(83)
    scale = rng.uniform(0.5, 1.5, (1, 4, 1, 1)).astype(F16)
    shift = rng.uniform(-1, 1, (1, 4, 1, 1)).astype(F16)
    # |fl16(x * 2**-24)| <= 0.0039 for every finite x, below half an ulp of 16 (2**-7):
    # fl16(fl16(x * 2**-24) + 16) = 16
    scale[0, 3], shift[0, 3] = 2.0**-24, 16
    model = model_from_text(
        f"""{HEAD}
        g (float16[N, 3, 6, 6] x) => (float16[N, 4, 4, 4] y) {{
          c = Conv (x, W)
          m = Mul (c, scale)
          y = Add (m, shift)
        }}""",
        {
            "W": rng.normal(size=(4, 3, 3, 3)).astype(F16) * F16(1e-3),
            "scale": scale,
            "shift": shift,
        },
    )
    x = rng.normal(size=(2, 3, 6, 6)).astype(F16)
    result = fold_and_compare(model, {"x": x}, atol=ATOL_F16, rtol=RTOL_F16)
    (chain,) = result.report.entries
    assert chain.status == "folded"
    w_new = next(
        numpy_helper.to_array(t) for t in result.model.graph.initializer if len(t.dims) == 4
    )
    assert (w_new[3] == 0).all()


# --------------------------------------------------------------------------------------------
# math.constant_channels against brute force over every float16 value


def _brute(steps, lo, hi):
    """Each channel's set of outputs over every float16 in [lo, hi], step by step."""
    xs = FINITE_F16[(FINITE_F16 >= lo) & (FINITE_F16 <= hi)]  # noqa: SIM300
    n = max(np.size(s) for s, _ in steps)
    out = []
    for k in range(n):
        v = xs
        for s, t in steps:
            sk = np.broadcast_to(s, (n,))[k]
            tk = np.broadcast_to(t, (n,))[k]
            v = (sk * v + tk).astype(F16).astype(np.float64)
        out.append(np.unique(v))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_constant_channels_is_sound_against_every_float16_input(seed):
    rng = np.random.default_rng(90 + seed)
    n = 12
    exps = rng.integers(-34, -8, size=n).astype(np.float64)
    s1 = rng.choice([-1, 1], n) * 2.0**exps * rng.uniform(1, 2, n)
    t1 = rng.choice([0.0, 0.5, 1.0, 3.0, -2.0, 1e-3], n)
    s2 = rng.uniform(0.5, 2, n)
    t2 = rng.normal(size=n)
    lo, hi = [(-65504.0, 65504.0), (0.0, 1.0), (-1.0, 1.0), (0.0, 65504.0)][seed % 4]
    for steps in ([(s1, t1)], [(s1, t1), (s2, t2)]):
        mask, value = fm.constant_channels(steps, lo, hi, np.dtype(F16))
        truth = _brute(steps, lo, hi)
        for k in range(n):
            if mask[k]:  # sound: a channel said constant has exactly one output
                assert truth[k].tolist() == [value[k]], (k, steps)
        # and, on these cases (none at a rounding boundary), complete
        assert mask.tolist() == [len(t) == 1 for t in truth]


def test_constant_channels_knows_the_clear_cases():
    mask, value = fm.constant_channels(
        [(np.array([2.0**-30, 2.0**-30, 1.0, 0.0]), np.array([1.0, 0.0, 0.0, 0.3]))],
        -65504.0,
        65504.0,
        np.dtype(F16),
    )
    # 2**-30 * 65504 ~ 6e-5 < half an ulp of 1 (2**-12) but > 2**-25 around 0
    assert mask.tolist() == [True, False, False, True]
    assert value[0] == 1.0 and value[3] == float(F16(0.3))
