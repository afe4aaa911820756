"""Constant values for the fold: initializers, Constant nodes and small constant subgraphs.

A value is constant when it is an initializer that is not an overridable graph input, the
output of a Constant node, the Shape of a value whose dims are static, or the output of any
standard op whose inputs are all constant (CastLike needs only its first input: the second
gives the type). Subgraphs are evaluated node by node by `bn_onnx.fold.evaluate`: onnx.reference's
kernels at the model's opset under a size budget, and a few evaluators of its own (random ops
and nodes with subgraphs are never constants). The nodes so evaluated are remembered:
the fold removes them once nothing reads their outputs. A function input is a constant when
every call of the function passes the same constant (`scopes.ScopeIndex.argument`); a node with
an attribute that refers to a function attribute is never evaluated.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import onnx_ir as ir

from bn_onnx.errors import UnsupportedModelError, one_line
from bn_onnx.fold import evaluate
from bn_onnx.fold.nodes import attr_int, is_standard
from bn_onnx.fold.validate import check_tensor_data
from bn_onnx.fold.views import ValueView


class _Arguments(Protocol):
    def argument(self, ctx: ValueView, value: ir.Value) -> np.ndarray | None:
        """A function input's constant: what every call passes (`scopes.ScopeIndex`)."""
        ...


class ConstantsContext(ValueView, Protocol):
    """What `Constants` reads from the fold's context: values, and function arguments."""

    @property
    def scopes(self) -> _Arguments: ...


# Values above this many elements are not kept in memory between uses (weights are read again).
CACHE_ELEMENTS = 1 << 16


# External tensors up to this size are copied out of their memory map when read: onnx-ir's
# save closes the maps of the small ones it loads into memory, which fails while a numpy view
# of the map is alive ("BufferError: cannot close exported pointers exist").
COPY_EXTERNAL_BYTES = 1 << 20


# Little-endian numpy dtypes read straight from a TensorProto's raw_data (the common case).
_FAST_DTYPES = {
    int(ir.DataType.FLOAT): np.dtype("<f4"),
    int(ir.DataType.FLOAT16): np.dtype("<f2"),
    int(ir.DataType.DOUBLE): np.dtype("<f8"),
    int(ir.DataType.INT64): np.dtype("<i8"),
}


def read_tensor(tensor: ir.TensorProtocol, name: str) -> np.ndarray:
    """The tensor as a numpy array (memory-mapped for big external data), or a one-line error."""
    try:
        if isinstance(tensor, ir.serde.TensorProtoTensor):
            proto = tensor.raw
            fast = _FAST_DTYPES.get(proto.data_type)
            if fast is not None and proto.HasField("raw_data"):  # skips onnx-ir's Shape objects
                array = np.frombuffer(proto.raw_data, dtype=fast)
                dims = proto.dims
                return (
                    array
                    if len(dims) == 1 and dims[0] == array.size
                    else array.reshape(tuple(dims))
                )
        array = np.asarray(tensor.numpy())
        if isinstance(tensor, ir.ExternalTensor) and array.nbytes <= COPY_EXTERNAL_BYTES:
            array = array.copy()
        return array
    except Exception as exc:
        raise UnsupportedModelError(f"cannot read tensor {name!r}: {one_line(exc)}") from None


def _constant_node_value(node: ir.Node) -> np.ndarray | None:
    """The value of a Constant node (`value`, `value_float(s)`, `value_int(s)`)."""
    for key, a in node.attributes.items():
        if a.is_ref():
            return None
        if key == "value" and a.type == ir.AttributeType.TENSOR and a.value is not None:
            name = node.outputs[0].name or ""
            check_tensor_data(a.value, name)
            return read_tensor(a.value, name)
        if key == "value_float":
            return np.array(a.value, dtype=np.float32)
        if key == "value_floats":
            return np.array(list(a.value), dtype=np.float32)
        if key == "value_int":
            return np.array(a.value, dtype=np.int64)
        if key == "value_ints":
            return np.array(list(a.value), dtype=np.int64)
    return None


class Constants:
    """Evaluates and caches constant values of one graph; see the module docstring."""

    def __init__(self, ctx: ConstantsContext) -> None:
        self.ctx = ctx
        self.cache: dict[ir.Value, np.ndarray | None] = {}
        self.nodes: set[ir.Node] = set()  # nodes evaluated as constants

    def value(self, value: ir.Value | None) -> np.ndarray | None:
        """The value's array if it is constant, else None."""
        if value is None:
            return None
        cached = self.cache.get(value, self)
        if cached is not self:
            return cached  # type: ignore[return-value]
        if value.const_value is not None and not self.ctx.is_graph_input(value):
            array = read_tensor(value.const_value, value.name or "")  # the common case
            self.remember(value, array)
            return array
        stack = [value]
        visiting: set[ir.Value] = set()
        while stack:
            v = stack[-1]
            if v in self.cache:
                stack.pop()
                continue
            deps = self._deps(v)
            if deps is None:
                self.cache[v] = self._leaf(v)
                stack.pop()
                continue
            missing = [d for d in deps if d not in self.cache]
            if missing:
                if v in visiting:  # a cycle: the checker refuses these, but never loop
                    self.cache[v] = None
                    stack.pop()
                    continue
                visiting.add(v)
                stack.extend(missing)
                continue
            self._evaluate(v.producer())  # type: ignore[arg-type]
            self.cache.setdefault(v, None)
            stack.pop()
        result = self.cache[value]
        if result is not None and result.size > CACHE_ELEMENTS:
            del self.cache[value]  # read again if needed: at most one copy held
        return result

    def remember(self, value: ir.Value, array: np.ndarray | None) -> None:
        """Cache `array` as the value's constant (small ones only; big ones are re-read)."""
        if array is not None and array.size > CACHE_ELEMENTS:
            self.cache.pop(value, None)
        else:
            self.cache[value] = array

    def _deps(self, value: ir.Value) -> list[ir.Value] | None:
        """Inputs to evaluate first, or None when `value` is resolved without them."""
        node = value.producer()
        if node is None or value.const_value is not None or self.ctx.is_graph_input(value):
            return None
        if not is_standard(node) or node.op_type == "Shape" or not evaluate.evaluable(node):
            return None
        if node.op_type == "CastLike":  # the second input only gives the type
            if len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[0] is None:
                return None
            return [node.inputs[0]] if self.ctx.elem_type(node.inputs[1]) else None
        return [v for v in node.inputs if v is not None]

    def _leaf(self, value: ir.Value) -> np.ndarray | None:
        if self.ctx.is_graph_input(value):  # an initializer listed as an input can be overridden
            return None
        if value.const_value is not None:
            return read_tensor(value.const_value, value.name or "")
        if value.is_graph_input():  # a function input that every call sets to one constant
            return self.ctx.scopes.argument(self.ctx, value)
        node = value.producer()
        if node is None or not is_standard(node):
            return None
        if any(a.is_ref() for a in node.attributes.values()):
            return None
        if node.op_type == "Constant":
            array = _constant_node_value(node)
            if array is not None:
                self.nodes.add(node)
            return array
        if node.op_type == "Shape" and node.inputs and node.inputs[0] is not None:
            shape = self.ctx.shape(node.inputs[0])
            if shape is None:
                return None
            start = attr_int(node, "start", 0)
            end = node.attributes.get("end")
            dims = shape[start : attr_int(node, "end", 0) if end is not None else None]
            if any(d is None for d in dims):
                return None
            self.nodes.add(node)
            return np.array(dims, dtype=np.int64)
        return None

    def _evaluate(self, node: ir.Node) -> None:
        inputs = evaluate.data_inputs(node)
        values = [self.cache.get(v) if v is not None else None for v in inputs]
        if any(x is None for v, x in zip(inputs, values, strict=True) if v is not None):
            return
        out = evaluate.evaluate(node, values, self.ctx)
        if out is None:
            return
        for value, arr in zip([o for o in node.outputs if o.name], out, strict=False):
            self.cache[value] = arr
        self.nodes.add(node)
