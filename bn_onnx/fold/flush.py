"""float16 flush (rule 18): channels the unfolded model itself makes constant.

A folded value that underflows (|a * w| below half float16's smallest subnormal, 2**-25)
rounds to zero. Flushing it is not provably harmless in general: the dropped term a*w*x can
reach 2**-25 * 65504 ~ 0.002 per input element, far above the rounding error of a small
output, and the output's size is not known without input bounds (see docs/fold.md). It is
provably harmless in one case: the unfolded model's own arithmetic already removed the
input from that channel. Each node rounds its exact result once to the model's dtype, so a
channel whose scale is too small to move the rounded output off one value r, for every input
the node can see, outputs r whatever the input. Folding that channel as the constant r (scale
0, shift r: its folded weights become exact zeros, its folded bias r) computes exactly what
the unfolded model computes, for every input on which the unfolded model's values are finite.
Other underflows keep the site, with the reason (`math.round_to`).

The input range is the dtype's finite range, narrowed when the input comes (through Identity
or inference Dropout) from a node whose outputs are bounded: Sigmoid, HardSigmoid [0, 1],
Tanh, Softsign [-1, 1], Relu [0, max], Clip [min, max] with constant bounds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from bn_onnx.fold import affine_math as fm
from bn_onnx.fold.nodes import attr_float, is_passthrough, is_standard

if TYPE_CHECKING:
    from bn_onnx.fold.context import FoldContext

_FLOAT_TYPES = frozenset(
    (ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE)
)
_BOUNDED = {
    "Sigmoid": (0.0, 1.0),
    "HardSigmoid": (0.0, 1.0),
    "Tanh": (-1.0, 1.0),
    "Softsign": (-1.0, 1.0),
}


def value_range(value: ir.Value, ctx: FoldContext, dtype: np.dtype) -> tuple[float, float]:
    """Bounds of every finite value `value` can take, from its producer (see the module
    docstring); the dtype's finite range when nothing narrower is known."""

    top = _max(dtype)
    for _ in range(64):  # through Identity / inference Dropout
        node = value.producer()
        if node is None or not is_standard(node) or node.outputs[0] is not value:
            break
        if is_passthrough(node, ctx):
            value = node.inputs[0]  # type: ignore[assignment]
            continue
        op = node.op_type
        if op in _BOUNDED:
            return _BOUNDED[op]
        if op == "Relu":
            return 0.0, top
        if op == "Clip":
            return _clip_range(node, ctx, top)
        break
    return -top, top


def _max(dtype: np.dtype) -> float:
    """The largest finite value of a float dtype (ml_dtypes knows bfloat16 too)."""
    import ml_dtypes

    return float(ml_dtypes.finfo(dtype).max)


def _clip_range(node: ir.Node, ctx: FoldContext, top: float) -> tuple[float, float]:
    if ctx.opset < 11:
        lo, hi = attr_float(node, "min", -top), attr_float(node, "max", top)
    else:
        bounds = []
        for pos, default in ((1, -top), (2, top)):
            v = node.inputs[pos] if pos < len(node.inputs) else None
            if v is None:
                bounds.append(default)
                continue
            k = ctx.const(v)
            if k is None or k.size != 1 or not np.isfinite(k).all():
                bounds.append(default)
            else:
                bounds.append(float(k.reshape(-1)[0]))
        lo, hi = bounds
    lo, hi = max(lo, -top), min(hi, top)
    return (lo, hi) if lo <= hi else (-top, top)


def flush_constant_channels(
    steps: list[tuple[np.ndarray, np.ndarray]],
    a: np.ndarray,
    c: np.ndarray,
    x: ir.Value,
    dtype: ir.DataType,
    ctx: FoldContext,
) -> tuple[np.ndarray, np.ndarray]:
    """The site's map (a, c) with every constant channel replaced by (0, r).

    `steps` are the site's nodes as (scale, shift) per node, each rounded to `dtype` by the
    unfolded model (`math.constant_channels`); x is the site's input. Only float16 and
    bfloat16 can have such channels at realistic scales (float32's range makes |a| * max
    tiny only for a ~ 1e-45); the check runs for every float dtype all the same.
    """
    if dtype not in _FLOAT_TYPES:
        return a, c
    np_dtype = dtype.numpy()
    lo, hi = value_range(x, ctx, np_dtype)
    mask, value = fm.constant_channels(steps, lo, hi, np_dtype)
    if not mask.any():
        return a, c
    mask = np.broadcast_to(mask, a.shape)
    value = np.broadcast_to(value, a.shape)
    return np.where(mask, 0.0, a), np.where(mask, value, c)
