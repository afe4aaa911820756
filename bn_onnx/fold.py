"""Fold inference-mode BatchNormalization nodes of an ONNX model into neighbouring linear nodes.

Only onnx and numpy: an app that folds models installs no torch. The arithmetic lives in
`bn_onnx.fold_math`; this module finds the places where it applies, proves each one safe, and
rewrites the graph. Every BN that stays is reported with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bn_onnx import fold_math as fm
from bn_onnx.errors import UnsupportedModelError, UsageError

PASSTHROUGH = ("Identity", "Dropout")
LINEAR_BEFORE = ("Gemm", "MatMul", "Add", "Conv", "ConvTranspose")
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
FLOAT_DTYPES = frozenset(helper.tensor_dtype_to_np_dtype(t) for t in FLOAT_TYPES)
_FAST_DTYPES = {
    TensorProto.FLOAT: np.dtype("<f4"),
    TensorProto.FLOAT16: np.dtype("<f2"),
    TensorProto.DOUBLE: np.dtype("<f8"),
}
_FAST_TYPES = {v: k for k, v in _FAST_DTYPES.items()}
# Ops evaluated when all their inputs are constant (parameters computed by constant subgraphs).
# fmt: off
CONST_OPS = frozenset([
    "Identity", "Cast", "CastLike", "Shape", "Size", "Expand", "ConstantOfShape", "Reshape",
    "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Concat", "Gather", "Slice", "Split",
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sqrt", "Reciprocal", "Pow", "Exp", "Log",
    "Max", "Min", "Sum", "Clip", "ReduceMean", "ReduceSum", "Where", "Equal", "Not",
])
# fmt: on
# A constant subgraph may not build a tensor bigger than this (elements): no memory bombs.
MAX_CONST_ELEMENTS = 1 << 26
# Tensors up to this size have their data size checked up front (bigger: when read).
CHECK_BYTES = 1 << 24
# Initializer values above this many elements are not kept in memory between uses.
CACHE_ELEMENTS = 1 << 16
# Constant nodes of at most this many elements keep their values in the inference skeleton.
SKELETON_KEEP_ELEMENTS = 64
_SHAPE_TYPES = frozenset({TensorProto.INT64, TensorProto.INT32})


# --------------------------------------------------------------------------------------------
# Report objects


@dataclasses.dataclass
class BnEntry:
    """What happened to one BatchNormalization node."""

    node: str
    status: str  # "folded" | "left"
    direction: str | None = None  # "preceding" | "following" | "merged"
    target: str | None = None  # the node(s) it went into, comma-separated
    target_op: str | None = None
    reason: str | None = None  # why it was left

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FoldReport:
    """The outcome of a fold: one entry per BN node, and graph sizes before and after."""

    entries: list[BnEntry]
    nodes_before: int
    nodes_after: int
    initializers_before: int
    initializers_after: int

    @property
    def n_bn(self) -> int:
        return len(self.entries)

    @property
    def n_folded(self) -> int:
        return sum(e.status == "folded" for e in self.entries)

    @property
    def left(self) -> list[BnEntry]:
        return [e for e in self.entries if e.status == "left"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_bn": self.n_bn,
            "n_folded": self.n_folded,
            "n_left": self.n_bn - self.n_folded,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "initializers_before": self.initializers_before,
            "initializers_after": self.initializers_after,
            "bn": [e.to_dict() for e in self.entries],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclasses.dataclass
class FoldResult:
    """The folded model and its report."""

    model: onnx.ModelProto
    report: FoldReport

    @property
    def n_bn(self) -> int:
        return self.report.n_bn

    @property
    def n_folded(self) -> int:
        return self.report.n_folded


@dataclasses.dataclass
class BnInfo:
    """Foldability of one BN node, as `bn-onnx inspect` shows it."""

    node: str
    foldable: bool
    direction: str | None
    target: str | None
    reason: str | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Match results: a plan to rewrite, or a refusal with its reason (data, not an exception)


@dataclasses.dataclass
class _Refusal:
    reason: str


@dataclasses.dataclass
class _Plan:
    direction: str
    targets: list[onnx.NodeProto]
    apply: Callable[[], None]


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _drop_attrs(node: onnx.NodeProto, names: tuple[str, ...]) -> None:
    keep = [a for a in node.attribute if a.name not in names]
    if len(keep) != len(node.attribute):
        node.ClearField("attribute")
        node.attribute.extend(keep)


def _set_float_attr(node: onnx.NodeProto, name: str, value: float) -> None:
    _drop_attrs(node, (name,))
    node.attribute.append(helper.make_attribute(name, value))


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0] if node.output else '?'})"


def _is_standard(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


# --------------------------------------------------------------------------------------------
# Validation and shape information without copying tensor data


def _tensor_elements(t: TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n


_ITEMSIZE: dict[int, int] = {}
_PACKED = {
    getattr(TensorProto, n)
    for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(TensorProto, n)
}
_NO_SIZE_CHECK = {TensorProto.STRING, TensorProto.UNDEFINED} | _PACKED


def _itemsize(data_type: int) -> int | None:
    size = _ITEMSIZE.get(data_type)
    if size is None:
        try:
            size = helper.tensor_dtype_to_np_dtype(data_type).itemsize
        except Exception:
            return None
        _ITEMSIZE[data_type] = size
    return size


def _data_bytes(t: TensorProto) -> int:
    """Bytes the tensor's data should take, from its dims and dtype (no copy of the data)."""
    n = 1
    for d in t.dims:
        if d < 0:
            raise UnsupportedModelError(f"tensor {t.name!r} has a negative dimension")
        n *= d
    itemsize = _itemsize(t.data_type)
    if itemsize is None:
        raise UnsupportedModelError(f"tensor {t.name!r} has unknown data type {t.data_type}")
    return n * itemsize


def _check_tensor_data(t: TensorProto) -> None:
    """Refuse a tensor whose stored data does not match its dims (the checker's size check).

    Up to CHECK_BYTES only: reading a protobuf bytes field copies it. Bigger tensors are
    checked when the fold reads them.
    """
    if t.data_location == TensorProto.EXTERNAL:
        raise UnsupportedModelError(
            f"tensor {t.name!r} keeps its data in an external file that was not loaded "
            "(load the model with bn_onnx.onnx_io.load_model)"
        )
    if t.data_type in _NO_SIZE_CHECK or not t.HasField("raw_data"):
        return
    expected = _data_bytes(t)
    if expected <= CHECK_BYTES and len(t.raw_data) != expected:
        raise UnsupportedModelError(
            f"tensor {t.name!r}: {len(t.raw_data)} bytes of data for shape {list(t.dims)} "
            f"({expected} expected)"
        )


def _varint(n: int) -> bytes:
    if n < 128:
        return _SMALL_VARINTS[n]
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


_SMALL_VARINTS = [bytes([i]) for i in range(128)]


def _len_field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _typed_inputs_blob(tensors: list[TensorProto]) -> bytes:
    """Serialized GraphProto `input` entries (field 11) typing each tensor by dtype and dims.

    Built as bytes and merged in one call: making thousands of ValueInfoProto messages field by
    field costs more than the whole shape inference. Weights share few shapes: cache those.
    """
    types: dict[tuple[int, ...], bytes] = {}
    parts = []
    for t in tensors:
        key = (t.data_type, *t.dims)
        type_field = types.get(key)
        if type_field is None:
            shape = b"".join(_len_field(b"\x0a", b"\x08" + _varint(d)) for d in t.dims)
            tensor = b"\x08" + _varint(t.data_type) + _len_field(b"\x12", shape)
            type_field = types[key] = _len_field(b"\x12", _len_field(b"\x0a", tensor))
        name = t.name.encode()
        body_len = 1 + len(_varint(len(name))) + len(name) + len(type_field)
        parts += (b"\x5a", _varint(body_len), b"\x0a", _varint(len(name)), name, type_field)
    return b"".join(parts)


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without large tensor data: big initializers become typed inputs.

    Shape inference and the checker then run on a few kilobytes instead of the weights. Each
    initializer's data size is checked against its dims on the way (as the checker would).
    """
    sk = onnx.ModelProto(ir_version=model.ir_version)
    sk.opset_import.extend(model.opset_import)
    sk.functions.extend(model.functions)
    g = model.graph
    sg = sk.graph
    sg.name = g.name or "graph"
    input_names = {i.name for i in g.input}
    sg.input.extend(g.input)
    keep, typed = [], []
    for t in g.initializer:
        _check_tensor_data(t)
        if len(t.dims) <= 1 and t.data_type in _SHAPE_TYPES:  # shapes, axes: keep for data_prop
            keep.append(t)
        elif t.name not in input_names:
            typed.append(t)
    for st in g.sparse_initializer:
        if st.values.name not in input_names:
            typed.append(
                TensorProto(name=st.values.name, data_type=st.values.data_type, dims=st.dims)
            )
    sg.initializer.extend(keep)
    sg.MergeFromString(_typed_inputs_blob(typed))
    constants = [n for n in g.node if n.op_type == "Constant"]
    if not constants:
        sg.node.extend(g.node)
    else:
        for node in g.node:
            value = None
            if node.op_type == "Constant" and _is_standard(node):
                value = next((a for a in node.attribute if a.name == "value"), None)
            if value is not None and _tensor_elements(value.t) > SKELETON_KEEP_ELEMENTS:
                t = value.t
                typed_t = TensorProto(name=node.output[0], data_type=t.data_type, dims=t.dims)
                sg.MergeFromString(_typed_inputs_blob([typed_t]))
                continue
            sg.node.append(node)
    sg.output.extend(g.output)
    sg.value_info.extend(g.value_info)
    return sk


def _first_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    text = text or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def validate_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Check `model` (checker + strict shape inference, without tensor data).

    Returns the inferred skeleton (for shapes and ranks); raises UnsupportedModelError with one
    line when the model is not valid ONNX.
    """
    if not model.HasField("graph") or not model.opset_import:
        raise UnsupportedModelError("not an ONNX model (no graph or opset)")
    sk = _skeleton(model)
    try:
        onnx.checker.check_model(sk)
        inferred = onnx.shape_inference.infer_shapes(
            sk, check_type=True, strict_mode=True, data_prop=True
        )
    except Exception as exc:  # ValidationError, InferenceError, and odd protobuf errors
        raise UnsupportedModelError(f"invalid ONNX model: {_first_line(exc)}") from None
    return inferred


class _Types:
    """Shapes and element types from shape inference, decoded only for the names asked about."""

    def __init__(self, inferred: onnx.ModelProto) -> None:
        g = inferred.graph
        self._infos = {vi.name: vi for vi in (*g.value_info, *g.output, *g.input)}
        self._inits = {t.name: t for t in g.initializer}

    def shape(self, name: str) -> list[int | None] | None:
        """Dims (None where symbolic or unknown), or None when even the rank is unknown."""
        if name in self._inits:
            return list(self._inits[name].dims)
        vi = self._infos.get(name)
        if vi is None or not vi.type.HasField("tensor_type"):
            return None
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]

    def elem_type(self, name: str) -> int | None:
        if name in self._inits:
            return self._inits[name].data_type
        vi = self._infos.get(name)
        if vi is None or not vi.type.HasField("tensor_type"):
            return None
        return vi.type.tensor_type.elem_type or None


def _subgraph_names(node: onnx.NodeProto) -> set[str]:
    """Every value name read or written inside the node's subgraphs (If/Loop/Scan bodies)."""
    names: set[str] = set()
    stack: list[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            stack.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            stack.extend(a.graphs)
    while stack:
        g = stack.pop()
        for n in g.node:
            names.update(n.input)
            names.update(n.output)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    stack.append(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(a.graphs)
        names.update(i.name for i in g.input)
        names.update(t.name for t in g.initializer)
    names.discard("")
    return names


# --------------------------------------------------------------------------------------------
# The graph with producer/consumer maps, kept up to date through every rewrite


class _Graph:
    def __init__(self, model: onnx.ModelProto, inferred: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.nodes: list[onnx.NodeProto] = list(self.graph.node)
        self.order: list[tuple[int, int]] = [(i, 0) for i in range(len(self.nodes))]
        self.alive: list[bool] = [True] * len(self.nodes)
        self.structure_changed = False
        self.graph_outputs = {o.name for o in self.graph.output}
        self.inits: dict[str, TensorProto] = {t.name: t for t in self.graph.initializer}
        self.dead_inits: set[str] = set()
        self.new_inits: list[str] = []
        # Before IR 4 every initializer had to be listed as an input too and stayed a constant;
        # from IR 4 on, an initializer listed as an input is a default the caller may override.
        self.legacy_inputs = model.ir_version < 4
        all_inputs = {i.name for i in self.graph.input}
        self.graph_inputs = all_inputs - set(self.inits) if self.legacy_inputs else all_inputs
        self.types = _Types(inferred)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        self.names: set[str] = all_inputs | set(self.inits) | self.graph_outputs
        for i, node in enumerate(self.nodes):
            self._link(i)
            self.names.update(node.output)
        self.names.update(vi.name for vi in self.graph.value_info)
        self.cache: dict[str, np.ndarray | None] = {}
        self.const_nodes: set[int] = set()  # nodes evaluated as constants
        self.overrides: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # merged BN: exact (a, c)
        self.candidates: set[str] = set()  # names that may have become unused

    # --- maps
    def _link(self, i: int) -> None:
        node = self.nodes[i]
        for name in node.input:
            if name:
                self.consumers.setdefault(name, []).append(i)
        sub = (
            _subgraph_names(node)
            if any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for a in node.attribute
            )
            else set()
        )
        for name in sub:
            self.consumers.setdefault(name, []).append(i)
            self.names.add(name)
        for name in node.output:
            if name:
                self.producer[name] = i

    def uses(self, name: str) -> int:
        return len(self.consumers.get(name, ())) + (name in self.graph_outputs)

    def fresh(self, base: str) -> str:
        base = base or "bnfold"
        name, k = base, 0
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def rank(self, name: str) -> int | None:
        shape = self.types.shape(name)
        return None if shape is None else len(shape)

    def set_input(self, i: int, pos: int, new: str) -> None:
        node = self.nodes[i]
        while len(node.input) <= pos:
            node.input.append("")
        old = node.input[pos]
        if old:
            self.consumers[old].remove(i)
            self.candidates.add(old)
        node.input[pos] = new
        if new:
            self.consumers.setdefault(new, []).append(i)

    def replace_uses(self, old: str, new: str) -> None:
        for i in list(self.consumers.get(old, ())):
            node = self.nodes[i]
            for pos, name in enumerate(node.input):
                if name == old:
                    self.set_input(i, pos, new)

    def set_output(self, i: int, pos: int, new: str) -> None:
        node = self.nodes[i]
        old = node.output[pos]
        if self.producer.get(old) == i:
            del self.producer[old]
        node.output[pos] = new
        self.producer[new] = i

    def remove_node(self, i: int) -> None:
        node = self.nodes[i]
        self.alive[i] = False
        self.structure_changed = True
        for name in set(node.input):
            if name and name in self.consumers:
                self.consumers[name] = [j for j in self.consumers[name] if j != i]
                self.candidates.add(name)
        for name in node.output:
            if self.producer.get(name) == i:
                del self.producer[name]

    def insert_after(self, i: int, node: onnx.NodeProto) -> int:
        j = len(self.nodes)
        self.nodes.append(node)
        base = self.order[i]
        self.order.append((base[0], base[1] + 1 + sum(o[0] == base[0] for o in self.order)))
        self.alive.append(True)
        self.structure_changed = True
        self._link(j)
        self.names.update(node.output)
        return j

    # --- constants
    def is_graph_input(self, name: str) -> bool:
        return name in self.graph_inputs

    def const(self, name: str) -> np.ndarray | None:
        """The value of `name` if it is a constant (initializer, Constant, constant subgraph)."""
        if not name:
            return None
        if name in self.cache:
            return self.cache[name]
        t = self.inits.get(name)
        if t is not None and name not in self.graph_inputs:  # the common case, directly
            value = self._to_array(t)
            if value.size <= CACHE_ELEMENTS:
                self.cache[name] = value
            return value
        stack = [name]
        visiting: set[str] = set()
        while stack:
            n = stack[-1]
            if n in self.cache:
                stack.pop()
                continue
            deps = self._const_deps(n)
            if deps is None:
                self.cache[n] = self._const_leaf(n)
                stack.pop()
                continue
            missing = [d for d in deps if d not in self.cache]
            if missing:
                if n in visiting:  # a cycle: the checker refuses these, but never loop
                    self.cache[n] = None
                    stack.pop()
                    continue
                visiting.add(n)
                stack.extend(missing)
                continue
            self._const_eval(self.producer[n])
            self.cache.setdefault(n, None)
            stack.pop()
        value = self.cache[name]
        if value is not None and value.size > CACHE_ELEMENTS and name in self.inits:
            del self.cache[name]  # weights are read again if needed: at most one copy held
        return value

    def _const_deps(self, name: str) -> list[str] | None:
        """Inputs to evaluate first, or None when `name` is resolved without them."""
        if name in self.graph_inputs or name in self.inits or name not in self.producer:
            return None
        node = self.nodes[self.producer[name]]
        if not _is_standard(node) or node.op_type not in CONST_OPS or node.op_type == "Shape":
            return None
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            return None
        if node.op_type == "CastLike":  # the second input only gives the type
            return [node.input[0]] if self.types.elem_type(node.input[1]) else None
        return [i for i in node.input if i]

    def _const_leaf(self, name: str) -> np.ndarray | None:
        if name in self.graph_inputs:  # an initializer listed as an input can be overridden
            return None
        if name in self.inits:
            return self._to_array(self.inits[name])
        if name not in self.producer:
            return None
        i = self.producer[name]
        node = self.nodes[i]
        if not _is_standard(node):
            return None
        if node.op_type == "Constant":
            value = _constant_value(node)
            if value is not None:
                self.const_nodes.add(i)
            return value
        if node.op_type == "Shape":
            shape = self.types.shape(node.input[0])
            if shape is None:
                return None
            dims = shape[_attr(node, "start", 0) : _attr(node, "end", None)]
            if any(d is None for d in dims):
                return None
            self.const_nodes.add(i)
            return np.array(dims, dtype=np.int64)
        return None

    def _to_array(self, t: TensorProto) -> np.ndarray:
        fast = _FAST_DTYPES.get(t.data_type)
        try:
            if fast is not None and t.HasField("raw_data"):  # the common case, no overhead
                return np.frombuffer(t.raw_data, dtype=fast).reshape(tuple(t.dims))
            return numpy_helper.to_array(t)
        except Exception as exc:
            raise UnsupportedModelError(
                f"cannot read tensor {t.name!r}: {_first_line(exc)}"
            ) from None

    def _const_eval(self, i: int) -> None:
        node = self.nodes[i]
        inputs = node.input[:1] if node.op_type == "CastLike" else node.input
        values = [self.cache.get(n) if n else None for n in inputs]
        if any(v is None for n, v in zip(inputs, values, strict=True) if n):
            return
        if node.op_type in ("ConstantOfShape", "Expand") and values:
            target = values[0] if node.op_type == "ConstantOfShape" else values[1]
            if target is None or target.size > 16:
                return
            if math.prod(abs(int(d)) for d in target.reshape(-1)) > MAX_CONST_ELEMENTS:
                return  # no memory bombs from a hostile shape
        if sum(v.size for v in values if v is not None) > MAX_CONST_ELEMENTS:
            return
        if node.op_type == "Identity":
            out = [values[0]]
        elif node.op_type == "CastLike":
            to = self.types.elem_type(node.input[1])
            if to not in FLOAT_TYPES:
                return
            out = [values[0].astype(helper.tensor_dtype_to_np_dtype(to))]
        else:
            try:
                from onnx.reference import ReferenceEvaluator

                feeds = {n: v for n, v in zip(node.input, values, strict=True) if n}
                ev = ReferenceEvaluator(node, opsets={"": self.opset})
                out = ev.run(None, feeds)
            except Exception:  # not evaluable: treat as not constant
                return
        for name, value in zip(node.output, out, strict=False):
            if name:
                arr = np.asarray(value)
                if arr.size > MAX_CONST_ELEMENTS:
                    return
                self.cache[name] = arr
        self.const_nodes.add(i)

    def write_input(self, i: int, pos: int, value: np.ndarray, base: str) -> None:
        """Give node i's input `pos` the constant `value`: in place if only node i reads it."""
        node = self.nodes[i]
        old = node.input[pos] if pos < len(node.input) else ""
        if (
            old
            and old in self.inits
            and old not in self.graph_inputs
            and not self.legacy_inputs
            and old not in self.graph_outputs
            and self.consumers.get(old, []).count(i) == 1
            and len(self.consumers[old]) == 1
        ):
            t = self.inits[old]
            if (
                t.HasField("raw_data")
                and _FAST_TYPES.get(value.dtype) == t.data_type
                and tuple(t.dims) == value.shape
            ):  # same dtype and shape: replace only the bytes
                t.raw_data = np.ascontiguousarray(value, value.dtype.newbyteorder("<")).tobytes()
            else:
                t.CopyFrom(_make_tensor(value, old))
            self._remember(old, value)
            return
        name = self.add_initializer(value, f"{old or (node.name or node.op_type) + '_bias'}_bnfold")
        self.set_input(i, pos, name)

    def _remember(self, name: str, value: np.ndarray) -> None:
        if value.size <= CACHE_ELEMENTS:
            self.cache[name] = value
        else:
            self.cache.pop(name, None)

    def add_initializer(self, value: np.ndarray, base: str) -> str:
        """A new initializer holding `value`, under a fresh name made from `base`."""
        name = self.fresh(base)
        self.graph.initializer.append(_make_tensor(value, name))
        self.inits[name] = self.graph.initializer[-1]
        self._remember(name, value)
        self.new_inits.append(name)
        return name

    # --- finishing
    def sweep(self) -> None:
        """Remove initializers and constant nodes that the rewrites left without readers."""
        todo = list(self.candidates)
        while todo:
            name = todo.pop()
            if not name or self.uses(name) or name in self.graph_inputs:
                continue
            if name in self.inits and name not in self.dead_inits:
                self.dead_inits.add(name)
                continue
            i = self.producer.get(name)
            if i is None or not self.alive[i] or i not in self.const_nodes:
                continue
            node = self.nodes[i]
            if any(self.uses(o) for o in node.output if o):
                continue
            self.remove_node(i)
            todo.extend(n for n in node.input if n)

    def finish(self) -> None:
        g = self.graph
        if self.structure_changed:
            keep = sorted(
                (k for k in range(len(self.nodes)) if self.alive[k]), key=lambda k: self.order[k]
            )
            nodes = [self.nodes[k] for k in keep]
            g.ClearField("node")
            g.node.extend(nodes)
        if self.dead_inits:
            for idx in range(len(g.initializer) - 1, -1, -1):
                if g.initializer[idx].name in self.dead_inits:
                    del g.initializer[idx]
        if self.legacy_inputs:  # IR < 4: initializers are listed as inputs, new ones too
            for idx in range(len(g.input) - 1, -1, -1):
                if g.input[idx].name in self.dead_inits:
                    del g.input[idx]
            added = [self.inits[n] for n in self.new_inits if n not in self.dead_inits]
            g.MergeFromString(_typed_inputs_blob(added))
        live = self.graph_inputs | self.graph_outputs | set(self.producer) | set(self.inits)
        vis = [vi for vi in g.value_info if vi.name in live]
        if len(vis) != len(g.value_info):
            g.ClearField("value_info")
            g.value_info.extend(vis)


def _make_tensor(value: np.ndarray, name: str) -> TensorProto:
    """numpy_helper.from_array without its overhead for the common float dtypes."""
    data_type = _FAST_TYPES.get(value.dtype)
    if data_type is None:
        return numpy_helper.from_array(value, name)
    t = TensorProto()
    t.name = name
    t.data_type = data_type
    t.dims.extend(value.shape)
    t.raw_data = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()
    return t


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            _check_tensor_data(a.t)
            try:
                return numpy_helper.to_array(a.t)
            except Exception:
                return None
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


# --------------------------------------------------------------------------------------------
# The pass


class FoldBatchNormPass:
    """Fold every inference-mode BatchNormalization that provably can be folded.

    With (a, c) the BN's per-channel affine map (a = scale/sqrt(var+eps), c = B - a*mean,
    computed in float64 and rounded once to the model's dtype), the pass rewrites:

    1. Gemm -> BN: scale the weight's output columns (any transA/transB), fold alpha into the
       weight and beta into the bias; C is created when missing and expanded when broadcast.
    2. MatMul -> BN and MatMul -> Add -> BN (bias as either Add input): scale the weight's
       columns, bias a*b + c (an Add is inserted when there was none). Rank-2 only.
    3. Conv -> BN, with or without bias, any group (grouped, depthwise).
    4. ConvTranspose -> BN, with or without bias, group-aware ((C_in, C_out/group, k...)).
    5. BN -> Gemm: when every reader of the BN output is a Gemm reading it as A (transA=0),
       scale the weight's input rows and add c @ W to the bias (alpha, beta, transB honoured).
    6. BN -> MatMul(+Add): as 5 for rank-2 MatMul; the bias goes into the following Add or a
       new one. Readers of 5 and 6 may be mixed; each gets its own copy of a shared weight.
    7. BN -> BN: two BNs in a row become one (then 1-6 may apply to it).
    8. Identity and inference-mode Dropout between the linear node and the BN are looked
       through (before the BN) and kept (after it).
    9. Parameters and weights may be initializers, Constant nodes or constant subgraphs
       (Identity, Cast, CastLike, Shape of a static shape, Expand, ConstantOfShape, ...).
    10. A weight or bias read by any other node is cloned, never changed under that node.
    11. float32, float16, bfloat16 and float64 models keep their dtype; IR < 4 models (whose
        initializers are all listed as inputs, and constant) keep that convention.

    A BN is left, with the reason, when its parameters are not constant (graph inputs
    included), training_mode=1 or it has extra outputs, the linear node's output is also a
    graph output or read by another node, the channel axis is not the linear node's output
    axis (MatMul of rank > 2, Gemm with transA=1 after the BN), shapes disagree, the variance
    is degenerate (var + eps <= 0 or not finite), or a folded value would not be finite,
    would overflow the dtype, or would underflow to zero where the original was not.
    """

    def __init__(self, *, check_output: bool = False) -> None:
        self.check_output = check_output

    def requires(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Precondition: a valid ONNX model. Returns its inferred (data-free) skeleton."""
        return validate_model(model)

    def ensures(self, model: onnx.ModelProto) -> None:
        """Postcondition: the result is valid ONNX (checked when check_output=True)."""
        try:
            validate_model(model)
        except UnsupportedModelError as exc:  # a bug in this pass, not a user error
            raise RuntimeError(f"fold produced an invalid model: {exc}") from None

    def __call__(self, model: onnx.ModelProto, *, copy: bool = True) -> FoldResult:
        """Fold `model` (a copy of it, unless copy=False) and return the result and report."""
        inferred = self.requires(model)
        if copy:
            out = onnx.ModelProto()
            out.CopyFrom(model)
        else:
            out = model
        nodes_before = len(out.graph.node)
        inits_before = len(out.graph.initializer)
        g = _Graph(out, inferred)
        entries = self._run(g)
        g.sweep()
        g.finish()
        if self.check_output:
            self.ensures(out)
        report = FoldReport(
            entries=entries,
            nodes_before=nodes_before,
            nodes_after=len(out.graph.node),
            initializers_before=inits_before,
            initializers_after=len(out.graph.initializer),
        )
        return FoldResult(model=out, report=report)

    # --- driver
    def _run(self, g: _Graph) -> list[BnEntry]:
        bns = [
            i
            for i, n in enumerate(g.nodes)
            if n.op_type == "BatchNormalization" and _is_standard(n)
        ]
        entries = {i: BnEntry(node=_label(g.nodes[i]), status="left") for i in bns}
        changed = True
        while changed:
            changed = False
            for i in bns:
                if not g.alive[i]:
                    continue
                outcome = self._try(g, i)
                entry = entries[i]
                if isinstance(outcome, _Refusal):
                    entry.reason = outcome.reason
                    continue
                entry.target = ", ".join(_label(t) for t in outcome.targets)
                entry.target_op = ", ".join(sorted({t.op_type for t in outcome.targets}))
                outcome.apply()
                changed = True
                entry.status = "folded"
                entry.reason = None
                entry.direction = outcome.direction
        return [entries[i] for i in bns]

    def _try(self, g: _Graph, i: int) -> _Plan | _Refusal:
        params = self._params(g, i)
        if isinstance(params, _Refusal):
            return params
        a, c = params
        before = self._preceding(g, i, a, c)
        if isinstance(before, _Plan):
            return before
        after = self._following(g, i, a, c)
        if isinstance(after, _Plan):
            return after
        merged = self._merge_next(g, i, a, c)
        if isinstance(merged, _Plan):
            return merged
        reason = f"before: {before.reason}; after: {after.reason}"
        if merged.reason:
            reason += f"; {merged.reason}"
        return _Refusal(reason)

    # --- the BN itself
    def _params(self, g: _Graph, i: int) -> tuple[np.ndarray, np.ndarray] | _Refusal:
        bn = g.nodes[i]
        if _attr(bn, "training_mode", 0):
            return _Refusal("training_mode=1")
        if g.opset < 7 and not _attr(bn, "is_test", 0):
            return _Refusal("is_test=0 (training mode)")
        if any(o for o in bn.output[1:]):
            return _Refusal("has running mean/var outputs (training mode)")
        if len(bn.input) < 5 or not bn.input[0]:
            return _Refusal("has fewer than 5 inputs")
        if i in g.overrides:
            return g.overrides[i]
        values = []
        for name in bn.input[1:5]:
            if g.is_graph_input(name):
                return _Refusal(f"parameter {name!r} is a graph input, not a constant")
            v = g.const(name)
            if v is None:
                return _Refusal(f"parameter {name!r} is not a constant")
            if v.dtype not in FLOAT_DTYPES:
                return _Refusal(f"parameter {name!r} is not floating point")
            values.append(v)
        sizes = {v.size for v in values}
        if len(sizes) != 1 or any(v.ndim != 1 for v in values):
            return _Refusal("parameters are not 1-D vectors of one length (spatial=0?)")
        eps = float(_attr(bn, "epsilon", 1e-5))
        try:
            return fm.bn_affine(*values, eps)
        except ValueError as exc:
            return _Refusal(str(exc))

    # --- rules 1-4, 8: into the node before
    def _preceding(self, g: _Graph, i: int, a: np.ndarray, c: np.ndarray) -> _Plan | _Refusal:
        name = g.nodes[i].input[0]
        chain: list[int] = []
        while True:
            if name in g.graph_outputs:
                return _Refusal(f"{name!r} is also a graph output")
            if g.uses(name) != 1:
                return _Refusal(f"{name!r} is also read by another node")
            p = g.producer.get(name)
            if p is None:
                return _Refusal(f"input {name!r} is not computed by a node")
            pn = g.nodes[p]
            if pn.output[0] == name and _is_passthrough(g, pn):
                chain.append(p)
                name = pn.input[0]
                continue
            break
        if not _is_standard(pn) or pn.op_type not in LINEAR_BEFORE:
            return _Refusal(f"comes after {pn.op_type} {_label(pn)!r}, not Gemm/MatMul/Conv")
        last = chain[0] if chain else p  # the node whose output the BN reads

        def remove_bn() -> None:
            bn = g.nodes[i]
            x, y = bn.input[0], bn.output[0]
            g.remove_node(i)
            g.set_output(last, 0, y)
            g.candidates.add(x)

        if pn.op_type == "Gemm":
            return self._into_gemm_before(g, i, p, a, c, remove_bn)
        if pn.op_type == "MatMul":
            return self._into_matmul_before(g, i, p, None, a, c, remove_bn)
        if pn.op_type == "Add":
            for pos in (0, 1):
                m = g.producer.get(pn.input[pos])
                if m is not None and g.nodes[m].op_type == "MatMul" and _is_standard(g.nodes[m]):
                    mm_out = pn.input[pos]
                    if mm_out in g.graph_outputs or g.uses(mm_out) != 1:
                        return _Refusal(f"MatMul output {mm_out!r} is read by another node")
                    return self._into_matmul_before(g, i, m, (p, 1 - pos), a, c, remove_bn)
            return _Refusal(f"comes after Add {_label(pn)!r} that does not add to a MatMul")
        return self._into_conv_before(g, i, p, a, c, remove_bn)

    def _weight(self, g: _Graph, name: str, ndim: int | None = 2) -> np.ndarray | _Refusal:
        if g.is_graph_input(name):
            return _Refusal(f"weight {name!r} is a graph input, not a constant")
        w = g.const(name)
        if w is None:
            return _Refusal(f"weight {name!r} is not a constant")
        if ndim is not None and w.ndim != ndim:
            return _Refusal(f"weight {name!r} has rank {w.ndim}, not {ndim}")
        if w.dtype not in FLOAT_DTYPES:
            return _Refusal(f"weight {name!r} has dtype {w.dtype}")
        return w

    def _bias(self, g: _Graph, name: str, n: int) -> np.ndarray | None | _Refusal:
        if not name:
            return None
        if g.is_graph_input(name):
            return _Refusal(f"bias {name!r} is a graph input, not a constant")
        b = g.const(name)
        if b is None:
            return _Refusal(f"bias {name!r} is not a constant")
        if b.ndim > 2 or (b.ndim >= 1 and b.shape[-1] not in (1, n)):
            return _Refusal(f"bias {name!r} of shape {list(b.shape)} does not broadcast to {n}")
        return b

    def _into_gemm_before(self, g, i, p, a, c, remove_bn) -> _Plan | _Refusal:
        gemm = g.nodes[p]
        w = self._weight(g, gemm.input[1])
        if isinstance(w, _Refusal):
            return w
        trans_b = bool(_attr(gemm, "transB", 0))
        n = w.shape[0] if trans_b else w.shape[1]
        if n != a.size:
            return _Refusal(f"BN has {a.size} channels, Gemm {_label(gemm)!r} has {n} outputs")
        c_name = gemm.input[2] if len(gemm.input) > 2 else ""
        b = self._bias(g, c_name, n)
        if isinstance(b, _Refusal):
            return b
        alpha, beta = float(_attr(gemm, "alpha", 1.0)), float(_attr(gemm, "beta", 1.0))
        factor = fm.preceding_factor(a, 2, out_axis=0 if trans_b else 1, weight_scale=alpha)
        try:
            w_r = fm.scale_rounded(w, factor)
            b_r = fm.round_to(fm.preceding_bias(b, a, c, bias_scale=beta), w.dtype)
        except ValueError as exc:
            return _Refusal(str(exc))

        def apply() -> None:
            g.write_input(p, 1, w_r, gemm.input[1])
            g.write_input(p, 2, b_r, c_name)
            _drop_attrs(gemm, ("alpha", "beta"))
            remove_bn()

        return _Plan("preceding", [gemm], apply)

    def _into_matmul_before(self, g, i, m, add, a, c, remove_bn) -> _Plan | _Refusal:
        mm = g.nodes[m]
        w = self._weight(g, mm.input[1])
        if isinstance(w, _Refusal):
            return w
        x = g.nodes[i].input[0]
        rank = g.rank(x)
        if rank is None:
            return _Refusal(f"rank of {x!r} is unknown")
        if rank != 2:
            return _Refusal(
                f"MatMul output has rank {rank}: BN normalizes axis 1, MatMul's outputs are the "
                "last axis"
            )
        n = w.shape[1]
        if n != a.size:
            return _Refusal(f"BN has {a.size} channels, MatMul {_label(mm)!r} has {n} outputs")
        b = None
        if add is not None:
            add_idx, bias_pos = add
            b = self._bias(g, g.nodes[add_idx].input[bias_pos], n)
            if isinstance(b, _Refusal):
                return b
        try:
            w_r = fm.scale_rounded(w, fm.preceding_factor(a, 2, out_axis=1))
            b_r = fm.round_to(fm.preceding_bias(b, a, c), (b if b is not None else w).dtype)
        except ValueError as exc:
            return _Refusal(str(exc))

        def apply() -> None:
            g.write_input(m, 1, w_r, mm.input[1])
            remove_bn()
            if add is not None:
                g.write_input(add[0], add[1], b_r, g.nodes[add[0]].input[add[1]])
            else:
                _insert_bias_add(g, m, b_r)

        targets = [mm] if add is None else [mm, g.nodes[add[0]]]
        return _Plan("preceding", targets, apply)

    def _into_conv_before(self, g, i, p, a, c, remove_bn) -> _Plan | _Refusal:
        conv = g.nodes[p]
        transpose = conv.op_type == "ConvTranspose"
        w = self._weight(g, conv.input[1], ndim=None)
        if isinstance(w, _Refusal):
            return w
        group = int(_attr(conv, "group", 1))
        if w.ndim < 3 or group < 1 or w.shape[0] % group:
            return _Refusal(f"{conv.op_type} weight shape {list(w.shape)} does not fit group")
        n = w.shape[1] * group if transpose else w.shape[0]
        if n != a.size:
            return _Refusal(f"BN has {a.size} channels, {conv.op_type} has {n} outputs")
        b_name = conv.input[2] if len(conv.input) > 2 else ""
        b = None
        if b_name:
            b = g.const(b_name) if not g.is_graph_input(b_name) else None
            if b is None or b.shape != (n,):
                return _Refusal(f"bias {b_name!r} is not a constant vector of {n}")
        try:
            w_r = fm.scale_rounded(w, fm.conv_factor(a, w.shape, group, transpose))
            b_r = fm.round_to(fm.preceding_bias(b, a, c), w.dtype)
        except ValueError as exc:
            return _Refusal(str(exc))

        def apply() -> None:
            g.write_input(p, 1, w_r, conv.input[1])
            g.write_input(p, 2, b_r, b_name)
            remove_bn()

        return _Plan("preceding", [conv], apply)

    # --- rules 5, 6, 8: into the nodes after
    def _following(self, g: _Graph, i: int, a: np.ndarray, c: np.ndarray) -> _Plan | _Refusal:
        bn = g.nodes[i]
        x, y = bn.input[0], bn.output[0]
        if y in g.graph_outputs:
            return _Refusal(f"its output {y!r} is a graph output")
        frontier = [y]
        readers: list[tuple[int, str]] = []  # (linear node, the name it reads)
        while frontier:
            name = frontier.pop()
            if name in g.graph_outputs:
                return _Refusal(f"{name!r} is a graph output")
            cons = g.consumers.get(name, [])
            if not cons:
                return _Refusal(f"{name!r} is not read by any node")
            for j in set(cons):
                node = g.nodes[j]
                if _is_passthrough(g, node) and node.input[0] == name and cons.count(j) == 1:
                    frontier.append(node.output[0])
                elif _is_standard(node) and node.op_type in ("Gemm", "MatMul"):
                    readers.append((j, name))
                else:
                    return _Refusal(f"{name!r} is read by {node.op_type} {_label(node)!r}")
        applies: list[Callable[[], None]] = []
        for j, name in readers:
            plan = self._into_linear_after(g, j, name, a, c)
            if isinstance(plan, _Refusal):
                return plan
            applies.append(plan)

        def apply() -> None:
            for fn in applies:
                fn()
            g.remove_node(i)
            g.replace_uses(y, x)

        return _Plan("following", [g.nodes[j] for j, _ in readers], apply)

    def _into_linear_after(self, g, j, name, a, c) -> Callable[[], None] | _Refusal:
        node = g.nodes[j]
        if node.input[0] != name or list(node.input).count(name) != 1:
            return _Refusal(f"{_label(node)!r} reads {name!r} as its weight or bias")
        if node.op_type == "Gemm":
            if _attr(node, "transA", 0):
                return _Refusal(f"Gemm {_label(node)!r} has transA=1 (BN channel is its batch)")
            w = self._weight(g, node.input[1])
            if isinstance(w, _Refusal):
                return w
            trans_b = bool(_attr(node, "transB", 0))
            k, n = (w.shape[1], w.shape[0]) if trans_b else w.shape
            if k != a.size:
                return _Refusal(f"BN has {a.size} channels, Gemm {_label(node)!r} has {k} inputs")
            c_name = node.input[2] if len(node.input) > 2 else ""
            b = self._bias(g, c_name, n)
            if isinstance(b, _Refusal):
                return b
            alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
            try:
                w_r = fm.scale_rounded(w, fm.following_factor(a, trans_b, weight_scale=alpha))
                new_b = fm.following_bias(w, b, c, trans_b, weight_scale=alpha, bias_scale=beta)
                b_r = fm.round_to(new_b, w.dtype)
            except ValueError as exc:
                return _Refusal(str(exc))

            def apply_gemm() -> None:
                g.write_input(j, 1, w_r, node.input[1])
                g.write_input(j, 2, b_r, c_name)
                _drop_attrs(node, ("alpha", "beta"))

            return apply_gemm
        # MatMul
        w = self._weight(g, node.input[1])
        if isinstance(w, _Refusal):
            return w
        rank = g.rank(name)
        if rank != 2:
            return _Refusal(
                f"MatMul {_label(node)!r} input has rank {rank if rank is not None else '?'}"
                ", not 2: BN's channel axis is not the contracted axis"
            )
        if w.shape[0] != a.size:
            return _Refusal(f"BN has {a.size} channels, MatMul {_label(node)!r} has {w.shape[0]}")
        out = node.output[0]
        add = None
        if out not in g.graph_outputs and g.uses(out) == 1:
            k = g.consumers[out][0]
            add_node = g.nodes[k]
            if add_node.op_type == "Add" and _is_standard(add_node):
                pos = 1 if add_node.input[0] == out else 0
                if add_node.input[1 - pos] == out and add_node.input[pos] != out:
                    b = self._bias(g, add_node.input[pos], w.shape[1])
                    if not isinstance(b, _Refusal) and b is not None:
                        add = (k, pos, b)
        b = add[2] if add else None
        try:
            w_r = fm.scale_rounded(w, fm.following_factor(a, transposed=False))
            new_b = fm.following_bias(w, b, c)
            b_r = fm.round_to(new_b, (b if b is not None else w).dtype)
        except ValueError as exc:
            return _Refusal(str(exc))

        def apply_matmul() -> None:
            g.write_input(j, 1, w_r, node.input[1])
            if add is not None:
                g.write_input(add[0], add[1], b_r, g.nodes[add[0]].input[add[1]])
            else:
                _insert_bias_add(g, j, b_r)

        return apply_matmul

    # --- rule 7: two BNs in a row
    def _merge_next(self, g: _Graph, i: int, a: np.ndarray, c: np.ndarray) -> _Plan | _Refusal:
        bn = g.nodes[i]
        y = bn.output[0]
        cons = g.consumers.get(y, [])
        if y in g.graph_outputs or len(cons) != 1:
            return _Refusal("")
        j = cons[0]
        nxt = g.nodes[j]
        if nxt.op_type != "BatchNormalization" or not _is_standard(nxt) or nxt.input[0] != y:
            return _Refusal("")
        second = self._params(g, j)
        if isinstance(second, _Refusal):
            return _Refusal(f"next BN {_label(nxt)!r}: {second.reason}")
        a2, c2 = fm.compose_affine(a, c, *second)
        params = [g.const(n) for n in nxt.input[1:5]]
        try:
            scale = fm.round_to(a2, params[0].dtype)
            bias = fm.round_to(c2, params[1].dtype)
        except ValueError as exc:
            return _Refusal(f"merging with {_label(nxt)!r}: {exc}")
        mean = np.zeros(a2.shape, params[2].dtype)
        var = np.ones(a2.shape, params[3].dtype)

        def apply() -> None:
            for pos, value in zip((1, 2, 3, 4), (scale, bias, mean, var), strict=True):
                g.write_input(j, pos, value, nxt.input[pos])
            _set_float_attr(nxt, "epsilon", 0.0)
            g.overrides[j] = (a2, c2)
            g.remove_node(i)
            g.replace_uses(y, bn.input[0])

        return _Plan("merged", [nxt], apply)


def _is_passthrough(g: _Graph, node: onnx.NodeProto) -> bool:
    if not _is_standard(node) or node.op_type not in PASSTHROUGH or not node.input:
        return False
    if node.op_type == "Identity":
        return True
    if g.opset < 7 and not _attr(node, "is_test", 0):
        return False
    if len(node.input) > 2 and node.input[2]:
        mode = g.const(node.input[2])
        return mode is not None and mode.size == 1 and not bool(mode.reshape(-1)[0])
    return True


def _insert_bias_add(g: _Graph, m: int, bias: np.ndarray) -> None:
    """Add `bias` to node m's output with a new Add node; readers keep the original name."""
    node = g.nodes[m]
    out = node.output[0]
    mid = g.fresh(f"{out}_nobias")
    g.set_output(m, 0, mid)
    b_name = g.add_initializer(bias, f"{node.name or out}_bias_bnfold")
    add = helper.make_node("Add", [mid, b_name], [out], name=g.fresh(f"{node.name or out}_bias"))
    g.insert_after(m, add)


# --------------------------------------------------------------------------------------------
# Public API


def _model_data_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data in the main graph (initializers and Constant nodes), from dims."""
    tensors = list(model.graph.initializer)
    tensors += [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.t.dims
    ]
    total = 0
    for t in tensors:
        size = _itemsize(t.data_type)
        total += t.ByteSize() if size is None or t.data_type in _NO_SIZE_CHECK else _data_bytes(t)
    return total


def fold_model(model: onnx.ModelProto, *, check_output: bool = False) -> FoldResult:
    """Fold every foldable BatchNormalization of `model`; the input model is not changed.

    Raises UnsupportedModelError when the model is not valid ONNX. `check_output=True` also
    runs the checker and strict shape inference on the result (a failure there is a bug in
    this pass and raises RuntimeError).
    """
    return FoldBatchNormPass(check_output=check_output)(model)


def inspect_model(model: onnx.ModelProto) -> list[BnInfo]:
    """Say, for each BatchNormalization of `model`, whether `fold_model` folds it and how.

    Runs the same checks on a private copy; `model` is not changed.
    """
    result = FoldBatchNormPass()(model)
    return [
        BnInfo(
            node=e.node,
            foldable=e.status == "folded",
            direction=e.direction,
            target=e.target,
            reason=e.reason,
        )
        for e in result.report.entries
    ]


def fold_file(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    report_path: str | os.PathLike[str] | None = None,
    in_place: bool = False,
    external_data: bool | None = None,
) -> FoldReport:
    """Fold the model at `in_path` and write it to `out_path` (atomically), with its report.

    External data is read only from inside the model's folder; the output is one file unless
    `external_data` is True or it nears protobuf's 2 GB limit. The input file is never changed
    unless `in_place` and `out_path` is the input.
    """
    from bn_onnx.files import atomic_output, check_output_path
    from bn_onnx.onnx_io import EXTERNAL_DATA_THRESHOLD, load_model, save_model

    src = Path(in_path)
    out = check_output_path(out_path, [src], in_place=in_place)
    if report_path is not None:
        rep = check_output_path(report_path, [src, out])
        if rep.resolve() in (src.resolve(), out.resolve()):
            raise UsageError(f"report path {rep} is the model input or output")
    model = load_model(src)
    result = FoldBatchNormPass()(model, copy=False)
    del model
    if external_data is None:  # decided here from dims: onnx_io would copy every tensor to count
        external_data = _model_data_bytes(result.model) > EXTERNAL_DATA_THRESHOLD
    save_model(result.model, out, external_data=external_data)
    if report_path is not None:
        with atomic_output(rep, suffix=".json") as tmp:
            tmp.write_text(result.report.to_json() + "\n", encoding="utf-8")
    return result.report
