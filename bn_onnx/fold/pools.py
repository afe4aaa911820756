"""Rule 23: a site's channels followed through pools that commute with a per-channel
affine map.

A pool acts on each (batch, channel) plane alone, so `pool(a*x + c) == a*pool(x) + c` per
channel when:

- MaxPool, GlobalMaxPool (and ReduceMax): every scale a >= 0. max commutes with a
  non-decreasing map (x -> a*x + c with a >= 0), and rounding to the dtype is non-decreasing
  too, so the rounded maxima agree; MaxPool's padding is -inf, which such a map keeps the
  smallest. A negative scale turns max into min: the reason names those channels. MaxPool's
  Indices output must be unread (a tie made or broken by rounding would change it).
- GlobalAveragePool, ReduceMean: the average of a*x + c is a*avg(x) + c (the weights sum to 1).
- AveragePool: the same, as long as every window's weights sum to 1. They do with
  count_include_pad=0 (each window divides by its own count of input elements: any pads,
  auto_pad, ceil_mode, dilations). With count_include_pad=1 a padded window counts the pads as
  zeros, which the shift would not be: allowed without padding only. With ceil_mode=1 the last
  window may overhang the input; onnxruntime and onnx.reference then divide by the elements
  inside (checked in tests/test_fold_concat_pools.py), but the spec does not say so, so
  count_include_pad=1 with ceil_mode=1 is allowed only where static shapes show no overhang.

The channel axis must not be pooled: for the pools, the channel axis is 0 or 1 (the plane's
index); for ReduceMean and ReduceMax, it is not among the reduced axes (keepdims=0 moves it).
The walks in `preceding` and `following` step through a pool with `step`; the pool stays in the
graph and the site folds into the linear node on its other side.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bn_onnx.fold.context import FoldContext
from bn_onnx.fold.layout import Channels, axes_of
from bn_onnx.fold.nodes import attr_int, attr_ints, attr_str, is_standard, label
from bn_onnx.fold.sites import Refusal

POOLS = frozenset(
    {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax"}
)
MAX_LIKE = frozenset({"MaxPool", "GlobalMaxPool", "ReduceMax"})


def is_pool(node: ir.Node) -> bool:
    return is_standard(node) and node.op_type in POOLS


def _channel_list(ids: np.ndarray, limit: int = 10) -> str:
    ids = np.unique(ids)
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    return shown + (f" and {ids.size - limit} more" if ids.size > limit else "")


def step(node: ir.Node, ch: Channels, ctx: FoldContext, *, forward: bool) -> Channels | Refusal:
    """The channels on the other side of pool `node` (its output when `forward`, else its
    input 0), or why the site does not commute with it."""
    op, name = node.op_type, f"{node.op_type} {label(node)!r}"
    if op in MAX_LIKE:
        negative = ch.a < 0
        if negative.any():
            ids = np.unique(ch.ids[negative])
            which = (
                f"channel {int(ids[0])} has a negative scale"
                if ids.size == 1
                else f"channels {_channel_list(ids)} have negative scales"
            )
            return Refusal(
                f"{ch.prefix()}{name}: {which} (max commutes only with a non-decreasing map)"
            )
        indices = node.outputs[1] if len(node.outputs) > 1 else None
        if indices is not None and (indices.uses() or indices.is_graph_output()):
            return Refusal(f"{ch.prefix()}{name}: its Indices output is read")
    if op in ("ReduceMean", "ReduceMax"):
        return _reduce(node, ch, ctx, forward=forward)
    if ch.axis > 1:
        return Refusal(f"{ch.prefix()}{name} pools the channel axis {ch.axis}")
    if op == "AveragePool" and attr_int(node, "count_include_pad", 0):
        why = _padded_average(node, ctx)
        if why:
            return Refusal(f"{ch.prefix()}{name} has count_include_pad=1 and {why}")
    return ch.moved(node, ch.axis)


def _padded_average(node: ir.Node, ctx: FoldContext) -> str | None:
    """Why an AveragePool with count_include_pad=1 weighs some window by less than 1, or None."""
    auto_pad = attr_str(node, "auto_pad", "NOTSET")
    pads = attr_ints(node, "pads") or []
    if auto_pad.startswith("SAME"):
        return f"auto_pad={auto_pad}: padded zeros enter the border averages"
    if auto_pad == "NOTSET" and any(pads):
        return f"pads={pads}: padded zeros enter the border averages"
    if not attr_int(node, "ceil_mode", 0):
        return None
    kernel = attr_ints(node, "kernel_shape") or []
    strides = attr_ints(node, "strides") or [1] * len(kernel)
    dilations = attr_ints(node, "dilations") or [1] * len(kernel)
    shape = ctx.shape(node.inputs[0])  # type: ignore[arg-type]
    spatial = None if shape is None else shape[2:]
    if spatial is None or None in spatial or len(spatial) != len(kernel):
        return "ceil_mode=1 on a dynamic shape: the last window may overhang the input"
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=False):
        if (size - d * (k - 1) - 1) % s:  # type: ignore[operator]
            return "ceil_mode=1: the last window overhangs the input"
    return None


def _reduce(node: ir.Node, ch: Channels, ctx: FoldContext, *, forward: bool) -> Channels | Refusal:
    name = f"{node.op_type} {label(node)!r}"
    axes = axes_of(node, ctx)
    if isinstance(axes, Refusal):
        return axes
    in_rank = ctx.rank(node.inputs[0])  # type: ignore[arg-type]
    if in_rank is None:
        return Refusal(f"{ch.prefix()}the rank of {name}'s input is unknown")
    if not axes:
        if attr_int(node, "noop_with_empty_axes", 0):
            return ch.moved(node, ch.axis)
        axes = list(range(in_rank))
    axes = sorted({a + in_rank if a < 0 else a for a in axes})
    keep = attr_int(node, "keepdims", 1)
    if keep:
        if ch.axis in axes:
            return Refusal(f"{ch.prefix()}{name} reduces the channel axis {ch.axis}")
        return ch.moved(node, ch.axis)
    if forward:
        if ch.axis in axes:
            return Refusal(f"{ch.prefix()}{name} reduces the channel axis {ch.axis}")
        return ch.moved(node, ch.axis - sum(a < ch.axis for a in axes))
    kept = [i for i in range(in_rank) if i not in axes]
    if ch.axis >= len(kept):
        return Refusal(f"{ch.prefix()}{name}: axis {ch.axis} is out of range")
    return ch.moved(node, kept[ch.axis])
