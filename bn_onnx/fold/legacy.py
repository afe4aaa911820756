"""Legacy broadcasting (rule 17): Add, Sub, Mul, Div and Gemm before opset 7.

Opset 7 brought numpy-style broadcasting. Before it (Add-1/-6, Mul-1/-6, Sub-1/-6, Div-1/-6,
Gemm-1/-6), the second input B broadcasts to the first input A's shape only with
`broadcast=1`: B is a scalar (one element), or B's shape equals the run of A's dims that
starts at `axis` (suffix matching when `axis` is absent); without `broadcast=1` the two
shapes must be equal. "1-dim expansion doesn't work yet" (the spec): inside the matched run,
B's dims equal A's. A Gemm's C broadcasts to (M, N) only with `broadcast=1`.

`aligned_shape` says where a constant input lines up with a dynamic one, under either
semantics; `bias_refusal` refuses an existing legacy Add whose bias does not line up with the
last axis; `mark_broadcast` gives a node the fold wrote a bias into `broadcast=1` (and drops a
legacy Add's `axis`, since every bias the fold writes lines up with the last axis).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import onnx_ir as ir

from bn_onnx.fold.nodes import attr_int, label

if TYPE_CHECKING:
    from bn_onnx.fold.views import ValueView

LEGACY_OPSET = 7  # opsets below this use the broadcast/axis attributes
Dims = Sequence["int | None"]


def aligned_shape(
    node: ir.Node, opset: int, k_shape: Sequence[int], k_pos: int, x_shape: Dims
) -> tuple[int, ...] | None:
    """The constant's shape lined up against x's dims (rank of x, 1 where it broadcasts).

    `node` computes op(inputs) with the constant (shape `k_shape`) at input `k_pos` and the
    dynamic x (dims `x_shape`, None where unknown) at the other. None when the output would
    not have x's shape (the constant expands x, or a dim is unknown where it could), or when
    the opset's broadcasting rules do not allow the pair.
    """
    rank = len(x_shape)
    k_shape = tuple(int(d) for d in k_shape)
    if len(k_shape) > rank:
        return None
    if opset >= LEGACY_OPSET:
        full = (1,) * (rank - len(k_shape)) + k_shape
    elif not attr_int(node, "broadcast", 0) or k_pos == 0:
        # No broadcasting, or x is B (only B broadcasts, to A's shape): equal shapes only.
        if k_shape != tuple(x_shape):
            return None
        full = k_shape
    else:
        size = 1
        for d in k_shape:
            size *= d
        if size == 1:
            full = (1,) * rank
        else:
            axis = _legacy_axis(node, rank, len(k_shape))
            if axis is None:
                return None
            if any(d != x_shape[axis + i] for i, d in enumerate(k_shape)):
                return None  # no 1-dim expansion before opset 7
            full = (1,) * axis + k_shape + (1,) * (rank - axis - len(k_shape))
    for d, xd in zip(full, x_shape, strict=True):
        if d != 1 and d != xd:  # x's dim is 1 (it would expand) or unknown
            return None
    return full


def _legacy_axis(node: ir.Node, rank: int, k_rank: int) -> int | None:
    """Where B's dims start in A's: the `axis` attribute, else suffix matching."""
    a = node.attributes.get("axis")
    axis = rank - k_rank if a is None else attr_int(node, "axis", rank - k_rank)
    if axis < 0:
        axis += rank
    if axis < 0 or axis + k_rank > rank:
        return None
    return axis


def bias_refusal(ctx: ValueView, add: ir.Node, bias_pos: int, rank: int) -> str | None:
    """Why an existing legacy Add's constant bias cannot be read as a bias on the last axis
    (None when it can, and always from opset 7 on)."""
    if ctx.opset >= LEGACY_OPSET:
        return None
    value = add.inputs[bias_pos]
    k = ctx.const(value)
    if k is None:
        return None  # the rule's own check says "not a constant"
    other = add.inputs[1 - bias_pos]
    x_shape = ctx.shape(other) if other is not None else None
    if x_shape is None or len(x_shape) != rank:
        x_shape = (None,) * rank
    if k.size == 1 and attr_int(add, "broadcast", 0) and bias_pos == 1:
        return None
    if tuple(k.shape) == tuple(x_shape):
        return None  # same shape: no broadcasting
    if not attr_int(add, "broadcast", 0) or bias_pos == 0:
        return (
            f"Add {label(add)!r} (opset {ctx.opset}) broadcasts its bias without"
            " broadcast=1 on its second input"
        )
    axis = _legacy_axis(add, rank, k.ndim)
    if axis != rank - k.ndim:
        return (
            f"Add {label(add)!r} (opset {ctx.opset}) lines its bias up at axis {axis},"
            " not with the last axis"
        )
    return None


def mark_broadcast(ctx: ValueView, node: ir.Node) -> None:
    """Before opset 7: `broadcast=1` on an Add or Gemm whose bias the fold wrote (a no-op
    when the shapes are equal), and no `axis` (the bias lines up with the last axis)."""
    if ctx.opset >= LEGACY_OPSET or node.op_type not in ("Add", "Gemm"):
        return
    node.attributes["broadcast"] = ir.AttrInt64("broadcast", 1)
    node.attributes.pop("axis", None)
