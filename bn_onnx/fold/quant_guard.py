"""The quantization-aware guard on forward folds: keep a BN whose fold would widen the range
of the weight it scales past what per-channel INT8 weights absorb.

A fold into the node after the BN scales the weight's *input* rows by a (one factor per
input channel), while per-channel quantization gives one scale per *output* channel. A few
large factors (an input feature of tiny variance: a = 1/sqrt(var + eps) up to ~35 on digits)
then set each output channel's scale, and the other weights of that channel lose their
precision. The measure is the weight's range: the mean over output channels of
max|w| / rms(w) (about 2.3 for a trained Gemm of 64 inputs). The guard refuses a forward fold
that multiplies it by more than a bound (`fold_model(..., max_row_range_growth=2.0)`); the BN
stays and the quantizer gives its output a scale of its own.

The same fold also changes what the next layer's input quantizer sees: x instead of the
normalized y, with one per-tensor scale for all its channels. A BatchNormalization knows x's
per-channel statistics (running mean m, variance v), so its activation range is estimated
without data: the span m +- 3 sqrt(v) of all channels (0 included, as MinMax does) over the
median channel's sqrt(v) (the inverse of a typical channel's signal-to-step ratio), against
the same for y (mean a*m + c, spread |a| sqrt(v)). A tabular input of incomes next to
embeddings is thousands of times wider than normalized; the guard refuses it by the same
bound. Pure numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from bn_onnx.fold.nodes import label
from bn_onnx.fold.sites import AffineSite, Refusal

if TYPE_CHECKING:
    from bn_onnx.fold.context import FoldContext


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


def activation_range(mean: np.ndarray, std: np.ndarray) -> float:
    """The span a per-tensor MinMax scale covers, [min(0, mean - 3 std), max(0, mean + 3 std)]
    over every channel, divided by the median positive std (inf when no channel varies)."""
    live = std > 0
    if not live.any():
        return float("inf")
    hi = max(0.0, float(np.max(mean + 3.0 * std)))
    lo = min(0.0, float(np.min(mean - 3.0 * std)))
    return (hi - lo) / float(np.median(std[live]))


def activation_growth(site: AffineSite, ctx: FoldContext) -> float | None:
    """How many times wider (`activation_range`) the next layer's input is after the forward
    fold; None when the site is not one BatchNormalization with constant statistics."""
    if site.kind != "BatchNormalization" or len(site.nodes) != 1:
        return None
    node = site.nodes[0]
    if len(node.inputs) < 5:
        return None
    mean, var = (ctx.const(node.inputs[i]) for i in (3, 4))
    if mean is None or var is None or mean.shape != site.a.shape or var.shape != site.a.shape:
        return None
    mean = mean.astype(np.float64)
    std = np.sqrt(np.maximum(var.astype(np.float64), 0.0))
    after = activation_range(mean, std)
    before = activation_range(site.a * mean + site.c, np.abs(site.a) * std)
    if not np.isfinite(after) or not np.isfinite(before) or before == 0.0:
        return None
    return after / before


def input_refusal(site: AffineSite, ctx: FoldContext, bound: float | None) -> Refusal | None:
    """Why the forward fold of `site` is refused under `bound` for the activation range of
    the next layer's input, or None."""
    if bound is None:
        return None
    growth = activation_growth(site, ctx)
    if growth is None or growth <= bound:
        return None
    return Refusal(
        f"quantization-aware: folding forward would feed the next layer {site.x.name!r}"
        f" un-normalized, a per-tensor range {growth:.3g}x wider (the mean +- 3 std span over"
        f" the median std, from the {site.short} statistics), past the bound {bound:g}x"
    )


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
