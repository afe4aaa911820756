"""A walk step through Split: a site on one output of a Split, or a Split after a site.

`Split(x)` along axis j puts indices [off_k, off_k + e_k) of x's axis j into output k (the
sizes are read from the outputs' inferred static shapes, so the `split` attribute, the
`split` input and `num_outputs` are all covered).

- Back: a site on output k, with its channels on axis j, is the map on x's indices
  [off_k, off_k + e_k) of that axis and the identity (a = 1, c = 0) on the others, so the
  linear node that computes x folds the site into those output channels only; its other
  channels are scaled by exactly 1 and shifted by exactly 0, so the other outputs keep their
  values bit for bit. A site whose channels are on another axis than j would change only some
  positions of each channel: refused.
- Forward: a site before the Split gives output k the slice of its pattern (channels on axis
  j), or the whole map (elsewhere), and the walk goes on from every output that is read.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bn_onnx.fold.context import FoldContext
from bn_onnx.fold.layout import Channels
from bn_onnx.fold.nodes import attr_int, is_standard, label
from bn_onnx.fold.sites import Refusal


def is_split(node: ir.Node) -> bool:
    return is_standard(node) and node.op_type == "Split"


def _layout(node: ir.Node, ch: Channels, ctx: FoldContext) -> tuple[int, list[int]] | Refusal:
    """The split axis (non-negative) and each output's size along it."""
    name = f"Split {label(node)!r}"
    rank = ctx.rank(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None
    if rank is None:
        return Refusal(f"{ch.prefix()}the rank of {name}'s input is unknown")
    axis = attr_int(node, "axis", 0)
    axis = axis + rank if axis < 0 else axis
    sizes = []
    for out in node.outputs:
        shape = ctx.shape(out)
        if shape is None or len(shape) != rank or shape[axis] is None:
            return Refusal(f"{ch.prefix()}{name}: the size of output {out.name!r} is unknown")
        sizes.append(int(shape[axis]))  # type: ignore[arg-type]
    return axis, sizes


def back(
    node: ir.Node, value: ir.Value, ch: Channels, ctx: FoldContext
) -> tuple[ir.Value, Channels] | Refusal:
    """The channels on the Split's input, given them on its output `value`."""
    layout = _layout(node, ch, ctx)
    if isinstance(layout, Refusal):
        return layout
    axis, sizes = layout
    ch = ch.at(axis)  # a uniform site is per channel of any axis
    if ch.axis != axis:
        return Refusal(
            f"{ch.prefix()}Split {label(node)!r} splits axis {axis}, the channels are on axis"
            f" {ch.axis}: the fold would change only part of each channel"
        )
    k = next(i for i, o in enumerate(node.outputs) if o is value)
    start, size, total = sum(sizes[:k]), sizes[k], sum(sizes)
    expanded = ch.expand(size)
    if expanded is None:
        return Refusal(
            f"{ch.prefix()}{ch.period} channels do not tile the {size} indices of output"
            f" {value.name!r} of Split {label(node)!r}"
        )
    a, c = np.ones(total), np.zeros(total)
    ids = np.full(total, -1)
    a[start : start + size], c[start : start + size] = expanded
    ids[start : start + size] = ch.ids[(np.arange(size) // ch.inner) % ch.period]
    via = (*ch.via, f"Split {label(node)!r}")
    return node.inputs[0], Channels(axis, 1, a, c, ids, via)  # type: ignore[return-value]


def forward(
    node: ir.Node, ch: Channels, ctx: FoldContext
) -> list[tuple[ir.Value, Channels]] | Refusal:
    """Each read output of the Split with the channels it carries, given them on its input."""
    layout = _layout(node, ch, ctx)
    if isinstance(layout, Refusal):
        return layout
    axis, sizes = layout
    parts = []
    start = 0
    for out, size in zip(node.outputs, sizes, strict=True):
        if out.uses() or out.is_graph_output():
            if ch.axis == axis and not ch.uniform:
                parts.append((out, ch.subset(node, start, start + size)))
            else:
                parts.append((out, ch.moved(node, ch.axis)))
        start += size
    return parts
