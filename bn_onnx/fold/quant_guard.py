"""The quantization-aware guard on forward folds: keep a BN whose fold would widen the range
of the weight it scales past what per-channel INT8 weights absorb.

A fold into the node after the BN scales the weight's *input* rows by a (one factor per
input channel), while per-channel quantization gives one scale per *output* channel. A few
large factors (an input feature of tiny variance: a = 1/sqrt(var + eps) up to ~35 on digits)
then set each output channel's scale, and the other weights of that channel lose their
precision. The measure is the weight's range: the mean over output channels of
max|w| / rms(w) (about 2.3 for a trained Gemm of 64 inputs). The guard refuses a forward fold
that multiplies it by more than a bound (`fold_model(..., max_row_range_growth=2.0)`); the BN
stays and the quantizer gives its output a scale of its own. Pure numpy on the weight.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bn_onnx.fold.sites import AffineSite, Refusal, label


def weight_range(w: np.ndarray, out_axis: int) -> float:
    """Mean over output channels (`out_axis`) of max|w| / rms(w); channels of zeros are left
    out (0.0 when every channel is zero)."""
    flat = np.moveaxis(np.asarray(w, dtype=np.float64), out_axis, 0).reshape(w.shape[out_axis], -1)
    rms = np.sqrt((flat**2).mean(axis=1))
    live = rms > 0
    if not live.any():
        return 0.0
    return float((np.abs(flat[live]).max(axis=1) / rms[live]).mean())


def range_growth(w: np.ndarray, factor: np.ndarray, out_axis: int) -> float:
    """How many times the fold (`w * factor`) widens `weight_range` (1.0 for a zero weight)."""
    before = weight_range(w, out_axis)
    if before == 0.0:
        return 1.0
    return weight_range(np.asarray(w, dtype=np.float64) * factor, out_axis) / before


def refusal(
    site: AffineSite,
    node: ir.Node,
    w: np.ndarray,
    factor: np.ndarray,
    out_axis: int,
    bound: float | None,
) -> Refusal | None:
    """Why the forward fold of `site` into `node` (weight `w` scaled by `factor`) is refused
    under `bound`, or None (no bound, or within it)."""
    if bound is None:
        return None
    growth = range_growth(w, factor, out_axis)
    if growth <= bound:
        return None
    before = weight_range(w, out_axis)
    return Refusal(
        f"quantization-aware: folding into {node.op_type} {label(node)!r} would widen its"
        f" weight's per-channel range (max/rms) {growth:.2f}x ({before:.2f} -> "
        f"{before * growth:.2f}), past the bound {bound:g}x"
    )
