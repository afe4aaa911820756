"""verify as runners: pairs are planned from the runs' kinds and providers (not their labels),
a runner of any class plugs into the engine, and `--locate` reuses the runners that ran."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bn_onnx.compare import TolerancePolicy
from bn_onnx.errors import UnsupportedModelError
from bn_onnx.verify import engine, pairs
from bn_onnx.verify.probes import Probe
from bn_onnx.verify.report import VerifyReport
from bn_onnx.verify.runners import OnnxReferenceRunner
from bn_onnx.verify.runs import Run


def _run(label: str, kind: str, y: np.ndarray, provider: str | None = None, **kw: object) -> Run:
    return Run(label, kind, "", {"random": {"y": y}}, provider=provider, **kw)  # type: ignore[arg-type]


def test_pairs_follow_kind_and_provider_whatever_the_labels_say():
    y = np.linspace(-1.0, 1.0, 8).reshape(2, 4)
    runs = [
        _run("truth", "float64", y),
        _run("first", "onnx", y.astype(np.float32), "cpu", model="a.onnx", folded=False),
        _run("second [cuda]", "onnx", y.astype(np.float32), "cpu", model="b.onnx", folded=True),
        _run("third", "onnx", (y + 1).astype(np.float32), "reference", model="b.onnx"),
    ]
    report = VerifyReport(runs=runs, probes=[Probe("random", "r", [{}])])
    pairs.add_pairs(report, TolerancePolicy(), set())
    got = {(p.actual, p.expected, p.kind) for p in report.pairs}
    assert got == {
        ("first", "truth", "float64"),
        ("second [cuda]", "truth", "float64"),
        ("third", "truth", "float64"),
        ("second [cuda]", "first", "info"),  # same provider (cpu), though the label says cuda
    }
    assert [(f.provider, f.unfolded, f.folded) for f in report.folding] == [
        ("cpu", "first", "second [cuda]")
    ]
    assert not next(p for p in report.pairs if p.actual == "third")


class _Constant:
    """A runner that is no class of verify's: outputs a fixed array, whatever the feeds."""

    kind, detail, provider, folded, graph, tap_nodes = "float64", "fixed", None, None, None, {}

    def __init__(self, label: str, y: np.ndarray) -> None:
        self.label, self.y = label, y

    def run(self, feeds):  # noqa: ANN001, ANN201
        return {"y": self.y}

    def intermediates(self, feed, names):  # noqa: ANN001, ANN201
        return {}

    def result(self) -> Run:
        return Run(self.label, self.kind, self.detail)


def test_run_all_takes_any_runner_and_skips_only_what_it_is_told():
    probes = [Probe("random", "r", [{}]), Probe("data", "d", [{}])]
    y = np.ones(3)
    runs, ran = engine.run_all([_Constant("c", y)], probes)
    assert [r.label for r in runs] == ["c"] and set(runs[0].outputs) == {"random", "data"}
    assert ran[0].label == "c"

    class Failing(_Constant):
        def run(self, feeds):  # noqa: ANN001, ANN201
            raise UnsupportedModelError("no kernel")

    runners = [Failing("bad", y), _Constant("good", y)]
    runs, ran = engine.run_all(runners, probes, lambda r, exc: r.label == "bad")
    assert [r.label for r in runs] == ["good"] == [r.label for r in ran]
    with pytest.raises(UnsupportedModelError, match="no kernel"):
        engine.run_all(runners, probes)


def _model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnx_reference_runner_gives_intermediates_from_the_same_evaluator():
    model = _model()
    runner = OnnxReferenceRunner("m [reference]", "m.onnx", model, folded=None)
    evaluator = runner.session.evaluator
    x = np.array([[1.0, -2.0, 3.0]], np.float32)
    h = runner.intermediates({"x": x}, ["h"])["h"]
    np.testing.assert_allclose(h, x.astype(np.float64) @ np.arange(6.0).reshape(3, 2), rtol=1e-6)
    np.testing.assert_array_equal(runner.run([{"x": x}])["y"], np.maximum(h, 0))
    assert runner.session.evaluator is evaluator and runner.provider == "reference"


def test_ort_and_float64_runners_give_the_same_intermediates_by_name():
    from bn_onnx.verify import float64
    from bn_onnx.verify.runners import Float64Runner, OrtRunner
    from bn_onnx.verify.runs import OrtSession

    model = _model()
    ort = OrtRunner("m [cpu]", "m.onnx", model, None, OrtSession(model, "cpu"))
    f64 = Float64Runner("f64", float64.build(model, "f64", "m"), model)
    x = np.array([[1.0, -2.0, 3.0], [0.5, 0.25, -1.0]], np.float32)
    want = x.astype(np.float64) @ np.arange(6.0).reshape(3, 2)
    for _ in range(2):  # the second call reuses the sessions with `h` marked
        got = ort.intermediates({"x": x}, ["h"])["h"]
        np.testing.assert_allclose(got, want, rtol=1e-6)
        exact = f64.intermediates({"x": x}, ["h"])["h"]
        assert exact.dtype == np.float64
        np.testing.assert_allclose(exact, want, rtol=1e-15)
    assert (ort.kind, ort.provider, f64.kind, f64.result().kind) == (
        "onnx",
        "cpu",
        "float64",
        "float64",
    )
