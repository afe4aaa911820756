"""The torch side of `bn-onnx verify --checkpoint`: the checkpoint's MLP in eval mode, float32.

Kept apart from `bn_onnx.verify` so that verify itself never imports torch; the CLI imports this
module only when a checkpoint is given.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from bn_onnx.checkpoint import load_model


def run_checkpoint(checkpoint: str | os.PathLike[str], x: np.ndarray) -> np.ndarray:
    """The checkpoint's outputs for the rows of `x`, computed by torch on the CPU in eval mode."""
    return run_checkpoint_taps(checkpoint, x)[0]


def run_checkpoint_taps(
    checkpoint: str | os.PathLike[str], x: np.ndarray
) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """Outputs plus the values at verify's matching points, labelled like the float64 reference.

    Forward hooks on each block's activation record its input ("block i pre-activation") and
    output ("block i activation"); the last point is the output.
    """
    model, _ = load_model(checkpoint)
    taps: list[tuple[str, np.ndarray]] = []
    hooks = []
    for i, block in enumerate(model.blocks):

        def hook(module, inputs, output, i=i):
            taps.append((f"block {i} pre-activation", inputs[0].detach().numpy().copy()))
            taps.append((f"block {i} activation", output.detach().numpy().copy()))

        hooks.append(block.act.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
    finally:
        for h in hooks:
            h.remove()
    taps.append(("output", out))
    return out, taps
