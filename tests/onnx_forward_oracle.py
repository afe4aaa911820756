"""A numpy float64 interpreter for MLP-shaped ONNX graphs: a test oracle, independent of
onnxruntime, onnx.reference and the float64 graph (`bn_onnx.verify.float64`).

`onnx_forward(model, x, names)` runs Gemm/MatMul/Add/BatchNormalization/activation chains with
`bn_onnx.float64_kernels`; `onnx_output` gives the single output; `evaluator_run` is onnx's
`ReferenceEvaluator` on the same feeds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from bn_onnx.errors import InputDataError, UnsupportedModelError
from bn_onnx.float64_kernels import Array, batch_norm, erf, gelu, sigmoid


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _float(a: Array) -> Array:
    return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a


def _gemm(ins: list[Any], at: dict[str, Any]) -> Array:
    a, b = ins[0], ins[1]
    if at.get("transA", 0):
        a = a.T
    if at.get("transB", 0):
        b = b.T
    y = float(at.get("alpha", 1.0)) * (a @ b)
    if len(ins) > 2 and ins[2] is not None:
        y = y + float(at.get("beta", 1.0)) * ins[2]
    return y


def _batchnorm(ins: list[Any], at: dict[str, Any]) -> Array:
    if at.get("training_mode", 0):
        raise UnsupportedModelError(
            "the float64 reference cannot run BatchNormalization with training_mode=1"
        )
    x, scale, bias, mean, var = ins[:5]
    return batch_norm(x, scale, bias, mean, var, float(at.get("epsilon", 1e-5)))


def _div(ins: list[Any], at: dict[str, Any]) -> Array:
    a, b = ins
    if np.issubdtype(np.result_type(a, b), np.integer):
        return np.trunc(np.asarray(a) / np.asarray(b)).astype(np.result_type(a, b))
    return a / b


def _softmax(ins: list[Any], at: dict[str, Any], opset: int) -> Array:
    x = ins[0]
    axis = int(at.get("axis", -1 if opset >= 13 else 1))
    if opset < 13:  # old Softmax flattens to 2-D at `axis`
        shape = x.shape
        x2 = x.reshape(int(np.prod(shape[:axis])), -1)
        return _softmax([x2], {"axis": 1}, 13).reshape(shape)
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def _reshape(ins: list[Any], at: dict[str, Any]) -> Array:
    x, shape = ins[0], [int(s) for s in np.asarray(ins[1]).ravel()]
    if not at.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _flatten(ins: list[Any], at: dict[str, Any]) -> Array:
    x = ins[0]
    axis = int(at.get("axis", 1)) % (x.ndim + 1) if x.ndim else 0
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _axes(ins: list[Any], at: dict[str, Any]) -> list[int] | None:
    if len(ins) > 1 and ins[1] is not None:
        return [int(a) for a in np.asarray(ins[1]).ravel()]
    if "axes" in at:
        return [int(a) for a in at["axes"]]
    return None


def _unsqueeze(ins: list[Any], at: dict[str, Any]) -> Array:
    x = ins[0]
    axes = _axes(ins, at) or []
    rank = x.ndim + len(axes)
    for a in sorted(a % rank for a in axes):
        x = np.expand_dims(x, a)
    return x


def _squeeze(ins: list[Any], at: dict[str, Any]) -> Array:
    axes = _axes(ins, at)
    return np.squeeze(ins[0], axis=None if axes is None else tuple(axes))


_CAST_TYPES = {
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.BOOL: np.bool_,
}


def _cast(ins: list[Any], at: dict[str, Any]) -> Array:
    to = int(at["to"])
    # Casts to a float type keep float64: the reference does all arithmetic in float64.
    if to in (
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
    ):
        return np.asarray(ins[0], dtype=np.float64)
    if to in _CAST_TYPES:
        return np.asarray(ins[0]).astype(_CAST_TYPES[to])
    raise UnsupportedModelError(f"the float64 reference cannot Cast to type {to}")


def _unary(f: Callable[[Array], Array]) -> Callable[[list[Any], dict[str, Any]], Array]:
    return lambda ins, at: f(ins[0])


def _binary(f: Callable[[Array, Array], Array]) -> Callable[[list[Any], dict[str, Any]], Array]:
    return lambda ins, at: f(ins[0], ins[1])


def _clip(ins: list[Any], at: dict[str, Any]) -> Array:
    lo = ins[1] if len(ins) > 1 and ins[1] is not None else at.get("min", -np.inf)
    hi = ins[2] if len(ins) > 2 and ins[2] is not None else at.get("max", np.inf)
    return np.clip(ins[0], lo, hi)


_OPS: dict[str, Callable[[list[Any], dict[str, Any]], Any]] = {
    "Gemm": _gemm,
    "MatMul": _binary(np.matmul),
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": _div,
    "Pow": _binary(np.power),
    "BatchNormalization": _batchnorm,
    "Relu": _unary(lambda x: np.maximum(x, 0.0)),
    "LeakyRelu": lambda ins, at: np.where(
        ins[0] >= 0, ins[0], float(at.get("alpha", 0.01)) * ins[0]
    ),
    "Gelu": lambda ins, at: gelu(
        ins[0],
        str(at.get("approximate", b"none"), "utf-8")
        if isinstance(at.get("approximate"), bytes)
        else str(at.get("approximate", "none")),
    ),
    "Tanh": _unary(np.tanh),
    "Sigmoid": _unary(sigmoid),
    "Silu": _unary(lambda x: x * sigmoid(x)),
    "Swish": _unary(lambda x: x * sigmoid(x)),
    "Erf": _unary(erf),
    "Exp": _unary(np.exp),
    "Log": _unary(np.log),
    "Sqrt": _unary(np.sqrt),
    "Neg": _unary(np.negative),
    "Abs": _unary(np.abs),
    "Reciprocal": _unary(lambda x: 1.0 / x),
    "Clip": _clip,
    "Identity": _unary(lambda x: x),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda ins, at: np.transpose(ins[0], at.get("perm")),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Cast": _cast,
}

SUPPORTED_OPS = tuple(sorted([*_OPS, "Softmax", "Dropout", "Constant"]))


def _constant(node: onnx.NodeProto) -> Array:
    at = node.attribute[0] if node.attribute else None
    if at is None:
        raise UnsupportedModelError(f"Constant node {node.name!r} has no value")
    value = onnx.helper.get_attribute_value(at)
    if at.name == "value":
        return _float(numpy_helper.to_array(value))
    if at.name in ("value_float", "value_floats"):
        return np.asarray(value, dtype=np.float64)
    if at.name in ("value_int", "value_ints"):
        return np.asarray(value, dtype=np.int64)
    raise UnsupportedModelError(f"the float64 reference cannot read Constant attribute {at.name}")


def _opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 0


def check_supported(model: onnx.ModelProto) -> None:
    """Raise `UnsupportedModelError` naming the first op the float64 reference cannot run."""
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
            domain = f"{node.domain}::" if node.domain not in ("", "ai.onnx") else ""
            raise UnsupportedModelError(
                f"the float64 reference does not support op {domain}{node.op_type} "
                f"(node {node.name or '<unnamed>'!r})"
            )


def _load(model: onnx.ModelProto | str | os.PathLike[str]) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    from bn_onnx.onnx_io import load_model

    return load_model(Path(model))


def onnx_forward(
    model: onnx.ModelProto | str | os.PathLike[str],
    inputs: Array | Mapping[str, Array],
    outputs: list[str] | None = None,
) -> dict[str, Array]:
    """Run an MLP-shaped ONNX graph in numpy float64; return the requested values by name.

    Args:
        model: the model or its path.
        inputs: the array for the single graph input, or a name -> array mapping.
        outputs: tensor names to return (intermediate ones allowed); default the graph outputs.

    Raises:
        UnsupportedModelError: an op outside `SUPPORTED_OPS`, naming it.
    """
    model = _load(model)
    check_supported(model)
    graph = model.graph
    opset = _opset(model)
    env: dict[str, Any] = {"": None}
    for init in graph.initializer:
        env[init.name] = _float(numpy_helper.to_array(init))
    init_names = set(env)
    real_inputs = [i.name for i in graph.input if i.name not in init_names]
    if isinstance(inputs, Mapping):
        feeds = dict(inputs)
    else:
        if len(real_inputs) != 1:
            raise UnsupportedModelError(
                f"model has {len(real_inputs)} inputs; pass a name -> array mapping"
            )
        feeds = {real_inputs[0]: inputs}
    for name in real_inputs:
        if name not in feeds:
            raise InputDataError(f"no value given for model input {name!r}")
        env[name] = _float(np.asarray(feeds[name]))
    for node in graph.node:
        at = _attrs(node)
        if node.op_type == "Constant":
            env[node.output[0]] = _constant(node)
            continue
        try:
            ins = [env[n] if n else None for n in node.input]
        except KeyError as exc:
            raise UnsupportedModelError(
                f"node {node.name or node.op_type!r} reads {exc.args[0]!r}, which nothing produces"
            ) from None
        if node.op_type == "Dropout":
            results: list[Any] = [ins[0], np.ones(np.shape(ins[0]), dtype=bool)]
        elif node.op_type == "Softmax":
            results = [_softmax(ins, at, opset)]
        else:
            try:
                results = [_OPS[node.op_type](ins, at)]
            except UnsupportedModelError:
                raise
            except (ValueError, TypeError, IndexError) as exc:
                raise UnsupportedModelError(
                    f"the float64 reference failed at node {node.name or node.op_type!r} "
                    f"({node.op_type}): {exc}"
                ) from None
        for name, value in zip(node.output, results, strict=False):
            if name:
                env[name] = value
    wanted = outputs if outputs is not None else [o.name for o in graph.output]
    missing = [n for n in wanted if n not in env]
    if missing:
        raise UnsupportedModelError(f"the graph does not compute {', '.join(missing)}")
    return {n: env[n] for n in wanted}


def onnx_output(model: onnx.ModelProto | str | os.PathLike[str], x: Array) -> Array:
    """The first graph output of `onnx_forward` for the single input `x`."""
    model = _load(model)
    return onnx_forward(model, x, [model.graph.output[0].name])[model.graph.output[0].name]


def evaluator_run(model: onnx.ModelProto | str | os.PathLike[str], x: Array) -> Array:
    """The first output of `onnx.reference.ReferenceEvaluator` (the model's own dtype)."""
    from onnx.reference import ReferenceEvaluator

    model = _load(model)
    ev = ReferenceEvaluator(model)
    stored = {t.name for t in model.graph.initializer}
    name = [i.name for i in model.graph.input if i.name not in stored][0]
    try:
        return np.asarray(ev.run(None, {name: x})[0])
    except Exception as exc:
        raise UnsupportedModelError(
            f"onnx.reference.ReferenceEvaluator cannot run the model: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
