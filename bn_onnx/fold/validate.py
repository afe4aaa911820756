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


def _bits(data_type: int) -> int:
    """Bits per element of an ONNX data type (UnsupportedModelError when unknown)."""
    bits = _BITS.get(data_type)
    if bits is None:
        try:
            bits = _BITS[data_type] = ir.DataType(data_type).bitwidth
        except Exception as exc:
            raise UnsupportedModelError(f"unknown tensor data type {data_type}: {exc}") from None
    return bits


_BITS: dict[int, int] = {}


def _tensor_nbytes(tensor: ir.TensorProtocol, name: str) -> int:
    """Bytes the tensor's data should take, from its dims and dtype (no data read)."""
    try:
        if isinstance(tensor, ir.serde.TensorProtoTensor):  # dims without building a Shape
            proto = tensor.raw
            dims, bits = proto.dims, _bits(proto.data_type)
        else:
            dims, bits = tensor.shape.numpy(), tensor.dtype.bitwidth
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"tensor {name!r}: {exc}") from None
    except Exception as exc:
        raise UnsupportedModelError(f"tensor {name!r}: {first_line(exc)}") from None
    n = 1
    for d in dims:
        if d < 0:
            raise UnsupportedModelError(f"tensor {name!r} has a negative dimension")
        n *= d
    return (n * bits + 7) // 8


def check_tensor_data(tensor: ir.TensorProtocol, name: str) -> int:
    """Refuse a tensor whose stored data does not match its dims; return its size in bytes.

    Only tensors read from a protobuf message are checked here, up to `CHECK_BYTES` (bigger
    ones fail when the fold reads them); external tensors are checked by `io.check_external_data`.
    """
    proto = tensor.raw if isinstance(tensor, ir.serde.TensorProtoTensor) else None
    data_type = proto.data_type if proto is not None else int(tensor.dtype)
    if data_type == ir.DataType.UNDEFINED:
        raise UnsupportedModelError(f"tensor {name!r} has an undefined data type")
    if data_type == ir.DataType.STRING:
        return 0
    expected = _tensor_nbytes(tensor, name)
    if proto is not None:
        if proto.data_location == onnx.TensorProto.EXTERNAL:
            raise UnsupportedModelError(
                f"tensor {name!r} keeps its data in an external file that was not loaded "
                "(load the model with onnx_ir.load or bn_onnx.fold.io)"
            )
        if (
            expected <= CHECK_BYTES
            and proto.HasField("raw_data")
            and _bits(data_type) % 8 == 0
            and len(proto.raw_data) != expected
        ):
            raise UnsupportedModelError(
                f"tensor {name!r}: {len(proto.raw_data)} bytes of data for shape "
                f"{list(proto.dims)} ({expected} expected)"
            )
    return expected


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
                    f"cannot read tensor {name!r}: {first_line(exc)}"
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


def _collect(inferred: onnx.ModelProto, typed: set[str]) -> ShapeTable:
    """The inferred types and shapes of the graph's values (initializers aside: their Values
    carry their tensors' shapes)."""
    dims: dict[str, tuple[int | None, ...] | None] = {}
    elem_types: dict[str, int] = {}
    g = inferred.graph
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
    return _collect(inferred, set(model.graph.initializers))
