"""Rules 1-4 (and 8 before the site): fold a site into the linear node that computes its input.

The node before the site computes x = W . input + b with the channel on its output axis; the
site's map a*x + c becomes a new weight (W scaled along its output-channel axis) and bias
(a*b + c). Identity and inference Dropout between them are looked through. Each value on the
way must be read by nothing else (shape-only readers aside) and be no graph output: its values
change.

1. Gemm: scale the weight's output columns (any transA, transB), fold alpha into the weight and
   beta into the bias; C is created when missing and expanded when broadcast.
2. MatMul and MatMul -> Add (bias as either Add input), rank 2: scale the weight's columns;
   the bias goes into the Add, or into a new one.
3. Conv, with or without bias, any group.
4. ConvTranspose, group-aware (weight (C_in, C_out/group, k...)).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bn_onnx.fold import lazy
from bn_onnx.fold import math as fm
from bn_onnx.fold.chains import is_passthrough
from bn_onnx.fold.context import FoldContext
from bn_onnx.fold.sites import (
    FLOAT_DTYPES,
    AffineSite,
    Plan,
    Refusal,
    Rule,
    attr_float,
    attr_int,
    is_standard,
    label,
)

LINEAR_BEFORE = ("Gemm", "MatMul", "Add", "Conv", "ConvTranspose")


def weight(ctx: FoldContext, value: ir.Value | None, ndim: int | None = 2) -> np.ndarray | Refusal:
    """A linear node's constant float weight of rank `ndim` (any rank when None)."""
    name = value.name if value is not None else ""
    if value is not None and ctx.is_graph_input(value):
        return Refusal(f"weight {name!r} is a graph input, not a constant")
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
        return Refusal(f"bias {name!r} is a graph input, not a constant")
    b = ctx.const(value)
    if b is None:
        return Refusal(f"bias {name!r} is not a constant")
    if b.ndim > 2 or (b.ndim >= 1 and b.shape[-1] not in (1, n)):
        return Refusal(f"bias {name!r} of shape {list(b.shape)} does not broadcast to {n}")
    return b


def _input(node: ir.Node, pos: int) -> ir.Value | None:
    return node.inputs[pos] if pos < len(node.inputs) else None


def fold_into_preceding(site: AffineSite, ctx: FoldContext) -> Plan | Refusal:
    """Rules 1-4: find the linear node before the site (through passthroughs) and fold."""
    value = site.x
    while True:
        name = value.name
        if value.is_graph_output():
            return Refusal(f"{name!r} is also a graph output")
        if ctx.uses(value) != 1:
            return Refusal(f"{name!r} is also read by another node")
        producer = value.producer()
        if producer is None:
            return Refusal(f"input {name!r} is not computed by a node")
        if producer.outputs[0] is value and is_passthrough(producer, ctx):
            value = producer.inputs[0]  # type: ignore[assignment]
            continue
        break
    if not is_standard(producer) or producer.op_type not in LINEAR_BEFORE:
        return Refusal(f"comes after {producer.op_type} {label(producer)!r}, not Gemm/MatMul/Conv")
    if producer.op_type == "Gemm":
        return _into_gemm(site, ctx, producer)
    if producer.op_type == "MatMul":
        return _into_matmul(site, ctx, producer, None)
    if producer.op_type == "Add":
        for pos in (0, 1):
            mm_out = _input(producer, pos)
            mm = mm_out.producer() if mm_out is not None else None
            if mm is not None and mm.op_type == "MatMul" and is_standard(mm):
                if mm_out.is_graph_output() or ctx.uses(mm_out) != 1:  # type: ignore[union-attr]
                    return Refusal(f"MatMul output {mm_out.name!r} is read by another node")  # type: ignore[union-attr]
                return _into_matmul(site, ctx, mm, (producer, 1 - pos))
        return Refusal(f"comes after Add {label(producer)!r} that does not add to a MatMul")
    return _into_conv(site, ctx, producer)


def _remove(site: AffineSite, ctx: FoldContext) -> None:
    """The node before the site now computes y: it takes y's name."""
    ctx.remove_site(site, keep_name=True)


def _into_gemm(site: AffineSite, ctx: FoldContext, gemm: ir.Node) -> Plan | Refusal:
    w = weight(ctx, _input(gemm, 1))
    if isinstance(w, Refusal):
        return w
    trans_b = bool(attr_int(gemm, "transB", 0))
    n = w.shape[0] if trans_b else w.shape[1]
    if n != site.channels:
        return Refusal(
            f"{site.short} has {site.channels} channels, Gemm {label(gemm)!r} has {n} outputs"
        )
    c_value = _input(gemm, 2)
    b = bias(ctx, c_value, n)
    if isinstance(b, Refusal):
        return b
    alpha, beta = attr_float(gemm, "alpha", 1.0), attr_float(gemm, "beta", 1.0)
    factor = fm.preceding_factor(site.a, 2, out_axis=0 if trans_b else 1, weight_scale=alpha)
    try:
        w_r = lazy.scaled(w, factor)
        b_r = fm.round_to(fm.preceding_bias(b, site.a, site.c, bias_scale=beta), w.dtype)
    except ValueError as exc:
        return Refusal(str(exc))

    def rewrite() -> None:
        ctx.write_input(gemm, 1, w_r, None)
        ctx.write_input(gemm, 2, b_r, None)
        ctx.drop_attributes(gemm, ("alpha", "beta"))
        _remove(site, ctx)

    return Plan("preceding", [gemm], rewrite)


def _into_matmul(
    site: AffineSite, ctx: FoldContext, mm: ir.Node, add: tuple[ir.Node, int] | None
) -> Plan | Refusal:
    w = weight(ctx, _input(mm, 1))
    if isinstance(w, Refusal):
        return w
    rank = site.rank
    if rank is None:
        return Refusal(f"rank of {site.x.name!r} is unknown")
    if rank != 2:  # the site's channel axis must be MatMul's output axis, the last one
        return Refusal(
            f"MatMul output has rank {rank}: {site.short} normalizes axis {site.axis}, "
            "MatMul's outputs are the last axis"
        )
    n = w.shape[1]
    if n != site.channels:
        return Refusal(
            f"{site.short} has {site.channels} channels, MatMul {label(mm)!r} has {n} outputs"
        )
    b = None
    if add is not None:
        add_node, bias_pos = add
        b = bias(ctx, _input(add_node, bias_pos), n)
        if isinstance(b, Refusal):
            return b
    try:
        w_r = lazy.scaled(w, fm.preceding_factor(site.a, 2, out_axis=1))
        b_r = fm.round_to(fm.preceding_bias(b, site.a, site.c), (b if b is not None else w).dtype)
    except ValueError as exc:
        return Refusal(str(exc))

    def rewrite() -> None:
        ctx.write_input(mm, 1, w_r, None)
        _remove(site, ctx)
        if add is not None:
            ctx.write_input(add[0], add[1], b_r, None)
        else:
            ctx.insert_bias_add(mm, b_r)

    targets = [mm] if add is None else [mm, add[0]]
    return Plan("preceding", targets, rewrite)


def _into_conv(site: AffineSite, ctx: FoldContext, conv: ir.Node) -> Plan | Refusal:
    transpose = conv.op_type == "ConvTranspose"
    w = weight(ctx, _input(conv, 1), ndim=None)
    if isinstance(w, Refusal):
        return w
    group = attr_int(conv, "group", 1)
    if w.ndim < 3 or group < 1 or w.shape[0] % group:
        return Refusal(f"{conv.op_type} weight shape {list(w.shape)} does not fit group")
    n = w.shape[1] * group if transpose else w.shape[0]
    if n != site.channels:
        return Refusal(f"{site.short} has {site.channels} channels, {conv.op_type} has {n} outputs")
    b_value = _input(conv, 2)
    b = None
    if b_value is not None:
        b = ctx.const(b_value) if not ctx.is_graph_input(b_value) else None
        if b is None or b.shape != (n,):
            return Refusal(f"bias {b_value.name!r} is not a constant vector of {n}")
    try:
        w_r = lazy.scaled(w, fm.conv_factor(site.a, w.shape, group, transpose))
        b_r = fm.round_to(fm.preceding_bias(b, site.a, site.c), w.dtype)
    except ValueError as exc:
        return Refusal(str(exc))

    def rewrite() -> None:
        ctx.write_input(conv, 1, w_r, None)
        ctx.write_input(conv, 2, b_r, None)
        _remove(site, ctx)

    return Plan("preceding", [conv], rewrite)


RULE = Rule("preceding", "before", fold_into_preceding)
