"""The fold's output check: the model written is valid and loads in onnxruntime.

After the fold and the cleanup, `OutputChecker.problem` checks the result:

1. the full checker with strict shape inference (`validate.validate_skeleton`: what
   `onnx.checker.check_model(full_check=True)` checks), on the model's skeleton (the big
   initializers declared as typed inputs: no weight is copied or read);
2. an onnxruntime session of the same skeleton (CPU, graph optimizations off), where
   onnxruntime is installed and loads the input: a model it cannot load to begin with (an
   opset it does not know, a custom domain) is checked by the checker alone.

`fold_in_place` (in `_pass`) acts on a failure: a cleanup step that breaks the model is left
out for that model (`fallback_skips`: one step at a time; then no cleanup), and the report's
`checks` says which and why; when the fold alone fails, the model is refused
(`FoldCheckError`). docs/cleanup.md, "Output check, and what the libraries get wrong".
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import onnx
import onnx_ir as ir

from bn_onnx.errors import one_line
from bn_onnx.fold.cleanup import CLEANUP_STEPS
from bn_onnx.fold.validate import InvalidModelError, validate_skeleton

# The order steps are left out in: the constant folder and the rewrite rules are the ones
# known to break models (docs/cleanup.md); onnx-ir's passes come after.
_SUSPECTS = ("rewrite_rules", "constant_folding")


def fallback_skips() -> list[tuple[str, ...]]:
    """The sets of cleanup steps to leave out, in the order they are tried: one step each
    (leaving out "constant_folding" leaves out the rewrite rules too: they run after it)."""
    return [(s,) for s in _SUSPECTS] + [(s,) for s in CLEANUP_STEPS if s not in _SUSPECTS]


@dataclasses.dataclass
class OutputChecks:
    """What the output check found (the fold report's `checks`).

    Attributes:
        checker: "passed" (the full checker with strict shape inference).
        onnxruntime: "loaded", "not installed", or "not checked: ..." (it does not load the
            input either).
        dropped_steps: cleanup step -> why it was left out (the first line of the check that
            the model with every step failed).
        cleanup_dropped: why the whole cleanup was left out (no single step explained the
            failure), or None.
    """

    checker: str = "passed"
    onnxruntime: str = "loaded"
    dropped_steps: dict[str, str] = dataclasses.field(default_factory=dict)
    cleanup_dropped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class OutputChecker:
    """Checks fold outputs against the input's own standing (see the module docstring).

    Args:
        input_skeleton: the input's checked skeleton (`FoldBatchNormPass.input_skeleton`); its
            onnxruntime session is made only when an output fails to load.
    """

    def __init__(self, input_skeleton: onnx.ModelProto | None) -> None:
        self.input_skeleton = input_skeleton
        self.checks = OutputChecks()
        self._ort_applies: bool | None = None
        if importlib.util.find_spec("onnxruntime") is None:
            self.checks.onnxruntime = "not installed"
            self._ort_applies = False

    def problem(self, model: ir.Model) -> str | None:
        """Why `model` must not be written ("checker: ...", "onnxruntime: ..."), or None."""
        try:
            skeleton, _ = validate_skeleton(model)
        except InvalidModelError as exc:
            return f"checker: {exc}"
        if self._ort_applies is False:
            return None
        error = _ort_error(skeleton)
        if error is None or not self._ort_checks():
            return None
        return f"onnxruntime: {error}"

    def _ort_checks(self) -> bool:
        """Whether onnxruntime can judge outputs: it is installed and loads the input."""
        if self._ort_applies is None:
            error = "no input" if self.input_skeleton is None else _ort_error(self.input_skeleton)
            self._ort_applies = error is None
            if error is not None:
                self.checks.onnxruntime = f"not checked: it does not load the input ({error})"
        return self._ort_applies


def _ort_error(skeleton: onnx.ModelProto) -> str | None:
    """The first line of onnxruntime's refusal to load `skeleton`, or None when it loads (or
    onnxruntime is not installed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # errors only: its warnings are not the user's business
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        ort.InferenceSession(
            skeleton.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # InvalidGraph, Fail, NotImplemented ...
        return one_line(exc)
    return None
