"""Loading and saving ONNX files with one-line errors, safe external data and atomic writes."""

from __future__ import annotations

import math
import os
from pathlib import Path

import onnx
from onnx import TensorProto, external_data_helper, helper

from bn_onnx.errors import InputFileError
from bn_onnx.files import OutputGroup, check_input_file, check_not_linked_with_data

_FIXED_SIZE_TYPES = {
    dtype: helper.tensor_dtype_to_np_dtype(dtype).itemsize
    for dtype in helper.get_all_tensor_dtypes()
    if dtype not in (TensorProto.STRING, TensorProto.UNDEFINED)
    and helper.tensor_dtype_to_np_dtype(dtype).itemsize > 0
}

# protobuf cannot serialize a message over 2 GiB; stay clear of it with some headroom.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [
        t
        for t in external_data_helper._get_all_tensors(model)
        if external_data_helper.uses_external_data(t)
    ]


# Files checked in full in this process: (path, device, inode, size, mtime) -> True.
_CHECKED: set[tuple[str, int, int, int, int]] = set()


def _file_key(p: Path) -> tuple[str, int, int, int, int]:
    st = p.stat()
    return (str(p.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def open_model(path: str | os.PathLike[str], *, check: bool = True) -> onnx.ModelProto:
    """Read an ONNX file (external data not loaded) and check it: the one loader of every
    command.

    Always: the file is a readable ModelProto with a graph, IR version and opset; its text
    fields are UTF-8; its external data entries are well formed and their files lie inside the
    model's folder and are long enough (`bn_onnx.onnx_check`). With `check` (every command
    but fold and inspect, whose fold pass runs the same checks on onnx-ir in
    `bn_onnx.fold.validate`): tensor data agrees with its dims, the graph has outputs and
    feedable inputs, and the full checker and strict shape inference pass. A file checked
    once in this process is not checked again.

    Raises:
        InputFileError, UnsupportedModelError: one line naming what is wrong.
    """
    from bn_onnx import onnx_check

    p = check_input_file(path, "model file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-ish types, OSError
        raise InputFileError(f"not a readable ONNX model: {p} ({type(exc).__name__})") from None
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise InputFileError(f"not an ONNX model (no graph, IR version or opset): {p}")
    key = _file_key(p)
    if key in _CHECKED:
        return model
    onnx_check.check_strings(model)
    onnx_check.check_external_data(model, p.parent)
    if check:
        onnx_check.check_skeleton(onnx_check.skeleton(model))
        _CHECKED.add(key)
    return model


def load_model(
    path: str | os.PathLike[str], *, load_external_data: bool = True, check: bool = True
) -> onnx.ModelProto:
    """Load and check an ONNX model (`open_model`), with its external data unless told not to.

    Raises:
        InputFileError, UnsupportedModelError: one line naming what is wrong.
    """
    model = open_model(path, check=check)
    if load_external_data and _external_tensors(model):
        try:
            external_data_helper.load_external_data_for_model(model, str(Path(path).parent))
        except Exception as exc:
            raise InputFileError(f"cannot read external data of {path}: {exc}") from None
    return model


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by the model's tensors (initializers, Constant attributes, subgraphs)."""
    total = 0
    for t in external_data_helper._get_all_tensors(model):
        # From dims, not len(raw_data): reading raw_data copies the bytes out of protobuf.
        if t.data_type in _FIXED_SIZE_TYPES and not external_data_helper.uses_external_data(t):
            total += math.prod(t.dims) * _FIXED_SIZE_TYPES[t.data_type]
        else:
            total += t.ByteSize()
    return total


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    group: OutputGroup | None = None,
) -> list[Path]:
    """Write `model` to `path` atomically; return the files written.

    `external_data=None` writes one file unless the tensors approach protobuf's 2 GiB limit, in
    which case they go to `<name>.data` beside it. With external data the model proto is
    modified in place (its tensors become references), which saves a copy of the weights.
    `group`: the command's `OutputGroup`, which renames the files when all its outputs are
    written (with external data they are staged under a name, `group.staged(path)`); without
    one they are renamed before this returns.

    Raises:
        OutputFileError: the files cannot be written; nothing is left behind.
    """
    if group is None:
        with OutputGroup() as own:
            return save_model(model, path, external_data=external_data, group=own)
    p = Path(path)
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if not external_data:
        with group.open(p) as f:
            f.write(model.SerializeToString())
        return [p]
    check_not_linked_with_data(p)
    data_name = p.name + ".data"
    tmp_dir = group.folder(p)
    onnx.save_model(
        model,
        str(tmp_dir / p.name),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )
    # (tensors under 1 KB stay inline, so the data file may not exist)
    return [p, *([p.parent / data_name] if (tmp_dir / data_name).exists() else [])]
