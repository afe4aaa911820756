"""Prove that ONNX models compute the same thing: every model, provider and probe, against float64.

The pieces, composed by `engine.verify_models` (and by `bn-onnx verify` through `verify()`):

- `signature`: each model's inputs and outputs, and probe shapes for symbolic dims (`--shape`);
- `probes`: the given data (`--input`, the checkpoint's test split) and seeded random inputs
  spanning each input's range; each is a probe kind of its own, and both count;
- `runners`: the `Runner` protocol and the ONNX runners (onnxruntime on a provider,
  onnx.reference, the graph cast to float64 by `float64`); `oracles`: the checkpoint's runners
  (its numpy float64 forward, torch eval); `runs`: the run results and the sessions below them;
- `engine`: runners over probes into run results (Polygraphy's `Comparator.run`), then
  `pairs`: which results are compared with which, by kind and provider, with
  `bn_onnx.compare`'s per-dtype tolerances (its `compare_accuracy`);
- `locate`: the first intermediate tensor where two runs part ways; `report`: the result.

Reference chain (DESIGN.md): float64 (checkpoint, else the first unfolded graph) -> torch
float32 eval -> onnxruntime unfolded -> onnxruntime folded, per provider. Where no float64
reference can exist (quantization ops), the float32 models are compared with each other at
twice the default tolerance, and the report says so. No torch import here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from bn_onnx.verify.engine import (
    DEFAULT_ROWS,
    VerifyOptions,
    is_folded,
    is_quantized,
    verify_models,
    verify_providers,
)
from bn_onnx.verify.locate import Location
from bn_onnx.verify.oracles import TorchRunner
from bn_onnx.verify.report import FoldingRow, Pair, VerifyReport, render, write_report
from bn_onnx.verify.runners import ONNX_REFERENCE, Runner
from bn_onnx.verify.taps import Tap, find_taps

__all__ = [
    "DEFAULT_ROWS",
    "ONNX_REFERENCE",
    "FoldingRow",
    "Location",
    "Pair",
    "Runner",
    "Tap",
    "TorchRunner",
    "VerifyOptions",
    "VerifyReport",
    "find_taps",
    "is_folded",
    "is_quantized",
    "render",
    "verify",
    "verify_models",
    "verify_providers",
    "write_report",
]


def verify(
    models: Sequence[str | os.PathLike[str]], options: VerifyOptions | None = None, **kwargs: object
) -> VerifyReport:
    """`verify_models(models, options)`, the options also given as `VerifyOptions`' keywords
    (`verify(paths, checkpoint=..., locate=True)`).

    Raises:
        BnOnnxError: bad models, inputs or options (exit 2), or nothing to compare.
        TypeError: a keyword that `VerifyOptions` has not.
    """
    if kwargs:
        from dataclasses import replace

        options = replace(options or VerifyOptions(), **kwargs)
    return verify_models(models, options)
