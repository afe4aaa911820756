"""The operands of a linear node that a fold reads: its constant weight and bias, and the
reason given when the site's channels do not fit it. Shared by the folds into the node before
(`preceding`) and the nodes after (`following`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from bn_onnx.fold.context import FoldContext
from bn_onnx.fold.layout import Channels
from bn_onnx.fold.nodes import FLOAT_DTYPES, is_standard, label
from bn_onnx.fold.sites import AffineSite, Refusal


def weight(ctx: FoldContext, value: ir.Value | None, ndim: int | None = 2) -> np.ndarray | Refusal:
    """A linear node's constant float weight of rank `ndim` (any rank when None)."""
    name = value.name if value is not None else ""
    if value is not None and ctx.is_graph_input(value):
        return Refusal(f"weight {name!r} is {ctx.describe_input(value)}, not a constant")
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "DequantizeLinear" and is_standard(producer):
        # a QDQ (QAT) model: a fold would store the weight unquantized, losing its scales
        return Refusal(
            f"weight {name!r} is quantized (DequantizeLinear {label(producer)!r}): folding would"
            " change its INT8 values and scales; fold the float model before quantizing"
        )
    w = ctx.const(value)
    if w is None:
        return Refusal(f"weight {name!r} is not a constant")
    if ndim is not None and w.ndim != ndim:
        return Refusal(f"weight {name!r} has rank {w.ndim}, not {ndim}")
    if w.dtype not in FLOAT_DTYPES:
        return Refusal(f"weight {name!r} has dtype {w.dtype}")
    return w


def bias(ctx: FoldContext, value: ir.Value | None, n: int) -> np.ndarray | None | Refusal:
    """A constant bias that broadcasts to n output channels; None when there is none."""
    if value is None:
        return None
    name = value.name
    if ctx.is_graph_input(value):
        return Refusal(f"bias {name!r} is {ctx.describe_input(value)}, not a constant")
    b = ctx.const(value)
    if b is None:
        return Refusal(f"bias {name!r} is not a constant")
    if b.ndim > 2 or (b.ndim >= 1 and b.shape[-1] not in (1, n)):
        return Refusal(f"bias {name!r} of shape {list(b.shape)} does not broadcast to {n}")
    return b


def operand(node: ir.Node, pos: int) -> ir.Value | None:
    """A node's input at `pos`, or None when the node has fewer inputs (or omits it)."""
    return node.inputs[pos] if pos < len(node.inputs) else None


def mismatch(site: AffineSite, ch: Channels, n: int, node: ir.Node, what: str) -> str:
    """The reason for a channel count that does not fit the linear node's."""
    if ch.inner == 1 and not ch.via:
        return (
            f"{site.short} has {ch.period} channels, {node.op_type} {label(node)!r} has {n} {what}"
        )
    return (
        f"{ch.prefix()}the {site.short}'s {ch.period} channels x {ch.inner} positions do not"
        f" tile the {n} {what} of {node.op_type} {label(node)!r}"
    )


def gemm_rewrite(
    ctx: FoldContext, gemm: ir.Node, w: np.ndarray | ir.TensorProtocol, b: np.ndarray
) -> Callable[[], None]:
    """The rewrite giving a Gemm its folded weight and bias (`w`: an array or a lazy
    `ScaledTensor`): alpha and beta are in them now, so the attributes go; before opset 7 the
    bias gets `broadcast=1`."""

    def rewrite() -> None:
        ctx.write_input(gemm, 1, w, None)
        ctx.write_input(gemm, 2, b, None)
        ctx.mark_broadcast(gemm)
        ctx.drop_attributes(gemm, ("alpha", "beta"))

    return rewrite
