"""Evaluate one standard ONNX node on constant inputs, under a size budget.

Any op of the default domain is evaluated by onnx.reference's kernel for the model's opset
(`onnx.reference.ReferenceEvaluator` on a one-node model: the versioned kernel, so
Unsqueeze-1's `axes` attribute and Unsqueeze-13's `axes` input both work, and ops onnx defines
as functions are expanded). A few ops have an evaluator of their own, registered with
`@register("Op")` as onnxscript's constant folder does (a new one is one function and one
entry): Identity (no copy), CastLike (its second input gives only the type), QuantizeLinear
and DequantizeLinear before opset 19 (by the version-19 kernel: onnx.reference has no older
one), and Squeeze and Unsqueeze, whose onnx.reference kernels before opset 13 apply the axes
one at a time, so negative or unsorted axes land wrong (`Unsqueeze(k[4], axes=[-2, -1])`
is [4, 1, 1], not [1, 4, 1]).

Not evaluated: random ops (their value is not a constant), nodes holding subgraphs, outputs
that are not tensors (sequences, optionals). The budget: at most `MAX_INPUT_BYTES` of inputs
and `MAX_OUTPUT_ELEMENTS` elements per output, the output shape known before the kernel runs
(from the model's shape inference, else from inference on the node with its small constant
inputs), so a hostile ConstantOfShape or Expand allocates nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir

from bn_onnx.fold.nodes import FLOAT_DTYPES

if TYPE_CHECKING:
    from bn_onnx.fold.views import ValueView

# Inputs of one node evaluated as a constant: at most this many bytes in all.
MAX_INPUT_BYTES = 1 << 28
# An evaluated output may hold at most this many elements: no memory bombs.
MAX_OUTPUT_ELEMENTS = 1 << 26
# Inputs up to this many elements are given as data to the node's own shape inference (shape,
# axes and repeats inputs); bigger ones only as typed inputs.
_SHAPE_DATA_ELEMENTS = 64
# Ops whose output is not a function of their inputs.
NOT_CONSTANT = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
    }
)

Values = Sequence["np.ndarray | None"]
Evaluator = Callable[[ir.Node, Values, "ValueView"], "list[np.ndarray] | None"]
EVALUATORS: dict[str, Evaluator] = {}


def register(op_type: str) -> Callable[[Evaluator], Evaluator]:
    """Register `fn(node, input values, ctx) -> outputs | None` as the evaluator of an op."""

    def decorator(fn: Evaluator) -> Evaluator:
        EVALUATORS[op_type] = fn
        return fn

    return decorator


def data_inputs(node: ir.Node) -> Sequence[ir.Value | None]:
    """The inputs whose values an evaluation needs (CastLike's second gives only a type)."""
    return node.inputs[:1] if node.op_type == "CastLike" else node.inputs


def evaluable(node: ir.Node) -> bool:
    """Whether the node may be evaluated as a constant once its inputs are constant."""
    if node.domain != "" or node.op_type in NOT_CONSTANT or node.op_type == "Constant":
        return False
    return not any(
        a.is_ref() or a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for a in node.attributes.values()
    )


def evaluate(node: ir.Node, values: Values, ctx: ValueView) -> list[np.ndarray] | None:
    """The node's outputs computed from its constant input `values` (None where an optional
    input is absent), or None when it is not evaluated (see the module docstring)."""
    if not evaluable(node):
        return None
    if sum(v.nbytes for v in values if v is not None) > MAX_INPUT_BYTES:
        return None
    if not _outputs_fit(node, values, ctx):
        return None
    own = EVALUATORS.get(node.op_type)
    try:
        out = own(node, values, ctx) if own is not None else _reference(node, values, ctx)
    except Exception:  # not evaluable (bad attributes, a kernel's limits): not a constant
        return None
    if out is None or len(out) < len([o for o in node.outputs if o.name]):
        return None
    arrays = []
    for x in out:
        if not isinstance(x, (np.ndarray, np.generic)):
            return None  # a sequence or an optional
        arr = np.asarray(x)
        if arr.size > MAX_OUTPUT_ELEMENTS or arr.dtype == object:
            return None
        arrays.append(arr)
    return arrays


def _outputs_fit(node: ir.Node, values: Values, ctx: ValueView) -> bool:
    """Whether every output's shape is known before evaluation and within the budget."""
    shapes = [ctx.shape(o) for o in node.outputs]
    if any(s is None or None in s for s in shapes):
        shapes = _infer_node(node, values, ctx.opset)
        if shapes is None:
            return False
    return all(math.prod(s) <= MAX_OUTPUT_ELEMENTS for s in shapes)  # type: ignore[arg-type]


def _node_model(node: ir.Node, values: Values, opset: int, *, data: bool) -> onnx.ModelProto:
    """A one-node model computing `node` from inputs named i0, i1, ...; with `data`, every
    input is an initializer, else only small ones are (the rest are typed inputs)."""
    proto = ir.serde.serialize_node(node)
    names = [f"i{k}" if v is not None else "" for k, v in enumerate(values)]
    del proto.input[:]
    proto.input.extend(names)
    outs = [f"o{k}" if o.name else "" for k, o in enumerate(node.outputs)]
    del proto.output[:]
    proto.output.extend(outs)
    inputs, inits = [], []
    for name, v in zip(names, values, strict=True):
        if v is None:
            continue
        if data or v.size <= _SHAPE_DATA_ELEMENTS:
            inits.append(onnx.numpy_helper.from_array(v, name))
        else:
            elem = onnx.helper.np_dtype_to_tensor_dtype(v.dtype)
            inputs.append(onnx.helper.make_tensor_value_info(name, elem, v.shape))
    graph = onnx.helper.make_graph(
        [proto],
        "constant",
        inputs,
        [onnx.helper.make_empty_tensor_value_info(o) for o in outs if o],
        initializer=inits,
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])


def _infer_node(node: ir.Node, values: Values, opset: int) -> list[tuple[int, ...]] | None:
    """The static output shapes of `node` on these inputs by onnx's shape inference, or None."""
    try:
        model = _node_model(node, values, opset, data=False)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception:
        return None
    shapes = []
    for out in inferred.graph.output:
        t = out.type.tensor_type
        if not t.HasField("shape") or any(not d.HasField("dim_value") for d in t.shape.dim):
            return None
        shapes.append(tuple(d.dim_value for d in t.shape.dim))
    return shapes


def _reference(
    node: ir.Node, values: Values, ctx: ValueView, opset: int | None = None
) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    model = _node_model(node, values, opset or ctx.opset, data=True)
    outs = [o.name for o in model.graph.output]
    got = dict(zip(outs, ReferenceEvaluator(model).run(outs, {}), strict=True))
    return [got[f"o{k}"] for k, o in enumerate(node.outputs) if o.name]


@register("DequantizeLinear")
@register("QuantizeLinear")
def _quantize_linear(node: ir.Node, values: Values, ctx: ValueView) -> list[np.ndarray]:
    """onnx.reference has only versions 19 and later, which compute the same as 10 and 13 on
    the types those take (19 adds float8 and float16 scales)."""
    return _reference(node, values, ctx, max(ctx.opset, 19))


@register("Identity")
def _identity(node: ir.Node, values: Values, ctx: ValueView) -> list[np.ndarray] | None:
    return [values[0]] if values and values[0] is not None else None


@register("CastLike")
def _cast_like(node: ir.Node, values: Values, ctx: ValueView) -> list[np.ndarray] | None:
    to = ctx.elem_type(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
    if to is None or values[0] is None:
        return None
    dtype = ir.DataType(to).numpy()
    if dtype not in FLOAT_DTYPES:
        return None  # onnx.reference's Cast has the rules for the others
    return [values[0].astype(dtype)]


def _axes(node: ir.Node, values: Values, ctx: ValueView) -> list[int] | None:
    if ctx.opset >= 13:
        axes = values[1] if len(values) > 1 else None
        return None if axes is None else [int(a) for a in axes.reshape(-1)]
    a = node.attributes.get("axes")
    return None if a is None else [int(v) for v in a.value]


def _normal_axes(axes: list[int], rank: int) -> tuple[int, ...]:
    normal = sorted(a + rank if a < 0 else a for a in axes)
    if len(set(normal)) != len(normal) or any(not 0 <= a < rank for a in normal):
        raise ValueError(f"axes {axes} do not fit rank {rank}")
    return tuple(normal)


@register("Unsqueeze")
def _unsqueeze(node: ir.Node, values: Values, ctx: ValueView) -> list[np.ndarray] | None:
    axes = _axes(node, values, ctx)
    x = values[0]
    if axes is None or x is None:
        return None
    return [np.expand_dims(x, _normal_axes(axes, x.ndim + len(axes)))]


@register("Squeeze")
def _squeeze(node: ir.Node, values: Values, ctx: ValueView) -> list[np.ndarray] | None:
    axes = _axes(node, values, ctx)
    x = values[0]
    if x is None:
        return None
    if not axes:
        return [np.squeeze(x)]
    normal = _normal_axes(axes, x.ndim)
    if any(x.shape[a] != 1 for a in normal):
        return None
    return [np.squeeze(x, normal)]
