"""The graph side of the fold: validation without tensor data, producer/consumer maps kept up
to date through rewrites, constants (initializers, Constant nodes, constant subgraphs), and
tensors read and written without needless copies. Used by `bn_onnx.fold`; onnx and numpy only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bn_onnx.errors import UnsupportedModelError

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
# Standard ops with graph attributes.
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})
# Initializers up to this size are copied into the skeleton as they are.
SKELETON_KEEP_BYTES = 4096
# Rewritten weights of at least this size may be kept as arrays until `write_model` (a copy
# into protobuf and the serialized copy of the whole model saved). 0: all of them, which is
# also a little faster on chains of small tensors and has every fold_file test use the path.
DEFER_BYTES = 0
# The fields `make_tensor` sets besides raw_data.
_BARE_FIELDS = frozenset({"name", "data_type", "dims"})


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of the node's attribute `name`, or `default` when it is not set."""
    for a in node.attribute:
        if a.name == name:
            if a.type == onnx.AttributeProto.INT:
                return a.i
            if a.type == onnx.AttributeProto.FLOAT:
                return a.f
            return helper.get_attribute_value(a)
    return default


def drop_attrs(node: onnx.NodeProto, names: tuple[str, ...]) -> None:
    keep = [a for a in node.attribute if a.name not in names]
    if len(keep) != len(node.attribute):
        node.ClearField("attribute")
        node.attribute.extend(keep)


def set_float_attr(node: onnx.NodeProto, name: str, value: float) -> None:
    drop_attrs(node, (name,))
    node.attribute.append(helper.make_attribute(name, value))


def label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0] if node.output else '?'})"


def is_standard(node: onnx.NodeProto) -> bool:
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


def item_size(data_type: int) -> int | None:
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
    for d in t.dims:  # one pass over the repeated field: faster than min() and math.prod()
        if d < 0:
            raise UnsupportedModelError(f"tensor {t.name!r} has a negative dimension")
        n *= d
    itemsize = _ITEMSIZE.get(t.data_type)
    if itemsize is None:
        itemsize = item_size(t.data_type)
        if itemsize is None:
            raise UnsupportedModelError(f"tensor {t.name!r} has unknown data type {t.data_type}")
    return n * itemsize


def _check_tensor_data(t: TensorProto) -> int:
    """Refuse a tensor whose stored data does not match its dims (the checker's size check);
    return its size in bytes.

    Up to CHECK_BYTES only: reading a protobuf bytes field copies it. Bigger tensors are
    checked when the fold reads them.
    """
    if t.data_location == TensorProto.EXTERNAL:
        raise UnsupportedModelError(
            f"tensor {t.name!r} keeps its data in an external file that was not loaded "
            "(load the model with bn_onnx.onnx_io.load_model)"
        )
    if t.data_type in _NO_SIZE_CHECK:
        return t.ByteSize()
    expected = _data_bytes(t)
    if t.HasField("raw_data") and expected <= CHECK_BYTES and len(t.raw_data) != expected:
        raise UnsupportedModelError(
            f"tensor {t.name!r}: {len(t.raw_data)} bytes of data for shape {list(t.dims)} "
            f"({expected} expected)"
        )
    return expected


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
        name = t.name if isinstance(t.name, bytes) else t.name.encode()  # bytes: not UTF-8
        body_len = 1 + len(_varint(len(name))) + len(name) + len(type_field)
        parts += (b"\x5a", _varint(body_len), b"\x0a", _varint(len(name)), name, type_field)
    return b"".join(parts)


def _skeleton(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of `model` without large tensor data: big initializers become typed inputs.

    Shape inference and the checker then run on a few kilobytes instead of the weights. Each
    initializer's data size is checked against its dims on the way (as the checker would).
    Returns the skeleton and the initializers' data bytes (as `model_data_bytes` counts them).
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
    total = 0
    for t in g.initializer:
        nbytes = _check_tensor_data(t)
        total += nbytes
        # Small tensors (BN vectors, shapes and axes for data propagation) are copied whole:
        # cheaper than typing them. Big ones become typed inputs.
        if nbytes <= SKELETON_KEEP_BYTES:
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
            if node.op_type == "Constant" and is_standard(node):
                value = next((a for a in node.attribute if a.name == "value"), None)
            if value is not None and _tensor_elements(value.t) > SKELETON_KEEP_ELEMENTS:
                t = value.t
                typed_t = TensorProto(name=node.output[0], data_type=t.data_type, dims=t.dims)
                sg.MergeFromString(_typed_inputs_blob([typed_t]))
                continue
            sg.node.append(node)
    sg.output.extend(g.output)
    sg.value_info.extend(g.value_info)
    return sk, total


def first_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    text = text or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def validate_model(
    model: onnx.ModelProto, *, sizes: dict[str, int] | None = None
) -> onnx.ModelProto:
    """Check `model` (checker + strict shape inference, without tensor data).

    Returns the inferred skeleton (for shapes and ranks); raises UnsupportedModelError with one
    line when the model is not valid ONNX. `sizes`, when given, receives the initializers' data
    bytes under "initializers" (for `model_data_bytes`, which then need not count them again).
    """
    if not model.HasField("graph") or not model.opset_import:
        raise UnsupportedModelError("not an ONNX model (no graph or opset)")
    sk, init_bytes = _skeleton(model)
    if sizes is not None:
        sizes["initializers"] = init_bytes
    try:
        onnx.checker.check_model(sk)
        inferred = onnx.shape_inference.infer_shapes(
            sk, check_type=True, strict_mode=True, data_prop=True
        )
    except Exception as exc:  # ValidationError, InferenceError, and odd protobuf errors
        raise UnsupportedModelError(f"invalid ONNX model: {first_line(exc)}") from None
    return inferred


class Types:
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


def has_subgraph(node: onnx.NodeProto) -> bool:
    """Whether the node holds a graph attribute (If, Loop, Scan, or a custom op)."""
    if is_standard(node) and node.op_type not in _SUBGRAPH_OPS:
        return False
    graph_types = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(a.type in graph_types for a in node.attribute)


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


def _copy_fields(dst: Any, src: Any, skip: str) -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "extend"):  # repeated field
            getattr(dst, field.name).extend(value)
        elif hasattr(value, "CopyFrom"):  # message
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


# (field, repeated) for every TensorProto field but raw_data; older protobuf has only `label`.
_TENSOR_FIELDS = [
    (f, f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED)
    for f in TensorProto.DESCRIPTOR.fields
    if f.name != "raw_data"
]


def _copy_tensor_header(dst: TensorProto, src: TensorProto) -> None:
    """Copy every field set in `src` but raw_data (ListFields would copy raw_data out)."""
    for f, repeated in _TENSOR_FIELDS:
        if repeated:
            values = getattr(src, f.name)
            if len(values):
                getattr(dst, f.name).extend(values)
        elif src.HasField(f.name):
            if f.message_type is not None:
                getattr(dst, f.name).CopyFrom(getattr(src, f.name))
            else:
                setattr(dst, f.name, getattr(src, f.name))


def copy_without_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A copy of `model` whose raw-data initializers are placeholders (name, dtype, dims only).

    Returns the copy and {name: the input's tensor} for the placeholders. `Graph` reads them
    from the input and fills in only those the fold did not rewrite or drop, so a fold never
    holds a weight twice in the copy (protobuf keeps replaced bytes until the model is freed).
    """
    out = onnx.ModelProto()
    _copy_fields(out, model, skip="graph")
    _copy_fields(out.graph, model.graph, skip="initializer")
    sources = {}
    for t in model.graph.initializer:
        placeholder = out.graph.initializer.add()
        if t.HasField("raw_data"):
            _copy_tensor_header(placeholder, t)
            sources[t.name] = t
        else:
            placeholder.CopyFrom(t)
    return out, sources


# --------------------------------------------------------------------------------------------
# The graph with producer/consumer maps, kept up to date through every rewrite


class Graph:
    """A model's main graph, edited in place, with maps built once and updated by each edit.

    `producer[name]` is the node index writing a value, `consumers[name]` the node indices
    reading it (with repeats; a node reading a name inside its subgraphs counts too). Nodes are
    removed by marking them dead and inserted with an order key; `finish` writes the node,
    initializer and value_info lists back once. `const(name)` evaluates constants lazily.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        inferred: onnx.ModelProto,
        sources: dict[str, TensorProto] | None = None,
    ) -> None:
        self.model = model
        # Placeholder initializers whose data still lives in the input (copy_without_weights).
        self.pending: dict[str, TensorProto] = dict(sources or {})
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
        self.types = Types(inferred)
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
        # {name: value} of rewritten weights kept out of protobuf (None: write them in).
        self.deferred: dict[str, np.ndarray] | None = None

    # --- maps
    def _link(self, i: int) -> None:
        node = self.nodes[i]
        for name in node.input:
            if name:
                self.consumers.setdefault(name, []).append(i)
        if has_subgraph(node):
            for name in _subgraph_names(node):
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
        if not is_standard(node) or node.op_type not in CONST_OPS or node.op_type == "Shape":
            return None
        if has_subgraph(node):
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
        if not is_standard(node):
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
            dims = shape[attr(node, "start", 0) : attr(node, "end", None)]
            if any(d is None for d in dims):
                return None
            self.const_nodes.add(i)
            return np.array(dims, dtype=np.int64)
        return None

    def _to_array(self, t: TensorProto) -> np.ndarray:
        if self.deferred and t.name in self.deferred:
            value = self.deferred[t.name].view()
            value.flags.writeable = False  # as read back from raw_data
            return value
        if self.pending:
            t = self.pending.get(t.name, t)
        fast = _FAST_DTYPES.get(t.data_type)
        try:
            if fast is not None and t.HasField("raw_data"):  # the common case, no overhead
                value = np.frombuffer(t.raw_data, dtype=fast)
                dims = t.dims
                if len(dims) == 1 and dims[0] == value.size:  # a vector: nothing to reshape
                    return value
                return value.reshape(tuple(dims))
            return numpy_helper.to_array(t)
        except Exception as exc:
            raise UnsupportedModelError(
                f"cannot read tensor {t.name!r}: {first_line(exc)}"
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
            same = _FAST_TYPES.get(value.dtype) == t.data_type and tuple(t.dims) == value.shape
            if self.deferred is not None and self._defer(old, t, value, same):
                pass
            elif same and t.HasField("raw_data"):  # same dtype and shape: replace only the bytes
                t.raw_data = np.ascontiguousarray(value, _FAST_DTYPES[t.data_type]).tobytes()
            else:
                if self.deferred:
                    self.deferred.pop(old, None)
                t.CopyFrom(make_tensor(value, old))
            self.pending.pop(old, None)
            self._remember(old, value)
            return
        name = self.add_initializer(value, f"{old or (node.name or node.op_type) + '_bias'}_bnfold")
        self.set_input(i, pos, name)

    def _defer(self, name: str, t: TensorProto, value: np.ndarray, same: bool) -> bool:
        """Keep `value` as the tensor's raw_data without copying it into protobuf (for
        `write_model`); False when the write must go into the tensor as it is.

        The tensor keeps every other field, as a raw_data write in place would; a placeholder
        (which the write would replace by a bare tensor) qualifies only when it is bare.
        """
        if not same or value.nbytes < DEFER_BYTES:
            return False
        if name in self.pending:
            if not all(f.name in _BARE_FIELDS for f, _ in t.ListFields()):
                return False
        elif name not in self.deferred:
            if not t.HasField("raw_data"):
                return False
            t.ClearField("raw_data")
        self.deferred[name] = value
        return True

    def _remember(self, name: str, value: np.ndarray) -> None:
        if value.size <= CACHE_ELEMENTS:
            self.cache[name] = value
        else:
            self.cache.pop(name, None)

    def add_initializer(self, value: np.ndarray, base: str) -> str:
        """A new initializer holding `value`, under a fresh name made from `base`."""
        name = self.fresh(base)
        self.graph.initializer.append(make_tensor(value, name))
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
        for name, src in self.pending.items():  # placeholders the fold kept as they were
            if name not in self.dead_inits:
                self.inits[name].raw_data = src.raw_data
        self.pending.clear()
        if self.deferred:
            for name in self.dead_inits:
                self.deferred.pop(name, None)
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


def make_tensor(value: np.ndarray, name: str) -> TensorProto:
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


def model_data_bytes(model: onnx.ModelProto, init_bytes: int | None = None) -> int:
    """Bytes of tensor data in the main graph (initializers and Constant nodes), from dims.

    `init_bytes`: the initializers' share when already known (from `validate_model`).
    """
    tensors = list(model.graph.initializer) if init_bytes is None else []
    tensors += [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.t.dims
    ]
    total = init_bytes or 0
    for t in tensors:
        size = item_size(t.data_type)
        total += t.ByteSize() if size is None or t.data_type in _NO_SIZE_CHECK else _data_bytes(t)
    return total


# --------------------------------------------------------------------------------------------
# Writing a model whose rewritten weights are still arrays


def fill_deferred(model: onnx.ModelProto, deferred: dict[str, np.ndarray]) -> None:
    """Put the deferred arrays into their tensors' raw_data (for the usual writers)."""
    for t in model.graph.initializer:
        value = deferred.get(t.name)
        if value is not None:
            t.raw_data = np.ascontiguousarray(value, _FAST_DTYPES[t.data_type]).tobytes()
    deferred.clear()


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview):
    """(field number, start, payload start, end) of each field of a serialized message."""
    pos, n = 0, len(buf)
    while pos < n:
        start = pos
        tag, pos = _read_varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
            yield tag >> 3, start, pos, pos
            continue
        if wire == 2:
            size, pos = _read_varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
        else:
            raise ValueError(f"unexpected wire type {wire}")
        yield tag >> 3, start, pos, pos + size
        pos += size
    if pos != n:
        raise ValueError("truncated message")


def _spliced(model: onnx.ModelProto, deferred: dict[str, np.ndarray]) -> list[Any] | None:
    """The pieces of `model`'s serialization with each deferred array as its tensor's raw_data
    (field 9, after fields 1-8 and before 10 and up, where protobuf puts it), or None when the
    layout is not the expected one."""
    data = memoryview(model.SerializeToString())
    names = {k.encode(): k for k in deferred}
    found: set[str] = set()
    out: list[Any] = []
    graph_seen = False
    for field, start, payload, end in _fields(data):
        if field != 7:  # ModelProto.graph
            out.append(data[start:end])
            continue
        if graph_seen:
            return None
        graph_seen = True
        parts: list[Any] = []
        size = 0
        graph = data[payload:end]
        for gfield, gstart, gpayload, gend in _fields(graph):
            if gfield != 5:  # GraphProto.initializer
                parts.append(graph[gstart:gend])
                size += gend - gstart
                continue
            tensor = graph[gpayload:gend]
            name, cut = None, len(tensor)
            for tfield, tstart, tpayload, tend in _fields(tensor):
                if tfield == 8:
                    name = bytes(tensor[tpayload:tend])
                elif tfield == 9:
                    name = None  # has raw_data already: not one of ours
                    break
                if tfield > 9 and cut == len(tensor):
                    cut = tstart
            key = names.get(name) if name is not None else None
            if key is None:
                parts.append(graph[gstart:gend])
                size += gend - gstart
                continue
            if key in found:
                return None
            found.add(key)
            value = deferred[key]
            raw = memoryview(np.ascontiguousarray(value, value.dtype.newbyteorder("<"))).cast("B")
            head = b"\x4a" + _varint(len(raw))
            body = len(tensor) + len(head) + len(raw)
            piece = [
                b"\x2a" + _varint(body),
                tensor[:cut],
                head,
                raw,
                tensor[cut:],
            ]
            parts += piece
            size += sum(len(p) for p in piece)
        out.append(b"\x3a" + _varint(size))
        out += parts
    if found != set(deferred):
        return None
    return out


def write_model(model: onnx.ModelProto, deferred: dict[str, np.ndarray], path: Any) -> None:
    """Write `model` to the file `path` with the deferred arrays as raw_data, byte for byte as
    onnx.save would after `fill_deferred`, without the weights' copies into protobuf and into
    one serialized string."""
    pieces = _spliced(model, deferred) if deferred else None
    if pieces is None:
        fill_deferred(model, deferred)
        pieces = [model.SerializeToString()]
    with open(path, "wb") as f:
        for p in pieces:
            f.write(p)
