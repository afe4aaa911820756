"""Whole folds of one weight and bias in float64, composed of the pieces the rules use
(`bn_onnx.fold.affine_math`): what the tests compare against torch's fusion and float64 forwards."""

from __future__ import annotations

import numpy as np

from bn_onnx.fold import affine_math as fm


def fold_conv_following(
    weight: np.ndarray,
    bias: np.ndarray | None,
    a: np.ndarray,
    c: np.ndarray,
    group: int = 1,
    transpose: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold BN (a, c) on the input of the Conv or ConvTranspose after it, in float64.

    Exact where every kernel tap of every output reads a real input element: a Conv that pads
    nothing, a ConvTranspose of stride 1 whose pads crop every border position that sees fewer
    taps (see `bn_onnx.fold.following`). Returns (new_weight, new_bias).
    """
    w = np.asarray(weight, dtype=np.float64)
    new_w = w * fm.conv_input_factor(a, w.shape, group, transpose)
    shift = fm.conv_input_shift(w, c, group, transpose)
    return new_w, shift if bias is None else np.asarray(bias, dtype=np.float64) + shift


def fold_preceding(
    weight: np.ndarray,
    bias: np.ndarray | None,
    a: np.ndarray,
    c: np.ndarray,
    out_axis: int,
    weight_scale: float = 1.0,
    bias_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold BN (a, c) into the linear node before it, exactly, in float64.

    The linear node computes y = weight_scale * (x . weight) + bias_scale * bias, with the
    output channel on `out_axis` of `weight` (1 for a MatMul/Gemm weight (K, N), 0 for a
    transposed Gemm weight or a Conv weight). Returns (new_weight, new_bias) such that
    a*y + c == x . new_weight + new_bias.
    """
    w = np.asarray(weight, dtype=np.float64)
    return w * fm.preceding_factor(a, w.ndim, out_axis, weight_scale), fm.preceding_bias(
        bias, a, c, bias_scale
    )


def fold_following(
    weight: np.ndarray,
    bias: np.ndarray | None,
    a: np.ndarray,
    c: np.ndarray,
    transposed: bool = False,
    weight_scale: float = 1.0,
    bias_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold BN (a, c) on the input x of the linear node after it, exactly, in float64.

    The linear node computes y = weight_scale * (x @ W) + bias_scale * bias with W = weight
    (K, N), or W = weight.T when `transposed` (weight stored (N, K)). Returns
    (new_weight, new_bias), the weight in the stored layout, such that
    weight_scale * ((a*x + c) @ W) + bias_scale * bias == x @ W' + b'.
    """
    w = np.asarray(weight, dtype=np.float64)
    new_w = w * fm.following_factor(a, transposed, weight_scale)
    return new_w, fm.following_bias(w, bias, c, transposed, weight_scale, bias_scale)


def fold_conv(
    weight: np.ndarray,
    bias: np.ndarray | None,
    a: np.ndarray,
    c: np.ndarray,
    group: int = 1,
    transpose: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold BN (a, c) into the Conv or ConvTranspose before it, exactly, in float64."""
    w = np.asarray(weight, dtype=np.float64)
    new_w = w * fm.conv_factor(a, w.shape, group, transpose)
    return new_w, fm.preceding_bias(bias, a, c)
