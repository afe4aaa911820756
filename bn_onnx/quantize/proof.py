"""The proof that fits INT8: the INT8 model against its float model, and what stays float.

An INT8 model is not exact, so the proof measures instead of asserting equality. Per probe
(the calibration data, labelled data when given) and per output: SQNR
10 log10(sum(y^2) / sum((y - y_int8)^2)) in dB and the max absolute error; for classifiers,
top-1 agreement and, on labelled data, both accuracies. The budget (`max_accuracy_drop`, in
percentage points) applies to the accuracy drop on labelled data; without labels, to the
top-1 disagreement on the probes (an upper bound of the drop). Both models run in
onnxruntime on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
     onnx.TensorProto.DOUBLE}
)  # fmt: skip
DEFAULT_MAX_DROP = 0.5


@dataclasses.dataclass
class OutputError:
    """One output on one probe: SQNR (dB, inf when exact), max abs error, top-1 agreement
    (a fraction; None for a non-classifier output)."""

    name: str
    sqnr_db: float
    max_abs: float
    agreement: float | None = None


@dataclasses.dataclass
class ProbeResult:
    """One probe: where it came from, its rows, each output, and both accuracies when the
    probe has labels (fractions)."""

    source: str
    rows: int
    outputs: list[OutputError]
    accuracy_float: float | None = None
    accuracy_int8: float | None = None

    @property
    def drop_points(self) -> float | None:
        if self.accuracy_float is None or self.accuracy_int8 is None:
            return None
        return 100.0 * (self.accuracy_float - self.accuracy_int8)


@dataclasses.dataclass
class FloatOp:
    """A node of the INT8 model that computes in float, and why."""

    node: str
    op_type: str
    reason: str


@dataclasses.dataclass
class Int8Proof:
    """The comparison and its verdict (`bool(proof)`: within budget)."""

    probes: list[ProbeResult]
    float_ops: list[FloatOp]
    max_accuracy_drop: float
    measured: float | None  # the drop (or disagreement) checked against the budget, points
    basis: str  # what `measured` is

    def __bool__(self) -> bool:
        return self.measured is None or self.measured <= self.max_accuracy_drop + 1e-9

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": bool(self),
            "max_accuracy_drop": self.max_accuracy_drop,
            "measured": self.measured,
            "basis": self.basis,
            "probes": [dataclasses.asdict(p) for p in self.probes],
            "float_ops": [dataclasses.asdict(f) for f in self.float_ops],
        }


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """10 log10(signal power / noise power), float64; inf when equal, -inf for a zero
    signal with noise."""
    ref = np.asarray(ref, np.float64)
    noise = float(((ref - np.asarray(test, np.float64)) ** 2).sum())
    signal = float((ref**2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _session(model: onnx.ModelProto | str) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def compare_probe(
    float_sess: Any,
    int8_sess: Any,
    source: str,
    feeds: Mapping[str, np.ndarray],
    *,
    labels: np.ndarray | None = None,
    classifier: Sequence[str] = (),
) -> ProbeResult:
    """Run both sessions on `feeds`; compare every output (labels: class indices for the
    first classifier output)."""
    names = [o.name for o in float_sess.get_outputs()]
    ys = float_sess.run(names, dict(feeds))
    qs = int8_sess.run(names, dict(feeds))
    rows = len(next(iter(feeds.values())))
    outputs, acc_f, acc_q = [], None, None
    for name, y, q in zip(names, ys, qs, strict=True):
        y64, q64 = np.asarray(y, np.float64), np.asarray(q, np.float64)
        agree = None
        if name in classifier and y64.ndim == 2 and y64.shape[1] > 1:
            top_f, top_q = y64.argmax(1), q64.argmax(1)
            agree = float((top_f == top_q).mean()) if rows else 1.0
            if labels is not None and acc_f is None:
                acc_f = float((top_f == labels).mean())
                acc_q = float((top_q == labels).mean())
        max_abs = float(np.abs(y64 - q64).max()) if y64.size else 0.0
        outputs.append(OutputError(name, sqnr_db(y64, q64), max_abs, agree))
    return ProbeResult(source, rows, outputs, acc_f, acc_q)


def _float_inputs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, list[str], list[str]]]:
    """Per node other than Q/DQ: its float inputs, and those not produced by a
    DequantizeLinear."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info]}
    types.update({v.name: v.type.tensor_type.elem_type for v in graph.output})
    types.update({t.name: t.data_type for t in graph.initializer})
    producer = {o: n for n in graph.node for o in n.output}
    out = []
    for node in graph.node:
        if node.op_type in QDQ_OPS:
            continue
        floats = [x for x in node.input if x and types.get(x) in FLOAT_TYPES]
        plain = [x for x in floats if _op(producer.get(x)) != "DequantizeLinear"]
        out.append((node, floats, plain))
    return out


def int8_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Op type -> count of the nodes that compute on quantized values: every float input
    comes from a DequantizeLinear (onnxruntime fuses them into integer kernels)."""
    counts: dict[str, int] = {}
    for node, floats, plain in _float_inputs(model):
        if floats and not plain:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def float_ops(model: onnx.ModelProto, reasons: Mapping[str, str] | None = None) -> list[FloatOp]:
    """Every node of a QDQ model that computes in float: a float input not produced by a
    DequantizeLinear. `reasons`: node name -> why it stays (the fold's reasons for BNs)."""
    from onnxruntime.quantization.registry import QDQRegistry

    reasons = reasons or {}
    producer = {o: n for n in model.graph.node for o in n.output}
    inputs = {v.name for v in model.graph.input}
    out = []
    for node, _, plain in _float_inputs(model):
        if not plain:
            continue
        name = node.name or f"{node.op_type}({node.output[0]})"
        if name in reasons:
            why = reasons[name]
        elif node.op_type not in QDQRegistry:
            why = f"onnxruntime's quantizer has no QDQ rule for {node.op_type}"
        elif plain[0] in inputs:
            why = f"it reads the model input {plain[0]!r} in float"
        else:
            src = producer.get(plain[0])
            what = f"{src.op_type} {src.name!r}" if src is not None else "a constant"
            why = f"its input {plain[0]!r} comes from {what}, not from a DequantizeLinear"
        out.append(FloatOp(name, node.op_type, why))
    return out


def _op(node: onnx.NodeProto | None) -> str | None:
    return node.op_type if node is not None else None


def prove(
    float_model: onnx.ModelProto | str,
    int8_model: onnx.ModelProto,
    probes: Sequence[tuple[str, Mapping[str, np.ndarray], np.ndarray | None]],
    *,
    classifier: Sequence[str] = (),
    max_accuracy_drop: float = DEFAULT_MAX_DROP,
    reasons: Mapping[str, str] | None = None,
) -> Int8Proof:
    """Compare `int8_model` with `float_model` on each probe `(source, feeds, labels or
    None)` and check the budget (see the module docstring)."""
    fs, qs = _session(float_model), _session(int8_model)
    results = [
        compare_probe(fs, qs, src, feeds, labels=labels, classifier=classifier)
        for src, feeds, labels in probes
    ]
    drops = [r.drop_points for r in results if r.drop_points is not None]
    if drops:
        measured, basis = max(drops), "accuracy drop on labelled data"
    else:
        agreements = [o.agreement for r in results for o in r.outputs if o.agreement is not None]
        if agreements:
            measured, basis = 100.0 * (1.0 - min(agreements)), "top-1 disagreement (no labels)"
        else:
            measured, basis = None, "no classifier output: SQNR and max error only"
    return Int8Proof(results, float_ops(int8_model, reasons), max_accuracy_drop, measured, basis)


def render(proof: Int8Proof) -> list[str]:
    """The proof as printed: a line per probe and output, the float ops, the verdict."""
    lines = ["proof (INT8 against the float model, onnxruntime CPU):"]
    for p in proof.probes:
        lines.append(f"  {p.source}:")
        if p.drop_points is not None:
            lines.append(
                f"    accuracy {100 * p.accuracy_float:.2f}% -> {100 * p.accuracy_int8:.2f}%"
                f" ({-p.drop_points:+.2f} points)"
            )
        for o in p.outputs:
            agree = f", top-1 agreement {100 * o.agreement:.2f}%" if o.agreement is not None else ""
            lines.append(f"    {o.name}: SQNR {o.sqnr_db:.1f} dB, max error {o.max_abs:.3g}{agree}")
    if proof.float_ops:
        lines.append(f"float ops: {len(proof.float_ops)}")
        lines.extend(f"  {f.op_type} {f.node}: {f.reason}" for f in proof.float_ops)
    else:
        lines.append("float ops: none (every op between DequantizeLinear and QuantizeLinear)")
    if proof.measured is None:
        lines.append(f"passed: {proof.basis}")
    else:
        verdict = "passed" if proof else "FAILED"
        cmp = "<=" if proof else ">"
        lines.append(
            f"{verdict}: {proof.basis} {proof.measured:.2f} points {cmp}"
            f" {proof.max_accuracy_drop:.2f} (--max-accuracy-drop)"
        )
    return lines
