"""`fold_file`: load with onnx-ir, fold, save tensor by tensor, atomically.

External data is memory-mapped by onnx-ir, and read only from inside the model's folder: a
location that escapes it, a missing or short data file, is refused before anything is read.
Tensors the fold does not rewrite stay mapped until they are written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx_ir as ir

from bn_onnx.errors import InputFileError, one_line
from bn_onnx.files import OutputGroup, check_not_linked_with_data
from bn_onnx.fold._pass import fold_in_place, quiet_onnx_ir
from bn_onnx.fold.report import FoldReport
from bn_onnx.fold.validate import InvalidModelError
from bn_onnx.onnx_io import EXTERNAL_DATA_THRESHOLD

# With external data, tensors of more than this many bytes go to the data file.
EXTERNAL_SIZE_THRESHOLD = 1024


def _all_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every tensor of the model: initializers and tensor attributes, subgraphs included."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
    for node in _nodes(model):
        for attr in node.attributes.values():
            if attr.is_ref() or attr.value is None:
                continue
            if attr.type == ir.AttributeType.TENSOR:
                yield attr.value
            elif attr.type == ir.AttributeType.TENSORS:
                yield from attr.value


def _nodes(model: ir.Model) -> list[ir.Node]:
    """Every node of the model: main graph, subgraphs, functions."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    for function in model.functions.values():
        nodes.extend(ir.traversal.RecursiveGraphIterator(function))
    return nodes


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Load an ONNX file with onnx-ir (external data memory-mapped), with one-line errors.

    The file is read and checked by the one loader of every command
    (`bn_onnx.onnx_io.open_model`: text fields, external data entries and files); the checker
    and shape inference run in the fold pass (`bn_onnx.fold.validate`).

    Raises:
        InputFileError, UnsupportedModelError: missing, empty, unreadable or non-ONNX file;
            unsafe, malformed, missing or truncated external data; text that is not UTF-8.
    """
    from bn_onnx.onnx_io import open_model

    proto = open_model(path, check=False)
    try:
        with quiet_onnx_ir():
            model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx-ir's own errors
        raise InvalidModelError(f"invalid ONNX model: {one_line(exc)}") from None
    ir.external_data.set_base_dir(model.graph, os.path.dirname(os.path.abspath(path)))
    return model


def tensor_bytes(model: ir.Model) -> int:
    """Bytes of the model's tensors, from their dims (no data is read); a tensor of no known
    size (an undefined data type: the fold pass's validation refuses it) counts 0."""
    total = 0
    for t in _all_tensors(model):
        try:
            total += t.nbytes
        except (TypeError, ValueError):
            continue
    return total


def save_model(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    release: bool = False,
    group: OutputGroup | None = None,
    named: bool = False,
) -> list[Path]:
    """Write `model` to `path` with `onnx_ir.save`, atomically; return the files written.

    `external_data=None` writes one file unless the tensors approach protobuf's 2 GiB limit,
    in which case the tensors of at least 1 kB go to `<name>.data` beside it. The model is
    not changed (tensors mapped from the input's data file stay mapped), unless `release`:
    then the caller is done with it, and a one-file save drops its tensors once they are
    serialized (see `_save_one_file`).

    `group`: the command's `OutputGroup`, which renames the files when all its outputs are
    written (without one the files are renamed before this returns); `named`: stage the
    files under a name (`group.staged(path)`) so that the caller can read them before that.

    Raises:
        InputFileError: an external tensor of the input cannot be read.
        OutputFileError: the files cannot be written (read-only folder, no space, EIO).
    """
    from bn_onnx.files import OutputGroup

    if group is None:
        with OutputGroup() as own:
            return save_model(
                model, path, external_data=external_data, release=release, group=own, named=named
            )
    p = Path(path)
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    try:
        with quiet_onnx_ir():
            if not external_data:
                _save_one_file(model, p, release=release, group=group, named=named)
                return [p]
            check_not_linked_with_data(p)
            data_name = p.name + ".data"
            # The data file has a fixed name relative to the model: both are written in a
            # temporary folder, and the group moves the data file before the model.
            ir.save(
                model,
                group.folder(p) / p.name,
                external_data=data_name,
                size_threshold_bytes=EXTERNAL_SIZE_THRESHOLD,
            )
            return [p, p.parent / data_name]
    except ValueError as exc:  # onnx-ir refused to read an external tensor
        raise InputFileError(f"cannot write {p}: {one_line(exc)}") from None


def _save_one_file(
    model: ir.Model, path: Path, *, release: bool, group: OutputGroup, named: bool
) -> None:
    """Write `model` as one protobuf file into `group` (what `onnx_ir.save` does without
    external data: serialize, then write the bytes).

    `release`: the caller is done with `model`; its tensors (the input's protobuf message, the
    rewritten weights) are dropped once serialized, before the file's bytes are made, so the
    save holds two copies of the weights, not three or four.
    """
    with quiet_onnx_ir(), _in_memory(model):
        proto = ir.serde.serialize_model(model)
    if release:
        _release_tensors(model)
    data = proto.SerializeToString()
    del proto
    if named:
        (group.folder(path) / path.name).write_bytes(data)
    else:
        with group.open(path) as f:
            f.write(data)


def _release_tensors(model: ir.Model) -> None:
    """Drop every tensor of `model` (which becomes unusable): initializers and tensor
    attributes. The input's protobuf message lives as long as one of its tensors does."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            value.const_value = None
    for node in _nodes(model):
        for key in [k for k, a in node.attributes.items() if _holds_tensor(a)]:
            del node.attributes[key]


def _holds_tensor(attr: ir.Attr) -> bool:
    return not attr.is_ref() and attr.type in (
        ir.AttributeType.TENSOR,
        ir.AttributeType.TENSORS,
    )


@contextlib.contextmanager
def _in_memory(model: ir.Model) -> Iterator[None]:
    """For a one-file save: external tensors are given as (memory-mapped) arrays, so that
    `ir.save` writes their bytes into the file instead of a reference to the input's data
    file. The model is restored afterwards."""
    values: list[tuple[ir.Value, ir.TensorProtocol]] = []
    attrs: list[tuple[ir.Node, ir.Attr]] = []
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                values.append((value, tensor))
                value.const_value = _loaded(tensor)
    for node in _nodes(model):
        for key, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                attrs.append((node, attr))
                node.attributes[key] = ir.AttrTensor(key, _loaded(attr.value))
    try:
        yield
    finally:
        for value, tensor in values:
            value.const_value = tensor
        for node, attr in attrs:
            node.attributes[attr.name] = attr


def _loaded(tensor: ir.ExternalTensor) -> ir.Tensor:
    return ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name)


@dataclasses.dataclass(frozen=True)
class FoldOptions:
    """How `fold_file` folds and writes, made once (the CLI: from its arguments) and passed as
    keywords: `fold_file(src, dst, **options.keywords())`.

    Attributes:
        report_path: write the fold report there as JSON (None: no report file).
        in_place: allow the output to be the input (still written atomically).
        external_data: True: the weights go to OUT.data; False: one file; None: only when the
            model nears protobuf's 2 GB limit.
        cleanup: clean the model after the fold (`bn_onnx.fold.cleanup`).
    """

    report_path: str | os.PathLike[str] | None = None
    in_place: bool = False
    external_data: bool | None = None
    cleanup: bool = True

    def keywords(self) -> dict[str, object]:
        """The options as `fold_file`'s keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def fold_file(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    report_path: str | os.PathLike[str] | None = None,
    in_place: bool = False,
    external_data: bool | None = None,
    progress: Callable[[str], None] | None = None,
    cleanup: bool = True,
    group: OutputGroup | None = None,
) -> FoldReport:
    """Fold the model at `in_path` and write it to `out_path` (atomically), with its report.

    After the fold the model is cleaned (`bn_onnx.fold.cleanup`: constants the exporter left,
    dead code, duplicate initializers) unless `cleanup` is False.

    External data is read only from inside the model's folder; the output is one file unless
    `external_data` is True or it nears protobuf's 2 GB limit. No output may be a file the
    fold reads (the model, any of its external-data files), or another output; `in_place`
    allows `out_path` (and its data file) to be the input's. `progress` is called with the
    stage ("loading", "folding", "writing") as each one starts.

    `group`: write into the caller's `OutputGroup` (the files appear when it commits; the
    model is staged under a name, `group.staged(out_path)`); without one, the model and the
    report are renamed into place together before this returns.

    Raises:
        InputFileError, UsageError, UnsupportedModelError: bad input or paths (one line).
        OutputFileError: an output cannot be written; nothing is left behind.
    """
    from bn_onnx.files import OutputGroup, check_output_path, check_outputs, model_files

    step = progress or (lambda stage: None)
    src = Path(in_path)
    out = check_output_path(out_path)
    outputs: list[tuple[str, str | os.PathLike[str]]] = [("output", out)]
    if report_path is not None:
        outputs.append(("--report", check_output_path(report_path)))
    may_replace = ("output", "the output's external data") if in_place else ()
    check_outputs(outputs, [("the input model", src)], may_replace=may_replace, in_place_hint=True)
    step("loading")
    model = load_model(src)
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if external_data:
        check_not_linked_with_data(out)
        outputs.insert(1, ("the output's external data", out.parent / (out.name + ".data")))
    locations = {
        os.fspath(t.location) for t in _all_tensors(model) if isinstance(t, ir.ExternalTensor)
    }
    check_outputs(outputs, model_files(src, sorted(locations)), may_replace=may_replace)
    step("folding")
    report = fold_in_place(model, cleanup=cleanup, reload=lambda: load_model(src))
    step("writing")
    with contextlib.nullcontext(group) if group is not None else OutputGroup() as g:
        save_model(
            model, out, external_data=external_data, release=True, group=g, named=group is not None
        )
        del model
        if report_path is not None:
            with g.open(report_path, "w") as f:
                f.write(report.to_json() + "\n")
    return report
