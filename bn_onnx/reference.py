"""The independent float64 reference: numpy forwards of a checkpoint and of MLP-shaped ONNX graphs.

Batch norm is computed as DESIGN.md writes it, (z - mean) / sqrt(var + eps) * gamma + beta, never
as a folded affine map, so the reference cannot share a mistake with the fold. numpy only: no
torch, no onnxruntime. `evaluator_run` wraps `onnx.reference.ReferenceEvaluator` as a further,
third runner.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from bn_onnx.errors import InputDataError, UnsupportedModelError

Array = np.ndarray

_erf = np.frompyfunc(math.erf, 1, 1)


def erf(x: Array) -> Array:
    """The error function elementwise, in float64 (numpy has none; math.erf is exact enough)."""
    return _erf(np.asarray(x, dtype=np.float64)).astype(np.float64)


def sigmoid(x: Array) -> Array:
    """Logistic sigmoid without overflow warnings for large |x|."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def gelu(x: Array, approximate: str = "none") -> Array:
    """GELU, exact (erf) or the tanh approximation, as torch and ONNX define them."""
    x = np.asarray(x, dtype=np.float64)
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu": gelu,
    "tanh": np.tanh,
    "sigmoid": sigmoid,
    "silu": lambda x: x * sigmoid(x),
}


def batch_norm(x: Array, gamma: Any, beta: Any, mean: Any, var: Any, eps: float) -> Array:
    """Inference batch norm over axis 1 by the equations, in float64.

    `gamma`/`beta` may be None (an affine=False BN such as the input normalization).
    """
    x = np.asarray(x, dtype=np.float64)
    shape = (1, -1) + (1,) * (x.ndim - 2)

    def col(v: Any) -> Array:
        return np.asarray(v, dtype=np.float64).reshape(shape)

    z = (x - col(mean)) / np.sqrt(col(var) + float(eps))
    if gamma is not None:
        z = z * col(gamma)
    if beta is not None:
        z = z + col(beta)
    return z


def batch_norm_node(
    x: Array,
    scale: Any,
    bias: Any,
    mean: Any,
    var: Any,
    epsilon: float | None = None,
    training_mode: int | None = None,
    spatial: int | None = None,
) -> Array:
    """An inference BatchNormalization node of any opset, by its equation, in float64.

    Parameters of rank > 1 (opset < 9 with `spatial=0`: one value per element of a sample)
    broadcast against one sample; rank-1 ones are per channel (axis 1).

    Raises:
        UnsupportedModelError: `training_mode=1` (batch statistics are not an inference map).
    """
    if training_mode:
        raise UnsupportedModelError(
            "the float64 reference cannot run BatchNormalization with training_mode=1"
        )
    eps = 1e-5 if epsilon is None else float(epsilon)
    params = [np.asarray(p, dtype=np.float64) for p in (scale, bias, mean, var)]
    if params[0].ndim > 1 or (spatial == 0 and params[0].size == int(np.prod(np.shape(x)[1:]))):
        x = np.asarray(x, dtype=np.float64)
        s, b, m, v = (p.reshape(1, *x.shape[1:]) for p in params)
        return (x - m) / np.sqrt(v + eps) * s + b
    return batch_norm(x, *params[:2], *params[2:], eps)


def _conv_pads(
    in_shape: tuple[int, ...],
    extent: list[int],
    strides: list[int],
    pads: Any,
    auto_pad: str,
) -> list[int]:
    nd = len(in_shape)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        head, tail = [], []
        for i in range(nd):
            out = -(-in_shape[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + extent[i] - in_shape[i])
            lo = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            head.append(lo)
            tail.append(total - lo)
        return head + tail
    if auto_pad == "VALID" or pads is None:
        return [0] * (2 * nd)
    return [int(p) for p in pads]


def _taps(
    offset: tuple[int, ...], dilations: list[int], count: list[int], strides: list[int]
) -> tuple[slice, ...]:
    """Per spatial axis, the `count` positions a kernel tap at `offset` meets: from
    offset * dilation, every stride-th (the Conv input positions one output row reads, or the
    ConvTranspose output positions one input row writes)."""
    return tuple(
        slice(o * d, o * d + (c - 1) * s + 1, s)
        for o, d, c, s in zip(offset, dilations, count, strides, strict=True)
    )


def conv(
    x: Array,
    w: Array,
    b: Array | None = None,
    *,
    strides: Any = None,
    pads: Any = None,
    dilations: Any = None,
    group: int = 1,
    auto_pad: str = "NOTSET",
) -> Array:
    """ONNX Conv in float64 for any number of spatial dims, groups, dilations and padding.

    x: [N, C, *spatial]; w: [M, C / group, *kernel]; b: [M] or None. Padding follows the ONNX
    spec (`pads` = [x1_begin, x2_begin, ..., x1_end, ...]; SAME_UPPER puts the odd one at the
    end). The input is unfolded into columns (im2col: one strided slice of the padded input
    per kernel offset), then multiplied by the weights, one matrix product per group (BLAS);
    where each group has one input channel (depthwise), the shifted slices are multiplied by
    their weights and summed instead. It shares no code with onnxruntime's kernels.
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    nd = x.ndim - 2
    k = list(w.shape[2:])
    strides = [int(s) for s in strides] if strides else [1] * nd
    dilations = [int(d) for d in dilations] if dilations else [1] * nd
    extent = [(k[i] - 1) * dilations[i] + 1 for i in range(nd)]
    p = _conv_pads(x.shape[2:], extent, strides, pads, auto_pad)
    if any(p):
        x = np.pad(x, [(0, 0), (0, 0), *[(p[i], p[i + nd]) for i in range(nd)]])
    n, c = x.shape[:2]
    g = int(group)
    m = w.shape[0]
    cg, mg = c // g, m // g
    out = [(x.shape[2 + i] - extent[i]) // strides[i] + 1 for i in range(nd)]
    size = math.prod(out)
    xg = x.reshape(n, g, cg, *x.shape[2:])
    offsets = list(np.ndindex(*k))

    def shifted(offset: tuple[int, ...]) -> Array:  # [N, g, C / g, *out]
        return xg[(slice(None), slice(None), slice(None), *_taps(offset, dilations, out, strides))]

    if cg == 1:
        wk = w.reshape(g, mg, len(offsets))
        y = np.zeros((n, g, mg, *out))
        for j, offset in enumerate(offsets):
            y += wk[(None, slice(None), slice(None), j, *([None] * nd))] * shifted(offset)
    elif len(offsets) == 1 and all(s == 1 for s in strides):
        y = np.matmul(w.reshape(g, mg, cg), xg.reshape(n, g, cg, size))
    else:
        cols = np.empty((n, g, cg, len(offsets), *out))
        for j, offset in enumerate(offsets):
            cols[:, :, :, j] = shifted(offset)
        y = np.matmul(w.reshape(g, mg, cg * len(offsets)), cols.reshape(n, g, -1, size))
    y = y.reshape(n, m, *out)
    if b is not None:
        y += np.asarray(b, dtype=np.float64).reshape(1, -1, *([1] * nd))
    return y


def pool(
    x: Array,
    kind: str,
    kernel_shape: Any,
    *,
    strides: Any = None,
    pads: Any = None,
    dilations: Any = None,
    ceil_mode: int = 0,
    count_include_pad: int = 0,
    auto_pad: str = "NOTSET",
) -> Array:
    """ONNX MaxPool (`kind="max"`) or AveragePool (`"avg"`) in float64, any spatial rank.

    With `ceil_mode` the last window may run past the padded input (but must start inside the
    input or its leading pad, as onnxruntime and PyTorch count); positions past the padding
    never count. Explicit pads count in an average only with `count_include_pad`.
    """
    x = np.asarray(x, dtype=np.float64)
    nd = x.ndim - 2
    k = [int(v) for v in kernel_shape]
    s = [int(v) for v in strides] if strides else [1] * nd
    d = [int(v) for v in dilations] if dilations else [1] * nd
    extent = [(k[i] - 1) * d[i] + 1 for i in range(nd)]
    ins = list(x.shape[2:])
    p = _conv_pads(tuple(ins), extent, s, pads, auto_pad)
    out, extra = [], []
    for i in range(nd):
        span = ins[i] + p[i] + p[i + nd] - extent[i]
        o = (-(-span // s[i]) if ceil_mode else span // s[i]) + 1
        if ceil_mode and (o - 1) * s[i] >= ins[i] + p[i]:
            o -= 1
        out.append(o)
        extra.append(max(0, (o - 1) * s[i] + extent[i] - (ins[i] + p[i] + p[i + nd])))
    widths = [(0, 0), (0, 0), *[(p[i], p[i + nd] + extra[i]) for i in range(nd)]]
    axes = tuple(range(2, 2 + nd))
    window = tuple(range(2 + nd, 2 + 2 * nd))

    def windows(a: Array) -> Array:
        v = np.lib.stride_tricks.sliding_window_view(a, extent, axis=axes)
        return v[
            (
                slice(None),
                slice(None),
                *[slice(0, (out[i] - 1) * s[i] + 1, s[i]) for i in range(nd)],
                *[slice(None, None, step) for step in d],
            )
        ]

    if kind == "max":
        return windows(np.pad(x, widths, constant_values=-np.inf)).max(axis=window)
    total = windows(np.pad(x, widths)).sum(axis=window)
    mask = np.ones([1, 1, *ins])
    mask = np.pad(
        mask,
        [(0, 0), (0, 0), *[(p[i], p[i + nd]) for i in range(nd)]],
        constant_values=1.0 if count_include_pad else 0.0,
    )
    mask = np.pad(mask, [(0, 0), (0, 0), *[(0, e) for e in extra]])
    return total / windows(mask).sum(axis=window)


def conv_transpose(
    x: Array,
    w: Array,
    b: Array | None = None,
    *,
    strides: Any = None,
    pads: Any = None,
    dilations: Any = None,
    group: int = 1,
    auto_pad: str = "NOTSET",
    output_padding: Any = None,
    output_shape: Any = None,
) -> Array:
    """ONNX ConvTranspose in float64: every input element scatters its kernel, then the crop.

    x: [N, C, *spatial]; w: [C, M / group, *kernel]. The full output is
    `stride * (in - 1) + output_padding + (kernel - 1) * dilation + 1` long per axis, cropped
    by `pads`, or by the padding `output_shape` implies (ONNX spec: SAME_UPPER puts the larger
    half of an odd total at the end, otherwise at the start).
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    nd = x.ndim - 2
    n, c = x.shape[:2]
    ins = list(x.shape[2:])
    k = list(w.shape[2:])
    g = int(group)
    m = w.shape[1] * g
    strides = [int(s) for s in strides] if strides else [1] * nd
    dilations = [int(d) for d in dilations] if dilations else [1] * nd
    extra = [int(v) for v in output_padding] if output_padding else [0] * nd
    full = [strides[i] * (ins[i] - 1) + extra[i] + (k[i] - 1) * dilations[i] + 1 for i in range(nd)]
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = (
            [int(v) for v in output_shape][-nd:]
            if output_shape is not None
            else [ins[i] * strides[i] for i in range(nd)]
        )
        total = [full[i] - target[i] for i in range(nd)]
        upper = auto_pad == "SAME_UPPER"
        head = [t // 2 if upper else t - t // 2 for t in total]
        p = head + [t - h for t, h in zip(total, head, strict=True)]
    elif auto_pad == "VALID" or pads is None:
        p = [0] * (2 * nd)
    else:
        p = [int(v) for v in pads]
    y = np.zeros((n, g, m // g, *full))
    xg = x.reshape(n, g, c // g, -1)
    # [offsets, g, M / g, C / g]: the weights at one kernel offset, contiguous.
    wk = np.ascontiguousarray(w.reshape(g, c // g, m // g, -1).transpose(3, 0, 2, 1))
    for j, offset in enumerate(np.ndindex(*k)):
        contrib = np.matmul(wk[j], xg).reshape(n, g, m // g, *ins)
        y[(slice(None), slice(None), slice(None), *_taps(offset, dilations, ins, strides))] += (
            contrib
        )
    y = y.reshape(n, m, *full)
    # Crop by the pads (a negative pad extends with zeros).
    lo = [max(0, -p[i]) for i in range(nd)]
    hi = [max(0, -p[i + nd]) for i in range(nd)]
    if any(lo) or any(hi):
        y = np.pad(y, [(0, 0), (0, 0), *zip(lo, hi, strict=True)])
    crop = tuple(slice(max(p[i], 0), y.shape[2 + i] - max(p[i + nd], 0)) for i in range(nd))
    y = y[(slice(None), slice(None), *crop)]
    if b is not None:
        y = y + np.asarray(b, dtype=np.float64).reshape(1, -1, *([1] * nd))
    return y


# --------------------------------------------------------------------------------------------
# checkpoint forward


@dataclass
class Forward:
    """A float64 forward pass: the output and the values at the matching points (`taps`).

    Taps are `(label, value)` in chain order: each block's pre-activation (the input of its
    activation, after the linear layer and any BN before it), each block's activation output,
    and finally the output. Folded and unfolded ONNX graphs expose the same points (see
    `bn_onnx.verify`), so a divergence can be located by position.
    """

    output: Array
    taps: list[tuple[str, Array]] = field(default_factory=list)


def _cfg(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _tensor(tensors: Mapping[str, Any], name: str) -> Array:
    if name not in tensors:
        raise UnsupportedModelError(f"checkpoint has no tensor {name!r}")
    return np.asarray(tensors[name], dtype=np.float64)


def _first_layer_input(config: Any, tensors: Mapping[str, Any], x: Any) -> Array:
    """The first layer's input in float64: `x` itself, or a tabular model's preprocessed columns.

    A tabular model (config with `tabular`) takes feeds `{"continuous": float [n, k] with NaN,
    "categorical": str [n, m]}`: fill and indicators and codes by `TabularSpec.preprocess` in
    float64, each code's embedding row, then `[embeddings..., numeric...]` as
    `bn_onnx.model.TabularMLP` concatenates them. A plain MLP takes an array or `{"input": x}`.
    """
    from bn_onnx.onnx_meta import INPUT_NAME
    from bn_onnx.tabular import TabularSpec

    spec = _cfg(config, "tabular")
    if spec is None:
        if isinstance(x, Mapping):
            if set(x) != {INPUT_NAME}:
                raise InputDataError(f"this model takes one input {INPUT_NAME!r}, got {sorted(x)}")
            x = x[INPUT_NAME]
        return np.asarray(x, dtype=np.float64)
    if not isinstance(spec, TabularSpec):
        spec = TabularSpec.from_dict(spec)
    if not isinstance(x, Mapping):
        names = sorted({c.input for c in spec.columns})
        raise InputDataError(f"a tabular model takes its raw columns by input name: {names}")
    numeric, codes = spec.preprocess(x, dtype=np.float64)
    parts = [_tensor(tensors, f"embeddings.{j}.weight")[codes[:, j]] for j in range(codes.shape[1])]
    return np.concatenate([*parts, numeric], axis=1)


def forward_tensors(config: Any, tensors: Mapping[str, Any], x: Any) -> Forward:
    """float64 forward of an MLP given its config (MLPConfig or its dict) and state_dict arrays.

    Follows `bn_onnx.model.MLP` in eval mode: input norm (affine=False BN), then per block
    linear -> BN -> act ("pre"), linear -> act -> BN ("post") or linear -> act ("none"); dropout
    is the identity; then the head. `x` is the input array (or `{"input": x}`); a tabular
    model (`bn_onnx.model.TabularMLP`) takes its raw columns, `{"continuous": ...,
    "categorical": ...}`, and starts with the fill, indicators, category codes and
    embeddings (see `_first_layer_input`).
    """
    h = _first_layer_input(config, tensors, x)
    in_features = int(_cfg(config, "in_features"))
    if h.ndim != 2 or h.shape[1] != in_features:
        raise InputDataError(f"input must be [rows, {in_features}], got shape {tuple(h.shape)}")
    eps = float(_cfg(config, "bn_eps", 1e-5))
    bn = str(_cfg(config, "bn", "pre"))
    name = str(_cfg(config, "activation", "relu"))
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"unknown activation {name!r} in the model config")
    act = ACTIVATIONS[name]
    taps: list[tuple[str, Array]] = []
    if _cfg(config, "input_norm", True):
        h = batch_norm(
            h,
            None,
            None,
            _tensor(tensors, "input_norm.running_mean"),
            _tensor(tensors, "input_norm.running_var"),
            eps,
        )

    def block_bn(i: int, z: Array) -> Array:
        p = f"blocks.{i}.bn."
        return batch_norm(
            z,
            _tensor(tensors, p + "weight"),
            _tensor(tensors, p + "bias"),
            _tensor(tensors, p + "running_mean"),
            _tensor(tensors, p + "running_var"),
            eps,
        )

    for i in range(len(tuple(_cfg(config, "hidden", ())))):
        w = _tensor(tensors, f"blocks.{i}.linear.weight")
        b = _tensor(tensors, f"blocks.{i}.linear.bias")
        z = h @ w.T + b
        if bn == "pre":
            z = block_bn(i, z)
        taps.append((f"block {i} pre-activation", z))
        h = act(z)
        taps.append((f"block {i} activation", h))
        if bn == "post":
            h = block_bn(i, h)
    out = h @ _tensor(tensors, "head.weight").T + _tensor(tensors, "head.bias")
    taps.append(("output", out))
    return Forward(out, taps)


def checkpoint_forward(checkpoint: Any, x: Any) -> Forward:
    """float64 forward of a checkpoint: a directory, or a `Checkpoint` (`.config`, `.tensors`).

    `x`: the input array [rows, features], or feeds by input name: `{"input": x}` for an
    MLP (what `bn_onnx.verify.oracles.checkpoint_input` gives), a tabular model's raw columns
    `{"continuous": ..., "categorical": ...}`; see `forward_tensors`.

    Raises:
        UnsupportedModelError: feeds that are not the model's inputs.
        InputDataError: an input of the wrong shape.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        from bn_onnx.checkpoint import read_checkpoint

        checkpoint = read_checkpoint(checkpoint)
    return forward_tensors(checkpoint.config, checkpoint.tensors, x)


# --------------------------------------------------------------------------------------------
# ONNX graph forward


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
