"""Validation of a model before the fold: the checker and strict shape inference on its skeleton.

The skeleton is the model without its big tensor data: every initializer over
`SKELETON_KEEP_BYTES` is declared as a typed graph input instead (as onnx-ir's
`passes.common.CheckerPass` and `ShapeInferencePass` do through their private
`_c_api_utils.call_onnx_api`). Neither pass is used as is: `ShapeInferencePass` logs and
swallows a failed inference (the fold must refuse the model instead), writes every inferred
shape into the model (which would then be saved as value_info the input did not have), and the
two passes together would serialize the model twice. Here one skeleton is serialized, checked,
and inferred with `strict_mode=True, data_prop=True`; the inferred shapes stay in a side table.
"""

from __future__ import annotations

import dataclasses

import onnx
import onnx_ir as ir

from bn_onnx.errors import UnsupportedModelError

# Initializers up to this size stay whole in the skeleton (BN vectors, shapes and axes that
# data propagation reads); bigger ones become typed inputs.
SKELETON_KEEP_BYTES = 4096
# Tensors up to this size have their stored data length checked against their dims (reading a
# protobuf bytes field copies it; bigger ones are checked when the fold reads them).
CHECK_BYTES = 1 << 24


class InvalidModelError(UnsupportedModelError, ir.passes.PreconditionError):
    """The model is not valid ONNX (a user error, exit 2, and the fold pass's failed
    precondition: onnx-ir's pass runner lets a `PreconditionError` through unwrapped)."""


class FoldOutputError(RuntimeError, ir.passes.PostconditionError):
    """The fold produced an invalid model: a bug in the pass, not a user error."""


def first_line(exc: BaseException) -> str:
    """An exception's message as one line of at most 300 characters.

    onnx-ir wraps errors in `SerdeError("Error calling _deserialize_graph with: ...")`: the
    innermost cause says what is wrong.
    """
    while exc.__cause__ is not None and type(exc).__name__ == "SerdeError":
        exc = exc.__cause__
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    text = text or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@dataclasses.dataclass
class ShapeTable:
    """Shapes and element types from shape inference, by value name (main graph).

    `dims[name]` is the tuple of dims (None where symbolic or unknown), or None when even the
    rank is unknown. Subgraph and function scopes are not recorded yet (issue 12, rule 2b).
    """

    dims: dict[str, tuple[int | None, ...] | None]
    elem_types: dict[str, int]

    def shape(self, value: ir.Value) -> tuple[int | None, ...] | None:
        """The value's dims from inference, else from its own type information."""
        name = value.name or ""
        if name in self.dims:
            return self.dims[name]
        if value.shape is not None:
            return tuple(d if isinstance(d, int) else None for d in value.shape)
        return None

    def elem_type(self, value: ir.Value) -> int | None:
        if value.dtype is not None:
            return int(value.dtype)
        return self.elem_types.get(value.name or "")


def _tensor_nbytes(tensor: ir.TensorProtocol, name: str) -> int:
    """Bytes the tensor's data should take, from its dims and dtype (no data read)."""
    try:
        dims = tensor.shape.numpy()
        n = 1
        for d in dims:
            if d < 0:
                raise UnsupportedModelError(f"tensor {name!r} has a negative dimension")
            n *= d
        return (n * tensor.dtype.bitwidth + 7) // 8
    except UnsupportedModelError:
        raise
    except Exception as exc:
        raise UnsupportedModelError(f"tensor {name!r}: {first_line(exc)}") from None


def check_tensor_data(tensor: ir.TensorProtocol, name: str) -> int:
    """Refuse a tensor whose stored data does not match its dims; return its size in bytes.

    Only tensors read from a protobuf message are checked here, up to `CHECK_BYTES` (bigger
    ones fail when the fold reads them); external tensors are checked by `io.check_external_data`.
    """
    if tensor.dtype in (ir.DataType.STRING, ir.DataType.UNDEFINED):
        if tensor.dtype == ir.DataType.UNDEFINED:
            raise UnsupportedModelError(f"tensor {name!r} has an undefined data type")
        return 0
    expected = _tensor_nbytes(tensor, name)
    proto = tensor.raw if isinstance(tensor, ir.serde.TensorProtoTensor) else None
    if proto is not None:
        if proto.data_location == onnx.TensorProto.EXTERNAL:
            raise UnsupportedModelError(
                f"tensor {name!r} keeps its data in an external file that was not loaded "
                "(load the model with onnx_ir.load or bn_onnx.fold.io)"
            )
        if (
            proto.HasField("raw_data")
            and expected <= CHECK_BYTES
            and tensor.dtype.bitwidth % 8 == 0
            and len(proto.raw_data) != expected
        ):
            raise UnsupportedModelError(
                f"tensor {name!r}: {len(proto.raw_data)} bytes of data for shape "
                f"{list(proto.dims)} ({expected} expected)"
            )
    return expected


def _skeleton(model: ir.Model) -> onnx.ModelProto:
    """The model serialized without its big initializers, which become typed inputs."""
    graph = model.graph
    input_ids = {id(v) for v in graph.inputs}
    inputs = list(graph.inputs)
    small = []
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        nbytes = check_tensor_data(tensor, value.name or "")
        if nbytes <= SKELETON_KEEP_BYTES:
            if isinstance(tensor, ir.ExternalTensor):  # the checker would look for the file
                try:
                    array = tensor.numpy().copy()  # no view left on the memory map
                except Exception as exc:
                    raise UnsupportedModelError(
                        f"cannot read tensor {value.name!r}: {first_line(exc)}"
                    ) from None
                value = ir.Value(
                    name=value.name,
                    type=ir.TensorType(tensor.dtype),
                    shape=ir.Shape(tensor.shape.numpy()),
                    const_value=ir.Tensor(array, dtype=tensor.dtype, name=value.name),
                )
            small.append(value)
        elif id(value) not in input_ids:  # declared by type only (IR < 4 lists it already)
            inputs.append(
                ir.Value(
                    name=value.name,
                    type=ir.TensorType(tensor.dtype),
                    shape=ir.Shape(tensor.shape.numpy()),
                )
            )
    for node in graph:  # Constant tensors are serialized whole: check their data first
        if node.op_type == "Constant" and node.domain == "":
            attr = node.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                check_tensor_data(attr.value, node.outputs[0].name or "")
    view = ir.GraphView(
        inputs,
        graph.outputs,
        nodes=graph,
        initializers=small,
        opset_imports=graph.opset_imports,
        name=graph.name or "graph",
        doc_string=graph.doc_string,
    )
    skeleton = ir.Model(
        view,  # type: ignore[arg-type]
        ir_version=model.ir_version,
        functions=model.functions.values(),
    )
    return ir.serde.serialize_model(skeleton)


def _collect(inferred: onnx.ModelProto) -> ShapeTable:
    dims: dict[str, tuple[int | None, ...] | None] = {}
    elem_types: dict[str, int] = {}
    g = inferred.graph
    for vi in (*g.input, *g.value_info, *g.output):
        if not vi.type.HasField("tensor_type"):
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
    for t in g.initializer:
        dims[t.name] = tuple(t.dims)
        elem_types[t.name] = t.data_type
    return ShapeTable(dims, elem_types)


def validate_model(model: ir.Model) -> ShapeTable:
    """Check `model` (checker + strict shape inference on its skeleton) and return its shapes.

    Raises:
        InvalidModelError: the model is not valid ONNX, with the checker's or shape
            inference's first line as the reason.
    """
    if not model.opset_imports:
        raise InvalidModelError("not an ONNX model (no graph or opset)")
    try:
        skeleton = _skeleton(model)
    except UnsupportedModelError as exc:
        raise InvalidModelError(str(exc)) from None
    except Exception as exc:  # the IR could not be serialized: not a model onnx can hold
        raise InvalidModelError(f"invalid ONNX model: {first_line(exc)}") from None
    try:
        onnx.checker.check_model(skeleton)
        inferred = onnx.shape_inference.infer_shapes(
            skeleton, check_type=True, strict_mode=True, data_prop=True
        )
    except Exception as exc:  # ValidationError, InferenceError, and odd protobuf errors
        raise InvalidModelError(f"invalid ONNX model: {first_line(exc)}") from None
    return _collect(inferred)
