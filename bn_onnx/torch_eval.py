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
    model, _ = load_model(checkpoint)
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    return out.numpy()
