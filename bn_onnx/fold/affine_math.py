"""The batch-norm fold arithmetic, on numpy arrays only.

Inference-mode batch norm is a per-channel affine map y = a*x + c with
a = gamma / sqrt(var + eps) and c = beta - a*mean. Folding moves (a, c) into a neighbouring
linear node. Every function here computes in float64; the caller rounds once to the model's
dtype with `round_to` (which also says why a rounding is unsafe).
"""

from __future__ import annotations

import math

import numpy as np

F64 = np.float64
# Elements per block in the blocked functions: float64 temporaries of ~2 MB stay in cache.
CHUNK = 1 << 18
# Dtypes whose product can be rounded by the multiply itself (out=, casting="unsafe").
_FUSED = frozenset(np.dtype(t) for t in ("float16", "float32", "float64"))


def _finite_nonzero(x: np.ndarray) -> bool:
    """Whether every element of a rounded result is finite and not zero.

    A sum is finite only if every term is, so one reduction settles the usual case; the
    elementwise test runs only when the sum is not. Call it under np.errstate(over="ignore",
    invalid="ignore"): the sum may overflow, or meet inf - inf, without that being news.
    """
    if x.dtype in _FUSED:
        finite = math.isfinite(np.add.reduce(x, axis=None)) or bool(np.isfinite(x).all())
        return finite and bool(np.logical_and.reduce(x, axis=None))  # and: no zero
    return bool(np.isfinite(x).all()) and not (x == 0).any()


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
    denom = np.add(var, F64(eps), dtype=F64)
    # 0 < denom < inf everywhere, as two reductions; NaN propagates and fails both.
    if denom.size and not (
        np.minimum.reduce(denom, axis=None) > 0 and np.maximum.reduce(denom, axis=None) < np.inf
    ):
        raise ValueError("degenerate variance (var + eps <= 0 or not finite)")
    a = np.divide(scale, np.sqrt(denom), dtype=F64)
    c = np.subtract(bias, a * mean, dtype=F64)
    if not (np.isfinite(a).all() and np.isfinite(c).all()):
        raise ValueError("batch-norm parameters are not finite")
    return a, c


def preceding_factor(
    a: np.ndarray, ndim: int, out_axis: int, weight_scale: float = 1.0
) -> np.ndarray:
    """The per-element factor (broadcastable to the weight) that folds a BN into the node
    before it: `weight_scale * a` along the weight's output-channel axis."""
    shape = [1] * ndim
    shape[out_axis] = -1
    return (F64(weight_scale) * a).reshape(shape)


def preceding_bias(
    bias: np.ndarray | None, a: np.ndarray, c: np.ndarray, bias_scale: float = 1.0
) -> np.ndarray:
    """The new bias a * (bias_scale * bias) + c of a fold into the node before the BN; `bias`
    may be None (zero) or any shape that broadcasts against the output's last axis."""
    if bias is None:
        return c.copy()
    return a * (F64(bias_scale) * np.asarray(bias, dtype=F64)) + c


def following_factor(a: np.ndarray, transposed: bool, weight_scale: float = 1.0) -> np.ndarray:
    """The factor folding a BN on the input x of y = x @ W (W = weight, or weight.T when
    `transposed`) into the weight as stored: scale W's input rows."""
    f = F64(weight_scale) * a
    return f[None, :] if transposed else f[:, None]


def following_bias(
    weight: np.ndarray,
    bias: np.ndarray | None,
    c: np.ndarray,
    transposed: bool = False,
    weight_scale: float = 1.0,
    bias_scale: float = 1.0,
) -> np.ndarray:
    """The new bias bias_scale * bias + weight_scale * (c @ W) of a fold into the node after
    the BN, accumulated in float64 by blocks of rows (no float64 copy of a big weight)."""
    w = np.asarray(weight)
    n = w.shape[0] if transposed else w.shape[1]
    shift = np.zeros(n, dtype=F64)
    rows = w.shape[0]
    step = max(1, CHUNK // max(1, w.shape[1]))
    for i in range(0, rows, step):
        block = w[i : i + step].astype(F64)
        if transposed:  # block holds output rows i.. : shift[i:] = block @ c
            shift[i : i + step] = block @ c
        else:  # block holds input rows i.. : shift += c[i:] @ block
            shift += c[i : i + step] @ block
    shift *= F64(weight_scale)
    return shift if bias is None else F64(bias_scale) * np.asarray(bias, dtype=F64) + shift


def conv_factor(
    a: np.ndarray, weight_shape: tuple[int, ...], group: int = 1, transpose: bool = False
) -> np.ndarray:
    """The factor folding a BN into the Conv or ConvTranspose before it, per output channel.

    Conv weights are (C_out, C_in/group, k...): the output channel is axis 0.
    ConvTranspose weights are (C_in, C_out/group, k...): output channel o of group g is
    weight[g*C_in/group:(g+1)*C_in/group, o - g*C_out/group].
    """
    kernel = (1,) * (len(weight_shape) - 2)
    if not transpose:
        return a.reshape((-1, 1) + kernel)
    c_in, per_group = weight_shape[0], weight_shape[1]
    per_in = c_in // group
    f = np.broadcast_to(a.reshape(group, 1, per_group), (group, per_in, per_group))
    return f.reshape((c_in, per_group) + kernel)


def conv_input_factor(
    a: np.ndarray, weight_shape: tuple[int, ...], group: int = 1, transpose: bool = False
) -> np.ndarray:
    """The factor folding a BN on the input of the Conv or ConvTranspose after it, per input
    channel (broadcastable to the weight).

    Conv weights are (C_out, C_in/group, k...): weight[o, i] reads input channel
    (o // (C_out/group)) * (C_in/group) + i. ConvTranspose weights are (C_in, C_out/group,
    k...): the input channel is axis 0.
    """
    kernel = (1,) * (len(weight_shape) - 2)
    if transpose:
        return a.reshape((-1, 1) + kernel)
    c_out, per_in = weight_shape[0], weight_shape[1]
    f = np.broadcast_to(a.reshape(group, 1, per_in), (group, c_out // group, per_in))
    return f.reshape((c_out, per_in) + kernel)


def conv_input_shift(
    weight: np.ndarray, c: np.ndarray, group: int = 1, transpose: bool = False
) -> np.ndarray:
    """Per output channel, the sum over input channels and kernel taps of weight * c: what a
    shift c on the input of a Conv (or ConvTranspose) adds to each output where every tap reads
    a real input element. float64, shape (C_out,); accumulated by blocks of the weight's first
    axis (no float64 copy of a big weight)."""
    w = np.asarray(weight)
    c = np.asarray(c, dtype=F64)
    rows = w.shape[0]
    step = max(1, CHUNK // max(1, w[0].size))
    if transpose:  # (C_in, C_out/group, k...): output channel g*C_out/group + j
        c_in, per_out = w.shape[0], w.shape[1]
        per_in = c_in // group
        shift = np.zeros((group, per_out), dtype=F64)
        for i in range(0, rows, step):
            block = w[i : i + step].astype(F64).reshape(min(step, rows - i), per_out, -1)
            taps = block.sum(axis=2) * c[i : i + step, None]  # (block, C_out/group)
            for g in range(i // per_in, (i + len(block) - 1) // per_in + 1):
                lo, hi = max(i, g * per_in), min(i + len(block), (g + 1) * per_in)
                shift[g] += taps[lo - i : hi - i].sum(axis=0)
        return shift.reshape(-1)
    c_out, per_in = w.shape[0], w.shape[1]
    per_out = c_out // group
    shift = np.empty(c_out, dtype=F64)
    for o in range(0, rows, step):
        block = w[o : o + step].astype(F64).reshape(min(step, rows - o), per_in, -1)
        groups = np.arange(o, o + len(block)) // per_out
        cg = c.reshape(group, per_in)[groups]  # (block, C_in/group)
        shift[o : o + len(block)] = np.einsum("oik,oi->o", block, cg)
    return shift


def scale_rounded(weight: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """weight * factor computed in float64 and rounded once to the weight's dtype.

    Works by blocks of rows into one reused float64 buffer, so a big weight never exists in
    float64 all at once and the temporaries stay in cache. Raises ValueError like `round_to`
    when a value is unsafe.
    """
    w = np.asarray(weight)
    f = np.asarray(factor, dtype=F64)
    f = f.reshape((1,) * (w.ndim - f.ndim) + f.shape)
    fused = w.dtype in _FUSED
    if w.size <= CHUNK:  # one block: no buffers to set up
        if fused:  # the float64 product rounded by the multiply's output cast: no temporary
            with np.errstate(over="ignore", under="ignore", invalid="ignore"):
                rounded = np.multiply(
                    w, f, dtype=F64, out=np.empty(w.shape, w.dtype), casting="unsafe"
                )
                if _finite_nonzero(rounded):
                    return rounded
        exact = np.multiply(w, f, dtype=F64)  # outside errstate: warns as it always did
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            rounded = exact.astype(w.dtype)
            if _finite_nonzero(rounded):
                return rounded
        return round_to(exact, w.dtype, w)
    out = np.empty(w.shape, dtype=w.dtype)
    rows = w.shape[0]
    step = max(1, CHUNK // max(1, w[0].size))
    buf = np.empty((min(step, rows),) + w.shape[1:], dtype=F64)
    for i in range(0, rows, step):
        block = w[i : i + step]
        fb = f if f.shape[0] == 1 else f[i : i + step]
        rounded = out[i : i + step]
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            if fused:
                np.multiply(block, fb, dtype=F64, out=rounded, casting="unsafe")
            else:
                rounded[...] = np.multiply(block, fb, out=buf[: len(block)])
            ok = _finite_nonzero(rounded)
        if not ok:  # the slow path (outside errstate, warning as before) says what is wrong
            exact = np.multiply(block, fb, out=buf[: len(block)])
            rounded[...] = round_to(exact, w.dtype, block)
    return out


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
        if rounded.dtype in _FUSED and _finite_nonzero(rounded):  # the usual case
            return rounded
    if not np.isfinite(rounded).all():
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
                f"{int(lost.sum())} folded value(s) underflow to zero in {np.dtype(dtype).name},"
                " where flushing is not provably exact (only in a channel the unfolded model"
                " rounds to one value for every input)"
            )
    return rounded


def constant_channels(
    steps: list[tuple[np.ndarray, np.ndarray]],
    lo: float,
    hi: float,
    dtype: np.dtype,
) -> tuple[np.ndarray, np.ndarray]:
    """The channels that a chain of per-channel affine nodes maps to one value, whatever
    its input in [lo, hi].

    Each step is a node computing `fl(s * x + t)` per channel: the exact result rounded once
    to `dtype` (the ONNX semantics of BatchNormalization, Mul, Add, Sub, Div). Rounding to
    nearest is monotone, so the node's outputs over an input interval lie in the interval
    between the rounded images of its ends; the ends are widened by far more than their
    float64 error (2**-40 of the terms' size) before rounding, so the result is a sound
    over-approximation. A channel whose final interval is one point r outputs r for every
    input in [lo, hi]: the unfolded model's own arithmetic removed its input.

    Args:
        steps: (s, t), float64 arrays of shape (C,) or () (a scalar applies to every channel).
        lo, hi: bounds of the input, the same for every channel.
        dtype: the element type every step rounds to.

    Returns:
        (mask, value): bool (C,), and float64 (C,) holding r where mask is set.
    """
    n = max((max(np.size(s), np.size(t)) for s, t in steps), default=1)
    low = np.full(n, F64(lo))
    high = np.full(n, F64(hi))
    with np.errstate(over="ignore", invalid="ignore"):
        for s, t in steps:
            s = np.asarray(s, dtype=F64)
            t = np.asarray(t, dtype=F64)
            e1, e2 = s * low + t, s * high + t
            pad = (np.abs(s) * np.maximum(np.abs(low), np.abs(high)) + np.abs(t)) * 2.0**-40
            low = (np.minimum(e1, e2) - pad).astype(dtype).astype(F64)
            high = (np.maximum(e1, e2) + pad).astype(dtype).astype(F64)
    mask = (low == high) & np.isfinite(low)
    return mask, np.where(mask, low, 0.0)
