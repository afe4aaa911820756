"""verify of one model with its checkpoint (issue 20, deliver 6): the float32 tolerance is
calibrated to what float32 costs the same checkpoint in a run that is not the model (torch
eval against the float64 checkpoint forward), printed with its reason, as the two-model path
calibrates to the original model; a model alone never calibrates its own proof."""

from __future__ import annotations

import numpy as np
import pytest

from bn_onnx.compare import TolerancePolicy
from bn_onnx.verify import pairs
from bn_onnx.verify.report import VerifyReport
from bn_onnx.verify.runs import Run


def _report(torch_error: float | None, model_error: float) -> VerifyReport:
    truth = np.linspace(-3.0, 3.0, 12).reshape(4, 3)
    base = Run("float64 checkpoint", "checkpoint", "numpy")
    base.outputs["data"] = {"logits": truth}
    model = Run("m.onnx [cpu]", "onnx", "ort", model="m.onnx", folded=True)
    model.outputs["data"] = {"logits": (truth + model_error).astype(np.float32)}
    runs = [base, model]
    if torch_error is not None:
        torch = Run("torch eval", "torch", "torch float32")
        torch.outputs["data"] = {"logits": (truth + torch_error).astype(np.float32)}
        runs.append(torch)
    return VerifyReport(runs=runs)


def _atol(policy: TolerancePolicy) -> tuple[float, str]:
    tol = policy.resolve("logits", np.float32)
    return tol.atol, tol.origin


def test_one_model_is_judged_by_what_float32_costs_torch_eval():
    policy = pairs.calibrate(
        _report(torch_error=8e-5, model_error=9e-5),
        TolerancePolicy(),
        original="m.onnx",
    )
    atol, origin = _atol(policy)
    # torch eval needs max(|a - b| - rtol |b|): 8e-5 less 1e-4 times the smallest |b| (3/11),
    # in float32; twice that is the atol, not the model's own 9e-5
    truth = np.linspace(-3.0, 3.0, 12)
    err = np.abs((truth + 8e-5).astype(np.float32).astype(np.float64) - truth)
    assert atol == pytest.approx(2 * np.max(err - 1e-4 * np.abs(truth)))
    assert atol > 1e-5
    assert origin.startswith("float32 default raised to 2x the atol torch eval needs")


def test_one_model_without_an_independent_float32_run_keeps_the_default():
    policy = pairs.calibrate(
        _report(torch_error=None, model_error=9e-5),
        TolerancePolicy(),
        original="m.onnx",
    )
    assert _atol(policy) == (pytest.approx(1e-5), "float32 default")


def test_one_model_is_also_judged_by_its_own_float32_arithmetic_not_by_its_constants():
    """Against its own graph in float64 (the same constants, exact arithmetic) the model shows
    what the runtime's float32 costs; constants that are off stay off against the checkpoint."""
    report = _report(torch_error=None, model_error=9e-5)
    truth = report.runs[0].outputs["data"]["logits"]
    graph = Run("float64 reference", "float64", "the graph in float64")
    graph.outputs["data"] = {"logits": truth + 8.99e-5}  # the constants are 9e-5 off
    report.runs.append(graph)
    policy = pairs.calibrate(
        report,
        TolerancePolicy(),
        original="m.onnx",
    )
    atol, origin = _atol(policy)
    assert atol == pytest.approx(1e-5)  # float32 arithmetic here is exact to 1e-8: no raise
    assert origin == "float32 default"
