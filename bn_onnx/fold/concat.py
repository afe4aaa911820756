"""Rule 22: a site after a Concat is split across the Concat's inputs.

`Concat(x_1, ..., x_k)` along the channel axis puts input i's indices at [off_i, off_i + e_i)
of that axis, so the site's map on those indices is the map of input i: the slice of the
pattern (`Channels.subset`). Along any other axis, every input carries all the channels, and
each gets the whole map. The walk in `preceding` then folds each part into the linear node that
computes that input (through passthroughs, layout ops and pools), and the site is removed once
every part has a plan; the Concat stays. An input that does not fold (read by another node, not
computed by a linear node, ...) makes the whole site stay, with a reason naming each such input:
a site split in part would need a new node for the rest.
"""

from __future__ import annotations

import onnx_ir as ir

from bn_onnx.fold.context import FoldContext
from bn_onnx.fold.layout import Channels
from bn_onnx.fold.nodes import attr_int, is_standard, label
from bn_onnx.fold.sites import Refusal


def is_concat(node: ir.Node) -> bool:
    return is_standard(node) and node.op_type == "Concat"


def split(
    node: ir.Node, ch: Channels, ctx: FoldContext
) -> list[tuple[ir.Value, Channels]] | Refusal:
    """Each input of Concat `node` with the channels it carries, given them on its output."""
    name = f"Concat {label(node)!r}"
    rank = ctx.rank(node.outputs[0])
    if rank is None:
        return Refusal(f"{ch.prefix()}the rank of {name}'s output is unknown")
    axis = attr_int(node, "axis", 0)
    axis = axis + rank if axis < 0 else axis
    inputs = [v for v in node.inputs if v is not None]
    if axis != ch.axis:  # every input holds every channel
        return [(v, ch.moved(node, ch.axis)) for v in inputs]
    parts: list[tuple[ir.Value, Channels]] = []
    start = 0
    for value in inputs:
        shape = ctx.shape(value)
        size = None if shape is None or len(shape) != rank else shape[axis]
        if size is None:
            return Refusal(
                f"{ch.prefix()}{name}: the channel count of input {value.name!r} is unknown"
            )
        parts.append((value, ch.subset(node, start, start + size)))
        start += size
    return parts
