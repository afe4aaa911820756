"""Constant subgraphs of any standard op are constants (`bn_onnx.fold.evaluate`).

Each fold runs in onnxruntime with its graph optimizations off, before and after; the
constants themselves are checked against onnxruntime computing the same value as an output.
Covered: Unsqueeze in both forms (attribute before opset 13, input from 13; negative axes),
ConstantOfShape (Caffe2 Scale layers as onnx's model zoo has them at opset 9), DequantizeLinear
of int8 BN parameters, Cast, and the size budget.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fold_testing import bn_params, model_from_text, op_count

from bn_onnx.fold import evaluate, fold_model
from bn_onnx.fold._pass import to_ir
from bn_onnx.fold.context import FoldContext
from bn_onnx.fold.validate import validate_model

ATOL, RTOL = 1e-5, 1e-4


def run_plain(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime on CPU with every graph optimization off (its own fusions would hide ours)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def const_of(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """What the fold's constant evaluator makes of value `name`."""
    work = to_ir(model)
    ctx = FoldContext(work, validate_model(work))
    value = next(o for n in work.graph for o in n.outputs if o.name == name)
    return ctx.const(value)


def fold_plain(model: onnx.ModelProto, feeds: dict[str, np.ndarray], atol=ATOL, rtol=RTOL):
    """Fold, check the result is valid, and that onnxruntime computes the same before/after."""
    result = fold_model(model)
    onnx.checker.check_model(result.model, full_check=True)
    for want, got in zip(run_plain(model, feeds), run_plain(result.model, feeds), strict=True):
        assert want.shape == got.shape and want.dtype == got.dtype
        np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)
    return result.model


def conv_x(rng, c_in=3):
    return {"x": rng.normal(size=(2, c_in, 6, 6)).astype(np.float32)}


@pytest.mark.parametrize(
    ("opset", "unsqueeze"),
    [
        (9, "Unsqueeze<axes=[1, 2]>(k)"),
        (11, "Unsqueeze<axes=[-2, -1]>(k)"),
        (11, "Unsqueeze<axes=[2, -2]>(k)"),
        (13, "Unsqueeze(k, ax)"),
        (18, "Unsqueeze(k, ax)"),
    ],
)
def test_unsqueeze_both_forms_and_negative_axes_evaluate_as_onnxruntime_does(opset, unsqueeze):
    """Unsqueeze(k[4], axes=[-2, -1]) is [4, 1, 1] (onnx.reference's kernels before opset 13
    apply the axes one at a time and make it [1, 4, 1])."""
    text = f"""
    <ir_version: 7, opset_import: ["" : {opset}]>
    g (float[1, 4, 5, 5] x) => (float[4, 1, 1] u) {{
      u = {unsqueeze}
    }}
    """
    rng = np.random.default_rng(0)
    k = rng.normal(size=4).astype(np.float32)
    model = model_from_text(text, {"k": k, "ax": np.array([-2, -1], np.int64)})
    if opset < 13:
        del model.graph.initializer[1]
    onnx.checker.check_model(model, full_check=True)
    (want,) = run_plain(model, {"x": np.zeros((1, 4, 5, 5), np.float32)})
    got = const_of(model, "u")
    assert got is not None and got.shape == want.shape == (4, 1, 1)
    np.testing.assert_array_equal(got, want)


def _scale_block(i: int, inp: str, factors: str) -> str:
    """Conv -> BN -> Mul -> Add: a Caffe2 Scale layer after the BN (factors named by kind)."""
    if factors == "ConstantOfShape":  # onnx model zoo (inception_v2, densenet121), opset 9
        mul = f"""
      sh{i} = Constant<value = int64[1] {{4}}>()
      f{i} = ConstantOfShape<value = float[1] {{1.25}}>(sh{i})
      fu{i} = Unsqueeze<axes=[1, 2]>(f{i})
      z{i} = ConstantOfShape<value = float[1] {{-0.5}}>(sh{i})
      zu{i} = Unsqueeze<axes=[1, 2]>(z{i})"""
    else:  # onnxruntime's ConvBNMulAddUnsqueeze fusion test: Unsqueeze of an initializer
        mul = f"""
      fu{i} = Unsqueeze<axes=[1, 2]>(k{i})
      zu{i} = Unsqueeze<axes=[-2, -1]>(q{i})"""
    return f"""
      c{i} = Conv<pads=[1, 1, 1, 1]>({inp}, w{i})
      n{i} = BatchNormalization(c{i}, s{i}, b{i}, mu{i}, var{i}){mul}
      m{i} = Mul(n{i}, fu{i})
      a{i} = Add(m{i}, zu{i})"""


@pytest.mark.parametrize("factors", ["ConstantOfShape", "initializer"])
def test_caffe2_scale_layers_after_bn_fold_completely(factors):
    rng = np.random.default_rng(1)
    opset = 9 if factors == "ConstantOfShape" else 11
    text = f"""
    <ir_version: 4, opset_import: ["" : {opset}]>
    g (float[2, 3, 6, 6] x) => (float[2, 4, 6, 6] y) {{
      {_scale_block(0, "x", factors)}
      r0 = Relu(a0)
      {_scale_block(1, "r0", factors)}
      y = Relu(a1)
    }}
    """
    inits = {}
    for i, c_in in ((0, 3), (1, 4)):
        inits[f"w{i}"] = rng.normal(0, 0.4, (4, c_in, 3, 3)).astype(np.float32)
        inits.update({f"{k}{i}": v for k, v in bn_params(rng, 4).items()})
        inits[f"k{i}"] = rng.normal(1, 0.5, 4).astype(np.float32)
        inits[f"q{i}"] = rng.normal(0, 0.5, 4).astype(np.float32)
    if factors == "ConstantOfShape":
        inits = {k: v for k, v in inits.items() if k[0] not in "kq"}
    model = model_from_text(text, inits)
    onnx.checker.check_model(model, full_check=True)
    folded = fold_plain(model, conv_x(rng))
    for op in ("BatchNormalization", "Mul", "Add", "Unsqueeze", "ConstantOfShape"):
        assert op_count(folded, op) == 0, onnx.printer.to_text(folded.graph)
    assert op_count(folded, "Conv") == 2


def test_bn_parameters_dequantized_from_int8_fold():
    """BN parameters from DequantizeLinear of int8 initializers (per tensor and per channel)."""
    rng = np.random.default_rng(2)
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2, 3, 6, 6] x) => (float[2, 4, 6, 6] y) {
      c = Conv<pads=[1, 1, 1, 1]>(x, w)
      s = DequantizeLinear<axis=0>(sq, ss, sz)
      b = DequantizeLinear(bq, bs, bz)
      mu = DequantizeLinear(mq, ms)
      var = DequantizeLinear(vq, vs, vz)
      y = BatchNormalization(c, s, b, mu, var)
    }
    """
    inits = {
        "w": rng.normal(0, 0.4, (4, 3, 3, 3)).astype(np.float32),
        "sq": rng.integers(-127, 127, 4).astype(np.int8),
        "ss": rng.uniform(0.005, 0.02, 4).astype(np.float32),
        "sz": np.array([3, -2, 0, 1], np.int8),
        "bq": rng.integers(-127, 127, 4).astype(np.int8),
        "bs": np.float32(0.01),
        "bz": np.int8(0),
        "mq": rng.integers(-127, 127, 4).astype(np.int8),
        "ms": np.float32(0.02),
        "vq": rng.integers(30, 127, 4).astype(np.int8),
        "vs": np.float32(0.015),
        "vz": np.int8(-5),
    }
    model = model_from_text(text, inits)
    onnx.checker.check_model(model, full_check=True)
    folded = fold_plain(model, conv_x(rng))
    assert {n.op_type for n in folded.graph.node} == {"Conv"}
    dq = inits["ss"] * (inits["sq"].astype(np.float32) - inits["sz"])
    np.testing.assert_array_equal(const_of(model, "s"), dq)


def test_cast_of_float16_bn_parameters_folds():
    rng = np.random.default_rng(3)
    text = """
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[2, 5] x) => (float[2, 4] y) {
      h = Gemm<transB=1>(x, w, wb)
      s = Cast<to=1>(s16)
      b = Cast<to=1>(b16)
      y = BatchNormalization(h, s, b, mu, var)
    }
    """
    p = bn_params(rng, 4)
    inits = {
        "w": rng.normal(size=(4, 5)).astype(np.float32),
        "wb": rng.normal(size=4).astype(np.float32),
        "s16": p["s"].astype(np.float16),
        "b16": p["b"].astype(np.float16),
        "mu": p["mu"],
        "var": p["var"],
    }
    model = model_from_text(text, inits)
    folded = fold_plain(model, {"x": rng.normal(size=(2, 5)).astype(np.float32)})
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]


def test_the_size_budget_and_random_ops_keep_values_unevaluated(monkeypatch):
    text = """
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[1, 4] x) => (float[8] small, float[16] big, float[1, 4] noise) {
      small = ConstantOfShape<value = float[1] {2.0}>(n8)
      big = ConstantOfShape<value = float[1] {2.0}>(n16)
      noise = RandomUniformLike(x)
    }
    """
    model = model_from_text(text, {"n8": np.array([8], np.int64), "n16": np.array([16], np.int64)})
    monkeypatch.setattr(evaluate, "MAX_OUTPUT_ELEMENTS", 10)
    np.testing.assert_array_equal(const_of(model, "small"), np.full(8, 2.0, np.float32))
    assert const_of(model, "big") is None
    assert const_of(model, "noise") is None


def test_a_dequantized_weight_is_not_folded_into():
    """A QDQ model's weight stays quantized: folding would write it in float."""
    rng = np.random.default_rng(4)
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2, 3, 6, 6] x) => (float[2, 4, 4, 4] y) {
      w = DequantizeLinear(wq, ws)
      c = Conv(x, w)
      y = BatchNormalization(c, s, b, mu, var)
    }
    """
    inits = {
        "wq": rng.integers(-127, 127, (4, 3, 3, 3)).astype(np.int8),
        "ws": np.float32(0.01),
        **bn_params(rng, 4),
    }
    result = fold_model(model_from_text(text, inits))
    assert result.report.n_folded == 0
    assert "is quantized (DequantizeLinear" in result.report.entries[0].reason
