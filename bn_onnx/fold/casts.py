"""A walk step through Cast between floating-point types (autocast's `Cast -> BN -> Cast`).

A Cast moves no element, so a per-channel map on one side is the same map on the other; what
changes is where the values are rounded. The fold keeps the original's rounding or does better:

- Back (the site after the Cast, folded into the linear node before it): through a Cast that
  narrows (float32 -> float16) or keeps the type, the folded map is computed in the wider type
  and rounded once by the Cast. Through a Cast that widens (float16 Conv -> Cast to float32 ->
  BN), the folded node rounds the map's output to the narrow type: allowed only when the
  original rounds it there too, that is when every reader of the site's output is a Cast back
  to the narrow type (or narrower) and it is no graph output. Then the fold goes into the
  float16 Conv, with its weights computed in float64 and rounded once to float16.
- Forward (the site before the Cast, folded into the linear node after it): through a Cast that
  widens or keeps the type only; a narrowing Cast would round (or overflow) the input of the
  map where the original rounds its output.

float16 and bfloat16 hold different sets of values (precision against range): a Cast between
them is refused both ways, as is any Cast to or from a type that is not floating point.
"""

from __future__ import annotations

import onnx_ir as ir

from bn_onnx.fold.context import FoldContext
from bn_onnx.fold.layout import Channels
from bn_onnx.fold.nodes import attr_int, is_standard, label
from bn_onnx.fold.sites import AffineSite, Refusal

_F16, _BF16, _F32, _F64 = (
    ir.DataType.FLOAT16,
    ir.DataType.BFLOAT16,
    ir.DataType.FLOAT,
    ir.DataType.DOUBLE,
)
# Each float type and the types whose every value it holds.
_HOLDS = {
    _F64: {_F64, _F32, _F16, _BF16},
    _F32: {_F32, _F16, _BF16},
    _F16: {_F16},
    _BF16: {_BF16},
}


def is_cast(node: ir.Node) -> bool:
    return is_standard(node) and node.op_type == "Cast"


def _types(node: ir.Node, ctx: FoldContext) -> tuple[ir.DataType, ir.DataType] | Refusal:
    name = f"Cast {label(node)!r}"
    src = ctx.elem_type(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None
    dst = attr_int(node, "to", 0)
    types = [ir.DataType(t) if t is not None else None for t in (src, dst)]
    if any(t not in _HOLDS for t in types):
        shown = " to ".join(t.name if t is not None else "?" for t in types)
        return Refusal(f"{name} casts {shown}: only casts between float types keep the values")
    return types[0], types[1]  # type: ignore[return-value]


def back(
    node: ir.Node, ch: Channels, ctx: FoldContext, site: AffineSite
) -> tuple[ir.Value, Channels] | Refusal:
    """The channels on the Cast's input, given them on its output (see the module docstring)."""
    types = _types(node, ctx)
    if isinstance(types, Refusal):
        return types
    src, dst = types
    name = f"Cast {label(node)!r}"
    if dst not in _HOLDS[src]:  # widens: the folded node rounds to src
        if src not in _HOLDS[dst]:
            return Refusal(f"{ch.prefix()}{name} casts {src.name} to {dst.name}")
        if not _cast_back(site, src, ctx):
            return Refusal(
                f"{ch.prefix()}comes after {name} from {src.name}: folding would round the"
                f" {site.short}'s output to {src.name}, which the original does not"
                f" (no Cast back to {src.name} after it)"
            )
    return node.inputs[0], ch.moved(node, ch.axis)  # type: ignore[return-value]


def forward(node: ir.Node, ch: Channels, ctx: FoldContext) -> tuple[ir.Value, Channels] | Refusal:
    """The channels on the Cast's output, given them on its input."""
    types = _types(node, ctx)
    if isinstance(types, Refusal):
        return types
    src, dst = types
    if src not in _HOLDS[dst]:
        return Refusal(
            f"{ch.prefix()}Cast {label(node)!r} narrows {src.name} to {dst.name}: the fold would"
            " round the map's input where the original rounds its output"
        )
    return node.outputs[0], ch.moved(node, ch.axis)


def _cast_back(site: AffineSite, narrow: ir.DataType, ctx: FoldContext) -> bool:
    """Whether the original rounds the site's output to `narrow`: every reader is a Cast to a
    type that `narrow` holds, and the output is no graph output."""
    y = site.y
    readers = ctx.readers(y)
    if y.is_graph_output() or not readers:
        return False
    for reader, _ in readers:
        if not is_cast(reader):
            return False
        to = attr_int(reader, "to", 0)
        if to not in [int(t) for t in _HOLDS[narrow]]:
            return False
    return True
