"""The checkpoint's float64 forward: `bn_onnx.model.MLP` (and `TabularMLP`) in numpy float64.

The independent baseline of `bn-onnx verify`: the model's equations on the checkpoint's own
tensors, with `bn_onnx.float64_kernels`' batch norm and activations. numpy only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bn_onnx.errors import InputDataError, UnsupportedModelError
from bn_onnx.float64_kernels import ACTIVATIONS, Array, batch_norm


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
