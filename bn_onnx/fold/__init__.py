"""Fold inference-mode BatchNormalization (and other per-channel affine maps: Mul/Add chains by
constants) into neighbouring linear nodes, on onnx-ir.

Only onnx, onnx-ir and numpy: an app that folds models installs no torch. The package:

- `sites`: what an affine site is, the rule interface (`Rule`, `Plan`, `Refusal`, `SiteKind`);
- `bn_site`, `affine_ops`: the site kinds (BatchNormalization; Mul/Add/Sub/Div chains by
  constants, and their merge into the BN before them);
- `context`: readers, constants, shapes and safe rewrites, shared by every rule;
- `preceding`, `following`, `bn_merge`: the rule families (into the node before, the nodes
  after, BN -> BN merged); `legacy`: broadcasting before opset 7; `flush`: float16
  channels the unfolded model makes constant;
- `layout`, `pools`, `concat`, `casts`, `splits`: the steps of their walks (layout ops,
  commuting pools, Concat, float Casts, Split);
- `nodes`: the ground floor (node attributes, labels, float dtypes, passthroughs), which the
  cleanup uses too;
- `evaluate`: one standard node evaluated on constant inputs (for `constants`);
- `scopes`: subgraphs and model-local functions;
- `_pass`: the driver (`FoldBatchNormPass`, an onnx-ir pass), `fold_in_place` (the pass and
  the cleanup), `fold_model`, `inspect_model`;
- `model_io`: `fold_file` (load with onnx-ir, fold, clean, save tensor by tensor, atomically);
- `cleanup`: the cleanup after the fold (the exporter's constants, dead code, duplicates);
- `lazy`: rewritten weights of external data computed when written;
- `affine_math`: the float64 arithmetic, pure numpy;
- `validate`: the checker and strict shape inference on the model without its weights;
- `guard`: the output check (checker, onnxruntime session) and the cleanup steps it drops;
- `report`: the report objects.
"""

from __future__ import annotations

from bn_onnx.fold._pass import (
    DEFAULT_RULES,
    DEFAULT_SITE_KINDS,
    FoldBatchNormPass,
    FoldPassResult,
    fold_in_place,
    fold_model,
    inspect_model,
)
from bn_onnx.fold.model_io import FoldOptions, fold_file
from bn_onnx.fold.report import BnEntry, BnInfo, FoldReport, FoldResult
from bn_onnx.fold.rules import Rule, SiteKind
from bn_onnx.fold.sites import AffineSite, Plan, Refusal
from bn_onnx.fold.validate import FoldCheckError, FoldOutputError, InvalidModelError

__all__ = [
    "DEFAULT_RULES",
    "DEFAULT_SITE_KINDS",
    "AffineSite",
    "BnEntry",
    "BnInfo",
    "FoldBatchNormPass",
    "FoldCheckError",
    "FoldOptions",
    "FoldOutputError",
    "FoldPassResult",
    "FoldReport",
    "FoldResult",
    "InvalidModelError",
    "Plan",
    "Refusal",
    "Rule",
    "SiteKind",
    "fold_file",
    "fold_in_place",
    "fold_model",
    "inspect_model",
]
