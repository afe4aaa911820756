"""Rules 5, 6 and 21, precision: keep an exact centring in front when folding forward cancels.

Folding y = a*x + c forward into x' . W + b gives x . (diag(a) W) + (b + c W). When the input
sits far from zero relative to its spread (|mean| >> std: a year, 2008 +- 0.8), the run-time
terms x_i a_i W_ij are about |mean_i|/std_i times larger than their sum, which cancels: float32
loses about log2(|mean|/std) bits (penguins' `year`: 11 bits, 2e-4 on the logits against
5.5e-5 for the unfolded model). Then the fold keeps the centring and folds only the scale:

    x_c = Sub(x, m)                          m per channel, in x's dtype (a new constant)
    x_c . (diag(a) W) + (b + (c + a*m) W)    computed in float64, rounded once

`x - m` is exact in float32 when x lies within a factor 2 of m (Sterbenz), so the centred
fold adds no error where the plain one cancels. The centre m and the ratio r = max |m|/std:

- BatchNormalization: its running mean; r_i = |a_i mean_i| / (|a_i| sqrt(var_i) + tiny).
- Mul/Add chain that starts with an Add/Sub of the raw input and scales after it (the
  `(x - mean) / std` form): m = the input its first node maps to zero; with no statistics, the
  chain is taken to normalize (its output spreads by about 1), so r_i = |a_i m_i|. Any other
  chain (a scale first, as FrozenBatchNorm's x*a + c, whose unfolded form adds the same large
  terms at run time; a lone Add/Sub, whose input scale is unknown) folds as before.

Centring starts at r > 2**5 (`MIN_RATIO`): measured on BN -> Gemm -> Relu -> Gemm with
float32 inputs drawn around the mean, the plain fold's error against float64 is about
r * 2**-24 of the output scale (3e-6 at r = 16, 1.3e-5 at r = 64): below 2**5 it stays under
a third of float32's default atol 1e-5; above it, it reaches that atol. The shipped models'
input normalizations have r below 4, so they fold into the Gemm alone, with no new node.

A chain that is one Sub marked as such a centring (`MARK`, its doc_string) is not folded
again: folding an already folded model keeps the precision.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bn_onnx.fold import affine_ops
from bn_onnx.fold.context import FoldContext
from bn_onnx.fold.nodes import attr_float, label
from bn_onnx.fold.sites import AffineSite, Refusal

MIN_RATIO = 2.0**5
MARK = "bn-onnx: exact centring kept by the fold for precision (bn_onnx.fold.centring)"
_TINY = 1e-300


@dataclasses.dataclass(frozen=True)
class Centring:
    """A centring to keep in front of a forward fold.

    Attributes:
        mean: the centre per channel of the site, in x's dtype, shape (C,) (a uniform site:
            shape (), one value for every element).
        ratio: max over channels of |mean| / std.
        site: the site with the centred shift c + a * mean (exact float64 of the rounded mean).
    """

    mean: np.ndarray
    ratio: float
    site: AffineSite

    def note(self) -> str:
        """What the fold report says about it."""
        return f"scale only; centred by Sub: mean/std up to {self.ratio:.3g}"


def kept_centring(site: AffineSite) -> Refusal | None:
    """Why a Sub that an earlier fold kept for precision (`MARK`) is not folded again."""
    if len(site.nodes) == 1 and site.nodes[0].doc_string == MARK:
        return Refusal(f"{label(site.nodes[0])!r} is an exact centring kept for precision")
    return None


def plan(site: AffineSite, ctx: FoldContext) -> Centring | None:
    """The centring a forward fold of `site` should keep, or None (fold fully, as before)."""
    if ctx.opset < 7 or site.dtype is None or (site.rank is None and not site.uniform):
        return None  # Sub-6 broadcasts by attributes only
    try:
        np_dtype = site.dtype.numpy()
    except TypeError:
        return None
    centre = _centre(site, ctx)
    if centre is None:
        return None
    mean, ratio = centre
    if site.uniform:  # the same map on every element: one centre for all, or none
        if not (mean == mean[0]).all():
            return None
        mean = mean[:1].reshape(())
    if not np.isfinite(ratio) or ratio <= MIN_RATIO:
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = mean.astype(np_dtype)
    if not np.isfinite(rounded).all():
        return None
    a = site.a
    c = site.c + a * rounded.astype(np.float64)
    return Centring(rounded, ratio, dataclasses.replace(site, c=c))


def _centre(site: AffineSite, ctx: FoldContext) -> tuple[np.ndarray, float] | None:
    """(centre per channel as float64, max ratio) of a BN (its statistics) or of a chain that
    starts with a shift of its input."""
    first = site.nodes[0]
    n = site.channels
    a = np.abs(site.a)
    if site.kind == "BatchNormalization":
        if first in ctx.exact_affine or len(first.inputs) < 5:
            return None  # a merged BN: its statistics are not the input's
        mean, var = ctx.const(first.inputs[3]), ctx.const(first.inputs[4])
        if mean is None or var is None or mean.shape != (n,) or var.shape != (n,):
            return None
        mean = mean.astype(np.float64)
        std = np.sqrt(var.astype(np.float64) + attr_float(first, "epsilon", 1e-5))
        ratio = np.abs(a * mean) / (a * std + _TINY)
        return mean, float(ratio.max())
    if site.kind != affine_ops.KIND or len(site.nodes) < 2 or first.op_type not in ("Add", "Sub"):
        return None
    step = affine_ops.affine_step(first, ctx)
    if step is None or (step.axis is not None and step.axis != site.axis):
        return None
    mean = np.broadcast_to(-step.shift / step.scale, (n,)).astype(np.float64)
    return mean, float(np.abs(site.a * mean).max())


def emit(centring: Centring, ctx: FoldContext) -> AffineSite:
    """Insert `Sub(x, mean)` before the site's first node; the site as computed from its
    output (remove that site to keep the centring)."""
    site = centring.site
    x = site.x
    array = centring.mean
    if array.ndim:  # per channel of `axis`: broadcast along the axes after it
        assert site.rank is not None
        array = array.reshape(array.shape + (1,) * (site.rank - 1 - site.axis % site.rank))
    stem = x.name or "input"
    mean = ctx.add_initializer(array, f"{stem}_mean_bnfold")
    out = ir.Value(name=ctx.fresh(f"{stem}_centred"), type=x.type, shape=x.shape)
    node = ir.Node("", "Sub", [x, mean], outputs=[out], name=ctx.fresh(f"{stem}_centre"))
    node.doc_string = MARK
    site.graph.insert_before(site.nodes[0], node)
    return dataclasses.replace(site, x=out)
