"""The fold's ground floor: node helpers every rule uses (attributes, the standard domain,
labels, float dtypes, the passthrough ops). Imports no other fold module at run time."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import onnx_ir as ir

if TYPE_CHECKING:
    from bn_onnx.fold.views import ValueView

FLOAT_DTYPES = frozenset(
    t.numpy()
    for t in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
)
PASSTHROUGH = ("Identity", "Dropout")
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
_D = TypeVar("_D")
_N = TypeVar("_N", int, float)


def label(node: ir.Node) -> str:
    """A node's name, or `Op(first output)` for a nameless node."""
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs else None
    return f"{node.op_type}({out or '?'})"


def is_standard(node: ir.Node) -> bool:
    """Whether the node is of the default ONNX domain ("" or "ai.onnx")."""
    return node.domain in STANDARD_DOMAINS


def _attr_number(node: ir.Node, name: str, default: _D, convert: Callable[[Any], _N]) -> _N | _D:
    a = node.attributes.get(name)
    if a is None or a.is_ref():
        return default
    try:
        return convert(a.value)
    except (TypeError, ValueError):
        return default


def attr_int(node: ir.Node, name: str, default: _D) -> int | _D:
    """An int attribute, or `default` when absent, a reference or not a number."""
    return _attr_number(node, name, default, int)


def attr_float(node: ir.Node, name: str, default: float) -> float:
    """A float attribute, or `default` when absent, a reference or not a number."""
    return _attr_number(node, name, default, float)


def attr_ints(node: ir.Node, name: str) -> list[int] | None:
    """An ints attribute as a list, or None when absent."""
    a = node.attributes.get(name)
    if a is None or a.is_ref() or a.value is None:
        return None
    return [int(v) for v in a.value]


def attr_str(node: ir.Node, name: str, default: str) -> str:
    a = node.attributes.get(name)
    if a is None or a.is_ref() or a.value is None:
        return default
    return str(a.value)


def is_passthrough(node: ir.Node, ctx: ValueView) -> bool:
    """Whether `node` copies its first input to its first output (Identity, inference
    Dropout: no training_mode input or a constant false one; before opset 7, is_test=1)."""
    if not is_standard(node) or node.op_type not in PASSTHROUGH or not node.inputs:
        return False
    if node.inputs[0] is None:
        return False
    if node.op_type == "Identity":
        return True
    if ctx.opset < 7 and not attr_int(node, "is_test", 0):
        return False
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        mode = ctx.const(node.inputs[2])
        return mode is not None and mode.size == 1 and not bool(mode.reshape(-1)[0])
    return True
