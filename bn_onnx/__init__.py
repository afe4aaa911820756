"""bn-onnx: MLPs with batch normalization, from training to folded ONNX, verified."""

from __future__ import annotations

from bn_onnx.errors import BnOnnxError

__version__ = "0.1.0"

__all__ = ["BnOnnxError", "__version__"]
