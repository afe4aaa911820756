"""Rules 1-4 (through 8, 19-20 and 22-25 on the way): fold a site into the linear node that
computes its input.

The node before the site computes x = W . input + b with the channel on its output axis; the
site's map a*x + c becomes a new weight (W scaled along its output-channel axis) and bias (a*b +
c). The walk back from the site (`walk_back`) looks through Identity and inference Dropout (rule
8), follows the channels through layout ops (rules 19-20, `layout`), pools that commute with the
map (rule 23, `pools`), Casts (rule 24) and Splits (rule 25), and splits the map across a
Concat's inputs (rule 22, `concat`). Each value on the way must be read by nothing else
(shape-only readers aside) and be no graph output: its values change. The nodes walked through
stay; only the site goes.

1. Gemm: scale the weight's output columns (any transA, transB), fold alpha into the weight and
   beta into the bias; C is created when missing and expanded when broadcast.
2. MatMul and MatMul -> Add (bias as either Add input), with a 2-D weight, when the channels
   are the output's last axis (any rank): scale the weight's columns; the bias goes into the
   Add, or into a new one.
3. Conv, with or without bias, any group.
4. ConvTranspose, group-aware (weight (C_in, C_out/group, k...)).

After layout ops the channels may repeat along the output axis (`Channels.expand`): a Gemm
followed by a Reshape to (N, C, H, W) and a BN scales each output column by its channel's
factor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from bn_onnx.fold import affine_math as fm
from bn_onnx.fold import casts, concat, layout, lazy, legacy, pools, splits
from bn_onnx.fold.context import FoldContext
from bn_onnx.fold.layout import Channels
from bn_onnx.fold.nodes import (
    attr_float,
    attr_int,
    is_passthrough,
    is_standard,
    label,
)
from bn_onnx.fold.operands import bias, gemm_rewrite, mismatch, operand, weight
from bn_onnx.fold.rules import Rule
from bn_onnx.fold.sites import AffineSite, Plan, Refusal

# A Concat's reason names at most this many of the inputs that do not fold.
MAX_NAMED = 4


@dataclasses.dataclass
class Part:
    """One linear node's share of a fold: the nodes it changes and the rewrite (the site is
    removed by the caller, once every part is written)."""

    targets: list[ir.Node]
    rewrite: Callable[[], None]


BackStep = Callable[
    [ir.Node, ir.Value, Channels, FoldContext, AffineSite], "tuple[ir.Value, Channels] | Refusal"
]


def _pool_back(
    node: ir.Node, value: ir.Value, ch: Channels, ctx: FoldContext, site: AffineSite
) -> tuple[ir.Value, Channels] | Refusal:
    stepped = pools.step(node, ch, ctx, forward=False)
    return stepped if isinstance(stepped, Refusal) else (node.inputs[0], stepped)  # type: ignore[return-value]


# The walk's steps from a node's output (the one carrying the channels) to its input, by the
# ops they claim: a new step is a module that maps the channels and one entry here (and one
# in `following.FORWARD_STEPS`).
BACK_STEPS: tuple[tuple[Callable[[ir.Node], bool], BackStep], ...] = (
    (layout.is_layout, lambda n, v, ch, ctx, site: layout.back(n, ch, ctx)),
    (casts.is_cast, lambda n, v, ch, ctx, site: casts.back(n, ch, ctx, site)),
    (pools.is_pool, _pool_back),
    (splits.is_split, lambda n, v, ch, ctx, site: splits.back(n, v, ch, ctx)),
)


def fold_into_preceding(site: AffineSite, ctx: FoldContext) -> Plan | Refusal:
    """Rules 1-4: find the linear node(s) before the site and fold."""
    parts = walk_back(site, ctx, site.x, Channels.of(site))
    if isinstance(parts, Refusal):
        return parts

    def rewrite() -> None:
        ctx.remove_site(site, keep_name=True)  # the node before the site now computes y
        for part in parts:  # after: an inserted bias Add takes the readers of x
            part.rewrite()

    return Plan("preceding", [t for part in parts for t in part.targets], rewrite)


def walk_back(
    site: AffineSite, ctx: FoldContext, value: ir.Value, ch: Channels
) -> list[Part] | Refusal:
    """From `value` (carrying the site's channels as `ch`) back to the linear nodes computing it:
    through passthroughs (rule 8), layout ops (rule 19), pools (rule 23), Concat (rule 22),
    float Casts (rule 24) and Split (rule 25: one output's channels of the input).
    Every value on the way changes, so each must have one reader and be no graph output."""
    while True:
        name = value.name
        if value.is_graph_output():
            return Refusal(f"{ch.prefix()}{name!r} is also a graph output")
        if ctx.uses(value) != 1:
            return Refusal(f"{ch.prefix()}{name!r} is also read by another node")
        producer = value.producer()
        if producer is None:
            what = "a graph input" if value.is_graph_input() else "not computed by a node"
            return Refusal(f"{ch.prefix()}{name!r} is {what}")
        if producer.outputs[0] is not value and not splits.is_split(producer):
            break
        if is_passthrough(producer, ctx):
            value = producer.inputs[0]  # type: ignore[assignment]
            continue
        step = next((fn for claims, fn in BACK_STEPS if claims(producer)), None)
        if step is not None:
            moved = step(producer, value, ch, ctx, site)
            if isinstance(moved, Refusal):
                return moved
            value, ch = moved
            continue
        if concat.is_concat(producer):
            return _split(site, ctx, producer, ch)
        break
    part = _into_linear(site, ctx, producer, value, ch)
    return part if isinstance(part, Refusal) else [part]


def _into_linear(
    site: AffineSite, ctx: FoldContext, producer: ir.Node, value: ir.Value, ch: Channels
) -> Part | Refusal:
    """Rules 1-4: the site's channels `ch` on `value`, the output of `producer`."""
    into = TARGETS_BEFORE.get(producer.op_type) if is_standard(producer) else None
    if into is None:
        return Refusal(
            f"{ch.prefix()}comes after {producer.op_type} {label(producer)!r}, not Gemm/MatMul/Conv"
        )
    return into(site, ctx, producer, value, ch)


def _into_add(
    site: AffineSite, ctx: FoldContext, producer: ir.Node, value: ir.Value, ch: Channels
) -> Part | Refusal:
    """MatMul -> Add (the bias as either input) is one linear node."""
    for pos in (0, 1):
        mm_out = operand(producer, pos)
        mm = mm_out.producer() if mm_out is not None else None
        if mm is not None and mm.op_type == "MatMul" and is_standard(mm):
            if mm_out.is_graph_output() or ctx.uses(mm_out) != 1:  # type: ignore[union-attr]
                return Refusal(
                    f"{ch.prefix()}MatMul output {mm_out.name!r} is read by another node"  # type: ignore[union-attr]
                )
            return _into_matmul(site, ctx, mm, (producer, 1 - pos), value, ch)
    return Refusal(
        f"{ch.prefix()}comes after Add {label(producer)!r} that does not add to a MatMul"
    )


def _split(site: AffineSite, ctx: FoldContext, node: ir.Node, ch: Channels) -> list[Part] | Refusal:
    """Rule 22: each input of the Concat folds its share, or the site stays."""
    split = concat.split(node, ch, ctx)
    if isinstance(split, Refusal):
        return split
    parts: list[Part] = []
    failed: list[str] = []
    for value, part_ch in split:
        got = walk_back(site, ctx, value, dataclasses.replace(part_ch, via=()))
        if isinstance(got, Refusal):
            reason = got.reason.removeprefix(f"{value.name!r} ")
            failed.append(f"{value.name!r} ({reason})")
        else:
            parts.extend(got)
    if failed:
        shown = ", ".join(failed[:MAX_NAMED])
        if len(failed) > MAX_NAMED:
            shown += f" and {len(failed) - MAX_NAMED} more"
        return Refusal(
            f"{ch.prefix()}after Concat {label(node)!r}, {len(failed)} of {len(split)} inputs"
            f" do not fold: {shown}"
        )
    return parts


def _channels_at(
    site: AffineSite, ch: Channels, n: int, node: ir.Node, axis: int, what: str
) -> tuple[np.ndarray, np.ndarray] | Refusal:
    """The site's (a, c) over the n output channels of `node`, which lie on `axis` of its
    output; or why the site's channels are elsewhere."""
    ch = ch.at(axis)  # a uniform site is per channel of any axis
    if ch.axis != axis:
        return Refusal(
            f"{ch.prefix()}the {site.short} is per channel of axis {ch.axis} of the output of"
            f" {node.op_type} {label(node)!r}, whose {what} are on axis {axis}"
        )
    expanded = ch.expand(n)
    if expanded is None:
        return Refusal(mismatch(site, ch, n, node, what))
    return expanded


def _into_gemm(site: AffineSite, ctx: FoldContext, gemm: ir.Node, ch: Channels) -> Part | Refusal:
    w = weight(ctx, operand(gemm, 1))
    if isinstance(w, Refusal):
        return w
    trans_b = bool(attr_int(gemm, "transB", 0))
    n = w.shape[0] if trans_b else w.shape[1]
    ac = _channels_at(site, ch, n, gemm, 1, "outputs")
    if isinstance(ac, Refusal):
        return ac
    a, c = ac
    c_value = operand(gemm, 2)
    b = bias(ctx, c_value, n)
    if isinstance(b, Refusal):
        return b
    alpha, beta = attr_float(gemm, "alpha", 1.0), attr_float(gemm, "beta", 1.0)
    factor = fm.preceding_factor(a, 2, out_axis=0 if trans_b else 1, weight_scale=alpha)
    try:
        w_r = lazy.scaled(w, factor)
        b_r = fm.round_to(fm.preceding_bias(b, a, c, bias_scale=beta), w.dtype)
    except ValueError as exc:
        return Refusal(str(exc))

    return Part([gemm], gemm_rewrite(ctx, gemm, w_r, b_r))


def _into_matmul(
    site: AffineSite,
    ctx: FoldContext,
    mm: ir.Node,
    add: tuple[ir.Node, int] | None,
    value: ir.Value,
    ch: Channels,
) -> Part | Refusal:
    """`value` is the output of the MatMul, or of the Add after it (a value renamed by an
    earlier fold's inserted Add may have lost its inferred shape; this one has it)."""
    w = weight(ctx, operand(mm, 1))
    if isinstance(w, Refusal):
        return w
    rank = ctx.rank(value)
    if rank is None:
        return Refusal(f"{ch.prefix()}rank of {value.name!r} is unknown")
    ch = ch.at(rank - 1)
    if ch.axis != rank - 1:  # MatMul's output channels are its last axis
        return Refusal(
            f"{ch.prefix()}MatMul output has rank {rank}: {site.short} normalizes axis"
            f" {ch.axis}, MatMul's outputs are the last axis"
        )
    n = w.shape[1]
    ac = _channels_at(site, ch, n, mm, rank - 1, "outputs")
    if isinstance(ac, Refusal):
        return ac
    a, c = ac
    b = None
    if add is not None:
        add_node, bias_pos = add
        b = bias(ctx, operand(add_node, bias_pos), n)
        if isinstance(b, Refusal):
            return b
        if (why := legacy.bias_refusal(ctx, add_node, bias_pos, rank)) is not None:
            return Refusal(why)
    try:
        w_r = lazy.scaled(w, fm.preceding_factor(a, 2, out_axis=1))
        b_r = fm.round_to(fm.preceding_bias(b, a, c), (b if b is not None else w).dtype)
    except ValueError as exc:
        return Refusal(str(exc))

    def rewrite() -> None:
        ctx.write_input(mm, 1, w_r, None)
        ctx.write_bias(mm, add, b_r)

    return Part([mm] if add is None else [mm, add[0]], rewrite)


def _into_conv(site: AffineSite, ctx: FoldContext, conv: ir.Node, ch: Channels) -> Part | Refusal:
    transpose = conv.op_type == "ConvTranspose"
    w = weight(ctx, operand(conv, 1), ndim=None)
    if isinstance(w, Refusal):
        return w
    group = attr_int(conv, "group", 1)
    if w.ndim < 3 or group < 1 or w.shape[0] % group:
        return Refusal(f"{conv.op_type} weight shape {list(w.shape)} does not fit group")
    n = w.shape[1] * group if transpose else w.shape[0]
    ac = _channels_at(site, ch, n, conv, 1, "outputs")
    if isinstance(ac, Refusal):
        return ac
    a, c = ac
    b_value = operand(conv, 2)
    b = None
    if b_value is not None:
        b = ctx.const(b_value) if not ctx.is_graph_input(b_value) else None
        if b is None or b.shape != (n,):
            return Refusal(f"bias {b_value.name!r} is not a constant vector of {n}")
    try:
        w_r = lazy.scaled(w, fm.conv_factor(a, w.shape, group, transpose))
        b_r = fm.round_to(fm.preceding_bias(b, a, c), w.dtype)
    except ValueError as exc:
        return Refusal(str(exc))

    def rewrite() -> None:
        ctx.write_input(conv, 1, w_r, None)
        ctx.write_input(conv, 2, b_r, None)

    return Part([conv], rewrite)


IntoBefore = Callable[[AffineSite, FoldContext, ir.Node, ir.Value, Channels], "Part | Refusal"]
# The linear nodes a site folds into from after them, by op type: `fn(site, ctx, node, value
# it computes, channels on it)`; a new target op is one function and one entry.
TARGETS_BEFORE: dict[str, IntoBefore] = {
    "Gemm": lambda site, ctx, node, value, ch: _into_gemm(site, ctx, node, ch),
    "MatMul": lambda site, ctx, node, value, ch: _into_matmul(site, ctx, node, None, value, ch),
    "Add": _into_add,
    "Conv": lambda site, ctx, node, value, ch: _into_conv(site, ctx, node, ch),
    "ConvTranspose": lambda site, ctx, node, value, ch: _into_conv(site, ctx, node, ch),
}
LINEAR_BEFORE = tuple(TARGETS_BEFORE)

RULE = Rule("preceding", "before", fold_into_preceding)
