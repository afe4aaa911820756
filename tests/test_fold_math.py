"""The fold arithmetic against torch's fuse_linear_bn_weights and a float64 numpy oracle."""

from __future__ import annotations

import subprocess
import sys

import affine_folds
import numpy as np
import pytest

from bn_onnx.fold import affine_math as fold_math


def _bn(rng, n):
    return (
        rng.normal(1, 0.5, n),
        rng.normal(0, 0.5, n),
        rng.normal(0, 0.5, n),
        rng.uniform(0.1, 2.0, n),
    )


def test_fold_preceding_agrees_with_torch_fuse_linear_bn_weights():
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_linear_bn_weights

    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(6, 4)), rng.normal(size=6)  # torch layout (out, in)
    gamma, beta, mean, var = _bn(rng, 6)
    eps = 1e-5
    a, c = fold_math.bn_affine(gamma, beta, mean, var, eps)
    new_w, new_b = affine_folds.fold_preceding(w, b, a, c, out_axis=0)
    t = [torch.tensor(v, dtype=torch.float64) for v in (w, b, mean, var, gamma, beta)]
    tw, tb = fuse_linear_bn_weights(t[0], t[1], t[2], t[3], eps, t[4], t[5])
    np.testing.assert_allclose(new_w, tw.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(new_b, tb.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_bn_affine_is_batch_norm():
    rng = np.random.default_rng(1)
    gamma, beta, mean, var = _bn(rng, 5)
    x = rng.normal(size=(8, 5))
    a, c = fold_math.bn_affine(gamma, beta, mean, var, 1e-3)
    np.testing.assert_allclose(
        a * x + c, gamma * (x - mean) / np.sqrt(var + 1e-3) + beta, rtol=1e-12
    )


def test_fold_following_matches_affine_then_linear():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(7, 5))
    a, c = fold_math.bn_affine(*_bn(rng, 5), 1e-5)
    w, b = rng.normal(size=(3, 5)), rng.normal(size=3)
    new_w, new_b = affine_folds.fold_following(
        w, b, a, c, transposed=True, weight_scale=0.5, bias_scale=2.0
    )
    want = 0.5 * ((a * x + c) @ w.T) + 2.0 * b
    np.testing.assert_allclose(x @ new_w.T + new_b, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_fold_conv_transpose_matches_per_output_channel_scaling(group):
    rng = np.random.default_rng(3)
    c_in, c_out = 8, 4
    w = rng.normal(size=(c_in, c_out // group, 3))
    a, c = fold_math.bn_affine(*_bn(rng, c_out), 1e-5)
    new_w, _ = affine_folds.fold_conv(w, None, a, c, group=group, transpose=True)
    per_in = c_in // group
    for o in range(c_out):
        grp, j = divmod(o, c_out // group)
        rows = slice(grp * per_in, (grp + 1) * per_in)
        np.testing.assert_allclose(new_w[rows, j], a[o] * w[rows, j], rtol=1e-12)


def test_degenerate_variance_raises_value_error():
    ones = np.ones(2)
    with pytest.raises(ValueError, match="variance"):
        fold_math.bn_affine(ones, ones, ones, np.array([1.0, -1.0]), 1e-5)


def test_round_to_refuses_overflow_underflow_and_non_finite():
    with pytest.raises(ValueError, match="overflows float16"):
        fold_math.round_to(np.array([1e6]), np.float16)
    with pytest.raises(ValueError, match="underflow"):
        fold_math.round_to(np.array([1e-10]), np.float16, original=np.array([1.0]))
    with pytest.raises(ValueError, match="not finite"):
        fold_math.round_to(np.array([np.nan]), np.float32)
    # a zero that was already zero is fine
    out = fold_math.round_to(np.array([0.0, 1.5]), np.float16, original=np.array([0.0, 1.0]))
    assert out.dtype == np.float16 and out.tolist() == [0.0, 1.5]


def test_importing_fold_does_not_import_torch():
    code = "import bn_onnx.fold, bn_onnx.cli.fold, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("shape,axis", [((1100, 300), 1), ((1100, 300), 0), ((3, 2, 5), 0)])
def test_blocked_scale_rounded_equals_one_rounding_of_the_float64_product(shape, axis):
    rng = np.random.default_rng(4)
    w = rng.normal(size=shape).astype(np.float32)  # 330k elements: several blocks
    a = rng.uniform(0.5, 2.0, shape[axis])
    factor = fold_math.preceding_factor(a, w.ndim, axis, weight_scale=0.7)
    got = fold_math.scale_rounded(w, factor)
    want = (w.astype(np.float64) * factor).astype(np.float32)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("transposed", [False, True])
def test_blocked_following_bias_equals_c_at_w(transposed):
    rng = np.random.default_rng(5)
    w = rng.normal(size=(1100, 300)).astype(np.float32)
    k = w.shape[1] if transposed else w.shape[0]
    c, b = rng.normal(size=k), rng.normal(size=w.shape[0] if transposed else w.shape[1])
    wk = w.astype(np.float64).T if transposed else w.astype(np.float64)
    got = fold_math.following_bias(w, b, c, transposed, weight_scale=0.5, bias_scale=2.0)
    np.testing.assert_allclose(got, 2.0 * b + 0.5 * (c @ wk), rtol=1e-12, atol=1e-10)
