"""The batch-norm fold arithmetic, on numpy arrays only.

Inference-mode batch norm is a per-channel affine map y = a*x + c with
a = gamma / sqrt(var + eps) and c = beta - a*mean. Folding moves (a, c) into a neighbouring
linear node. Every function here computes in float64; the caller rounds once to the model's
dtype with `round_to` (which also says why a rounding is unsafe).
"""

from __future__ import annotations

import numpy as np

F64 = np.float64


def bn_affine(
    scale: np.ndarray,
    bias: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (a, c), float64, such that BatchNormalization(x) == a*x + c per channel.

    Raises ValueError when the variance is degenerate (var + eps <= 0 or not finite) or the
    parameters are not finite, since such a BN cannot be folded.
    """
    scale = np.asarray(scale, dtype=F64)
    denom = np.asarray(var, dtype=F64) + F64(eps)
    if not (np.isfinite(denom).all() and (denom > 0).all()):
        raise ValueError("degenerate variance (var + eps <= 0 or not finite)")
    a = scale / np.sqrt(denom)
    c = np.asarray(bias, dtype=F64) - a * np.asarray(mean, dtype=F64)
    if not (np.isfinite(a).all() and np.isfinite(c).all()):
        raise ValueError("batch-norm parameters are not finite")
    return a, c


def fold_preceding(
    weight: np.ndarray,
    bias: np.ndarray | None,
    a: np.ndarray,
    c: np.ndarray,
    out_axis: int,
    weight_scale: float = 1.0,
    bias_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold BN (a, c) into the linear node before it.

    The linear node computes y = weight_scale * (x . weight) + bias_scale * bias, with the
    output channel on `out_axis` of `weight` (1 for a MatMul/Gemm weight (K, N), 0 for a
    transposed Gemm weight or a Conv weight). Returns (new_weight, new_bias) in float64 such
    that a*y + c == x . new_weight + new_bias; `bias` may be None (zero) or any shape that
    broadcasts against the output's last axis.
    """
    new_w = np.array(weight, dtype=F64)  # a float64 copy, scaled in place
    shape = [1] * new_w.ndim
    shape[out_axis] = -1
    new_w *= (F64(weight_scale) * a).reshape(shape)
    new_b = c.copy() if bias is None else a * (F64(bias_scale) * np.asarray(bias, dtype=F64)) + c
    return new_w, new_b


def fold_following(
    weight: np.ndarray,
    bias: np.ndarray | None,
    a: np.ndarray,
    c: np.ndarray,
    transposed: bool = False,
    weight_scale: float = 1.0,
    bias_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold BN (a, c) on the input x of the linear node after it.

    The linear node computes y = weight_scale * (x @ W) + bias_scale * bias with W = weight
    (K, N), or W = weight.T when `transposed` (weight stored (N, K)). Returns
    (new_weight, new_bias) in float64, the weight in the stored layout, such that
    weight_scale * ((a*x + c) @ W) + bias_scale * bias == x @ W' + b'.
    """
    w = np.asarray(weight, dtype=F64)
    wk = w.T if transposed else w  # (K, N)
    new_wk = F64(weight_scale) * a[:, None] * wk
    shift = F64(weight_scale) * (c @ wk)  # (N,)
    new_b = shift if bias is None else F64(bias_scale) * np.asarray(bias, dtype=F64) + shift
    return (new_wk.T if transposed else new_wk), new_b


def fold_conv(
    weight: np.ndarray,
    bias: np.ndarray | None,
    a: np.ndarray,
    c: np.ndarray,
    group: int = 1,
    transpose: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold BN (a, c) into the Conv or ConvTranspose before it, per output channel.

    Conv weights are (C_out, C_in/group, k...): the output channel is axis 0.
    ConvTranspose weights are (C_in, C_out/group, k...): output channel o of group g is
    weight[g*C_in/group:(g+1)*C_in/group, o - g*C_out/group].
    """
    w = np.asarray(weight, dtype=F64)
    if not transpose:
        new_w = w * a.reshape((-1,) + (1,) * (w.ndim - 1))
    else:
        c_in, per_group = w.shape[0], w.shape[1]
        kernel = w.shape[2:]
        wg = w.reshape((group, c_in // group, per_group) + kernel)
        ag = a.reshape((group, 1, per_group) + (1,) * len(kernel))
        new_w = (wg * ag).reshape(w.shape)
    new_b = c.copy() if bias is None else a * np.asarray(bias, dtype=F64) + c
    return new_w, new_b


def compose_affine(
    a1: np.ndarray, c1: np.ndarray, a2: np.ndarray, c2: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The affine map x -> a2*(a1*x + c1) + c2 as one (a, c): two BNs in a row."""
    return a2 * a1, a2 * c1 + c2


def round_to(exact: np.ndarray, dtype: np.dtype, original: np.ndarray | None = None) -> np.ndarray:
    """Round a float64 fold result once to `dtype`; raise ValueError if that is unsafe.

    Unsafe: the exact value is not finite, the rounding overflows to inf, or a value that is
    not zero (exactly, and in `original` when given) underflows to zero.
    """
    exact = np.asarray(exact, dtype=F64)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        rounded = exact.astype(dtype)
    if not np.isfinite(rounded).all():  # one pass covers the usual case
        if not np.isfinite(exact).all():
            raise ValueError("folded value is not finite")
        worst = float(np.abs(exact).max())
        raise ValueError(f"folded value {worst:.3g} overflows {np.dtype(dtype).name}")
    zero = rounded == 0
    if zero.any():
        lost = zero & (exact != 0)
        if original is not None:
            lost &= np.broadcast_to(np.asarray(original), exact.shape) != 0
        if lost.any():
            raise ValueError(
                f"{int(lost.sum())} folded value(s) underflow to zero in {np.dtype(dtype).name}"
            )
    return rounded
