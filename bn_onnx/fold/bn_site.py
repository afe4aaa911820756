"""The BatchNormalization site: an inference-mode BN node with constant parameters as an
affine map (the other site kind, Mul/Add chains by constants, is `bn_onnx.fold.affine_ops`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir

from bn_onnx.fold import affine_math as fm
from bn_onnx.fold.flush import flush_constant_channels
from bn_onnx.fold.nodes import FLOAT_DTYPES, attr_float, attr_int, is_standard, label
from bn_onnx.fold.rules import SiteKind
from bn_onnx.fold.sites import AffineSite, Refusal

if TYPE_CHECKING:
    from bn_onnx.fold.context import FoldContext


def _claims_batch_norm(node: ir.Node) -> bool:
    return node.op_type == "BatchNormalization" and is_standard(node)


def batch_norm_site(node: ir.Node, ctx: FoldContext) -> AffineSite | Refusal:
    """The affine map of an inference-mode BatchNormalization node with constant parameters.

    a = scale / sqrt(var + eps), c = B - a * mean (ONNX BatchNormalization, spatial=1), in
    float64. Refused: training_mode=1 (or is_test=0 before opset 7), running-stat outputs,
    `spatial=0` (opset <= 8) on an input that is not 2-D, parameters that are graph inputs or
    not constant or not floating point, parameters that are not 1-D vectors of one length, a
    degenerate variance.

    Legacy attributes (BatchNormalization-1, -6, -7): `is_test=0` (opset < 7) is training
    mode, which normalizes with the batch's own statistics. `spatial=0` (opset < 9)
    normalizes per (channel, position) with parameters of shape (C, D1, ..., Dn): not a
    per-channel map, except on a 2-D input (N, C), where both modes are the same map.
    `consumed_inputs` (opset < 6) is "a legacy optimization attribute": it marks the inputs a
    training-mode node updates in place (mean and var, whose updates are the extra outputs);
    it does not change Y, and the opset 5 -> 6 version converter drops it, so it does not
    affect foldability (is_test and the extra outputs decide).

    A channel whose output the unfolded model rounds to one value for every finite input
    (float16: a scale too small to move the shift) becomes that constant (a = 0):
    `bn_onnx.fold.flush`.
    """
    if attr_int(node, "training_mode", 0):
        return Refusal("training_mode=1")
    if ctx.opset < 7 and not attr_int(node, "is_test", 0):
        return Refusal(
            f"is_test=0 (opset {ctx.opset}): BatchNormalization-{6 if ctx.opset == 6 else 1}"
            " normalizes with the batch's statistics (training mode)"
        )
    if any(o.name for o in node.outputs[1:]):
        return Refusal("has running mean/var outputs (training mode)")
    inputs = node.inputs
    if len(inputs) < 5 or inputs[0] is None:
        return Refusal("has fewer than 5 inputs")
    x, y = inputs[0], node.outputs[0]
    if ctx.opset < 9 and not attr_int(node, "spatial", 1):
        rank = ctx.rank(x)
        if rank != 2:
            has = "unknown rank" if rank is None else f"rank {rank}"
            return Refusal(
                f"spatial=0 (opset {ctx.opset}) on an input of {has}: it normalizes per channel"
                " and position, not per channel (only a 2-D input, where spatial=0 and"
                " spatial=1 agree, is folded)"
            )
    exact = ctx.exact_affine.get(node)
    if exact is not None:  # a merged BN: its exact float64 map, not the rounded parameters
        a, c = exact
    else:
        values = []
        for value in inputs[1:5]:
            name = value.name if value is not None else ""
            if value is not None and ctx.is_graph_input(value):
                return Refusal(f"parameter {name!r} is {ctx.describe_input(value)}, not a constant")
            v = ctx.const(value)
            if v is None:
                return Refusal(f"parameter {name!r} is not a constant")
            if v.dtype not in FLOAT_DTYPES:
                return Refusal(f"parameter {name!r} is not floating point")
            values.append(v)
        if len({v.size for v in values}) != 1 or any(v.ndim != 1 for v in values):
            return Refusal("parameters are not 1-D vectors of one length")
        eps = attr_float(node, "epsilon", 1e-5)
        try:
            a, c = fm.bn_affine(*values, eps)
        except ValueError as exc:
            return Refusal(str(exc))
    shape = ctx.shape(x)
    elem_type = ctx.elem_type(x)
    if exact is None and elem_type is not None:  # a merged BN's channels were flushed before
        a, c = flush_constant_channels([(a, c)], a, c, x, ir.DataType(elem_type), ctx)
    return AffineSite(
        kind="BatchNormalization",
        label=label(node),
        nodes=(node,),
        x=x,
        y=y,
        a=a,
        c=c,
        axis=1,
        rank=None if shape is None else len(shape),
        dtype=None if elem_type is None else ir.DataType(elem_type),
        graph=node.graph,  # type: ignore[arg-type]
        where=ctx.where(node.graph),
    )


BATCH_NORM = SiteKind("BatchNormalization", _claims_batch_norm, batch_norm_site)
