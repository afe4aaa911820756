"""Validation of a model before the fold: the checker and strict shape inference on its skeleton.

The skeleton is the model without its big tensor data: every initializer over
`SKELETON_KEEP_BYTES` is declared as a typed graph input instead (as onnx-ir's
`passes.common.CheckerPass` and `ShapeInferencePass` do through their private
`_c_api_utils.call_onnx_api`). Neither pass is used as is: `ShapeInferencePass` logs and
swallows a failed inference (the fold must refuse the model instead), writes every inferred
shape into the model (which would then be saved as value_info the input did not have), and the
two passes together would serialize the model twice. Here one skeleton is serialized, checked,
and inferred with `strict_mode=True, data_prop=True`; the inferred shapes stay in a side table.

The table has one part per scope (rule 15): onnx's inference writes the value_info of
If/Loop/Scan bodies, read here by walking the skeleton beside the onnx-ir graph. It infers no
function body, so each model-local function is inferred once per distinct call (its inputs
typed as that call's arguments, attribute references replaced by the call's attributes) and
the results are joined: a dim is known only where every call agrees on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable

import onnx
import onnx_ir as ir

from bn_onnx import onnx_check
from bn_onnx.errors import UnsupportedModelError, one_line
from bn_onnx.onnx_check import SKELETON_KEEP_BYTES


class InvalidModelError(UnsupportedModelError, ir.passes.PreconditionError):
    """The model is not valid ONNX (a user error, exit 2, and the fold pass's failed
    precondition: onnx-ir's pass runner lets a `PreconditionError` through unwrapped)."""


class FoldOutputError(RuntimeError, ir.passes.PostconditionError):
    """The fold produced an invalid model: a bug in the pass, not a user error."""


class FoldCheckError(UnsupportedModelError):
    """The fold itself (without the cleanup) made a model that fails the output check while
    the input passes it: refused (exit 2), nothing is written."""


def _invalid(exc: UnsupportedModelError) -> InvalidModelError:
    error = InvalidModelError(str(exc))
    error.detail = exc.detail
    return error


Dims = tuple[int | None, ...]


@dataclasses.dataclass
class ShapeTable:
    """Shapes and element types from shape inference, by value name, per scope.

    `dims[name]` is the tuple of dims (None where symbolic or unknown), or None when even the
    rank is unknown. The fields hold the main graph's values; `scopes` holds one table per
    subgraph and function body (keyed by its `ir.Graph`), and `shape`/`elem_type` look a value
    up in the table of the graph that defines it (a value captured from an outer graph in
    the outer graph's table). `main` is the main graph (None: one flat table, as before).
    """

    dims: dict[str, Dims | None]
    elem_types: dict[str, int]
    scopes: dict[ir.Graph, ShapeTable] = dataclasses.field(default_factory=dict)
    main: ir.Graph | None = None

    def _table(self, value: ir.Value) -> ShapeTable:
        graph = value.graph
        if self.main is None or graph is None or graph is self.main:
            return self
        return self.scopes.get(graph, _UNKNOWN)

    def shape(self, value: ir.Value) -> Dims | None:
        """The value's dims from inference, else from its own type information."""
        name = value.name or ""
        table = self._table(value)
        if name in table.dims:
            return table.dims[name]
        if value.shape is not None:
            return tuple(d if isinstance(d, int) else None for d in value.shape)
        return None

    def elem_type(self, value: ir.Value) -> int | None:
        if value.dtype is not None:
            return int(value.dtype)
        return self._table(value).elem_types.get(value.name or "")


_UNKNOWN = ShapeTable({}, {})  # a scope inference knows nothing of


def _tensor_nbytes(tensor: ir.TensorProtocol, name: str) -> int:
    """Bytes the tensor's data should take, from its dims and dtype (no data read)."""
    try:
        dims, bits = tensor.shape.numpy(), tensor.dtype.bitwidth
    except Exception as exc:
        raise UnsupportedModelError(f"tensor {name!r}: {one_line(exc)}") from None
    n = 1
    for d in dims:
        if d < 0:
            raise UnsupportedModelError(f"tensor {name!r} has a negative dimension")
        n *= d
    return (n * bits + 7) // 8


def check_tensor_data(tensor: ir.TensorProtocol, name: str) -> int:
    """Refuse a tensor whose stored data does not match its dims; return its size in bytes.

    Only tensors read from a protobuf message are checked here, up to `CHECK_BYTES` (bigger
    ones fail when the fold reads them); external tensors by
    `bn_onnx.onnx_check.check_external_data`.
    """
    proto = tensor.raw if isinstance(tensor, ir.serde.TensorProtoTensor) else None
    if proto is not None:
        if proto.data_location == onnx.TensorProto.EXTERNAL:
            raise UnsupportedModelError(
                f"tensor {name!r} keeps its data in an external file that was not loaded "
                "(load the model with onnx_ir.load or bn_onnx.fold.model_io)"
            )
        return onnx_check.check_tensor_data(proto, name)
    data_type = int(tensor.dtype)
    if data_type == ir.DataType.UNDEFINED:
        raise UnsupportedModelError(f"tensor {name!r} has an undefined data type")
    if data_type == ir.DataType.STRING:
        return 0
    return _tensor_nbytes(tensor, name)


def _typed_input(graph: onnx.GraphProto, name: str, tensor: ir.TensorProtocol) -> None:
    vi = graph.input.add()
    vi.name = name
    tt = vi.type.tensor_type
    tt.elem_type = int(tensor.dtype)
    tt.shape.SetInParent()
    for d in tensor.shape.numpy():
        tt.shape.dim.add().dim_value = d


def _skeleton(model: ir.Model) -> onnx.ModelProto:
    """The model as a ModelProto without its big initializers, declared as typed inputs.

    Built from onnx-ir's serde pieces rather than `serialize_model`, which would copy every
    weight and write a value_info for every initializer.
    """
    graph = model.graph
    sk = onnx.ModelProto(ir_version=model.ir_version)
    for domain, version in model.opset_imports.items():
        sk.opset_import.add(domain=domain, version=version)
    g = sk.graph
    g.name = graph.name or "graph"
    input_ids = {id(v) for v in graph.inputs}
    for value in graph.inputs:
        ir.serde.serialize_value_into(g.input.add(), value)
    for value in graph.initializers.values():
        tensor = value.const_value
        name = value.name or ""
        if tensor is None:
            continue
        nbytes = check_tensor_data(tensor, name)
        if nbytes > SKELETON_KEEP_BYTES:
            if id(value) not in input_ids:  # IR < 4 lists it as an input already
                _typed_input(g, name, tensor)
            continue
        if isinstance(tensor, ir.ExternalTensor):  # the checker would look for the file
            try:
                array = tensor.numpy().copy()  # no view left on the memory map
            except Exception as exc:
                raise UnsupportedModelError(
                    f"cannot read tensor {name!r}: {one_line(exc)}"
                ) from None
            tensor = ir.Tensor(array, dtype=tensor.dtype, name=name)
        if isinstance(tensor, ir.serde.TensorProtoTensor) and tensor.raw.name == name:
            g.initializer.append(tensor.raw)  # a copy of the small proto, as serde would make
        else:
            ir.serde.serialize_tensor_into(g.initializer.add(), tensor)
            g.initializer[-1].name = name
    for node in graph:
        if node.op_type == "Constant" and node.domain == "":  # serialized whole: check it
            attr = node.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                check_tensor_data(attr.value, node.outputs[0].name or "")
        ir.serde.serialize_node_into(g.node.add(), node, model_ir_version=model.ir_version)
        for out in node.outputs:  # declared types and shapes, for inference to check
            declared = out.type is not None or out.shape is not None
            if declared and out.name and not out.is_graph_output():
                ir.serde.serialize_value_into(g.value_info.add(), out)
    for value in graph.outputs:
        ir.serde.serialize_value_into(g.output.add(), value)
    create_value_info = model.ir_version >= 10
    for function in model.functions.values():
        sk.functions.append(
            ir.serde.serialize_function(function, create_value_info=create_value_info)
        )
    return sk


def _collect(g: onnx.GraphProto, typed: Iterable[str]) -> ShapeTable:
    """The inferred types and shapes of one graph's values (initializers aside: their Values
    carry their tensors' shapes)."""
    dims: dict[str, Dims | None] = {}
    elem_types: dict[str, int] = {}
    typed = set(typed)
    for vi in (*g.input, *g.value_info, *g.output):
        if vi.name in typed or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if tt.elem_type:
            elem_types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            dims[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim
            )
        else:
            dims[vi.name] = None
    return ShapeTable(dims, elem_types)


def validate_model(model: ir.Model) -> ShapeTable:
    """Check `model` (checker + strict shape inference on its skeleton) and return its shapes.

    Raises:
        InvalidModelError: the model is not valid ONNX, with the checker's or shape
            inference's first line as the reason.
    """
    return validate_skeleton(model)[1]


def validate_skeleton(model: ir.Model) -> tuple[onnx.ModelProto, ShapeTable]:
    """As `validate_model`, also returning the checked skeleton (the model without its big
    initializers, declared as typed graph inputs), e.g. for an onnxruntime session.

    The checks are those of `onnx.checker.check_model(full_check=True)`: the checker, then
    shape inference with `check_type=True, strict_mode=True` (and `data_prop=True`).
    """
    if not model.opset_imports:
        raise InvalidModelError("not an ONNX model (no graph or opset)")
    try:
        skeleton = _skeleton(model)
    except UnsupportedModelError as exc:
        raise _invalid(exc) from None
    except Exception as exc:  # the IR could not be serialized: not a model onnx can hold
        raise InvalidModelError(f"invalid ONNX model: {one_line(exc)}") from None
    try:
        inferred = onnx_check.check_skeleton(skeleton)
    except UnsupportedModelError as exc:
        raise _invalid(exc) from None
    table = _collect(inferred.graph, model.graph.initializers)
    table.main = model.graph
    _collect_subgraphs(model.graph, inferred.graph, table.scopes)
    with contextlib.suppress(Exception):  # best effort: function shapes stay unknown
        _infer_functions(model, table)
    return skeleton, table


def _collect_subgraphs(
    graph: ir.Graph, proto: onnx.GraphProto, tables: dict[ir.Graph, ShapeTable]
) -> None:
    """The tables of the subgraphs of `graph`, at any depth, from its inferred `proto` (the
    same nodes in the same order: it was serialized from `graph`)."""
    stack = [(graph, proto)]
    while stack:
        g, p = stack.pop()
        for node, node_proto in zip(g, p.node, strict=False):
            protos = {a.name: a for a in node_proto.attribute}
            for key, attr in node.attributes.items():
                a = protos.get(key)
                if attr.is_ref() or attr.value is None or a is None:
                    continue
                if attr.type == ir.AttributeType.GRAPH:
                    pairs = [(attr.value, a.g)]
                elif attr.type == ir.AttributeType.GRAPHS:
                    pairs = list(zip(attr.value, a.graphs, strict=False))
                else:
                    continue
                for sub, sub_proto in pairs:
                    tables[sub] = _collect(sub_proto, sub.initializers)
                    stack.append((sub, sub_proto))


# --------------------------------------------------------------------------------------------
# Function bodies: inferred per call, joined over the calls


def _infer_functions(model: ir.Model, table: ShapeTable) -> None:
    """Add each model-local function body's table (and its subgraphs') to `table.scopes`.

    A function is inferred once its callers' scopes are known (a function called from another
    function's body waits for that one); a function without calls, or one whose call cannot be
    inferred, gets no table (its shapes stay unknown, and rules that need them refuse).
    """
    if not model.functions:
        return
    from bn_onnx.fold.scopes import ScopeIndex

    index = ScopeIndex(model)
    protos = {
        key: ir.serde.serialize_function(f, create_value_info=model.ir_version >= 10)
        for key, f in model.functions.items()
    }
    pending = dict(model.functions)

    def waits(key: tuple[str, str, str]) -> bool:
        """Whether a call of this function sits in a function not inferred yet."""
        for call in index.calls[key]:
            caller = index.enclosing.get(call.graph) if call.graph is not None else None
            if caller is not None and caller.identifier() in pending:
                return True
        return False

    while pending:
        ready = [key for key in pending if not waits(key)]
        if not ready:  # calls in a cycle (invalid): leave them unknown
            return
        for key in ready:
            function = pending.pop(key)
            found: list[dict[ir.Graph, ShapeTable]] = []
            seen: set[bytes] = set()
            for call in index.calls[key]:
                inferred = _infer_call(model, function, protos, call, table, seen)
                if inferred is False:
                    continue  # the same types and attributes as a call already inferred
                if inferred is None:
                    found = []
                    break
                found.append(inferred)
            if found:
                for graph in found[0]:
                    table.scopes[graph] = _join([f.get(graph, _UNKNOWN) for f in found])


def _infer_call(
    model: ir.Model,
    function: ir.Function,
    protos: dict[tuple[str, str, str], onnx.FunctionProto],
    call: ir.Node,
    table: ShapeTable,
    seen: set[bytes],
) -> dict[ir.Graph, ShapeTable] | None | bool:
    """The tables of `function`'s body for one call: None when it cannot be inferred, False
    when a call with the same argument types and attributes was inferred already."""
    fp = protos[function.identifier()]
    g = onnx.GraphProto(name=function.name)
    for i, name in enumerate(fp.input):
        arg = call.inputs[i] if i < len(call.inputs) else None
        if arg is None:
            return None
        vi = g.input.add(name=name)
        elem_type, dims = table.elem_type(arg), table.shape(arg)
        if elem_type is None:
            return None
        tt = vi.type.tensor_type
        tt.elem_type = elem_type
        if dims is not None:
            tt.shape.SetInParent()
            for d in dims:
                dim = tt.shape.dim.add()
                if d is not None:
                    dim.dim_value = d
    given = {}
    for key, attr in call.attributes.items():
        if attr.is_ref():
            return None  # set by the caller's own caller
        given[key] = ir.serde.serialize_attribute(attr)
    defaults = {a.name: a for a in fp.attribute_proto}
    nodes = [onnx.NodeProto() for _ in fp.node]
    for node, src in zip(nodes, fp.node, strict=True):
        node.CopyFrom(src)
        if not _resolve_references(node, given, defaults):
            return None
    key = b"".join([g.SerializeToString()] + [given[k].SerializeToString() for k in sorted(given)])
    if key in seen:
        return False
    seen.add(key)
    g.node.extend(nodes)
    g.value_info.extend(fp.value_info)
    for name in fp.output:
        g.output.add(name=name)
    opsets = {**model.opset_imports, **function.opset_imports}
    probe = onnx.helper.make_model(
        g,
        ir_version=model.ir_version,
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()],
        functions=list(protos.values()),
    )
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:  # the body does not infer for these types: unknown
        return None
    tables = {function.graph: _collect(inferred.graph, ())}
    _collect_subgraphs(function.graph, inferred.graph, tables)
    return tables


def _resolve_references(
    node: onnx.NodeProto,
    given: dict[str, onnx.AttributeProto],
    defaults: dict[str, onnx.AttributeProto],
) -> bool:
    """Replace `node`'s attribute references (`@name`, in its subgraphs too) by the call's
    attributes or the function's defaults; an unset reference drops the attribute, as at a
    call. False when a reference names an attribute of another type."""
    stack = [node]
    while stack:
        n = stack.pop()
        attributes = []
        for a in n.attribute:
            src = a
            if a.ref_attr_name:
                src = given.get(a.ref_attr_name) or defaults.get(a.ref_attr_name)
                if src is None:
                    continue
                if src.type != a.type:
                    return False
            new = onnx.AttributeProto()
            new.CopyFrom(src)
            new.name = a.name
            attributes.append(new)
        del n.attribute[:]
        n.attribute.extend(attributes)  # copies: the subgraphs are walked in the new ones
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                stack.extend(a.g.node)
            elif a.type == onnx.AttributeProto.GRAPHS:
                stack.extend(sub_node for sub in a.graphs for sub_node in sub.node)
    return True


def _join(tables: list[ShapeTable]) -> ShapeTable:
    """What every table agrees on: a dim where all give it, a rank where all give it."""
    first, rest = tables[0], tables[1:]
    dims: dict[str, Dims | None] = {}
    for name, shape in first.dims.items():
        if any(name not in t.dims for t in rest):
            continue  # unknown for some call
        shapes = [shape, *(t.dims[name] for t in rest)]
        known = [s for s in shapes if s is not None]
        if len(known) < len(shapes) or len({len(s) for s in known}) != 1:
            dims[name] = None  # the rank differs or is unknown for some call
            continue
        dims[name] = tuple(
            column[0] if len(set(column)) == 1 else None for column in zip(*known, strict=True)
        )
    elem_types = {
        name: t
        for name, t in first.elem_types.items()
        if all(other.elem_types.get(name) == t for other in rest)
    }
    return ShapeTable(dims, elem_types)
