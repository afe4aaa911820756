"""A float64 reference for any graph of standard ops: the model's float tensors cast to double.

`to_double` rewrites a copy of the model so that it computes in float64: initializers,
Constant and ConstantOfShape values, Cast/EyeLike/Random* targets, and graph input, output and
subgraph types of float32, float16 and bfloat16 become double (model-local functions are
inlined first, so their bodies are cast too). The result runs in onnxruntime where it has a
double kernel for every op (with graph optimizations off), else in onnx.reference with the
corrected kernels of `bn_onnx.verify.evaluator_ops` (`bn_onnx.float64_kernels`' Erf, Conv,
ConvTranspose, pools and BatchNormalization, and opsets 1-6's broadcast axis for Add, Sub,
Mul and Div).

A model with quantization ops (QuantizeLinear, QLinearConv, ...) has values whose meaning is
tied to float32 and cannot be cast; `Float64Reference` then holds the reason (`bool()` False)
and verify falls back to comparing the float32 models with each other.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from bn_onnx.compare import is_float_dtype
from bn_onnx.errors import BnOnnxError, UnsupportedModelError, one_line
from bn_onnx.verify import evaluator_ops
from bn_onnx.verify.runs import EvaluatorSession, OrtSession, Outputs, mark_outputs

FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
# Ops whose values are defined by a float32 (or integer) quantization grid: no float64 meaning.
QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "QLinearAdd",
    "QLinearMul",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QLinearAveragePool",
    "QLinearGlobalAveragePool",
    "QLinearConcat",
    "DynamicQuantizeMatMul",
    "MatMulNBits",
}
_DTYPE_ATTRS = {
    "Cast": "to",
    "EyeLike": "dtype",
    "RandomNormal": "dtype",
    "RandomUniform": "dtype",
    "RandomNormalLike": "dtype",
    "RandomUniformLike": "dtype",
    "Bernoulli": "dtype",
}
_NO_KERNEL = re.compile(
    r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'"
)


def _double_tensor(t: TensorProto) -> None:
    if t.data_type in FLOATS:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))


def _double_value_info(vi: onnx.ValueInfoProto) -> None:
    tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
    if tt is not None and tt.elem_type in FLOATS:
        tt.elem_type = TensorProto.DOUBLE


def _double_graph(graph: onnx.GraphProto) -> None:
    for t in graph.initializer:
        _double_tensor(t)
    for vi in [*graph.input, *graph.output]:
        _double_value_info(vi)
    del graph.value_info[:]  # stale types; inference recomputes them
    for node in graph.node:
        if node.domain not in ("", "ai.onnx", "ai.onnx.ml"):
            continue
        if node.op_type in QUANTIZED_OPS:
            raise UnsupportedModelError(
                f"op {node.op_type} (node {node.name or '<unnamed>'!r}) works on a float32 "
                "quantization grid and has no float64 meaning"
            )
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                _double_tensor(a.t)
            elif a.type == onnx.AttributeProto.GRAPH:
                _double_graph(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    _double_graph(g)
            elif a.type == onnx.AttributeProto.SPARSE_TENSOR:
                raise UnsupportedModelError(
                    f"the float64 reference does not cast sparse constants (node {node.name!r})"
                )
        attr = _DTYPE_ATTRS.get(node.op_type)
        if attr is not None:
            for a in node.attribute:
                if a.name == attr and a.i in FLOATS:
                    a.i = TensorProto.DOUBLE
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name in ("value_float", "value_floats"):
                    value = np.asarray(
                        a.f if a.name == "value_float" else list(a.floats), dtype=np.float64
                    )
                    node.attribute.remove(a)
                    node.attribute.append(
                        onnx.helper.make_attribute("value", numpy_helper.from_array(value))
                    )
                    break


def to_double(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` computing in float64 (see the module docstring).

    Raises:
        UnsupportedModelError: an op without a float64 meaning (quantization), naming it.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if out.functions:
        from onnx import inliner

        out = inliner.inline_local_functions(out)
    for p in list(out.metadata_props):
        if p.key.startswith("bn_onnx."):
            out.metadata_props.remove(p)
    _double_graph(out.graph)
    return out


@dataclass
class Float64Reference:
    """The float64 reference of one model, and how it runs.

    `bool(ref)` is True when it can run. `engine` is `onnxruntime` or `onnx.reference`;
    `notes` say why onnxruntime was not used (the op without a double kernel); `blocker` says
    why there is no float64 reference at all.
    """

    label: str
    source: str
    model: onnx.ModelProto | None = None
    engine: str | None = None
    notes: list[str] = field(default_factory=list)
    blocker: str | None = None
    _runner: OrtSession | EvaluatorSession | None = None
    _marked: dict[tuple[str, ...], OrtSession] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.model is not None and self.blocker is None

    def describe(self) -> str:
        """One line for the report."""
        if self.blocker:
            why = f" ({'; '.join(self.notes)})" if self.notes else ""
            return f"none: {self.blocker}{why}"
        where = (
            "onnxruntime (CPU, graph optimizations off)"
            if self.engine == "onnxruntime"
            else "onnx.reference (numpy; Conv, ConvTranspose, pools, BatchNormalization and Erf "
            "from bn_onnx.float64_kernels)"
        )
        why = f": {'; '.join(self.notes)}" if self.notes else ""
        return f"{self.source} cast to float64, run in {where}{why}"

    def _fallback(self, reason: str) -> None:
        self.notes.append(reason)
        self.engine = "onnx.reference"
        self._runner = EvaluatorSession(self.model, new_ops=evaluator_ops.corrected_ops())

    def run(
        self, feeds: Sequence[dict[str, np.ndarray]], names: Sequence[str] | None = None
    ) -> Outputs:
        """float64 outputs for the probe's feeds (float inputs cast to float64).

        Raises:
            UnsupportedModelError: neither engine can run the graph.
        """
        if not self:
            raise UnsupportedModelError(f"no float64 reference: {self.blocker}")
        feeds = [
            {k: (v.astype(np.float64) if is_float_dtype(v.dtype) else v) for k, v in f.items()}
            for f in feeds
        ]
        assert self._runner is not None
        runner = self._runner
        if names:
            runner = _runner_with(self, names)
        try:
            return runner.run(feeds, names)
        except UnsupportedModelError:
            raise
        except BnOnnxError as exc:
            if self.engine != "onnxruntime":
                raise
            self._fallback(f"onnxruntime failed to run it in float64 ({exc})")
            return self.run(feeds, names)


def _runner_with(ref: Float64Reference, names: Sequence[str]) -> OrtSession | EvaluatorSession:
    """A session returning `names` too: onnx.reference's own, else one onnxruntime session
    per set of names, kept for the next feed (`--locate` asks once per pair)."""
    assert ref.model is not None
    if ref.engine == "onnx.reference":
        assert isinstance(ref._runner, EvaluatorSession)
        return ref._runner  # it returns intermediate values by name as they are
    key = tuple(names)
    if key not in ref._marked:
        ref._marked[key] = OrtSession(mark_outputs(ref.model, key), "cpu", optimization="disable")
    return ref._marked[key]


def build(model: onnx.ModelProto, label: str, source: str) -> Float64Reference:
    """Cast `model` to float64 and pick the engine: onnxruntime if it has every kernel."""
    ref = Float64Reference(label, source)
    try:
        ref.model = to_double(model)
    except UnsupportedModelError as exc:
        ref.blocker = str(exc)
        return ref
    try:
        ref._runner = OrtSession(ref.model, "cpu", optimization="disable")
        ref.engine = "onnxruntime"
        return ref
    except BnOnnxError as exc:
        m = _NO_KERNEL.search(str(exc))
        reason = (
            f"onnxruntime has no float64 kernel for {m.group(1)} (opset {m.group(2)})"
            if m
            else f"onnxruntime cannot load it in float64 ({one_line(exc)})"
        )
    try:
        ref._fallback(reason)
    except UnsupportedModelError as exc:
        ref.blocker = f"{reason}, and {exc}"
        ref.model = None
    return ref
