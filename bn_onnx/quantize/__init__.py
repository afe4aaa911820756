"""INT8 models with proof: the quantization-aware fold, onnxruntime's quantizer, and the
comparison of the INT8 model against its float model.

- `kernels`: the CPU-dependent default (u8s8 with or without reduce_range, u8u8);
- `pipeline`: fold, pre-process (no symbolic shape inference), `quantize_static` (QDQ,
  per-channel weights, MinMax);
- `proof`: top-1 agreement, accuracy, SQNR and max error per output against the float model,
  the accuracy budget, and every op left in float with the reason.

No torch import: an app that quantizes models installs no torch.
"""

from __future__ import annotations

from bn_onnx.quantize.kernels import Kernels, choose_kernels, cpu_flags
from bn_onnx.quantize.pipeline import DEFAULT_MAX_GROWTH, QuantizeResult, quantize_model

__all__ = [
    "DEFAULT_MAX_GROWTH",
    "Kernels",
    "QuantizeResult",
    "choose_kernels",
    "cpu_flags",
    "quantize_model",
]
