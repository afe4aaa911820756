"""Old home of the float64 kernels and the checkpoint forward, kept so that older imports work.

New code imports `bn_onnx.float64_kernels` (numpy float64 kernels) and
`bn_onnx.checkpoint_forward` (the checkpoint's float64 forward).
"""

from __future__ import annotations

from bn_onnx.checkpoint_forward import Forward, checkpoint_forward, forward_tensors
from bn_onnx.float64_kernels import (
    ACTIVATIONS,
    batch_norm,
    batch_norm_node,
    conv,
    conv_transpose,
    erf,
    gelu,
    pool,
    sigmoid,
)

__all__ = [
    "ACTIVATIONS",
    "Forward",
    "batch_norm",
    "batch_norm_node",
    "checkpoint_forward",
    "conv",
    "conv_transpose",
    "erf",
    "forward_tensors",
    "gelu",
    "pool",
    "sigmoid",
]
