"""Rules 5-6 (and 8 after the site): fold a site into the linear nodes that read its output.

When every reader of y (through Identity and inference Dropout, which stay) is a Gemm reading
it as A with transA=0 or a rank-2 MatMul reading it as its first input, each reader
x' @ W + b with x' = a*x + c becomes x @ (a[:, None] * W) + (b + c @ W). Readers may share a
weight: each gets its own copy (`FoldContext.write_input`). Shape-only readers (`Shape`,
`Size`, CastLike's type input) are rewired to x, whose shape and type are y's.

5. Gemm (alpha, beta, transB honoured).
6. MatMul, rank 2; the bias goes into the MatMul's only reader when it is an Add of a constant,
   or into a new Add.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

from bn_onnx.fold import lazy
from bn_onnx.fold import math as fm
from bn_onnx.fold.chains import is_passthrough
from bn_onnx.fold.context import FoldContext
from bn_onnx.fold.preceding import bias, weight
from bn_onnx.fold.sites import (
    AffineSite,
    Plan,
    Refusal,
    Rule,
    attr_float,
    attr_int,
    is_standard,
    label,
)

LINEAR_AFTER = ("Gemm", "MatMul")


def fold_into_following(site: AffineSite, ctx: FoldContext) -> Plan | Refusal:
    """Rules 5-6: fold the site into every linear node reading its output."""
    y = site.y
    if y.is_graph_output():
        return Refusal(f"its output {y.name!r} is a graph output")
    frontier = [y]
    readers: list[tuple[ir.Node, ir.Value]] = []  # (linear node, the value it reads)
    while frontier:
        value = frontier.pop()
        if value.is_graph_output():
            return Refusal(f"{value.name!r} is a graph output")
        uses = ctx.readers(value)
        if not uses:
            return Refusal(f"{value.name!r} is not read by any node")
        seen: set[ir.Node] = set()
        for node, _ in uses:
            if node in seen:
                continue
            seen.add(node)
            count = sum(u.node is node for u in uses)
            if node.graph is not site.graph:
                owner = ctx.owner_in(node, site.graph)
                return Refusal(f"{value.name!r} is read by {owner.op_type} {label(owner)!r}")
            if is_passthrough(node, ctx) and node.inputs[0] is value and count == 1:
                frontier.append(node.outputs[0])
            elif is_standard(node) and node.op_type in LINEAR_AFTER:
                readers.append((node, value))
            else:
                return Refusal(f"{value.name!r} is read by {node.op_type} {label(node)!r}")
    rewrites: list[Callable[[], None]] = []
    for node, value in readers:
        plan = _into_linear_after(site, ctx, node, value)
        if isinstance(plan, Refusal):
            return plan
        rewrites.append(plan)

    def rewrite() -> None:
        for fn in rewrites:
            fn()
        ctx.remove_site(site, keep_name=False)

    return Plan("following", [node for node, _ in readers], rewrite)


def _into_linear_after(
    site: AffineSite, ctx: FoldContext, node: ir.Node, value: ir.Value
) -> Callable[[], None] | Refusal:
    a, c = site.a, site.c
    if node.inputs[0] is not value or sum(v is value for v in node.inputs) != 1:
        return Refusal(f"{label(node)!r} reads {value.name!r} as its weight or bias")
    w_value = node.inputs[1] if len(node.inputs) > 1 else None
    if node.op_type == "Gemm":
        if attr_int(node, "transA", 0):
            return Refusal(f"Gemm {label(node)!r} has transA=1 ({site.short} channel is its batch)")
        w = weight(ctx, w_value)
        if isinstance(w, Refusal):
            return w
        trans_b = bool(attr_int(node, "transB", 0))
        k, n = (w.shape[1], w.shape[0]) if trans_b else w.shape
        if k != site.channels:
            return Refusal(
                f"{site.short} has {site.channels} channels, Gemm {label(node)!r} has {k} inputs"
            )
        c_value = node.inputs[2] if len(node.inputs) > 2 else None
        b = bias(ctx, c_value, n)
        if isinstance(b, Refusal):
            return b
        alpha, beta = attr_float(node, "alpha", 1.0), attr_float(node, "beta", 1.0)
        try:
            w_r = lazy.scaled(w, fm.following_factor(a, trans_b, weight_scale=alpha))
            new_b = fm.following_bias(w, b, c, trans_b, weight_scale=alpha, bias_scale=beta)
            b_r = fm.round_to(new_b, w.dtype)
        except ValueError as exc:
            return Refusal(str(exc))

        def rewrite_gemm() -> None:
            ctx.write_input(node, 1, w_r, None)
            ctx.write_input(node, 2, b_r, None)
            ctx.drop_attributes(node, ("alpha", "beta"))

        return rewrite_gemm
    # MatMul
    w = weight(ctx, w_value)
    if isinstance(w, Refusal):
        return w
    rank = ctx.rank(value)
    if rank != 2:
        return Refusal(
            f"MatMul {label(node)!r} input has rank {rank if rank is not None else '?'}"
            f", not 2: {site.short}'s channel axis is not the contracted axis"
        )
    if w.shape[0] != site.channels:
        return Refusal(
            f"{site.short} has {site.channels} channels, MatMul {label(node)!r} has {w.shape[0]}"
        )
    out = node.outputs[0]
    add = None
    out_readers = ctx.readers(out)
    if not out.is_graph_output() and len(out_readers) == 1:
        add_node, _ = out_readers[0]
        if add_node.op_type == "Add" and is_standard(add_node) and add_node.graph is node.graph:
            pos = 1 if add_node.inputs[0] is out else 0
            if add_node.inputs[1 - pos] is out and add_node.inputs[pos] is not out:
                b = bias(ctx, add_node.inputs[pos], w.shape[1])
                if not isinstance(b, Refusal) and b is not None:
                    add = (add_node, pos, b)
    b = add[2] if add else None
    try:
        w_r = lazy.scaled(w, fm.following_factor(a, transposed=False))
        new_b = fm.following_bias(w, b, c)
        b_r = fm.round_to(new_b, (b if b is not None else w).dtype)
    except ValueError as exc:
        return Refusal(str(exc))

    def rewrite_matmul() -> None:
        ctx.write_input(node, 1, w_r, None)
        if add is not None:
            ctx.write_input(add[0], add[1], b_r, None)
        else:
            ctx.insert_bias_add(node, b_r)

    return rewrite_matmul


RULE = Rule("following", "after", fold_into_following)
