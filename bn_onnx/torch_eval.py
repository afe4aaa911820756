"""The torch side of `bn-onnx verify --checkpoint`: the checkpoint's MLP in eval mode, float32.

Kept apart from `bn_onnx.verify` so that verify itself never imports torch; the CLI imports this
module only when a checkpoint is given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from bn_onnx.checkpoint import load_model
from bn_onnx.errors import InputDataError
from bn_onnx.onnx_meta import INPUT_NAME


def run_checkpoint(checkpoint: str | os.PathLike[str], x: Any) -> np.ndarray:
    """The checkpoint's outputs for the rows of `x`, computed by torch on the CPU in eval mode.

    `x`: see `run_checkpoint_taps`.
    """
    return run_checkpoint_taps(checkpoint, x)[0]


def _model_inputs(config: Any, x: Any) -> list[torch.Tensor]:
    """The torch module's inputs: `x` as float32, or a tabular model's preprocessed columns."""
    spec = config.tabular
    if spec is None:
        if isinstance(x, Mapping):
            if set(x) != {INPUT_NAME}:
                raise InputDataError(f"this model takes one input {INPUT_NAME!r}, got {sorted(x)}")
            x = x[INPUT_NAME]
        return [torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))]
    if not isinstance(x, Mapping):
        names = sorted({c.input for c in spec.columns})
        raise InputDataError(f"a tabular model takes its raw columns by input name: {names}")
    numeric, codes = spec.preprocess(x, dtype=np.float32)
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in spec.model_inputs(numeric, codes)]


def run_checkpoint_taps(
    checkpoint: str | os.PathLike[str], x: Any
) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """Outputs plus the values at verify's matching points, labelled like the float64 reference.

    `x` is the input rows (float [rows, features]) or feeds by input name: `{"input": x}`, or
    for a tabular model its raw columns `{"continuous": float32 [rows, k] with NaN for a
    missing value, "categorical": str [rows, m] with "" for a missing value}`, which
    `TabularSpec.preprocess` turns into the network's inputs as the exported graph does.

    Forward hooks on each block's activation record its input ("block i pre-activation") and
    output ("block i activation"); the last point is the output.
    """
    model, ckpt = load_model(checkpoint)
    inputs = _model_inputs(ckpt.config, x)
    taps: list[tuple[str, np.ndarray]] = []
    hooks = []
    for i, block in enumerate(model.blocks):

        def hook(module, inputs, output, i=i):
            taps.append((f"block {i} pre-activation", inputs[0].detach().numpy().copy()))
            taps.append((f"block {i} activation", output.detach().numpy().copy()))

        hooks.append(block.act.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(*inputs).numpy()
    finally:
        for h in hooks:
            h.remove()
    taps.append(("output", out))
    return out, taps
