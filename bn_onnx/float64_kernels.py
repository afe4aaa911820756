"""numpy float64 kernels: the independent arithmetic behind every float64 reference.

Used by the checkpoint's float64 forward (`bn_onnx.checkpoint_forward`) and by the float64
graph of any model (`bn_onnx.verify.evaluator_ops` replaces onnx.reference's kernels with
these). Batch norm is computed as DESIGN.md writes it, (z - mean) / sqrt(var + eps) * gamma +
beta, never as a folded affine map, so a reference cannot share a mistake with the fold. numpy
only: no torch, no onnxruntime.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from bn_onnx.errors import UnsupportedModelError

Array = np.ndarray

_erf = np.frompyfunc(math.erf, 1, 1)


def erf(x: Array) -> Array:
    """The error function elementwise, in float64 (numpy has none; math.erf is exact enough)."""
    return _erf(np.asarray(x, dtype=np.float64)).astype(np.float64)


def sigmoid(x: Array) -> Array:
    """Logistic sigmoid without overflow warnings for large |x|."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def gelu(x: Array, approximate: str = "none") -> Array:
    """GELU, exact (erf) or the tanh approximation, as torch and ONNX define them."""
    x = np.asarray(x, dtype=np.float64)
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu": gelu,
    "tanh": np.tanh,
    "sigmoid": sigmoid,
    "silu": lambda x: x * sigmoid(x),
}


def batch_norm(
    x: Array,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    mean: ArrayLike,
    var: ArrayLike,
    eps: float,
) -> Array:
    """Inference batch norm over axis 1 by the equations, in float64.

    `gamma`/`beta` may be None (an affine=False BN such as the input normalization).
    """
    x = np.asarray(x, dtype=np.float64)
    shape = (1, -1) + (1,) * (x.ndim - 2)

    def col(v: ArrayLike) -> Array:
        return np.asarray(v, dtype=np.float64).reshape(shape)

    z = (x - col(mean)) / np.sqrt(col(var) + float(eps))
    if gamma is not None:
        z = z * col(gamma)
    if beta is not None:
        z = z + col(beta)
    return z


def batch_norm_node(
    x: Array,
    scale: ArrayLike,
    bias: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    epsilon: float | None = None,
    training_mode: int | None = None,
    spatial: int | None = None,
) -> Array:
    """An inference BatchNormalization node of any opset, by its equation, in float64.

    Parameters of rank > 1 (opset < 9 with `spatial=0`: one value per element of a sample)
    broadcast against one sample; rank-1 ones are per channel (axis 1).

    Raises:
        UnsupportedModelError: `training_mode=1` (batch statistics are not an inference map).
    """
    if training_mode:
        raise UnsupportedModelError(
            "the float64 reference cannot run BatchNormalization with training_mode=1"
        )
    eps = 1e-5 if epsilon is None else float(epsilon)
    params = [np.asarray(p, dtype=np.float64) for p in (scale, bias, mean, var)]
    if params[0].ndim > 1 or (spatial == 0 and params[0].size == int(np.prod(np.shape(x)[1:]))):
        x = np.asarray(x, dtype=np.float64)
        s, b, m, v = (p.reshape(1, *x.shape[1:]) for p in params)
        return (x - m) / np.sqrt(v + eps) * s + b
    return batch_norm(x, *params[:2], *params[2:], eps)


def _conv_pads(
    in_shape: tuple[int, ...],
    extent: list[int],
    strides: list[int],
    pads: Sequence[int] | None,
    auto_pad: str,
) -> list[int]:
    nd = len(in_shape)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        head, tail = [], []
        for i in range(nd):
            out = -(-in_shape[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + extent[i] - in_shape[i])
            lo = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            head.append(lo)
            tail.append(total - lo)
        return head + tail
    if auto_pad == "VALID" or pads is None:
        return [0] * (2 * nd)
    return [int(p) for p in pads]


def _taps(
    offset: tuple[int, ...], dilations: list[int], count: list[int], strides: list[int]
) -> tuple[slice, ...]:
    """Per spatial axis, the `count` positions a kernel tap at `offset` meets: from
    offset * dilation, every stride-th (the Conv input positions one output row reads, or the
    ConvTranspose output positions one input row writes)."""
    return tuple(
        slice(o * d, o * d + (c - 1) * s + 1, s)
        for o, d, c, s in zip(offset, dilations, count, strides, strict=True)
    )


def _per_axis(values: Sequence[int] | None, nd: int) -> list[int]:
    """Strides or dilations per spatial axis (absent: 1 each)."""
    return [int(v) for v in values] if values else [1] * nd


def _conv_operands(
    x: Array, w: Array, strides: Sequence[int] | None, dilations: Sequence[int] | None
) -> tuple[Array, Array, int, list[int], list[int]]:
    """x and w in float64, the number of spatial dims, and the strides and dilations."""
    x, w = np.asarray(x, dtype=np.float64), np.asarray(w, dtype=np.float64)
    nd = x.ndim - 2
    return x, w, nd, _per_axis(strides, nd), _per_axis(dilations, nd)


def conv(
    x: Array,
    w: Array,
    b: Array | None = None,
    *,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    group: int = 1,
    auto_pad: str = "NOTSET",
) -> Array:
    """ONNX Conv in float64 for any number of spatial dims, groups, dilations and padding.

    x: [N, C, *spatial]; w: [M, C / group, *kernel]; b: [M] or None. Padding follows the ONNX
    spec (`pads` = [x1_begin, x2_begin, ..., x1_end, ...]; SAME_UPPER puts the odd one at the
    end). The input is unfolded into columns (im2col: one strided slice of the padded input
    per kernel offset), then multiplied by the weights, one matrix product per group (BLAS);
    where each group has one input channel (depthwise), the shifted slices are multiplied by
    their weights and summed instead. It shares no code with onnxruntime's kernels.
    """
    x, w, nd, strides, dilations = _conv_operands(x, w, strides, dilations)
    k = list(w.shape[2:])
    extent = [(k[i] - 1) * dilations[i] + 1 for i in range(nd)]
    p = _conv_pads(x.shape[2:], extent, strides, pads, auto_pad)
    if any(p):
        x = np.pad(x, [(0, 0), (0, 0), *[(p[i], p[i + nd]) for i in range(nd)]])
    n, c = x.shape[:2]
    g = int(group)
    m = w.shape[0]
    cg, mg = c // g, m // g
    out = [(x.shape[2 + i] - extent[i]) // strides[i] + 1 for i in range(nd)]
    size = math.prod(out)
    xg = x.reshape(n, g, cg, *x.shape[2:])
    offsets = list(np.ndindex(*k))

    def shifted(offset: tuple[int, ...]) -> Array:  # [N, g, C / g, *out]
        return xg[(slice(None), slice(None), slice(None), *_taps(offset, dilations, out, strides))]

    if cg == 1:
        wk = w.reshape(g, mg, len(offsets))
        y = np.zeros((n, g, mg, *out))
        for j, offset in enumerate(offsets):
            y += wk[(None, slice(None), slice(None), j, *([None] * nd))] * shifted(offset)
    elif len(offsets) == 1 and all(s == 1 for s in strides):
        y = np.matmul(w.reshape(g, mg, cg), xg.reshape(n, g, cg, size))
    else:
        cols = np.empty((n, g, cg, len(offsets), *out))
        for j, offset in enumerate(offsets):
            cols[:, :, :, j] = shifted(offset)
        y = np.matmul(w.reshape(g, mg, cg * len(offsets)), cols.reshape(n, g, -1, size))
    y = y.reshape(n, m, *out)
    if b is not None:
        y += np.asarray(b, dtype=np.float64).reshape(1, -1, *([1] * nd))
    return y


def pool(
    x: Array,
    kind: str,
    kernel_shape: Sequence[int],
    *,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    ceil_mode: int = 0,
    count_include_pad: int = 0,
    auto_pad: str = "NOTSET",
) -> Array:
    """ONNX MaxPool (`kind="max"`) or AveragePool (`"avg"`) in float64, any spatial rank.

    With `ceil_mode` the last window may run past the padded input (but must start inside the
    input or its leading pad, as onnxruntime and PyTorch count); positions past the padding
    never count. Explicit pads count in an average only with `count_include_pad`.
    """
    x = np.asarray(x, dtype=np.float64)
    nd = x.ndim - 2
    k = [int(v) for v in kernel_shape]
    s, d = _per_axis(strides, nd), _per_axis(dilations, nd)
    extent = [(k[i] - 1) * d[i] + 1 for i in range(nd)]
    ins = list(x.shape[2:])
    p = _conv_pads(tuple(ins), extent, s, pads, auto_pad)
    out, extra = [], []
    for i in range(nd):
        span = ins[i] + p[i] + p[i + nd] - extent[i]
        o = (-(-span // s[i]) if ceil_mode else span // s[i]) + 1
        if ceil_mode and (o - 1) * s[i] >= ins[i] + p[i]:
            o -= 1
        out.append(o)
        extra.append(max(0, (o - 1) * s[i] + extent[i] - (ins[i] + p[i] + p[i + nd])))
    widths = [(0, 0), (0, 0), *[(p[i], p[i + nd] + extra[i]) for i in range(nd)]]
    axes = tuple(range(2, 2 + nd))
    window = tuple(range(2 + nd, 2 + 2 * nd))

    def windows(a: Array) -> Array:
        v = np.lib.stride_tricks.sliding_window_view(a, extent, axis=axes)
        return v[
            (
                slice(None),
                slice(None),
                *[slice(0, (out[i] - 1) * s[i] + 1, s[i]) for i in range(nd)],
                *[slice(None, None, step) for step in d],
            )
        ]

    if kind == "max":
        return windows(np.pad(x, widths, constant_values=-np.inf)).max(axis=window)
    total = windows(np.pad(x, widths)).sum(axis=window)
    mask = np.ones([1, 1, *ins])
    mask = np.pad(
        mask,
        [(0, 0), (0, 0), *[(p[i], p[i + nd]) for i in range(nd)]],
        constant_values=1.0 if count_include_pad else 0.0,
    )
    mask = np.pad(mask, [(0, 0), (0, 0), *[(0, e) for e in extra]])
    return total / windows(mask).sum(axis=window)


def conv_transpose(
    x: Array,
    w: Array,
    b: Array | None = None,
    *,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    group: int = 1,
    auto_pad: str = "NOTSET",
    output_padding: Sequence[int] | None = None,
    output_shape: Sequence[int] | None = None,
) -> Array:
    """ONNX ConvTranspose in float64: every input element scatters its kernel, then the crop.

    x: [N, C, *spatial]; w: [C, M / group, *kernel]. The full output is
    `stride * (in - 1) + output_padding + (kernel - 1) * dilation + 1` long per axis, cropped
    by `pads`, or by the padding `output_shape` implies (ONNX spec: SAME_UPPER puts the larger
    half of an odd total at the end, otherwise at the start).
    """
    x, w, nd, strides, dilations = _conv_operands(x, w, strides, dilations)
    n, c = x.shape[:2]
    ins = list(x.shape[2:])
    k = list(w.shape[2:])
    g = int(group)
    m = w.shape[1] * g
    extra = [int(v) for v in output_padding] if output_padding else [0] * nd
    full = [strides[i] * (ins[i] - 1) + extra[i] + (k[i] - 1) * dilations[i] + 1 for i in range(nd)]
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = (
            [int(v) for v in output_shape][-nd:]
            if output_shape is not None
            else [ins[i] * strides[i] for i in range(nd)]
        )
        total = [full[i] - target[i] for i in range(nd)]
        upper = auto_pad == "SAME_UPPER"
        head = [t // 2 if upper else t - t // 2 for t in total]
        p = head + [t - h for t, h in zip(total, head, strict=True)]
    elif auto_pad == "VALID" or pads is None:
        p = [0] * (2 * nd)
    else:
        p = [int(v) for v in pads]
    y = np.zeros((n, g, m // g, *full))
    xg = x.reshape(n, g, c // g, -1)
    # [offsets, g, M / g, C / g]: the weights at one kernel offset, contiguous.
    wk = np.ascontiguousarray(w.reshape(g, c // g, m // g, -1).transpose(3, 0, 2, 1))
    for j, offset in enumerate(np.ndindex(*k)):
        contrib = np.matmul(wk[j], xg).reshape(n, g, m // g, *ins)
        y[(slice(None), slice(None), slice(None), *_taps(offset, dilations, ins, strides))] += (
            contrib
        )
    y = y.reshape(n, m, *full)
    # Crop by the pads (a negative pad extends with zeros).
    lo = [max(0, -p[i]) for i in range(nd)]
    hi = [max(0, -p[i + nd]) for i in range(nd)]
    if any(lo) or any(hi):
        y = np.pad(y, [(0, 0), (0, 0), *zip(lo, hi, strict=True)])
    crop = tuple(slice(max(p[i], 0), y.shape[2 + i] - max(p[i + nd], 0)) for i in range(nd))
    y = y[(slice(None), slice(None), *crop)]
    if b is not None:
        y = y + np.asarray(b, dtype=np.float64).reshape(1, -1, *([1] * nd))
    return y
