"""verify's verdict agrees with its own evidence (issue 19, deliver 6): a model's values that
miss the float64 tolerance but are no further from float64 than the original's are accepted
(and said so); a changed weight still fails."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bn_onnx.cli import main
from bn_onnx.compare import compare_outputs
from bn_onnx.verify import pairs
from bn_onnx.verify.report import Pair, VerifyReport, render
from bn_onnx.verify.runs import Run

ATOL, RTOL = 1e-5, 1e-4


def _report(ref: np.ndarray, orig: np.ndarray, folded: np.ndarray) -> VerifyReport:
    base = Run("float64 reference", "float64", "", {"random": {"y": ref}})
    a = Run("a.onnx [cpu]", "onnx", "", {"random": {"y": orig}}, "a.onnx", "cpu", False)
    b = Run("b.onnx [cpu]", "onnx", "", {"random": {"y": folded}}, "b.onnx", "cpu", True)
    report = VerifyReport(runs=[base, a, b])
    for run in (a, b):
        comp = compare_outputs(run.outputs["random"], base.outputs["random"], atol=ATOL, rtol=RTOL)
        report.pairs.append(Pair("random", run.label, base.label, comp))
    return report


def _float32_like_errors(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A [2, 4, 6] float64 reference, and two runs with float32-sized errors of the same
    scale per channel: the original's largest at big values (inside rtol), the other's one
    largest error at a value near zero (outside atol + rtol * |ref|)."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(2, 4, 6))
    ref[0, 1, 3] = ref[0, 2, 3] = 1e-3
    ref[1, 2, 0] = 5.0
    orig = ref + rng.uniform(-2e-6, 2e-6, ref.shape)
    orig[1, 2, 0] += 3.9e-5  # within rtol * 5.0
    folded = ref + rng.uniform(-2e-6, 2e-6, ref.shape)
    folded[0, 2, 3] += 3.8e-5  # beyond 1e-5 + 1e-4 * 1e-3, within channel 2's own 3.9e-5
    return ref, orig, folded


def test_an_element_no_further_from_float64_than_the_original_is_not_a_failure():
    ref, orig, folded = _float32_like_errors(0)
    report = _report(ref, orig, folded)
    assert not report.passed  # against the bare tolerance, 1 value fails
    pairs.forgive_float_noise(report, original="a.onnx")
    out = report.pairs[1].comparison.outputs[0]
    assert report.passed and (out.n_mismatched, out.n_forgiven) == (0, 1)
    assert "no further from float64 than a.onnx" in out.forgiven
    assert "1 within the original's own error" in render(report)


def test_an_error_beyond_the_originals_in_its_channel_still_fails():
    ref, orig, folded = _float32_like_errors(1)
    folded[0, 1, 3] += 2e-5  # channel 1's original error is at most 2e-6: 10x that
    folded[0, 2, 3] += 5e-5  # channel 2: 8.8e-5 against the original's 3.9e-5
    report = _report(ref, orig, folded)
    pairs.forgive_float_noise(report, original="a.onnx")
    out = report.pairs[1].comparison.outputs[0]
    assert not report.passed and out.n_mismatched == 2 and out.n_forgiven == 0


def _convtranspose_bn(path):
    """onnxscript's test shape: ConvTranspose (no bias, group 1) -> BatchNormalization."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(a.astype(np.float32), n)
        for n, a in [
            ("W", rng.normal(size=(8, 16, 3, 3))),
            ("gamma", rng.normal(size=16)),
            ("beta", rng.normal(size=16)),
            ("mean", rng.normal(size=16)),
            ("var", np.abs(rng.normal(size=16))),
        ]
    ]
    graph = helper.make_graph(
        [
            helper.make_node("ConvTranspose", ["X", "W"], ["c"]),
            helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["Y"]),
        ],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 8, 6, 6])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 16, 8, 8])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def test_convtranspose_fold_passes_and_a_small_weight_change_fails(tmp_path, capsys):
    src, out, bad = tmp_path / "m.onnx", tmp_path / "f.onnx", tmp_path / "t.onnx"
    _convtranspose_bn(src)
    assert main(["fold", "-q", str(src), "-o", str(out)]) == 0
    assert main(["verify", str(src), str(out)]) == 0
    folded = onnx.load(out)
    weight = next(t for t in folded.graph.initializer if t.dims and len(t.dims) == 4)
    w = numpy_helper.to_array(weight).copy()
    w[3, 5, 1, 1] *= 1.001  # one weight of 1152, by 0.1%
    weight.CopyFrom(numpy_helper.from_array(w, weight.name))
    onnx.save(folded, bad)
    capsys.readouterr()
    assert main(["verify", str(src), str(bad)]) == 1
    assert "FAIL" in capsys.readouterr().out
