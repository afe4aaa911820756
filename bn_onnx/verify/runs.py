"""Running a model over a probe: onnxruntime on one execution provider, or onnx.reference.

Every output is returned by name. A probe with several runs (a model with a fixed batch) gives
each output stacked along a new first axis, so that comparisons see one array per output.
onnxruntime's Python API cannot hand over bfloat16 arrays; they go in and come out as raw
16-bit words, bit for bit.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from bn_onnx.errors import BnOnnxError, InputDataError, UnsupportedModelError, one_line
from bn_onnx.onnx_check import with_detail

Outputs = dict[str, np.ndarray]
_BF16 = "tensor(bfloat16)"


@dataclass
class Run:
    """One way of computing the outputs, with its outputs per probe kind.

    `kind`: `onnx` (a model on an execution provider, or onnx.reference), `float64` (a graph
    cast to double), `checkpoint` (the MLP's own float64 forward) or `torch`.
    """

    label: str
    kind: str
    detail: str
    outputs: dict[str, Outputs] = field(default_factory=dict)
    model: str | None = None
    provider: str | None = None
    folded: bool | None = None
    int8: bool = False  # a quantized model: no side of the folding rows
    tf32: bool | None = None
    compute_dtype: str | None = None  # the lowest float precision inside the model

    def dtypes(self) -> dict[str, str]:
        """Output name -> dtype name (of the first probe that has it)."""
        out: dict[str, str] = {}
        for values in self.outputs.values():
            for name, arr in values.items():
                out.setdefault(name, "str" if arr.dtype.kind in "USO" else arr.dtype.name)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no arrays)."""
        return {
            **{k: v for k, v in self.__dict__.items() if k != "outputs"},
            "outputs": {
                probe: {n: {"shape": list(a.shape), "dtype": str(a.dtype)} for n, a in v.items()}
                for probe, v in self.outputs.items()
            },
        }


def merge(per_run: Sequence[Outputs]) -> Outputs:
    """One array per output: the single run's, or every run's stacked on a new first axis."""
    if len(per_run) == 1:
        return dict(per_run[0])
    out: Outputs = {}
    for name in per_run[0]:
        arrays = [np.asarray(r[name]) for r in per_run]
        if all(a.shape == arrays[0].shape for a in arrays):
            out[name] = np.stack(arrays)
        else:  # outputs whose size depends on the values: compare them flattened
            out[name] = np.concatenate([a.reshape(-1) for a in arrays])
    return out


def mark_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the tensors `names` whose element type is known.

    Types come from shape inference; a name without one is left out (onnxruntime needs it).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    types = value_types(model)
    for name in names:
        if name not in have and types.get(name):
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
            have.add(name)
    return out


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value of the main graph that shape inference can type."""
    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is best effort here; declared types still count
        inferred = model
    g = inferred.graph
    for vi in [*g.value_info, *g.output, *g.input]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    return types


def _to_ort(value: np.ndarray) -> Any:
    import onnxruntime as ort

    if value.dtype.name == "bfloat16":
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            np.ascontiguousarray(value).view(np.uint16), onnx.TensorProto.BFLOAT16
        )
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))


def _from_ort(value: Any) -> np.ndarray:
    if value.data_type() != _BF16:
        return value.numpy()
    if value.device_name().lower() != "cpu":
        raise UnsupportedModelError("bfloat16 outputs are read back from CPU memory only")
    shape = tuple(value.shape())
    n = math.prod(shape)
    words = (ctypes.c_uint16 * n).from_address(value.data_ptr())
    import ml_dtypes

    return np.frombuffer(words, np.uint16, count=n).copy().reshape(shape).view(ml_dtypes.bfloat16)


class OrtSession:
    """A model in one onnxruntime session; `run(feeds)` returns every output (or `names`).

    CUDA sessions are created with TF32 off (verification must see float32 arithmetic).
    """

    def __init__(
        self,
        model: onnx.ModelProto | str,
        provider: str,
        *,
        optimization: str = "all",
    ) -> None:
        from bn_onnx.runtime import create_session

        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
        self.info = create_session(
            source, provider=provider, use_tf32=False, graph_optimization_level=optimization
        )
        session = self.info.session
        self.names = [o.name for o in session.get_outputs()]
        self._raw = any(t.type == _BF16 for t in [*session.get_inputs(), *session.get_outputs()])

    def run(
        self, feeds: Sequence[dict[str, np.ndarray]], names: Sequence[str] | None = None
    ) -> Outputs:
        """Run each feed dict and merge the outputs (see `merge`)."""
        names = list(names or self.names)
        session = self.info.session
        per_run = []
        for feed in feeds:
            try:
                if self._raw:
                    values = session.run_with_ort_values(
                        names, {k: _to_ort(v) for k, v in feed.items()}
                    )
                    arrays = [_from_ort(v) for v in values]
                else:
                    arrays = session.run(names, feed)
            except BnOnnxError:
                raise
            except Exception as exc:
                raise with_detail(
                    InputDataError(
                        f"onnxruntime failed to run the model: {one_line(exc)} (inputs "
                        f"{_shapes(feed)}; pass --shape NAME:DIMS where a symbolic dim needs "
                        "a size)"
                    ),
                    exc,
                ) from None
            per_run.append(dict(zip(names, arrays, strict=True)))
        return merge(per_run)


def _shapes(feed: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {list(np.shape(v))}" for k, v in feed.items())


def one_blas_thread() -> AbstractContextManager[object]:
    """A context in which numpy's BLAS uses one thread (threadpoolctl).

    onnx.reference runs a graph node by node, each a small matrix product for one probe run
    (a batch-1 image). A multi-threaded BLAS hands each to its threads and waits for them:
    where another process, or onnxruntime's spinning threads, hold the other cores, every
    product waits for a scheduler slice (16 ms per product measured on a shared 2-core VM,
    against 0.2 ms on one thread).
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


class EvaluatorSession:
    """A model in onnx.reference's `ReferenceEvaluator` (numpy; any op of the standard).

    It runs with one BLAS thread (`one_blas_thread`).
    """

    def __init__(self, model: onnx.ModelProto, new_ops: Sequence[type] = ()) -> None:
        from onnx.reference import ReferenceEvaluator

        try:
            self.evaluator = ReferenceEvaluator(model, new_ops=list(new_ops) or None)
        except Exception as exc:
            raise UnsupportedModelError(
                f"onnx.reference cannot load the model: {one_line(exc)}"
            ) from None
        self.names = [o.name for o in model.graph.output]

    def run(
        self, feeds: Sequence[dict[str, np.ndarray]], names: Sequence[str] | None = None
    ) -> Outputs:
        """Run each feed dict and merge the outputs (intermediate names allowed)."""
        names = list(names or self.names)
        with one_blas_thread():
            return merge([self._run_one(names, feed) for feed in feeds])

    def _run_one(self, names: list[str], feed: dict[str, np.ndarray]) -> Outputs:
        try:
            arrays = self.evaluator.run(names, feed)
        except Exception as exc:
            raise UnsupportedModelError(
                f"onnx.reference failed to run the model: {type(exc).__name__}: {one_line(exc)}"
            ) from None
        return {n: np.asarray(a) for n, a in zip(names, arrays, strict=True)}
