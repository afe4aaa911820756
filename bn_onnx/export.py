"""Checkpoint -> ONNX with torch's dynamo exporter, BatchNormalization kept (or folded on request).

`torch.onnx.export(dynamo=True, optimize=False)`: the exporter's optimizer would fuse a BN into
the Gemm before it without saying so, and the unfolded file must really hold the BN nodes, so
it is off and the result is checked. What torch 2.13 emits for an eval-mode `BatchNorm1d` is
one inference-mode `BatchNormalization` node (no training_mode, one output) with its four
parameters as initializers - except for a BN without affine parameters (the MLP's input
normalization), whose scale and bias become `Expand(CastLike(Constant), Shape(input))`
chains. Export therefore runs on a copy of the model in which such a BN has explicit weight 1
and bias 0 (the same function exactly), so every BN's parameters are plain initializers.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from bn_onnx import __version__, onnx_meta
from bn_onnx.checkpoint import CHECKPOINT_FILES, Checkpoint
from bn_onnx.columns import COLUMNS_KEY, NA_KEY, columns_to_json, feature_columns
from bn_onnx.errors import UnsupportedModelError, UsageError
from bn_onnx.files import OutputGroup, check_output_path, check_outputs, checkpoint_files
from bn_onnx.model_config import MLPConfig

if TYPE_CHECKING:
    import torch

DEFAULT_OPSET = 18
# Below 18 torch's exporter silently falls back to 18 (its function library starts there).
MIN_OPSET = 18
# torch.export specializes sizes 0 and 1, so the example batch must be larger to stay symbolic.
_EXAMPLE_BATCH = 2


@dataclass
class ExportResult:
    """What `export_checkpoint` wrote.

    Attributes:
        path: The ONNX file.
        files: Every file written (`path`, plus `path.data` for models over 2 GB).
        folded: Whether the BN nodes were folded away.
        opset: The file's default-domain opset.
        n_bn_exported: BatchNormalization nodes in torch's export (one per BN module).
        n_bn: BatchNormalization nodes left in the file written.
        op_counts: Node count per op type of the file written.
        export_seconds: Wall time of torch's exporter plus the checks.
        fold_seconds: Wall time of the fold pass (0 when not folded).
        fold_report: The fold pass's `to_dict()` when folded, else None.
    """

    path: Path
    files: list[Path]
    folded: bool
    opset: int
    n_bn_exported: int
    n_bn: int
    op_counts: dict[str, int] = field(default_factory=dict)
    export_seconds: float = 0.0
    fold_seconds: float = 0.0
    fold_report: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "path": str(self.path),
            "files": [str(f) for f in self.files],
            "folded": self.folded,
            "opset": self.opset,
            "n_bn_exported": self.n_bn_exported,
            "n_bn": self.n_bn,
            "op_counts": dict(self.op_counts),
            "export_seconds": self.export_seconds,
            "fold_seconds": self.fold_seconds,
            "fold_report": self.fold_report,
        }


def check_opset(opset: int) -> int:
    """Refuse an opset torch's exporter cannot write or onnx does not know."""
    highest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= highest:
        raise UsageError(f"opset must be a whole number from {MIN_OPSET} to {highest}, got {opset}")
    return opset


def metadata_for(config: MLPConfig, meta: dict[str, Any], *, folded: bool) -> dict[str, str]:
    """The `bn_onnx.*` metadata_props of an exported model, from its checkpoint's config.json.

    A tabular model also gets `bn_onnx.columns`, its column schema (`bn_onnx.columns`); so
    does a plain model trained from a CSV or Parquet file: its features by name, read by
    `run`, `serve` and `Predictor` from named rows (`bn_onnx.columns.feature_columns`).
    """
    values = {
        onnx_meta.PRODUCER_VERSION: __version__,
        onnx_meta.FOLDED: "true" if folded else "false",
        onnx_meta.TASK: config.task,
        onnx_meta.CONFIG: onnx_meta.json_value(config.to_dict()),
        onnx_meta.PREPROCESSING: onnx_meta.json_value(meta.get("preprocessing") or {}),
        onnx_meta.CLASS_NAMES: onnx_meta.json_value(meta.get("class_names")),
    }
    if config.tabular is not None:
        values[COLUMNS_KEY] = config.tabular.columns_json()
    elif _named_source(meta, config.in_features):
        names = meta["preprocessing"]["feature_names"]
        values[COLUMNS_KEY] = columns_to_json(feature_columns(names, onnx_meta.INPUT_NAME))
    na_values = (meta.get("dataset") or {}).get("na_values")
    if COLUMNS_KEY in values and isinstance(na_values, list):  # only when not the default
        values[NA_KEY] = onnx_meta.json_value(na_values)
    return values


def _named_source(meta: dict[str, Any], width: int) -> bool:
    """Whether a plain model was trained from a file whose header names its features."""
    dataset = meta.get("dataset") if isinstance(meta.get("dataset"), dict) else {}
    names = (meta.get("preprocessing") or {}).get("feature_names")
    return (
        dataset.get("source") in ("csv", "parquet")
        and isinstance(names, list)
        and len(names) == len(set(map(str, names))) == width
    )


def _inference_copy(model: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """An eval-mode copy of `model` in which every BN is a BatchNorm1d with explicit parameters.

    Returns the copy and its number of BN modules. SyncBatchNorm (from distributed training)
    becomes BatchNorm1d; a BN without affine parameters gets weight 1 and bias 0, so that the
    exporter writes its scale and bias as initializers instead of shape-dependent subgraphs.
    """
    import torch
    from torch import nn

    clone = copy.deepcopy(model).eval()
    n_bn = 0
    for parent in list(clone.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.modules.batchnorm._BatchNorm):
                continue
            n_bn += 1
            if type(child) is nn.BatchNorm1d and child.affine:
                continue
            if not isinstance(child, (nn.BatchNorm1d, nn.SyncBatchNorm)):
                continue  # BatchNorm2d/3d: not an MLP layer; exported as torch writes it
            if not child.track_running_stats or child.running_mean is None:
                raise UnsupportedModelError(
                    f"batch norm {name!r} keeps no running statistics, so it has no inference form"
                )
            bn = nn.BatchNorm1d(child.num_features, eps=child.eps, affine=True)
            with torch.no_grad():
                bn.running_mean.copy_(child.running_mean)
                bn.running_var.copy_(child.running_var)
                if child.affine:
                    bn.weight.copy_(child.weight)
                    bn.bias.copy_(child.bias)
                else:
                    bn.weight.fill_(1.0)
                    bn.bias.zero_()
            setattr(parent, name, bn.eval())
    return clone, n_bn


@contextlib.contextmanager
def _quiet_torch_exporter() -> Iterator[None]:
    """Silence torch's exporter chatter (torchvision notices, deprecation warnings)."""
    loggers = [
        logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")
    ]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


_REGISTRY_CACHE: dict[int, Any] = {}


@contextlib.contextmanager
def _reuse_torchlib_registry() -> Iterator[None]:
    """Build torch's aten->ONNX registry once per process and opset instead of per export.

    torch rebuilds it on every `torch.onnx.export` call by parsing the source of ~500
    onnxscript functions (about 2 s, more than the rest of a small MLP's export). This patches
    a private torch classmethod for the duration of one export; if torch's internals differ,
    the export runs unpatched. Not thread-safe: export from one thread at a time.
    """
    try:
        from torch.onnx._internal.exporter import _registration

        original = _registration.ONNXRegistry.__dict__["from_torchlib"]
        build = original.__func__
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def cached(cls: type, opset_version: int = DEFAULT_OPSET) -> Any:
        if opset_version not in _REGISTRY_CACHE:
            _REGISTRY_CACHE[opset_version] = build(cls, opset_version=opset_version)
        return _REGISTRY_CACHE[opset_version]

    _registration.ONNXRegistry.from_torchlib = classmethod(cached)
    try:
        yield
    finally:
        _registration.ONNXRegistry.from_torchlib = original


def check_inference_bn(model: onnx.ModelProto, expected: int) -> None:
    """Raise unless `model` holds `expected` inference-mode BN nodes with constant parameters.

    This is the guarantee of an unfolded export: a file whose BN was fused, decomposed into
    arithmetic, or left in training form is refused rather than written.
    """
    nodes = onnx_meta.bn_nodes(model)
    if len(nodes) != expected:
        raise UnsupportedModelError(
            f"torch's exporter wrote {len(nodes)} BatchNormalization node(s) for {expected} "
            "batch-norm layer(s); the unfolded file must keep every one"
        )
    initializers = {t.name for t in model.graph.initializer}
    for node in nodes:
        if onnx_meta.bn_training_mode(node) != 0 or len([o for o in node.output if o]) != 1:
            raise UnsupportedModelError(
                f"torch's exporter wrote BatchNormalization {node.name!r} in training form"
            )
        missing = [name for name in node.input[1:5] if name not in initializers]
        if missing:
            raise UnsupportedModelError(
                f"BatchNormalization {node.name!r}: parameter {missing[0]!r} is not an initializer"
            )


def _export_torch(
    model: torch.nn.Module,
    examples: tuple[torch.Tensor, ...],
    input_names: list[str],
    task: str,
    opset: int,
    *,
    varargs: bool = False,
) -> onnx.ModelProto:
    """torch's dynamo export of an eval copy of `model`, every BN kept and checked.

    Each input has a symbolic batch axis 0; the output is `logits` or `prediction` by `task`.
    `varargs`: the model's forward takes `*inputs` (torch.export then wants the inputs'
    dynamic shapes as one tuple).
    """
    import torch

    check_opset(opset)
    if task not in onnx_meta.OUTPUT_NAMES:
        raise UsageError(f"task must be classification or regression, got {task!r}")
    clone, n_bn = _inference_copy(model)
    batch = torch.export.Dim("batch")
    shapes = tuple({0: batch} for _ in examples)
    with _quiet_torch_exporter(), _reuse_torchlib_registry(), torch.no_grad():
        program = torch.onnx.export(
            clone,
            examples,
            dynamo=True,
            optimize=False,
            input_names=input_names,
            output_names=[onnx_meta.OUTPUT_NAMES[task]],
            dynamic_shapes=(shapes,) if varargs else shapes,
            opset_version=opset,
            verbose=False,
        )
    proto = program.model_proto
    written = {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")}
    if written != {opset}:
        raise UnsupportedModelError(f"torch's exporter wrote opset {written}, not {opset}")
    check_inference_bn(proto, n_bn)
    strip_stack_traces(proto)
    return proto


def to_onnx(
    model: torch.nn.Module,
    in_features: int,
    *,
    task: str = "classification",
    metadata: dict[str, str] | None = None,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """Export an eval-mode `[batch, in_features] -> [batch, K]` model to an unfolded ONNX model.

    The input is `input` (float32, symbolic batch), the output `logits` or `prediction` by
    `task`; every BN module becomes one inference-mode BatchNormalization node (checked).
    `metadata` entries are added to metadata_props. The model is checked with
    `onnx.checker.check_model(full_check=True)` when it is under protobuf's 2 GB limit.
    """
    import torch

    example = torch.zeros(_EXAMPLE_BATCH, in_features, dtype=torch.float32)
    proto = _export_torch(model, (example,), [onnx_meta.INPUT_NAME], task, opset)
    if metadata:
        onnx_meta.set_metadata(proto, metadata)
    check_model(proto)
    return proto


def tabular_to_onnx(
    model: torch.nn.Module,
    config: MLPConfig,
    *,
    metadata: dict[str, str] | None = None,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """Export a `TabularMLP` to one unfolded ONNX model that takes the raw columns.

    torch exports the network from its `numeric` and `codes` inputs; `bn_onnx.tabular_graph`
    then puts the fill, indicators and category lookup in front, so the file's inputs are
    `continuous` float32 [batch, k] (NaN = missing) and `categorical` string [batch, m]
    ("" = missing), each present when the model has such columns (`bn_onnx.columns`). The
    embeddings are Gather nodes, the input normalization one BatchNormalization node before
    the first Gemm. Checked with `onnx.checker.check_model(full_check=True)`.
    """
    import torch

    from bn_onnx.tabular import NUMERIC_INPUT
    from bn_onnx.tabular_graph import add_preprocessing

    spec = config.tabular
    if spec is None:
        raise UsageError("tabular_to_onnx needs a model config with tabular columns")
    examples = tuple(
        torch.zeros(_EXAMPLE_BATCH, spec.n_numeric, dtype=torch.float32)
        if name == NUMERIC_INPUT
        else torch.zeros(_EXAMPLE_BATCH, spec.n_categorical, dtype=torch.int64)
        for name in spec.model_input_names
    )
    proto = _export_torch(model, examples, spec.model_input_names, config.task, opset, varargs=True)
    proto = add_preprocessing(proto, spec)
    if metadata:
        onnx_meta.set_metadata(proto, metadata)
    check_model(proto)
    return proto


# torch records each node's Python stack trace, with the build machine's absolute file paths:
# they leak into shipped files and make the bytes depend on where the checkout lies.
_STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def strip_stack_traces(model: onnx.ModelProto) -> None:
    """Drop torch's per-node stack-trace metadata (absolute source paths) in place."""
    graphs = [model.graph, *(f for f in model.functions)]
    for graph in graphs:
        for node in graph.node:
            keep = [p for p in node.metadata_props if p.key != _STACK_TRACE_KEY]
            if len(keep) != len(node.metadata_props):
                del node.metadata_props[:]
                node.metadata_props.extend(keep)


def check_model(model: onnx.ModelProto) -> None:
    """`onnx.checker.check_model(full_check=True)`, skipped above protobuf's 2 GB limit.

    Such a model is checked from its file instead (see `export_checkpoint`).
    """
    from bn_onnx.onnx_io import EXTERNAL_DATA_THRESHOLD, tensor_bytes

    if tensor_bytes(model) <= EXTERNAL_DATA_THRESHOLD:
        onnx.checker.check_model(model, full_check=True)


def fold_exported(
    model: onnx.ModelProto, *, cleanup: bool = True
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Fold every BN of an exported model with `bn_onnx.fold`, then clean it (unless `cleanup`
    is False: see `bn_onnx.fold.fold_model`); return it and the fold report.

    Raises `UnsupportedModelError` if any BN is left: in an MLP export every one is foldable.
    """
    from bn_onnx.fold import fold_model

    result = fold_model(model, cleanup=cleanup)
    left = onnx_meta.bn_nodes(result.model)
    if left:
        reasons = "; ".join(f"{e.node}: {e.reason}" for e in result.report.left)
        raise UnsupportedModelError(
            f"the fold pass left {len(left)} BatchNormalization node(s)"
            + (f" ({reasons})" if reasons else "")
        )
    report = result.report.to_dict()
    folded = result.model
    onnx_meta.set_metadata(folded, {onnx_meta.FOLDED: "true"})
    check_model(folded)
    return folded, report


def _load_checkpoint(ckpt_dir: str | os.PathLike[str]) -> tuple[torch.nn.Module, Checkpoint]:
    from bn_onnx.checkpoint import load_model, read_checkpoint

    # The numpy-only read first: a bad checkpoint is refused before torch is imported.
    read_checkpoint(ckpt_dir)
    return load_model(ckpt_dir)


def export_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    fold: bool = False,
    opset: int = DEFAULT_OPSET,
    on_start: Callable[[str], None] | None = None,
    cleanup: bool = True,
) -> ExportResult:
    """Export a checkpoint directory to one ONNX file, atomically; optionally fold its BN.

    Args:
        ckpt_dir: A checkpoint written by `bn-onnx train` / `save_checkpoint`.
        out_path: The `.onnx` file to write; its folder must exist. Models above 2 GB get
            their tensors in `<out_path>.data` beside it.
        fold: Fold every BN into its neighbouring Gemm (the input normalization into the first
            one), so that no BatchNormalization node remains.
        opset: Default-domain opset, 18 or newer.
        on_start: Called with a short description once the inputs are checked and the
            (slow) torch export begins; the CLI uses it to show progress.
        cleanup: With `fold`, also fold the constants the exporter left and remove dead code
            (`bn_onnx.fold.cleanup`); no effect without `fold`.

    Raises:
        CheckpointError: the checkpoint is missing or corrupt.
        InputFileError, UsageError: the output path cannot be written or is part of the
            checkpoint; a bad opset.
    """
    check_opset(opset)
    ckpt_root = Path(ckpt_dir)
    out = check_output_path(out_path)
    check_outputs(
        [("output", out), ("the output's external data", out.parent / (out.name + ".data"))],
        lambda: checkpoint_files(ckpt_root, CHECKPOINT_FILES),
    )
    model, ckpt = _load_checkpoint(ckpt_root)
    if on_start is not None:
        on_start(
            f"exporting {ckpt_root} with torch.onnx (dynamo)" + (", then folding" if fold else "")
        )
    start = time.perf_counter()
    metadata = metadata_for(ckpt.config, ckpt.meta, folded=False)
    if ckpt.config.tabular is not None:
        proto = tabular_to_onnx(model, ckpt.config, metadata=metadata, opset=opset)
    else:
        proto = to_onnx(
            model, ckpt.config.in_features, task=ckpt.config.task, metadata=metadata, opset=opset
        )
    n_bn_exported = len(onnx_meta.bn_nodes(proto))
    export_seconds = time.perf_counter() - start
    fold_seconds = 0.0
    report = None
    if fold:
        start = time.perf_counter()
        proto, report = fold_exported(proto, cleanup=cleanup)
        fold_seconds = time.perf_counter() - start
    files = save_checked(proto, out)
    return ExportResult(
        path=out,
        files=files,
        folded=fold,
        opset=opset,
        n_bn_exported=n_bn_exported,
        n_bn=len(onnx_meta.bn_nodes(proto)),
        op_counts=onnx_meta.op_counts(proto),
        export_seconds=export_seconds,
        fold_seconds=fold_seconds,
        fold_report=report,
    )


def save_checked(model: onnx.ModelProto, out: Path, group: OutputGroup | None = None) -> list[Path]:
    """Save atomically as one file, or with external data above 2 GB (checked from disk first,
    in the temporary folder the files are staged in); `group` as in `onnx_io.save_model`."""
    from bn_onnx.onnx_io import EXTERNAL_DATA_THRESHOLD, save_model, tensor_bytes

    if group is None:
        with OutputGroup() as own:
            return save_checked(model, out, own)
    if tensor_bytes(model) <= EXTERNAL_DATA_THRESHOLD:
        return save_model(model, out, external_data=False, group=group)
    files = save_model(model, out, external_data=True, group=group)
    onnx.checker.check_model(str(group.staged(out)), full_check=True)
    return files
