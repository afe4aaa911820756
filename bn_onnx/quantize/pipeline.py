"""Fold, pre-process and quantize a float model to INT8 (QDQ) with onnxruntime's quantizer.

1. The quantization-aware fold (`bn_onnx.fold.fold_model` with `max_row_range_growth`): every
   BN that folds without widening a weight's per-channel range past the bound.
2. The pre-process, without `quant_pre_process`'s symbolic shape inference (which fails on
   torch's dynamo exports): onnx shape inference, then onnxruntime's basic-level graph
   optimizations (constant folding, redundant nodes, Conv+Add/Mul fusions) saved with
   `optimized_model_filepath`.
3. `onnxruntime.quantization.quantize_static`: QDQ format, per-channel weights, MinMax
   calibration on the given feeds; BatchNormalization nodes the fold left, and the nodes
   computing their input, are excluded (`float_nodes`): they run in float.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from bn_onnx.errors import UnsupportedModelError, one_line
from bn_onnx.fold import FoldReport, fold_model
from bn_onnx.quantize.kernels import Kernels

# The bound of the quantization-aware fold, measured (tools/bench_quantize.py, docs/performance.md):
# on the shipped digits MLP the input normalization's forward fold widens the first Gemm's
# range 2.73x and costs 19 dB of SQNR (test accuracy 0.963, 0.804 with reduce_range, against
# 0.978 kept); on a Conv-ReLU-BN-Conv1x1 net a 1.65x fold costs nothing (32.8 dB either way)
# while the BN kept in float costs latency. 2.0 keeps the first and folds the second.
DEFAULT_MAX_GROWTH = 2.0
# Calibration feeds are handed to the quantizer in batches of this many rows.
CALIBRATION_BATCH = 256
QUANTIZED_META = "bn_onnx.quantized"
# Above this the float model needs external data, which the pipeline does not handle yet.
MAX_BYTES = 1 << 30
LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclasses.dataclass
class QuantizeResult:
    """The INT8 model and what was done.

    Attributes:
        model: the QDQ model (weights int8/uint8 per channel, activations uint8).
        fold_report: the quantization-aware fold's report (BNs folded and left, with reasons).
        kernels: the kernels quantized for.
        excluded: nodes kept out of quantization (`float_nodes`), by name.
    """

    model: onnx.ModelProto
    fold_report: FoldReport
    kernels: Kernels
    excluded: list[str]


def batches(feeds: Mapping[str, np.ndarray], rows: int = CALIBRATION_BATCH) -> list[dict]:
    """Split feeds (input name -> array, rows first) into batches of `rows` rows."""
    n = len(next(iter(feeds.values())))
    return [{k: np.asarray(v[i : i + rows]) for k, v in feeds.items()} for i in range(0, n, rows)]


def _reader(feeds: Sequence[Mapping[str, np.ndarray]]) -> object:
    from onnxruntime.quantization import CalibrationDataReader

    class FeedsReader(CalibrationDataReader):
        """The calibration batches, once each."""

        def __init__(self) -> None:
            self._it: Iterator[Mapping[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> dict | None:
            return dict(next(self._it, None) or {}) or None

        def rewind(self) -> None:
            self._it = iter(feeds)

    return FeedsReader()


def preprocess(model: onnx.ModelProto, path: Path) -> None:
    """Write `model` to `path` after onnx shape inference and onnxruntime's basic graph
    optimizations (the pre-process the quantizer expects, without symbolic shape inference).

    Raises:
        UnsupportedModelError: onnxruntime cannot load the model.
    """
    import onnxruntime as ort

    with contextlib.suppress(Exception):  # shapes help the quantizer but are not needed
        model = onnx.shape_inference.infer_shapes(model)
    raw = path.with_suffix(".raw.onnx")
    onnx.save_model(model, raw)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(path)
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(str(raw), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        line = one_line(exc)
        raise UnsupportedModelError(f"onnxruntime cannot load the model: {line}") from None


def static_settings(kernels: Kernels) -> dict[str, object]:
    """`quantize_static`'s settings for `kernels`: QDQ, per-channel weights, MinMax, uint8
    activations, int8 (or uint8 with `--accurate`) weights, reduce_range as chosen for the CPU.
    `tools/bench_quantize.py` gives onnxruntime's own flow the same ones."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    return {
        "quant_format": QuantFormat.QDQ,
        "per_channel": True,
        "reduce_range": kernels.reduce_range,
        "activation_type": QuantType.QUInt8,
        "weight_type": QuantType.QInt8 if kernels.weight_signed else QuantType.QUInt8,
        "calibrate_method": CalibrationMethod.MinMax,
    }


def float_nodes(graph: onnx.GraphProto) -> list[str]:
    """The nodes kept out of quantization: every BatchNormalization the fold left and the
    nodes that compute its input up to a linear node (a tabular model's fill, lookups,
    embeddings and Concat: one per-tensor scale over incomes and embeddings would erase the
    embeddings; the BN normalizes them in float and its output gets the scale). A Relu right
    after a linear node stays quantized: onnxruntime fuses it into that node's QDQ group,
    which then quantizes [0, max] instead of the full signed range (measured: keeping it in
    float cost 0.8-1.4 dB on the corpus's audio_conv1d)."""
    producer = {o: n for n in graph.node for o in n.output}
    kept = [n for n in graph.node if n.op_type == "BatchNormalization"]
    names = [n.name for n in kept]
    todo = [n.input[0] for n in kept if n.input]
    seen: set[str] = set()
    while todo:
        value = todo.pop()
        node = producer.get(value)
        if node is None or node.name in seen or node.op_type in LINEAR_OPS:
            continue
        before = producer.get(node.input[0]) if node.input else None
        if node.op_type == "Relu" and before is not None and before.op_type in LINEAR_OPS:
            continue
        seen.add(node.name)
        names.append(node.name)
        todo.extend(x for x in node.input if x)
    return names


def check_not_quantized(model: onnx.ModelProto) -> None:
    """Refuse a model that is quantized already: `bn_onnx.quantized` metadata, a
    QuantizeLinear (activations in INT8) or a QLinear*/*Integer op. Weights alone behind a
    DequantizeLinear (a QAT export) are float activations and may be quantized.

    Raises:
        UnsupportedModelError: one line naming what was found.
    """
    meta = {p.key for p in model.metadata_props}
    ops = {n.op_type for n in model.graph.node}
    found = sorted(
        op
        for op in ops
        if op == "QuantizeLinear" or op.startswith("QLinear") or op.endswith("Integer")
    )
    if QUANTIZED_META in meta or found:
        why = f"{QUANTIZED_META} metadata" if QUANTIZED_META in meta else ", ".join(found)
        raise UnsupportedModelError(
            f"the model is already quantized ({why}); quantize the float model instead"
        )


def quantize_model(
    model: onnx.ModelProto,
    calibration: Sequence[Mapping[str, np.ndarray]],
    kernels: Kernels,
    *,
    max_row_range_growth: float | None = DEFAULT_MAX_GROWTH,
) -> QuantizeResult:
    """Fold, pre-process and quantize `model` (not changed) to a QDQ INT8 model.

    Args:
        model: a float model.
        calibration: batches of feeds (input name -> array) for MinMax calibration.
        kernels: the activation and weight types and reduce_range (`choose_kernels`).
        max_row_range_growth: the quantization-aware fold's bound (None: fold every BN).

    Raises:
        UnsupportedModelError: the model is quantized already, is not valid ONNX, its
            tensors exceed 1 GiB, onnxruntime cannot load it, or the quantizer fails on it.
    """
    from onnxruntime.quantization import quantize_static

    from bn_onnx.onnx_io import tensor_bytes

    if not calibration:
        raise UnsupportedModelError("no calibration data")
    check_not_quantized(model)
    if tensor_bytes(model) > MAX_BYTES:
        raise UnsupportedModelError(
            f"the model's tensors take {tensor_bytes(model):,} bytes: quantizing models near"
            " 2 GB (external data) is not supported yet"
        )
    folded = fold_model(model, max_row_range_growth=max_row_range_growth)
    with tempfile.TemporaryDirectory(prefix="bn-onnx-quantize-") as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        preprocess(folded.model, pre)
        excluded = float_nodes(onnx.load(pre).graph)
        logger = logging.getLogger()
        level = logger.level
        logger.setLevel(logging.ERROR)  # the quantizer logs advice at WARNING
        try:
            quantize_static(
                pre,
                out,
                _reader(calibration),
                nodes_to_exclude=excluded,
                **static_settings(kernels),
            )
        except Exception as exc:  # noqa: BLE001 - the quantizer raises many types
            line = one_line(exc)
            raise UnsupportedModelError(f"onnxruntime's quantizer failed: {line}") from None
        finally:
            logger.setLevel(level)
        q = onnx.load(out)
    _carry_metadata(folded.model, q, kernels)
    try:
        onnx.checker.check_model(q, full_check=True)
    except onnx.checker.ValidationError as exc:
        line = one_line(exc)
        raise UnsupportedModelError(f"the quantized model fails the checker: {line}") from None
    return QuantizeResult(model=q, fold_report=folded.report, kernels=kernels, excluded=excluded)


def _carry_metadata(src: onnx.ModelProto, dst: onnx.ModelProto, kernels: Kernels) -> None:
    """The float model's metadata props (class names, config, folded flag) on the INT8
    model, and `bn_onnx.quantized` with the kernels."""
    from bn_onnx.onnx_meta import get_metadata, set_metadata

    props = get_metadata(src)
    props[QUANTIZED_META] = json.dumps(
        {"format": "QDQ", "kernels": kernels.name, "reduce_range": kernels.reduce_range}
    )
    del dst.metadata_props[:]
    set_metadata(dst, props)
    dst.producer_name = src.producer_name or dst.producer_name
