"""Cleanup after the BN fold: fold the constants an exporter left, then remove dead code.

torch's dynamo exporter (with `optimize=False`) leaves clutter that a BN fold does not touch and
onnxruntime cannot always remove itself: `CastLike(Constant, x)` before every Clip bound (its
second input is a runtime tensor whose *type* alone is read, so onnxruntime sees a dynamic
min/max and loses its Conv+Clip fusion), `Shape` of static dims, `Expand`/`ConstantOfShape` of
constants, `Identity` chains, sequence ops around `Split`, and one `Constant` node per scalar.
`CleanupPass` folds them with onnxscript's constant folder (`FoldConstantsPass`, the folder of
`onnxscript.optimizer.optimize`, on the same onnx-ir model) and most of its default rewrite
rules, and removes what is left with onnx-ir's passes. Only the decisions the libraries leave
open are made here:

1. *When* to fold: `needs_constant_folder` scans the model cheaply, without importing
   onnxscript (about 0.2 to 0.4 s here), for a node the folder would change; a model without
   one never pays for the import.
2. *What* may be folded (`CleanupPass.should_fold`): only deterministic ops of the standard
   domain without attributes that refer to a function's attributes; never BatchNormalization
   (the fold reports each one), the quantization ops, random
   ops, Bernoulli or Dropout (onnxscript's list misses the last two), nor a node whose output
   would be a new constant of more than `max_new_elements` elements not paid for by the
   constants it frees (an Expand/ConstantOfShape/Tile "bomb"). Output sizes come from ONNX
   shape inference on the constant inputs themselves, not from the model's own value_info,
   which could lie; a node whose output size cannot be inferred is folded only if its op cannot
   grow its data (`NON_GROWING_OPS`).
3. Identity elimination that keeps valid ONNX: onnx-ir's `IdentityEliminationPass` would rename
   an outer-scope value to a subgraph's output name (onnxruntime rejects a subgraph that returns
   an outer value directly) and drop a graph output's name when `y = Identity(x)` has both x
   and y as outputs; such Identity nodes are kept.
4. The guarantees, checked after every run (`ensures`): graph input and output names, dtypes and
   shapes and their order, `metadata_props`, the opset imports of the model and of every
   function, and the set of function signatures never change, and no node of a domain that was
   not already used appears. Constant graph outputs stay graph outputs with their names.
5. Which rewrite rules: onnxscript's defaults except the BatchNormalization fusions and the two
   that are not exact (see `CleanupPass`, rule 2).

References: onnxscript `optimizer/_constant_folding.py` (FoldConstantsPass, its partial
evaluators for Shape, Size, CastLike, Cast, Expand, Reshape, Gather of a shape, Identity,
Dropout, If of a constant condition and the sequence ops), `rewriter/rules/common/`; onnx-ir
`passes/common/` (`RemoveUnusedNodesPass`, `RemoveUnusedFunctionsPass`,
`LiftConstantsToInitializersPass`, `DeduplicateInitializersPass`, `IdentityEliminationPass`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from bn_onnx.fold.nodes import STANDARD_DOMAINS, attr_int, is_standard

__all__ = [
    "CLEANUP_STEPS",
    "DEFAULT_MAX_HEAVY_INPUT_ELEMENTS",
    "DEFAULT_MAX_NEW_ELEMENTS",
    "CleanupPass",
    "CleanupResult",
    "cleanup",
    "needs_constant_folder",
]

# A folded constant may be this big (elements) beyond the constants it frees: 1M elements is
# 4 MB of float32, already far more than any shape or scalar the exporter leaves.
DEFAULT_MAX_NEW_ELEMENTS = 1 << 20
# Ops outside CHEAP_OPS (Conv, MatMul, Resize ...) run in onnx.reference's numpy kernels when
# folded; inputs above this many elements in all are left to the runtime.
DEFAULT_MAX_HEAVY_INPUT_ELEMENTS = 1 << 16
# Initializers up to this size are deduplicated by onnx-ir (by their bytes); larger ones here.
_SMALL_ELEMENTS = 1024
_FINGERPRINT_BYTES = 4096
# Small constant inputs are handed to shape inference as data (shape, repeats, pads, starts).
_SHAPE_DATA_ELEMENTS = 64

# Each call may give a different result: never folded.
NON_DETERMINISTIC_OPS = frozenset(
    {
        "Bernoulli",
        "Dropout",  # random in training mode; onnxscript turns the inference forms into Identity
        "Multinomial",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
    }
)
# Never folded: the BN fold reports every BatchNormalization it leaves, and a quantized weight
# stays quantized (a folded DequantizeLinear is 4x the bytes and loses the scale).
KEPT_OPS = frozenset(
    {"BatchNormalization", "DequantizeLinear", "DynamicQuantizeLinear", "QuantizeLinear"}
)
# Ops whose output has at most as many elements as all their inputs together.
NON_GROWING_OPS = frozenset(
    {
        "Abs", "ArgMax", "ArgMin", "Cast", "CastLike", "Ceil", "Concat", "Cos", "Erf", "Exp",
        "Flatten", "Floor", "Identity", "IsInf", "IsNaN", "Log", "Neg", "Not", "ReduceL1",
        "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
        "ReduceProd", "ReduceSum", "ReduceSumSquare", "Reciprocal", "Relu", "Reshape", "Round",
        "Shape", "Sigmoid", "Sign", "Sin", "Size", "Slice", "Sqrt", "Squeeze", "Tanh",
        "Transpose", "Unsqueeze",
    }
)  # fmt: skip
# Linear-time in numpy: folded whatever the input size (the memory bound still applies).
CHEAP_OPS = NON_GROWING_OPS | frozenset(
    {
        "Add", "And", "ConstantOfShape", "Div", "Equal", "Expand", "Gather", "Greater",
        "GreaterOrEqual", "Less", "LessOrEqual", "Max", "Min", "Mod", "Mul", "Or", "Pow",
        "Range", "Sub", "Tile", "Where", "Xor",
    }
)  # fmt: skip
# Loggers of the libraries used here: they warn on stderr for cases that are fine here
# (a graph-output initializer is not deduplicated; a node the reference evaluator cannot run).
_QUIET_LOGGERS = (
    "onnx_ir.passes.common.initializer_deduplication",
    "onnxscript.optimizer._constant_folding",
)
_FOLDED_FROM_KEY = "pkg.onnxscript.optimizer.folded_from"
# The cleanup's steps by name, in the order they run (`CleanupPass(skip=...)` leaves some out;
# the fold's output check drops a step that breaks a model: `bn_onnx.fold.guard`).
CLEANUP_STEPS = (
    "constant_folding",  # onnxscript's FoldConstantsPass and the initializer Transpose fold
    "rewrite_rules",  # onnxscript's default rewrite rules
    "identity_elimination",
    "remove_unused",  # dead nodes, unused initializers and functions
    "lift_constants",
    "deduplicate_initializers",
    "common_subexpressions",
)


# --------------------------------------------------------------------------------------------
# Result


@dataclasses.dataclass
class CleanupResult(ir.passes.PassResult):
    """What the cleanup changed. Counts include nodes in subgraphs and functions.

    Attributes:
        nodes_before: nodes before the cleanup (main graph, subgraphs, functions).
        nodes_after: nodes after it.
        initializers_before: initializers before (main graph and subgraphs).
        initializers_after: initializers after.
        removed_ops: net number of nodes removed per op type (negative where nodes were
            added, e.g. a CastLike turned into a Cast that could not be folded).
        deduplicated: initializers replaced by an identical one.
        rewrites: onnxscript rewrite rules applied (see `CleanupPass`, rule 2).
        used_constant_folder: whether onnxscript's constant folder ran (and was imported).
    """

    nodes_before: int = 0
    nodes_after: int = 0
    initializers_before: int = 0
    initializers_after: int = 0
    removed_ops: dict[str, int] = dataclasses.field(default_factory=dict)
    deduplicated: int = 0
    rewrites: int = 0
    used_constant_folder: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The counts as JSON-ready data (for the fold's `--report`)."""
        return {
            "modified": self.modified,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "initializers_before": self.initializers_before,
            "initializers_after": self.initializers_after,
            "removed_ops": dict(self.removed_ops),
            "deduplicated": self.deduplicated,
            "rewrites": self.rewrites,
            "used_constant_folder": self.used_constant_folder,
        }


# --------------------------------------------------------------------------------------------
# Traversal helpers


def _graph_likes(model: ir.Model) -> Iterator[ir.Graph | ir.Function]:
    yield model.graph
    yield from model.functions.values()


def _all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    for g in _graph_likes(model):
        yield from ir.traversal.RecursiveGraphIterator(g)


def _count_initializers(model: ir.Model) -> int:
    return sum(len(g.initializers) for g in model.graphs())


def _is_constant(value: ir.Value | None) -> bool:
    """A value known before the run: an initializer (not overridable) or a Constant's output."""
    if value is None:  # an omitted optional input
        return True
    if value.const_value is not None and not value.is_graph_input():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and is_standard(producer)


def _static_dims(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None or not value.shape.is_static():
        return None
    return tuple(value.shape.numpy())


def _const_ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    if value.const_value.size > _SHAPE_DATA_ELEMENTS:
        return None
    try:
        return [int(v) for v in value.const_value.numpy().reshape(-1)]
    except (TypeError, ValueError):
        return None


def _nonnegative_unsqueeze_axes(node: ir.Node) -> None:
    """Write an Unsqueeze-11's negative `axes` attribute as the same axes counted from 0.

    onnx.reference's Unsqueeze-1/-11, which onnxscript's folder runs, inserts the axes one at
    a time, so `axes=[-2, -1]` of a [4] vector gives [1, 4, 1] instead of [4, 1, 1]. Counted
    from 0 (output rank = input rank + number of axes) the attribute means the same and the
    evaluator gets it right. The input must be a constant (its rank known).
    """
    attr = node.attributes.get("axes")
    data = node.inputs[0] if node.inputs else None
    if attr is None or attr.is_ref() or attr.type != ir.AttributeType.INTS:
        return
    if data is None or data.const_value is None:
        return
    axes = list(attr.as_ints())
    if all(a >= 0 for a in axes):
        return
    rank = len(data.const_value.shape) + len(axes)
    fixed = sorted(a + rank if a < 0 else a for a in axes)
    node.attributes["axes"] = ir.AttrInt64s("axes", fixed)


def _has_graph_attr(node: ir.Node) -> bool:
    return any(
        a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for a in node.attributes.values()
    )


# --------------------------------------------------------------------------------------------
# The cheap scan


def _folder_would_change(node: ir.Node) -> bool:
    """Whether onnxscript's folder has something to do with `node` (over-approximated)."""
    if not is_standard(node) or node.op_type == "Constant":
        return False
    op = node.op_type
    if op in KEPT_OPS or (op in NON_DETERMINISTIC_OPS and op != "Dropout"):
        return False
    inputs = node.inputs
    if op == "If":
        return _is_constant(inputs[0]) if inputs else False
    if _has_graph_attr(node):
        return False  # Loop and Scan are never folded; their bodies are scanned on their own
    if op == "Dropout":  # the folder turns an inference-mode Dropout into Identity
        return True
    if op in ("SequenceAt", "SplitToSequence", "ConcatFromSequence", "SequenceConstruct"):
        return True
    if inputs and all(_is_constant(v) for v in inputs):
        return True
    first = inputs[0] if inputs else None
    if op == "CastLike":  # Cast(x, to=dtype(y)) once y's dtype is known or inferred
        return True
    if op == "Cast":
        return (
            first is not None
            and first.dtype is not None
            and first.dtype == attr_int(node, "to", None)
        )
    # Shape and Size: static dims, or no shape yet (the folder's shape inference may find one)
    if op == "Size":
        return first is not None and (first.shape is None or first.shape.is_static())
    if op == "Shape":
        if first is None or first.shape is None:
            return first is not None
        # one static dim is enough: a Gather or Slice of it is a constant
        start, end = attr_int(node, "start", 0), attr_int(node, "end", None)
        return any(isinstance(d, int) for d in first.shape.dims[slice(start, end)])
    if op == "Reshape" and len(inputs) > 1 and not _is_constant(inputs[1]):
        # a shape computed at run time where the output has at most one unknown dim: the
        # rewriter writes it as a constant (`-1` for the unknown one)
        shape = node.outputs[0].shape
        return shape is not None and sum(not isinstance(d, int) for d in shape) <= 1
    if op in ("Reshape", "Expand"):
        dims = _static_dims(first)
        target = _const_ints(inputs[1]) if len(inputs) > 1 else None
        return dims is not None and target is not None and list(dims) == target
    if op == "Concat":
        return len(inputs) == 1
    return False


def needs_constant_folder(model: ir.Model) -> bool:
    """Whether `model` has a node that onnxscript's constant folder would change.

    Cheap (one pass over the nodes, no import of onnxscript) and conservative: it may say True
    for a model the folder leaves as it is, never False for one the folder would change.
    Identity nodes alone do not count: the cleanup removes them with onnx-ir.
    """
    return any(_folder_would_change(n) for n in _all_nodes(model))


# --------------------------------------------------------------------------------------------
# Output size of a node, from its constant inputs


def _inferred_output_elements(node: ir.Node, opset: int) -> int | None:
    """Elements in all outputs of `node` (every input a constant), or None if not inferable.

    Runs ONNX shape inference on the node alone with its inputs' real types and small inputs
    as data, so a wrong value_info in the model cannot hide a large output.
    """
    try:
        proto = ir.serde.serialize_node(node)
        proto.ClearField("input")
        proto.ClearField("output")
        types: dict[str, onnx.TypeProto] = {}
        data: dict[str, onnx.TensorProto] = {}
        for i, value in enumerate(node.inputs):
            name = ""
            if value is not None:
                tensor = value.const_value
                if tensor is None:  # a Constant node's output before the folder saw it
                    return None
                name = f"i{i}"
                dims = [int(d) for d in tensor.shape.numpy()]
                types[name] = onnx.helper.make_tensor_type_proto(int(tensor.dtype), dims)
                if tensor.size <= _SHAPE_DATA_ELEMENTS:
                    data[name] = ir.serde.serialize_tensor(tensor)
            proto.input.append(name)
        proto.output.extend(f"o{i}" for i in range(len(node.outputs)))
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        inferred = onnx.shape_inference.infer_node_outputs(schema, proto, types, data)
    except Exception:  # noqa: BLE001 - any failure means "not inferable"
        return None
    total = 0
    for i in range(len(node.outputs)):
        t = inferred.get(f"o{i}")
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        dims = t.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            return None
        total += math.prod(d.dim_value for d in dims)
    return total


# --------------------------------------------------------------------------------------------
# Passes: the two onnx-ir passes made safe for this use


class _SafeIdentityEliminationPass(common_passes.IdentityEliminationPass):
    """onnx-ir's IdentityEliminationPass, keeping the Identity nodes it would break.

    `y = Identity(x)` with y a graph output is removed only when x is made by a node of the same
    graph and is not itself a graph output: otherwise x would be renamed to y, which renames an
    outer-scope value (a subgraph may not return one directly) or drops a graph output's name.
    """

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if node.op_type != "Identity" or node.domain not in STANDARD_DOMAINS:
            return False
        if len(node.inputs) != 1 or len(node.outputs) != 1 or node.inputs[0] is None:
            return False
        x, y = node.inputs[0], node.outputs[0]
        if y.is_graph_output():
            producer = x.producer()
            if producer is None or producer.graph is not node.graph or x.is_graph_output():
                return False
        return super()._try_eliminate_identity_node(node)


class _SafeCommonSubexpressionEliminationPass(common_passes.CommonSubexpressionEliminationPass):
    """onnx-ir's CommonSubexpressionEliminationPass (onnxscript's optimizer runs it last), never
    merging a node this cleanup must not touch.

    The library merges nodes of the main graph with the same op, inputs and attributes, except
    control flow, random ops and big constants. Also left here: `KEPT_OPS` (the fold reports
    every BatchNormalization it leaves), `NON_DETERMINISTIC_OPS` (Dropout in training mode and
    Bernoulli are random; the library's list misses them), ops outside the standard domain
    (what a custom op computes is unknown) and Constant nodes (those left after rule 5 keep a
    constant graph output's name: merging two would put an Identity there, which the next
    cleanup would fold). Such a node gets, for the run, an attribute no other node has, so
    that it matches nothing; the attribute is removed afterwards.
    """

    _MARK = "bn_onnx_cleanup_cse_keep"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        kept = [
            node
            for node in model.graph
            if not is_standard(node)
            or node.op_type in KEPT_OPS
            or node.op_type in NON_DETERMINISTIC_OPS
            or node.op_type == "Constant"
        ]
        for i, node in enumerate(kept):
            node.attributes[self._MARK] = ir.AttrInt64(self._MARK, i)
        try:
            return super().call(model)
        finally:
            for node in kept:
                node.attributes.pop(self._MARK, None)


class _LiftConstantsPass(common_passes.LiftConstantsToInitializersPass):
    """onnx-ir's LiftConstantsToInitializersPass, skipping Constants it cannot convert.

    The library raises ValueError on a `sparse_value` Constant; such a node is kept.
    """

    def _constant_node_attribute_to_tensor(self, node, attr_name, attr_value, initializer_name):  # type: ignore[no-untyped-def]
        try:
            return super()._constant_node_attribute_to_tensor(
                node, attr_name, attr_value, initializer_name
            )
        except ValueError:
            return None


def _remove_unused_subgraph_initializers(model: ir.Model) -> int:
    """Drop subgraph initializers nothing reads (RemoveUnusedNodesPass does the main graph)."""
    count = 0
    for graph in model.graphs():
        if graph is model.graph:
            continue
        for value in list(graph.initializers.values()):
            if not (value.uses() or value.is_graph_output() or value.is_graph_input()):
                assert value.name is not None
                del graph.initializers[value.name]
                count += 1
    return count


def _raw_bytes(value: ir.Value) -> np.ndarray:
    """A tensor's elements as bytes (bitwise: NaN equals NaN, -0.0 differs from 0.0)."""
    assert value.const_value is not None
    return np.ascontiguousarray(value.const_value.numpy()).reshape(-1).view(np.uint8)


def _end_bytes(value: ir.Value) -> bytes:
    """The first and last `_FINGERPRINT_BYTES` of a tensor's elements, without computing a
    weight the fold rewrites lazily (`ScaledTensor`) whole."""
    from bn_onnx.fold.lazy import ScaledTensor

    tensor = value.const_value
    if isinstance(tensor, ScaledTensor):
        return tensor.end_bytes(_FINGERPRINT_BYTES)
    raw = _raw_bytes(value)
    return raw[:_FINGERPRINT_BYTES].tobytes() + raw[-_FINGERPRINT_BYTES:].tobytes()


def _fold_initializer_transposes(model: ir.Model) -> int:
    """Replace `Transpose(W)` of an initializer read only there by W transposed, lazily.

    torch's dynamo exporter writes a Linear on 3-D input as `MatMul(x, Transpose(W))`.
    onnxscript's folder would transpose every such weight in memory at once; here the new
    initializer is an `ir.LazyTensor` computed from the (possibly memory-mapped) source when the
    model is saved, one tensor at a time. Returns the number of Transpose nodes replaced.
    """
    count = 0
    for graph in model.graphs():
        for node in list(graph):
            if node.op_type != "Transpose" or not is_standard(node) or len(node.inputs) != 1:
                continue
            src, out = node.inputs[0], node.outputs[0]
            perm_attr = node.attributes.get("perm")
            if (
                src is None
                or src.const_value is None
                or src.const_value.dtype == ir.DataType.STRING
                or src.graph is not graph
                or not src.is_initializer()
                or src.is_graph_input()
                or src.is_graph_output()
                or out.is_graph_output()
                or len(src.uses()) != 1
                or (
                    perm_attr is not None
                    and (perm_attr.is_ref() or perm_attr.type != ir.AttributeType.INTS)
                )
            ):
                continue
            tensor = src.const_value
            dims = tuple(int(d) for d in tensor.shape.numpy())
            perm = (
                tuple(perm_attr.as_ints())
                if perm_attr is not None
                else tuple(reversed(range(len(dims))))
            )
            if sorted(perm) != list(range(len(dims))):
                continue  # an invalid perm: left for onnxruntime to reject

            def transposed(
                tensor: ir.TensorProtocol = tensor, perm: tuple[int, ...] = perm
            ) -> ir.TensorProtocol:
                return ir.tensor(np.transpose(tensor.numpy(), perm), dtype=tensor.dtype)

            shape = ir.Shape([dims[p] for p in perm])
            lazy = ir.LazyTensor(transposed, dtype=tensor.dtype, shape=shape)
            new = ir.Value(
                name=out.name, type=ir.TensorType(tensor.dtype), shape=shape, const_value=lazy
            )
            out.replace_all_uses_with(new)
            graph.remove(node, safe=True)
            assert src.name is not None
            graph.initializers.pop(src.name)
            graph.register_initializer(new)
            count += 1
    return count


def _deduplicate_large_initializers(model: ir.Model, min_elements: int) -> int:
    """Merge identical initializers of more than `min_elements` elements; return how many went.

    As onnx-ir's DeduplicateHashedInitializersPass, but without reading every tensor whole
    (it hashes all of them: seconds for a model of gigabytes): tensors are compared only
    within the same dtype and shape, first by their first and last 4 KiB, and byte for byte
    only where those agree. Graph inputs and outputs are never merged.
    """
    count = 0
    for graph in model.graphs():
        groups: dict[tuple[Any, ...], list[ir.Value]] = collections.defaultdict(list)
        for value in graph.initializers.values():
            tensor = value.const_value
            if (
                tensor is None
                or tensor.size <= min_elements
                or tensor.dtype == ir.DataType.STRING
                or value.is_graph_input()
                or value.is_graph_output()
            ):
                continue
            groups[(tensor.dtype, tuple(tensor.shape.numpy()))].append(value)
        for members in groups.values():
            if len(members) < 2:
                continue
            # Values, not arrays, are kept: an array may be a copy (float_data) or a lazy result.
            kept: dict[bytes, list[ir.Value]] = collections.defaultdict(list)
            for value in members:
                ends = _end_bytes(value)
                if not kept[ends]:  # nothing to compare with: no need to read it whole
                    kept[ends].append(value)
                    continue
                raw = _raw_bytes(value)
                same = next((k for k in kept[ends] if np.array_equal(_raw_bytes(k), raw)), None)
                del raw
                if same is None:
                    kept[ends].append(value)
                    continue
                value.replace_all_uses_with(same)
                assert value.name is not None
                graph.initializers.pop(value.name)
                count += 1
    return count


@contextlib.contextmanager
def _quiet_library_loggers() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# --------------------------------------------------------------------------------------------
# The contract: what must never change


@dataclasses.dataclass(frozen=True)
class _Interface:
    """Everything the cleanup promises to keep, captured before it runs."""

    inputs: tuple[tuple[Any, ...], ...]
    outputs: tuple[tuple[Any, ...], ...]
    metadata_props: tuple[tuple[str, str], ...]
    opsets: tuple[tuple[str, int], ...]
    functions: tuple[tuple[Any, ...], ...]
    domains: frozenset[str]

    @staticmethod
    def _values(values: Any) -> tuple[tuple[Any, ...], ...]:
        return tuple(
            (v.name, v.type, None if v.shape is None else tuple(v.shape.dims)) for v in values
        )

    @classmethod
    def capture(cls, model: ir.Model) -> _Interface:
        return cls(
            inputs=cls._values(model.graph.inputs),
            outputs=cls._values(model.graph.outputs),
            metadata_props=tuple(model.metadata_props.items()),
            opsets=tuple(sorted(model.opset_imports.items())),
            functions=tuple(
                (
                    key,
                    tuple(sorted(f.opset_imports.items())),
                    tuple(v.name for v in f.inputs),
                    tuple(v.name for v in f.outputs),
                    tuple(f.attributes),
                )
                for key, f in sorted(model.functions.items())
            ),
            domains=frozenset(n.domain for n in _all_nodes(model)),
        )

    def restore_types(self, model: ir.Model) -> None:
        """Undo refinements shape inference made to graph input and output types and shapes."""
        for values, saved in (
            (model.graph.inputs, self.inputs),
            (model.graph.outputs, self.outputs),
        ):
            for value, (name, type_, dims) in zip(values, saved, strict=False):
                if value.name == name:
                    value.type = type_
                    value.shape = None if dims is None else ir.Shape(dims)

    def differences(self, model: ir.Model) -> list[str]:
        """What changed in `model` against this capture (empty when the contract holds)."""
        now = _Interface.capture(model)
        problems = [
            f"{field.name} changed"
            for field in dataclasses.fields(self)
            if field.name not in ("domains", "functions")
            and getattr(self, field.name) != getattr(now, field.name)
        ]
        # Unused functions may be removed; no function may appear or change.
        if not set(now.functions) <= set(self.functions):
            problems.append("a function signature changed")
        if new := sorted(now.domains - self.domains):
            problems.append(f"nodes of new domains {new}")
        return problems


# --------------------------------------------------------------------------------------------
# The pass


class CleanupPass(ir.passes.InPlacePass):
    """Fold the constants an exporter left and remove dead code, keeping the model's contract.

    Rules, in order:

    0. Identical initializers above 1024 elements are merged (`_deduplicate_large_initializers`,
       which reads a tensor whole only when another one of its dtype and shape has the same
       first and last 4 KiB), and `Transpose` of an initializer read only there becomes the
       transposed initializer, computed lazily when the model is saved
       (`_fold_initializer_transposes`: the exporter's `MatMul(x, Transpose(W))` for a Linear).
    1. If `needs_constant_folder` finds work: onnxscript's `FoldConstantsPass` with ONNX shape
       inference, deciding with `should_fold`. It turns `CastLike(c, x)` into a constant of
       x's dtype, `Shape`/`Size` of static dims (and `Gather` of them) into constants, `Expand`
       and `Reshape` to the same shape, `Cast` to the same type, one-input `Concat` and
       inference-mode `Dropout` into Identity, `If` of a constant condition into its branch,
       `SplitToSequence`/`SequenceAt` into `Split`, and folds every other node whose inputs
       are all constants (Expand, ConstantOfShape, Reshape, Unsqueeze, Squeeze, Concat, Cast,
       arithmetic ...) when `should_fold` allows. Subgraphs and functions included.
    2. With the folder, onnxscript's default rewrite rules (those of `optimizer.optimize`), then
       the folder again if a rule applied. They remove what a folder cannot: a Reshape whose
       shape is computed at run time but whose output shape is known (at most one unknown dim)
       gets a constant shape, so the Shape/Gather/Concat chain before it dies; Relu/Clip and
       Min/Max chains merge; Transpose, Reshape and Unsqueeze pairs merge; Pad merges into
       Conv; an all-zero bias is dropped; no-op Cast, Expand, Transpose and Slice go. Left
       out: the BatchNormalization fusions (the BN fold owns BN and reports each one), the
       no-op arithmetic rules (`x * 1`, `x + 0` ...: they match constants within a tolerance,
       so `x * 1.000001` would become `x`) and Cast-Cast (dropping the middle cast rounds
       once instead of twice).
    3. `Identity` nodes are removed (`_SafeIdentityEliminationPass`).
    4. Dead nodes, unused initializers (in subgraphs too) and unused functions are removed.
    5. Constant nodes become initializers (in functions they stay nodes: functions have none).
    6. Identical initializers up to 1024 elements are merged (onnx-ir's
       DeduplicateInitializersPass).
    7. Common subexpressions: nodes of the main graph with the same op, inputs and attributes
       are merged (onnx-ir's CommonSubexpressionEliminationPass, as onnxscript's optimizer
       runs it), except BatchNormalization and the quantization ops, random ops and Dropout,
       ops outside the standard domain, Constant nodes and control flow
       (`_SafeCommonSubexpressionEliminationPass`). torch's dynamo exporter writes one Split or
       MaxPool per reader of the same value.

    Graph inputs and outputs (names, dtypes, shapes, order), metadata_props, opset imports and
    function signatures are checked unchanged afterwards (PostconditionError otherwise).

    Args:
        max_new_elements: largest constant (elements, all outputs of a node together) a fold may
            create beyond the constant inputs it frees.
        max_heavy_input_elements: input elements (all inputs together) above which an op
            outside CHEAP_OPS is left to the runtime.
        fold_constants: False skips the Transpose fold of rule 0 and rules 1 and 2 (and never
            imports onnxscript).
        rewrite: False skips rule 2.
        skip: names from `CLEANUP_STEPS` to leave out ("constant_folding": the Transpose fold
            of rule 0 and rule 1; "rewrite_rules": rule 2; "identity_elimination": 3;
            "remove_unused": 4; "lift_constants": 5; "deduplicate_initializers": the merges of
            rules 0 and 6; "common_subexpressions": 7).

    Raises:
        ValueError: a name in `skip` is not a step.
    """

    def __init__(
        self,
        *,
        max_new_elements: int = DEFAULT_MAX_NEW_ELEMENTS,
        max_heavy_input_elements: int = DEFAULT_MAX_HEAVY_INPUT_ELEMENTS,
        fold_constants: bool = True,
        rewrite: bool = True,
        skip: frozenset[str] | set[str] | tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        unknown = set(skip) - set(CLEANUP_STEPS)
        if unknown:
            raise ValueError(f"unknown cleanup steps {sorted(unknown)}; known: {CLEANUP_STEPS}")
        self.skip = frozenset(skip)
        if "constant_folding" in self.skip:
            fold_constants = False
        if "rewrite_rules" in self.skip:
            rewrite = False
        self.rewrite = rewrite
        self.max_new_elements = max_new_elements
        self.max_heavy_input_elements = max_heavy_input_elements
        self.fold_constants = fold_constants
        self._opset = 0
        self._contract: _Interface | None = None

    # -- decisions ---------------------------------------------------------------------------

    def should_fold(self, node: ir.Node) -> bool:
        """Whether the folder may evaluate `node`, every input of which is a constant.

        Raises nothing; any doubt is a refusal.
        """
        if not is_standard(node) or node.op_type in KEPT_OPS:
            return False
        if node.op_type in NON_DETERMINISTIC_OPS or _has_graph_attr(node):
            return False
        if any(a.is_ref() for a in node.attributes.values()):
            return False  # a function's attribute: its value is known only at the call
        if any(v is not None and v.const_value is None for v in node.inputs):
            return False
        if node.op_type == "Unsqueeze" and self._opset < 13:
            _nonnegative_unsqueeze_axes(node)
        in_sizes = [v.const_value.size for v in node.inputs if v is not None]  # type: ignore[union-attr]
        if node.op_type not in CHEAP_OPS and sum(in_sizes) > self.max_heavy_input_elements:
            return False
        # Inputs read only here die with the node: folding frees them.
        freed = sum(
            v.const_value.size  # type: ignore[union-attr]
            for v in {v for v in node.inputs if v is not None}
            if len(v.uses()) == sum(1 for u in node.inputs if u is v) and not v.is_graph_output()
        )
        if node.op_type in NON_GROWING_OPS and sum(in_sizes) - freed <= self.max_new_elements:
            return True  # no need to infer: the output is at most the inputs together
        out = _inferred_output_elements(node, self._opset)
        if out is None:
            return False
        return out - freed <= self.max_new_elements

    # -- the pass ----------------------------------------------------------------------------

    def requires(self, model: ir.Model) -> None:
        self._contract = _Interface.capture(model)

    def ensures(self, model: ir.Model) -> None:
        assert self._contract is not None
        problems = self._contract.differences(model)
        self._contract = None
        if problems:
            raise ir.passes.PostconditionError(
                "cleanup broke the model contract: " + "; ".join(problems)
            )

    def call(self, model: ir.Model) -> CleanupResult:
        if self._contract is None:  # called directly, not through __call__
            self._contract = _Interface.capture(model)
        before = collections.Counter(n.op_type for n in _all_nodes(model))
        inits_before = _count_initializers(model)
        modified = False
        used_folder = False
        rewrites = 0
        skip = self.skip
        with _quiet_library_loggers():
            # Large duplicates first, while they are still the file's (memory-mapped) tensors.
            deduplicated = 0
            if "deduplicate_initializers" not in skip:
                deduplicated = _deduplicate_large_initializers(model, _SMALL_ELEMENTS)
                modified |= deduplicated > 0
            if self.fold_constants:
                modified |= _fold_initializer_transposes(model) > 0
            if self.fold_constants and needs_constant_folder(model):
                used_folder = True
                modified |= self._run_constant_folder(model)
                if self.rewrite:
                    rewrites = _rewrite_rules().apply_to_model(model)
                    if rewrites:
                        modified = True
                        self._run_constant_folder(model)
            if "identity_elimination" not in skip:
                modified |= _SafeIdentityEliminationPass()(model).modified
            if "remove_unused" not in skip:
                modified |= common_passes.RemoveUnusedNodesPass()(model).modified
                modified |= _remove_unused_subgraph_initializers(model) > 0
                modified |= common_passes.RemoveUnusedFunctionsPass()(model).modified
            if "lift_constants" not in skip:
                lift = _LiftConstantsPass(lift_all_constants=True, size_limit=0)
                modified |= lift(model).modified
            if "deduplicate_initializers" not in skip:
                n_inits = _count_initializers(model)
                dedup = common_passes.DeduplicateInitializersPass(size_limit=_SMALL_ELEMENTS)
                modified |= dedup(model).modified
                deduplicated += n_inits - _count_initializers(model)
            if "common_subexpressions" not in skip:
                modified |= _SafeCommonSubexpressionEliminationPass()(model).modified
        self._contract.restore_types(model)
        after = collections.Counter(n.op_type for n in _all_nodes(model))
        removed = {op: before[op] - after[op] for op in sorted(before | after)}
        return CleanupResult(
            model,
            modified,
            nodes_before=before.total(),
            nodes_after=after.total(),
            initializers_before=inits_before,
            initializers_after=_count_initializers(model),
            removed_ops={op: n for op, n in removed.items() if n},
            deduplicated=deduplicated,
            rewrites=rewrites,
            used_constant_folder=used_folder,
        )

    def _run_constant_folder(self, model: ir.Model) -> bool:
        from onnxscript.optimizer import _constant_folding  # ~0.3 s: only when needed

        self._opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        folder = _constant_folding.FoldConstantsPass(
            shape_inference=True,
            input_size_limit=self.max_heavy_input_elements,
            output_size_limit=self.max_new_elements,
            should_fold=self.should_fold,
        )
        modified = folder(model).modified
        # The folder tags each folded value with where it came from, in metadata_props that
        # would be written into the file; the tag is only meant for the folder's own use.
        for node in _all_nodes(model):
            for value in node.outputs:
                if _FOLDED_FROM_KEY in value.meta:
                    value.metadata_props.pop(_FOLDED_FROM_KEY, None)
        for graph in model.graphs():
            for value in graph.initializers.values():
                if _FOLDED_FROM_KEY in value.meta:
                    value.metadata_props.pop(_FOLDED_FROM_KEY, None)
        return modified


def _rewrite_rules() -> Any:
    """onnxscript's default rewrite rules without those `CleanupPass` rule 2 leaves out, and
    with its Reshape-shape rule replaced by `_opset_safe_materialize_rule` (it writes
    `allowzero=1`, an attribute Reshape has only from opset 14)."""
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import (
        _basic_rules,
        _fuse_batchnorm,
        _materialize_reshape_shape,
        _no_op,
    )

    excluded = {
        id(rule)
        for rule in (*_fuse_batchnorm.rules.rules, *_no_op.rules.rules, _basic_rules.cast_cast_rule)
    }
    materialize = _materialize_reshape_shape.materialize_reshape_shape_rule
    rules = [
        _opset_safe_materialize_rule() if rule is materialize else rule
        for rule in rewriter._DEFAULT_REWRITE_RULES
        if id(rule) not in excluded
    ]
    return rewriter.pattern.RewriteRuleSet(rules)


def _opset_safe_materialize_rule() -> Any:
    """onnxscript's MaterializeReshapeShape (a Reshape whose computed shape has at most one
    unknown dim gets a constant shape), writing `allowzero=1` only where a dim is 0 (elsewhere
    it changes nothing) and, there, only from opset 14; before, such a Reshape is kept."""
    from onnxscript.rewriter.rules.common._materialize_reshape_shape import (
        MaterializeReshapeShape,
    )

    class _OpsetSafeMaterializeReshapeShape(MaterializeReshapeShape):
        def check(self, context, data, shape):  # type: ignore[no-untyped-def]
            result = super().check(context, data, shape)
            if not result:
                return result
            scope = context.graph_or_function
            opset = scope.opset_imports.get("", context.model.opset_imports.get("", 0))
            self._zero = 0 in self._new_dims
            if self._zero and opset < 14:
                return result.fail("a 0 dim needs allowzero=1, which Reshape has from opset 14")
            return result

        def rewrite(self, op, data, shape):  # type: ignore[no-untyped-def]
            new_shape = op.Constant(value=ir.tensor(self._new_dims, dtype=ir.DataType.INT64))
            if self._zero:
                return op.Reshape(data, new_shape, allowzero=1)
            return op.Reshape(data, new_shape)

    return _OpsetSafeMaterializeReshapeShape.rule()


def cleanup(
    model: ir.Model,
    *,
    max_new_elements: int = DEFAULT_MAX_NEW_ELEMENTS,
    max_heavy_input_elements: int = DEFAULT_MAX_HEAVY_INPUT_ELEMENTS,
    fold_constants: bool = True,
    rewrite: bool = True,
    skip: frozenset[str] | set[str] | tuple[str, ...] = (),
) -> CleanupResult:
    """Clean `model` in place after the BN fold; see `CleanupPass` for the rules.

    Args:
        model: the onnx-ir model, changed in place (also `result.model`).
        max_new_elements: largest new constant a fold may create (elements).
        max_heavy_input_elements: input size above which Conv, MatMul and other ops outside
            CHEAP_OPS are not folded.
        fold_constants: False runs only the dead-code, Identity, lifting and deduplication
            passes, never importing onnxscript.
        rewrite: False leaves out onnxscript's rewrite rules (rule 2).
        skip: steps of `CLEANUP_STEPS` to leave out (see `CleanupPass`).

    Returns:
        The counts of what changed.

    Raises:
        onnx_ir.passes.PostconditionError: the result broke the contract (a bug, not bad input).
    """
    cleanup_pass = CleanupPass(
        max_new_elements=max_new_elements,
        max_heavy_input_elements=max_heavy_input_elements,
        fold_constants=fold_constants,
        rewrite=rewrite,
        skip=skip,
    )
    result = cleanup_pass(model)
    assert isinstance(result, CleanupResult)
    return result
