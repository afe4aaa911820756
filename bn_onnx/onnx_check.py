"""The checks every command runs on a model file before using it, on the ModelProto (no onnx-ir).

`bn_onnx.onnx_io.open_model` runs them in this order: text fields are UTF-8
(`check_strings`), external data entries are well formed and their files lie inside the
model's folder and are long enough (`check_external_data`); then, on the skeleton (the model
without its big tensors, `skeleton`), the tensors' stored data matches their dims
(`check_tensor_data`), the graph has outputs and inputs of a size that can be fed
(`check_interface`), and the full checker and strict shape inference pass (`check_skeleton`).
`bn_onnx.fold.validate` builds the same skeleton from onnx-ir and runs the same last three, so
every command refuses a model with the same words. Each error is one line; the full text of an
onnx error is kept as the error's `detail` (`bn-onnx --debug` shows it).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.descriptor import FieldDescriptor

from bn_onnx.errors import BnOnnxError, InputFileError, UnsupportedModelError, one_line

# Initializers up to this size stay whole in the skeleton (BN vectors, shapes and axes that
# data propagation reads); bigger ones become typed inputs.
SKELETON_KEEP_BYTES = 4096
# Tensors up to this size have their stored data length checked against their dims (reading a
# protobuf bytes field copies it; bigger ones are checked when they are read).
CHECK_BYTES = 1 << 24
# A graph input whose fixed dims need more than this cannot be fed on any machine.
MAX_INPUT_BYTES = 1 << 40
# The most one generated input (verify's probe, bench's batch, run's padded chunk) may take.
MAX_FEED_BYTES = 1 << 32

_WHOLE_NUMBER = re.compile(r"[0-9]+")
_NO_OP = re.compile(r"No Op registered for (\S+) with domain_version of (\d+)")
_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE
_TENSOR_FIELDS = onnx.TensorProto.DESCRIPTOR.fields_by_name
_NODE_FIELDS = onnx.NodeProto.DESCRIPTOR.fields_by_name


def with_detail(error: BnOnnxError, exc: BaseException) -> BnOnnxError:
    """`error`, keeping `exc`'s full text as its detail when the one line left some out."""
    text = str(exc).strip()
    if "\n" in text or len(text) > 300:
        error.detail = text
    return error


def check_strings(model: onnx.ModelProto) -> None:
    """Refuse a text field that is not UTF-8 (protobuf hands such a field over as bytes).

    Raises:
        UnsupportedModelError: naming the field, e.g. `graph.node[0].name`.
    """
    stack: list[tuple[object, str]] = [(model, "model")]
    while stack:
        msg, where = stack.pop()
        if isinstance(msg, onnx.NodeProto):  # the bulk of a model: its text fields read directly
            if any(type(v) is bytes for v in _node_text(msg)):
                fields = msg.ListFields()  # say which field
            else:
                fields = [
                    (_NODE_FIELDS[k], getattr(msg, k))
                    for k in ("attribute", "metadata_props")
                    if getattr(msg, k)
                ]
        elif isinstance(msg, onnx.TensorProto):  # ListFields would copy raw_data out
            fields = [(_TENSOR_FIELDS[k], getattr(msg, k)) for k in ("name", "doc_string")]
            if msg.external_data:
                fields.append((_TENSOR_FIELDS["external_data"], msg.external_data))
        else:
            fields = msg.ListFields()  # type: ignore[attr-defined]
        for fd, value in fields:
            if fd.type == _STRING:
                values = value if _repeated(fd) else [value]
                if any(isinstance(v, bytes) for v in values):
                    raise UnsupportedModelError(
                        f"invalid ONNX model: the text of {where}.{fd.name} is not UTF-8"
                    )
            elif fd.type == _MESSAGE:
                if _repeated(fd):
                    stack.extend((v, f"{where}.{fd.name}[{i}]") for i, v in enumerate(value))
                else:
                    stack.append((value, f"{where}.{fd.name}"))


def _node_text(node: onnx.NodeProto) -> tuple:
    return (
        node.name,
        node.op_type,
        node.domain,
        node.overload,
        node.doc_string,
        *node.input,
        *node.output,
    )


def _repeated(fd: FieldDescriptor) -> bool:
    is_repeated = getattr(fd, "is_repeated", None)  # protobuf >= 6; `label` before
    return bool(is_repeated) if is_repeated is not None else fd.label == fd.LABEL_REPEATED


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor: initializers and tensor attributes of the graph, its subgraphs and the
    model-local functions (as onnx's `external_data_helper._get_all_tensors`, faster)."""
    graphs: list[onnx.GraphProto | onnx.FunctionProto] = [model.graph, *model.functions]
    while graphs:
        g = graphs.pop()
        if isinstance(g, onnx.GraphProto):
            yield from g.initializer
        for node in g.node:
            if not node.attribute:
                continue
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("g"):
                    graphs.append(a.g)
                graphs.extend(a.graphs)


def _bits(data_type: int) -> int:
    """Bits per element of an ONNX data type (UnsupportedModelError when unknown)."""
    bits = _BITS.get(data_type)
    if bits is None:
        try:
            if data_type in _FOUR_BIT:
                bits = 4
            else:
                bits = 8 * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
        except Exception:
            raise UnsupportedModelError(f"unknown tensor data type {data_type}") from None
        _BITS[data_type] = bits
    return bits


_BITS: dict[int, int] = {}
_FOUR_BIT = {
    getattr(onnx.TensorProto, n)
    for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(onnx.TensorProto, n)
}
if hasattr(onnx.TensorProto, "INT2"):
    _BITS[onnx.TensorProto.INT2] = _BITS[onnx.TensorProto.UINT2] = 2
    _FOUR_BIT -= {onnx.TensorProto.INT2, onnx.TensorProto.UINT2}


def tensor_nbytes(tensor: onnx.TensorProto, name: str | None = None) -> int:
    """Bytes the tensor's data should take, from its dims and data type (no data read).

    Raises:
        UnsupportedModelError: a negative dim or an unknown data type.
    """
    name = tensor.name if name is None else name
    if any(d < 0 for d in tensor.dims):
        raise UnsupportedModelError(f"tensor {name!r} has a negative dimension")
    try:
        bits = _bits(tensor.data_type)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"tensor {name!r}: {exc}") from None
    return (math.prod(tensor.dims) * bits + 7) // 8


def check_tensor_data(tensor: onnx.TensorProto, name: str | None = None) -> int:
    """Refuse a tensor whose stored data does not match its dims; return its size in bytes.

    Tensors up to `CHECK_BYTES` are checked here (bigger ones fail when they are read);
    external tensors by `check_external_data`.
    """
    name = tensor.name if name is None else name
    if tensor.data_type == onnx.TensorProto.UNDEFINED:
        raise UnsupportedModelError(f"tensor {name!r} has an undefined data type")
    if tensor.data_type == onnx.TensorProto.STRING:
        return 0
    expected = tensor_nbytes(tensor, name)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return expected
    if (
        expected <= CHECK_BYTES
        and tensor.HasField("raw_data")
        and _bits(tensor.data_type) % 8 == 0
        and len(tensor.raw_data) != expected
    ):
        raise UnsupportedModelError(
            f"tensor {name!r}: {len(tensor.raw_data)} bytes of data for shape "
            f"{list(tensor.dims)} ({expected} expected)"
        )
    return expected


def _entry(tensor: onnx.TensorProto, key: str) -> str | None:
    for e in tensor.external_data:
        if e.key == key:
            return e.value
    return None


def _whole(tensor: onnx.TensorProto, key: str) -> int | None:
    text = _entry(tensor, key)
    if text is None:
        return None
    if not _WHOLE_NUMBER.fullmatch(text):
        raise InputFileError(
            f"tensor {tensor.name!r}: external data {key} {text!r} is not a whole number of bytes"
        )
    return int(text)


def check_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external data whose entries are malformed (an offset or length that is not a
    whole number, a location with a NUL byte), that points outside `base_dir`, or whose file is
    missing, short, or hard-linked (a hard link can reach any file).

    Raises:
        InputFileError: naming the tensor.
    """
    base = base_dir.resolve()
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        name = tensor.name
        location = _entry(tensor, "location") or ""
        if "\x00" in location:
            raise InputFileError(
                f"tensor {name!r}: external data location {location!r} holds a NUL byte"
            )
        offset = _whole(tensor, "offset") or 0
        length = _whole(tensor, "length")
        if not location or os.path.isabs(location):
            raise InputFileError(
                f"tensor {name!r}: external data location {location!r} must be a relative "
                "path inside the model's folder"
            )
        target = (base / location).resolve()
        if base != target and base not in target.parents:
            raise InputFileError(
                f"tensor {name!r}: external data {location!r} points outside the model's "
                f"folder {base_dir}"
            )
        if not target.is_file():
            raise InputFileError(f"tensor {name!r}: external data file missing: {target}")
        stat = target.stat()
        nbytes = 0 if tensor.data_type == onnx.TensorProto.STRING else tensor_nbytes(tensor)
        need = max(length or 0, nbytes)
        if offset + need > stat.st_size:
            raise InputFileError(
                f"tensor {name!r}: external data file {target.name} is truncated "
                f"(needs bytes {offset}..{offset + need}, has {stat.st_size})"
            )
        if stat.st_nlink > 1:
            raise InputFileError(
                f"tensor {name!r}: external data file {target.name} has {stat.st_nlink} hard "
                "links; copy it to a file of its own"
            )


def _typed_input(graph: onnx.GraphProto, tensor: onnx.TensorProto) -> None:
    vi = graph.input.add()
    vi.name = tensor.name
    tt = vi.type.tensor_type
    tt.elem_type = tensor.data_type
    tt.shape.SetInParent()
    for d in tensor.dims:
        tt.shape.dim.add().dim_value = d


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its big or external initializers (declared as typed inputs), for the
    checker and shape inference; every main-graph tensor's data is checked on the way."""
    sk = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        if model.HasField(field):
            setattr(sk, field, getattr(model, field))
    sk.opset_import.extend(model.opset_import)
    sk.functions.extend(model.functions)
    src, g = model.graph, sk.graph
    g.name = src.name or "graph"
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    listed = {vi.name for vi in src.input}
    for tensor in src.initializer:
        nbytes = check_tensor_data(tensor)
        if nbytes > SKELETON_KEEP_BYTES or tensor.data_location == onnx.TensorProto.EXTERNAL:
            if tensor.name not in listed:  # IR < 4 lists it as an input already
                _typed_input(g, tensor)
            continue
        g.initializer.append(tensor)
    for node in src.node:
        if node.op_type == "Constant" and node.domain == "":
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    check_tensor_data(attr.t, node.output[0] if node.output else "")
    g.node.extend(src.node)
    return sk


def check_interface(sk: onnx.ModelProto) -> None:
    """Refuse a graph without outputs, or an input with a negative dim or one whose fixed dims
    need more than `MAX_INPUT_BYTES`.

    Raises:
        UnsupportedModelError
    """
    g = sk.graph
    if not g.output:
        raise UnsupportedModelError("invalid ONNX model: the graph has no outputs")
    initializers = {t.name for t in g.initializer}
    for vi in (*g.input, *g.output):
        if vi.name in initializers or not vi.type.tensor_type.HasField("shape"):
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value for d in tt.shape.dim if d.HasField("dim_value")]
        kind = "input" if any(vi is i for i in g.input) else "output"
        if any(d < 0 for d in dims):
            raise UnsupportedModelError(
                f"invalid ONNX model: {kind} {vi.name!r} has a negative dim {min(dims)}"
            )
        try:
            size = math.prod(dims) * _bits(tt.elem_type) // 8 if tt.elem_type else 0
        except UnsupportedModelError:
            continue  # the checker names the type
        if kind == "input" and size > MAX_INPUT_BYTES:
            shape = "x".join(
                str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                for d in tt.shape.dim
            )
            raise UnsupportedModelError(
                f"input {vi.name!r} of dims {shape} takes {size / 2**40:.3g} TiB: no run can "
                "feed it"
            )


def check_feed_bytes(what: str, shape: tuple[int, ...], itemsize: int, hint: str) -> None:
    """Refuse to make an input of `shape` over `MAX_FEED_BYTES`, with `hint` on what to do.

    Raises:
        UsageError
    """
    from bn_onnx.errors import UsageError

    size = math.prod(shape) * itemsize
    if size > MAX_FEED_BYTES:
        dims = "x".join(map(str, shape))
        raise UsageError(
            f"{what} of dims {dims} would take {size / 2**30:.3g} GiB, over the "
            f"{MAX_FEED_BYTES / 2**30:.3g} GiB budget; {hint}"
        )


def check_skeleton(sk: onnx.ModelProto) -> onnx.ModelProto:
    """`check_interface`, then the full checker and strict shape inference on `sk`; return the
    inferred skeleton.

    Raises:
        UnsupportedModelError: `invalid ONNX model: ` and the first line of onnx's reason.
    """
    check_interface(sk)
    try:
        onnx.checker.check_model(sk)
        return onnx.shape_inference.infer_shapes(
            sk, check_type=True, strict_mode=True, data_prop=True
        )
    except RecursionError:
        raise UnsupportedModelError("invalid ONNX model: nested too deeply") from None
    except Exception as exc:  # ValidationError, InferenceError, and odd protobuf errors
        m = _NO_OP.search(str(exc))
        if m:
            raise with_detail(
                UnsupportedModelError(f"unsupported model: no op {m[1]} in opset {m[2]}"), exc
            ) from None
        raise with_detail(
            UnsupportedModelError(f"invalid ONNX model: {one_line(exc)}"), exc
        ) from None
