"""Rules 5-6 and 21 (through 8, 19-20 and 23-25 on the way): fold a site into the linear
nodes that read its output.

The walk forward from y looks through Identity and inference Dropout (which stay), follows the
channels through layout ops (rules 19-20, `layout`), pools that commute with the map (rule 23,
`pools`), widening Casts (rule 24) and Splits (rule 25), and needs every reader at the end to be
a linear node reading the value as its data input with the channels on the axis it contracts.
Each reader x' . W + b with x' = a*x + c becomes x . (W scaled by a along its input channels) +
(b + W . c). Readers may share a weight: each gets its own copy (`FoldContext.write_input`).
Shape-only readers (`Shape`, `Size`, CastLike's type input) are rewired to x, whose shape and
type are y's.

5. Gemm reading the value as A (the channels on axis 1, or 0 with transA=1; alpha, beta,
   transB honoured).
6. MatMul with a 2-D weight, the channels on the last axis of its input (any rank); the bias
   goes into the MatMul's only reader when it is an Add of a constant, or into a new Add.
21. Conv that pads nothing (pads all 0 and auto_pad NOTSET or VALID, or SAME with a 1x1
    kernel), any group: weight[o, i] scaled by a of the input channel it reads
    ((o // (C_out/group)) * (C_in/group) + i), bias + sum over in-channels and taps of W * c.
    A padded Conv would see the shift at its border where the original saw zero: refused
    (unless the shift is zero). ConvTranspose of stride 1 whose pads crop every border position
    that sees fewer kernel taps (pads >= dilation*(kernel-1), + output_padding at the end):
    weight (C_in, C_out/group, k...) scaled along axis 0; any other ConvTranspose gives some
    outputs fewer taps (at the borders; with stride > 1 between input positions), so the
    shift is not a per-channel bias: refused with the reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from bn_onnx.fold import affine_math as fm
from bn_onnx.fold import casts, centring, layout, lazy, legacy, pools, quant_guard, splits
from bn_onnx.fold.context import FoldContext
from bn_onnx.fold.layout import Channels
from bn_onnx.fold.nodes import (
    attr_float,
    attr_int,
    attr_ints,
    attr_str,
    is_passthrough,
    is_standard,
    label,
)
from bn_onnx.fold.operands import bias, gemm_rewrite, mismatch, weight
from bn_onnx.fold.rules import Rule
from bn_onnx.fold.sites import AffineSite, Plan, Refusal

ForwardStep = Callable[
    [ir.Node, Channels, FoldContext], "list[tuple[ir.Value, Channels]] | Refusal"
]


def _one(moved: tuple[ir.Value, Channels] | Refusal) -> list[tuple[ir.Value, Channels]] | Refusal:
    return moved if isinstance(moved, Refusal) else [moved]


def _pool_forward(
    node: ir.Node, ch: Channels, ctx: FoldContext
) -> list[tuple[ir.Value, Channels]] | Refusal:
    stepped = pools.step(node, ch, ctx, forward=True)
    return stepped if isinstance(stepped, Refusal) else [(node.outputs[0], stepped)]


# The walk's steps from a node's input 0 to the outputs that carry the channels, by the ops
# they claim (the counterparts of `preceding.BACK_STEPS`).
FORWARD_STEPS: tuple[tuple[Callable[[ir.Node], bool], ForwardStep], ...] = (
    (layout.is_layout, lambda n, ch, ctx: _one(layout.forward(n, ch, ctx))),
    (casts.is_cast, lambda n, ch, ctx: _one(casts.forward(n, ch, ctx))),
    (pools.is_pool, _pool_forward),
    (splits.is_split, splits.forward),
)


def _forward_step(node: ir.Node) -> ForwardStep | None:
    return next((fn for claims, fn in FORWARD_STEPS if claims(node)), None)


def fold_into_following(
    site: AffineSite, ctx: FoldContext, *, max_growth: float | None = None
) -> Plan | Refusal:
    """Rules 5-6 and 21: fold the site into every linear node reading its output.

    `max_growth`: refuse a fold that widens a weight's per-channel range past this factor
    (`quant_guard`); None: no bound.
    """
    y = site.y
    if y.is_graph_output():
        return Refusal(f"its output {y.name!r} is a graph output")
    kept = centring.kept_centring(site)
    if kept is not None:
        return kept
    centre = centring.plan(site, ctx)  # far from zero: fold the scale, keep Sub(x, mean)
    if centre is not None:
        site = centre.site
    frontier = [(y, Channels.of(site))]
    readers: list[tuple[ir.Node, ir.Value, Channels]] = []  # (linear node, value it reads, ...)
    while frontier:
        value, ch = frontier.pop()
        if value.is_graph_output():
            return Refusal(f"{ch.prefix()}{value.name!r} is a graph output")
        uses = ctx.readers(value)
        if not uses:
            return Refusal(f"{ch.prefix()}{value.name!r} is not read by any node")
        seen: set[ir.Node] = set()
        for node, _ in uses:
            if node in seen:
                continue
            seen.add(node)
            count = sum(u.node is node for u in uses)
            if node.graph is not site.graph:
                owner = ctx.owner_in(node, site.graph)
                return Refusal(
                    f"{ch.prefix()}{value.name!r} is read by {owner.op_type} {label(owner)!r}"
                )
            first = node.inputs[0] is value and count == 1
            if first and is_passthrough(node, ctx):
                frontier.append((node.outputs[0], ch))
            elif is_standard(node) and node.op_type in TARGETS_AFTER:
                readers.append((node, value, ch))
            elif first and (step := _forward_step(node)) is not None:
                moved = step(node, ch, ctx)
                if isinstance(moved, Refusal):
                    return moved
                frontier.extend(moved)
            else:
                return Refusal(
                    f"{ch.prefix()}{value.name!r} is read by {node.op_type} {label(node)!r}"
                )
    rewrites: list[Callable[[], None]] = []
    for node, value, ch in readers:
        wrong = _reads_as_data(node, value, ch)
        if wrong is not None:
            return wrong
        plan = TARGETS_AFTER[node.op_type](site, ctx, node, value, ch, max_growth)
        if isinstance(plan, Refusal):
            return plan
        rewrites.append(plan)
    wide = quant_guard.input_refusal(site, ctx, max_growth)
    if wide is not None:
        return wide

    def rewrite() -> None:
        for fn in rewrites:
            fn()
        ctx.remove_site(site if centre is None else centring.emit(centre, ctx), keep_name=False)

    targets = [node for node, _, _ in readers]
    return Plan("following", targets, rewrite, None if centre is None else centre.note())


def _reads_as_data(node: ir.Node, value: ir.Value, ch: Channels) -> Refusal | None:
    """Why a target reading `value` is not folded into: it reads it as a weight or bias."""
    if node.inputs[0] is not value or sum(v is value for v in node.inputs) != 1:
        return Refusal(f"{ch.prefix()}{label(node)!r} reads {value.name!r} as its weight or bias")
    return None


def _into_linear_after(
    site: AffineSite,
    ctx: FoldContext,
    node: ir.Node,
    value: ir.Value,
    ch: Channels,
    max_growth: float | None = None,
) -> Callable[[], None] | Refusal:
    w_value = node.inputs[1] if len(node.inputs) > 1 else None
    if node.op_type == "Gemm":
        trans_a = attr_int(node, "transA", 0)
        contracted = 0 if trans_a else 1  # A is (M, K), or (K, M) with transA=1
        ch = ch.at(contracted)  # a uniform site is per channel of any axis
        if ch.axis != contracted:
            return Refusal(
                f"{ch.prefix()}Gemm {label(node)!r} has transA={trans_a}: it contracts axis"
                f" {contracted} of {value.name!r}, the {site.short} channel is axis {ch.axis}"
            )
        w = weight(ctx, w_value)
        if isinstance(w, Refusal):
            return w
        trans_b = bool(attr_int(node, "transB", 0))
        k, n = (w.shape[1], w.shape[0]) if trans_b else w.shape
        ac = ch.expand(k)
        if ac is None:
            return Refusal(mismatch(site, ch, k, node, "inputs"))
        a, c = ac
        c_value = node.inputs[2] if len(node.inputs) > 2 else None
        b = bias(ctx, c_value, n)
        if isinstance(b, Refusal):
            return b
        alpha, beta = attr_float(node, "alpha", 1.0), attr_float(node, "beta", 1.0)
        factor = fm.following_factor(a, trans_b, weight_scale=alpha)
        wide = quant_guard.refusal(site, node, w, factor, 0 if trans_b else 1, max_growth)
        if wide is not None:
            return wide
        try:
            w_r = lazy.scaled(w, factor)
            new_b = fm.following_bias(w, b, c, trans_b, weight_scale=alpha, bias_scale=beta)
            b_r = fm.round_to(new_b, w.dtype)
        except ValueError as exc:
            return Refusal(str(exc))

        return gemm_rewrite(ctx, node, w_r, b_r)
    # MatMul with a 2-D weight: it contracts the last axis of its first input
    w = weight(ctx, w_value)
    if isinstance(w, Refusal):
        return w
    rank = ctx.rank(value)
    if rank is not None:
        ch = ch.at(rank - 1)
    if rank is None or ch.axis != rank - 1:
        return Refusal(
            f"{ch.prefix()}MatMul {label(node)!r} input has rank"
            f" {rank if rank is not None else '?'}: it contracts the last axis,"
            f" the {site.short} channel is axis {ch.axis}"
        )
    ac = ch.expand(w.shape[0])
    if ac is None:
        return Refusal(mismatch(site, ch, w.shape[0], node, "inputs"))
    a, c = ac
    out = node.outputs[0]
    add = None
    out_readers = ctx.readers(out)
    if not out.is_graph_output() and len(out_readers) == 1:
        add_node, _ = out_readers[0]
        if add_node.op_type == "Add" and is_standard(add_node) and add_node.graph is node.graph:
            pos = 1 if add_node.inputs[0] is out else 0
            if add_node.inputs[1 - pos] is out and add_node.inputs[pos] is not out:
                b = bias(ctx, add_node.inputs[pos], w.shape[1])
                legacy_ok = legacy.bias_refusal(ctx, add_node, pos, 2) is None
                if not isinstance(b, Refusal) and b is not None and legacy_ok:
                    add = (add_node, pos, b)
    b = add[2] if add else None
    wide = quant_guard.refusal(site, node, w, fm.following_factor(a, False), 1, max_growth)
    if wide is not None:
        return wide
    try:
        w_r = lazy.scaled(w, fm.following_factor(a, transposed=False))
        new_b = fm.following_bias(w, b, c)
        b_r = fm.round_to(new_b, (b if b is not None else w).dtype)
    except ValueError as exc:
        return Refusal(str(exc))

    def rewrite_matmul() -> None:
        ctx.write_input(node, 1, w_r, None)
        ctx.write_bias(node, add, b_r)

    return rewrite_matmul


def _pads(node: ir.Node, dims: int) -> tuple[str, list[int]]:
    """auto_pad and explicit pads (zeros when absent) of a Conv or ConvTranspose."""
    return attr_str(node, "auto_pad", "NOTSET"), attr_ints(node, "pads") or [0] * (2 * dims)


def _conv_pads_refusal(
    site: AffineSite, node: ir.Node, kernel: tuple[int, ...], ch: Channels, c: np.ndarray
) -> Refusal | None:
    """Rule 21: why a following Conv's padded border would see something else than the shift."""
    auto_pad, pads = _pads(node, len(kernel))
    if not c.any():  # no shift: the padded border sees zero either way
        return None
    if auto_pad.startswith("SAME") and any(k != 1 for k in kernel):
        padding = f"auto_pad={auto_pad}"
    elif auto_pad == "NOTSET" and any(pads):
        padding = f"pads={pads}"
    else:
        return None
    return Refusal(
        f"{ch.prefix()}the following Conv {label(node)!r} pads ({padding}): a padded border"
        f" would see the {site.short}'s shift, not zero"
    )


def _conv_transpose_refusal(
    site: AffineSite,
    node: ir.Node,
    kernel: tuple[int, ...],
    ch: Channels,
    c: np.ndarray,
) -> Refusal | None:
    """Rule 21: why a following ConvTranspose would not add the shift as one bias per channel.

    Output position p of a ConvTranspose (per spatial dim: stride s, dilation d, kernel K,
    pads b and e, output_padding q) takes tap k from input j = (p + b - k*d) / s when that is
    a whole index inside the input. Every output sees every tap exactly when s = 1,
    b >= d*(K-1) and e >= d*(K-1) + q: then the shift adds sum over taps and input channels
    of W * c to every output of a channel. Otherwise borders (and, for s > 1, the positions
    between input strides) see fewer taps, so the shift is not a per-channel bias.
    """
    if not c.any():
        return None
    name = f"{ch.prefix()}the following ConvTranspose {label(node)!r}"
    if attr_ints(node, "output_shape") is not None:
        return Refusal(f"{name} has output_shape: its pads are computed at run time")
    dims = len(kernel)
    strides = attr_ints(node, "strides") or [1] * dims
    if any(s != 1 for s in strides):
        return Refusal(
            f"{name} has strides={strides}: its outputs see different kernel taps, so the"
            f" {site.short}'s shift is not a per-channel bias"
        )
    auto_pad, pads = _pads(node, dims)
    dilations = attr_ints(node, "dilations") or [1] * dims
    extra = attr_ints(node, "output_padding") or [0] * dims
    need_begin = [d * (k - 1) for d, k in zip(dilations, kernel, strict=False)]
    need_end = [n + q for n, q in zip(need_begin, extra, strict=False)]
    if auto_pad != "NOTSET":
        pads = [0] * (2 * dims)
        if auto_pad.startswith("SAME") and any(need_end):
            return Refusal(
                f"{name} pads (auto_pad={auto_pad}): border outputs see fewer kernel taps,"
                f" so the {site.short}'s shift is not a per-channel bias"
            )
    begin, end = pads[:dims], pads[dims:]
    if any(b < n for b, n in zip(begin, need_begin, strict=False)) or any(
        e < n for e, n in zip(end, need_end, strict=False)
    ):
        return Refusal(
            f"{name} has pads={pads}, less than dilation*(kernel-1) (+ output_padding) ="
            f" {need_begin + need_end}: border outputs see fewer kernel taps, so the"
            f" {site.short}'s shift is not a per-channel bias"
        )
    return None


def _into_conv_after(
    site: AffineSite,
    ctx: FoldContext,
    node: ir.Node,
    value: ir.Value,
    ch: Channels,
    max_growth: float | None = None,
) -> Callable[[], None] | Refusal:
    """Rule 21: a site on the input of a Conv (or ConvTranspose) that pads nothing."""
    transpose = node.op_type == "ConvTranspose"
    ch = ch.at(1)  # a uniform site is per channel of any axis
    if ch.axis != 1:
        return Refusal(
            f"{ch.prefix()}the {site.short} channel is axis {ch.axis} of {value.name!r},"
            f" {node.op_type} {label(node)!r} reads channels on axis 1"
        )
    w = weight(ctx, node.inputs[1] if len(node.inputs) > 1 else None, ndim=None)
    if isinstance(w, Refusal):
        return w
    group = attr_int(node, "group", 1)
    if w.ndim < 3 or group < 1 or w.shape[0] % group:
        return Refusal(f"{node.op_type} weight shape {list(w.shape)} does not fit group")
    c_in = w.shape[0] if transpose else w.shape[1] * group
    c_out = w.shape[1] * group if transpose else w.shape[0]
    ac = ch.expand(c_in)
    if ac is None:
        return Refusal(mismatch(site, ch, c_in, node, "input channels"))
    a, c = ac
    kernel = tuple(int(k) for k in w.shape[2:])
    if transpose:
        refused = _conv_transpose_refusal(site, node, kernel, ch, c)
    else:
        refused = _conv_pads_refusal(site, node, kernel, ch, c)
    if refused is not None:
        return refused
    b_value = node.inputs[2] if len(node.inputs) > 2 else None
    b = None
    if b_value is not None:
        b = ctx.const(b_value) if not ctx.is_graph_input(b_value) else None
        if b is None or b.shape != (c_out,):
            return Refusal(f"bias {b_value.name!r} is not a constant vector of {c_out}")
    factor = fm.conv_input_factor(a, w.shape, group, transpose)
    wide = quant_guard.refusal(site, node, w, factor, 1 if transpose else 0, max_growth)
    if wide is not None:
        return wide
    try:
        w_r = lazy.scaled(w, factor)
        shift = fm.conv_input_shift(w, c, group, transpose)
        b_r = fm.round_to(shift if b is None else b.astype(np.float64) + shift, w.dtype)
    except ValueError as exc:
        return Refusal(str(exc))

    def rewrite_conv() -> None:
        ctx.write_input(node, 1, w_r, None)
        ctx.write_input(node, 2, b_r, None)

    return rewrite_conv


IntoAfter = Callable[
    [AffineSite, FoldContext, ir.Node, ir.Value, Channels, "float | None"],
    "Callable[[], None] | Refusal",
]
# The linear nodes a site folds into from before them, by op type: `fn(site, ctx, node, value
# it reads, channels on it, max_growth) -> rewrite | Refusal`; a new target op is one function
# and one entry.
TARGETS_AFTER: dict[str, IntoAfter] = {
    "Gemm": _into_linear_after,
    "MatMul": _into_linear_after,
    "Conv": _into_conv_after,
    "ConvTranspose": _into_conv_after,
}
LINEAR_AFTER = tuple(TARGETS_AFTER)

RULE = Rule("following", "after", fold_into_following)


def guarded(max_growth: float) -> Rule:
    """The rule with the quantization-aware bound (`quant_guard`)."""
    return Rule("following", "after", functools.partial(fold_into_following, max_growth=max_growth))
