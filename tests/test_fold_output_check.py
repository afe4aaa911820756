"""The fold never writes a model that is invalid or does not load (issue 19, deliver 3).

Regression shapes: an opset-13 Reshape of a Shape chain (onnxscript's rewrite wrote
`allowzero=1`), an opset-11 Unsqueeze with negative axes (onnx.reference's Unsqueeze-11 put
them in the wrong place), a Squeeze-11 our constants ran at the newest opset; then the guard
itself: a step that breaks the model is left out and reported, a fold that breaks it alone is
refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bn_onnx.cli import main
from bn_onnx.fold import FoldCheckError, cleanup, fold_model

CASES = Path(__file__).parent / "data" / "fold_cases"
GAP_CASE = CASES / "opset13_gap_reshape_shape_of.onnx"


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])


def _assert_valid_and_same(original: onnx.ModelProto, folded: onnx.ModelProto, x: np.ndarray):
    onnx.checker.check_model(folded, full_check=True)
    onnx.shape_inference.infer_shapes(folded, check_type=True, strict_mode=True)
    name = original.graph.input[0].name
    want = _session(original).run(None, {name: x})[0]
    got = _session(folded).run(None, {name: x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _conv_bn_scaled(opset: int, scale_node: str, foldable: bool) -> onnx.ModelProto:
    """Conv -> BN [-> Relu] -> Mul by a per-channel constant made by Unsqueeze/Squeeze."""
    rng = np.random.default_rng(0)

    def init(name, array):
        return numpy_helper.from_array(np.asarray(array, np.float32), name)

    inits = [
        init("w", rng.normal(size=(4, 3, 3, 3))),
        init("s", rng.uniform(0.5, 1.5, 4)),
        init("b", rng.normal(size=4)),
        init("m", rng.normal(size=4)),
        init("v", rng.uniform(0.5, 1.5, 4)),
    ]
    if scale_node == "Unsqueeze":
        inits.append(init("k", rng.uniform(0.5, 1.5, 4)))
        if opset < 13:
            scale = helper.make_node("Unsqueeze", ["k"], ["k3"], axes=[-2, -1])
        else:
            inits.append(numpy_helper.from_array(np.array([-2, -1], np.int64), "axes"))
            scale = helper.make_node("Unsqueeze", ["k", "axes"], ["k3"])
    else:  # Squeeze-11 of a [1, 4, 1, 1] constant, axes as the attribute
        inits.append(init("k", rng.uniform(0.5, 1.5, (1, 4, 1, 1))))
        scale = helper.make_node("Squeeze", ["k"], ["k3"], axes=[0])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"]),
    ]
    before_mul = "bn"
    if not foldable:  # a Relu between: the Mul stays, and the cleanup folds its constant
        nodes.append(helper.make_node("Relu", ["bn"], ["r"]))
        before_mul = "r"
    nodes += [scale, helper.make_node("Mul", [before_mul, "k3"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_opset13_gap_reshape_folds_to_a_valid_model_that_computes_the_same():
    original = onnx.load(GAP_CASE)
    result = fold_model(original)
    folded = result.model
    assert result.report.n_folded == 1
    assert result.report.checks["dropped_steps"] == {}
    for node in folded.graph.node:
        assert all(a.name != "allowzero" for a in node.attribute), node
    x = np.random.default_rng(1).normal(size=(2, 3, 16, 16)).astype(np.float32)
    _assert_valid_and_same(original, folded, x)


@pytest.mark.parametrize("opset", [11, 12, 13])
@pytest.mark.parametrize("foldable", [True, False], ids=["mul-folded", "mul-left"])
def test_unsqueeze_of_negative_axes_keeps_its_channel_axis(opset, foldable):
    """[4] -> [4, 1, 1]: folded into the Conv (our constants) or by the cleanup (onnxscript)."""
    original = _conv_bn_scaled(opset, "Unsqueeze", foldable)
    result = fold_model(original)
    assert result.report.checks["dropped_steps"] == {}
    ops = [n.op_type for n in result.model.graph.node]
    assert "Unsqueeze" not in ops and ("Mul" not in ops) == foldable
    x = np.random.default_rng(2).normal(size=(2, 3, 8, 8)).astype(np.float32)
    _assert_valid_and_same(original, result.model, x)


def test_squeeze11_axes_attribute_is_honoured_by_the_fold_constants():
    """Run at the newest opset, Squeeze ignored `axes=[0]` and gave [4] instead of [4, 1, 1]."""
    original = _conv_bn_scaled(11, "Squeeze", foldable=True)
    result = fold_model(original, cleanup=False)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    x = np.random.default_rng(3).normal(size=(2, 3, 8, 8)).astype(np.float32)
    _assert_valid_and_same(original, result.model, x)


def _upstream_reshape_rule(monkeypatch):
    """Bring back onnxscript's own rule, which writes allowzero=1 at any opset."""
    from onnxscript.rewriter.rules.common import _materialize_reshape_shape as upstream

    monkeypatch.setattr(
        cleanup, "_opset_safe_materialize_rule", lambda: upstream.materialize_reshape_shape_rule
    )


def test_a_rewrite_that_breaks_the_model_is_left_out_and_reported(monkeypatch, tmp_path, capsys):
    _upstream_reshape_rule(monkeypatch)
    out, rep = tmp_path / "f.onnx", tmp_path / "r.json"
    assert main(["fold", str(GAP_CASE), "-o", str(out), "--report", str(rep)]) == 0
    text = capsys.readouterr().out
    assert "cleanup: left out rewrite_rules (checker: " in text and "allowzero" in text
    checks = json.loads(rep.read_text())["checks"]
    assert list(checks["dropped_steps"]) == ["rewrite_rules"]
    assert "allowzero" in checks["dropped_steps"]["rewrite_rules"]
    assert checks["cleanup_dropped"] is None
    x = np.random.default_rng(4).normal(size=(1, 3, 16, 16)).astype(np.float32)
    _assert_valid_and_same(onnx.load(GAP_CASE), onnx.load(out), x)


def test_a_constant_fold_that_breaks_the_model_is_left_out(monkeypatch):
    """Without the axes fix, onnxscript's folder makes [1, 4, 1]: Mul no longer broadcasts."""
    monkeypatch.setattr(cleanup, "_nonnegative_unsqueeze_axes", lambda node: None)
    original = _conv_bn_scaled(11, "Unsqueeze", foldable=False)
    result = fold_model(original)
    reason = result.report.checks["dropped_steps"]["constant_folding"]
    assert "Incompatible dimensions" in reason
    assert "Unsqueeze" in [n.op_type for n in result.model.graph.node]
    x = np.random.default_rng(5).normal(size=(2, 3, 8, 8)).astype(np.float32)
    _assert_valid_and_same(original, result.model, x)


def test_the_whole_cleanup_is_left_out_when_no_single_step_explains_it(monkeypatch):
    _upstream_reshape_rule(monkeypatch)
    monkeypatch.setattr("bn_onnx.fold.guard.fallback_skips", lambda: [])
    original = onnx.load(GAP_CASE)
    result = fold_model(original)
    assert "allowzero" in result.report.checks["cleanup_dropped"]
    assert result.report.cleanup is None
    assert "Shape" in [n.op_type for n in result.model.graph.node]  # the fold alone
    x = np.random.default_rng(6).normal(size=(1, 3, 16, 16)).astype(np.float32)
    _assert_valid_and_same(original, result.model, x)


def _break_the_fold(monkeypatch):
    """Make the fold itself write an attribute Conv does not have."""
    from bn_onnx.fold import _pass

    call = _pass.FoldBatchNormPass.call

    def broken(self, model):
        result = call(self, model)
        for node in model.graph:
            if node.op_type == "Conv":
                node.attributes["allowzero"] = _pass.ir.AttrInt64("allowzero", 1)
        return result

    monkeypatch.setattr(_pass.FoldBatchNormPass, "call", broken)


@pytest.mark.parametrize("cleanup_flag", ["--cleanup", "--no-cleanup"])
def test_a_fold_that_breaks_the_model_alone_is_refused_and_not_written(
    monkeypatch, tmp_path, capsys, cleanup_flag
):
    _break_the_fold(monkeypatch)
    out = tmp_path / "f.onnx"
    assert main(["fold", str(GAP_CASE), "-o", str(out), cleanup_flag]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "allowzero" in err and "not written" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(FoldCheckError):
        fold_model(onnx.load(GAP_CASE))


def test_bn9_with_empty_optional_outputs_is_inference_mode_and_folds(tmp_path):
    """`outputs = [Y, "", "", "", ""]` (issue 19, deliver 5): the full checker and
    onnxruntime accept it, and it is folded."""
    rng = np.random.default_rng(7)
    w, s, b = rng.normal(size=(3, 4)), rng.uniform(0.5, 1.5, 4), rng.normal(size=4)
    m, v = rng.normal(size=4), rng.uniform(0.5, 1.5, 4)
    inits = [
        numpy_helper.from_array(a.astype(np.float32), n)
        for n, a in zip("wsbmv", [w, s, b, m, v], strict=True)
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["z"]),
            helper.make_node(
                "BatchNormalization", ["z", "s", "b", "m", "v"], ["y", "", "", "", ""]
            ),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=7)
    onnx.checker.check_model(original, full_check=True)
    path, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(original, path)
    assert main(["fold", "-q", str(path), "-o", str(out)]) == 0
    folded = onnx.load(out)
    onnx.checker.check_model(folded, full_check=True)
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    x = rng.normal(size=(5, 3)).astype(np.float32)
    z = x.astype(np.float64) @ w
    want = s * (z - m) / np.sqrt(v + 1e-5) + b  # float64 BatchNormalization, epsilon 1e-5
    np.testing.assert_allclose(_session(folded).run(None, {"x": x})[0], want, rtol=1e-4, atol=1e-5)


def test_fold_in_place_without_reload_falls_back_on_its_own_clone(monkeypatch):
    import onnx_ir as ir

    from bn_onnx.fold import fold_in_place

    _upstream_reshape_rule(monkeypatch)
    model = ir.load(GAP_CASE)
    report = fold_in_place(model)
    assert list(report.checks["dropped_steps"]) == ["rewrite_rules"]
    folded = ir.serde.serialize_model(model)
    x = np.random.default_rng(8).normal(size=(2, 3, 16, 16)).astype(np.float32)
    _assert_valid_and_same(onnx.load(GAP_CASE), folded, x)
