"""verify on any ONNX model: Conv nets, several inputs and outputs, integer, string and bool
inputs, symbolic dims, float16/bfloat16/double, quantized graphs; tampering caught and located.

Folded models come from today's `bn_onnx.fold.fold_model`; tampered ones change one weight.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from fold_testing import bn_params, model_from_text
from onnx import helper, numpy_helper

from bn_onnx import verify
from bn_onnx.errors import InputDataError, UsageError
from bn_onnx.fold import fold_model

CASES = Path(__file__).parent / "data" / "fold_cases"
HEAD = '<ir_version: 8, opset_import: ["" : 18]>'
ML_HEAD = '<ir_version: 8, opset_import: ["" : 18, "ai.onnx.ml" : 3]>'


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def pair(
    model: onnx.ModelProto, tmp: Path, name: str = "m", *, cleanup: bool = True
) -> tuple[Path, Path]:
    """The model and today's fold of it, saved."""
    folded = fold_model(model, cleanup=cleanup).model
    return save(model, tmp / f"{name}.onnx"), save(folded, tmp / f"{name}.f.onnx")


def used_initializers(model: onnx.ModelProto) -> set[str]:
    names: set[str] = set()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            names.update(node.input)
            for a in node.attribute:
                for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                    walk(g)

    walk(model.graph)
    for f in model.functions:
        for node in f.node:
            names.update(node.input)
    return names


def tamper(path: Path, out: Path, name: str | None = None, delta: float = 0.5) -> str:
    """Copy `path` with one element of a weight changed (`name`, else the first float
    initializer of rank >= 2 that some node reads); return the weight's name."""
    model = onnx.load(path)
    used = used_initializers(model)
    for t in model.graph.initializer:
        if (t.name == name) if name else (t.data_type == 1 and len(t.dims) >= 2 and t.name in used):
            a = numpy_helper.to_array(t).copy()
            a.flat[a.size // 2] += delta
            t.CopyFrom(numpy_helper.from_array(a, t.name))
            onnx.save(model, out)
            return t.name
    raise KeyError(name)


# ---- the fold cases: every pair passes with a float64 reference; a changed weight fails ------


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.glob("*.onnx")))
def test_fold_case_pair_passes_and_a_changed_weight_fails_and_is_located(tmp_path, case):
    original = CASES / case
    folded = save(fold_model(onnx.load(original)).model, tmp_path / "folded.onnx")
    report = verify.verify([original, folded], provider="auto")
    assert report.passed, verify.render(report)
    assert "float64 reference" in [r.label for r in report.runs]
    assert report.reference is not None and "cast to float64" in report.reference
    bad = tmp_path / "bad.onnx"
    weight = tamper(folded, bad)
    report = verify.verify([original, bad], provider="auto", locate=True)
    assert not report.passed and report.exit_code == 1, verify.render(report)
    if case == "spatial0_vector_params.onnx":
        # Invalid by the spec (spatial=0 wants (C, H, W) parameters): the fold leaves the BN,
        # and onnxruntime's BatchNormalization kernel refuses it (only its Conv+BN fusion,
        # which ignores spatial, runs the whole model), so locate cannot run the prefix.
        return
    loc = report.locations[0]
    assert loc.first is not None, verify.render(report)
    assert weight in loc.reads, verify.render(report)


def test_depthwise_conv_with_a_static_4d_input_is_verified_on_enough_runs(tmp_path):
    original = CASES / "depthwise_bias_bn.onnx"
    folded = save(fold_model(onnx.load(original)).model, tmp_path / "f.onnx")
    report = verify.verify([original, folded], provider="cpu", rows=20)
    (probe,) = report.probes
    # [2, 8, 5, 5] fixed: 20 rows are 10 runs of the fixed batch of 2
    assert (probe.runs, probe.rows) == (10, 20)
    assert report.runs[0].outputs["random"]["y"].shape == (10, 2, 8, 5, 5)
    assert report.passed


def test_the_random_probe_takes_both_branches_of_an_if(tmp_path):
    original = CASES / "bn_in_if_branches.onnx"
    for branch in ("W_then", "W_else"):
        bad = tmp_path / f"{branch}.onnx"
        tamper(original, bad, branch)
        report = verify.verify([original, bad], provider="cpu", locate=True)
        assert not report.passed, branch
        assert report.locations[0].first.op == "If"
        assert branch in report.locations[0].reads


# ---- a Conv net: locate names the Conv next to the changed weight ---------------------------


def resnet_block() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = {
        "W0": rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32),
        "W1": rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32),
        "W2": rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32),
        "Wf": rng.normal(0, 0.3, (4, 8)).astype(np.float32),
        "Bf": rng.normal(0, 0.1, 4).astype(np.float32),
    }
    for k in ("0", "1", "2"):
        inits.update({f"{n}{k}": v for n, v in bn_params(rng, 8).items()})
    return model_from_text(
        f"""{HEAD}
        g (float[N, 3, 12, 12] x) => (float[N, 4] y) {{
          c0 = Conv <pads=[1,1,1,1], strides=[2,2]> (x, W0)
          n0 = BatchNormalization (c0, s0, b0, mu0, var0)
          r0 = Relu (n0)
          c1 = Conv <pads=[1,1,1,1]> (r0, W1)
          n1 = BatchNormalization (c1, s1, b1, mu1, var1)
          r1 = Relu (n1)
          c2 = Conv <pads=[1,1,1,1]> (r1, W2)
          n2 = BatchNormalization (c2, s2, b2, mu2, var2)
          a = Add (n2, r0)
          r2 = Relu (a)
          p = MaxPool <kernel_shape=[3,3], strides=[2,2], pads=[1,1,1,1]> (r2)
          q = GlobalAveragePool (p)
          f = Flatten (q)
          y = Gemm <transB=1> (f, Wf, Bf)
        }}""",
        inits,
    )


@pytest.mark.parametrize("weight, conv", [("W0", "c0"), ("W2", "c2")])
def test_locate_names_the_conv_whose_weight_changed(tmp_path, weight, conv):
    u, f = pair(resnet_block(), tmp_path)
    report = verify.verify([u, f], provider="cpu")
    assert report.passed, verify.render(report)
    assert "no float64 kernel for Conv" in report.reference  # onnxruntime has none
    bad = tmp_path / "bad.onnx"
    convs = [n for n in onnx.load(f).graph.node if n.op_type == "Conv"]
    folded_weight = next(n.input[1] for n in convs if n.input[1].startswith(weight))
    tamper(f, bad, folded_weight)
    report = verify.verify([u, bad], provider="cpu", locate=True)
    assert not report.passed
    (loc,) = report.locations
    assert loc.method == "tensor names" and loc.expected == "float64 reference"
    # the fold gives the Conv the BN's output name: the first value that differs is n0/n2
    assert loc.first.name == conv.replace("c", "n") and loc.first.op == "Conv"
    assert loc.nodes == [f"Conv -> {conv.replace('c', 'n')}"] and folded_weight in loc.reads
    text = verify.render(report)
    assert f"first divergence: {conv.replace('c', 'n')}, computed by Conv" in text


# ---- several inputs and outputs; integer, string, bool, NaN inputs ---------------------------


def multi_io() -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    inits = {
        "E": rng.normal(size=(7, 3)).astype(np.float32),
        "W": rng.normal(size=(5, 7)).astype(np.float32),
        "B": rng.normal(size=5).astype(np.float32),
        "axes": np.array([1], np.int64),
        **bn_params(rng, 5),
    }
    return model_from_text(
        f"""{HEAD}
        g (float[N, 4] x, int64[N] idx, bool[N, 1] flag) => (float[N, 5] y, float[N] total) {{
          e = Gather <axis=0> (E, idx)
          c = Concat <axis=1> (x, e)
          h = Gemm <transB=1> (c, W, B)
          y = BatchNormalization (h, s, b, mu, var)
          z = Where (flag, y, h)
          total = ReduceSum <keepdims=0> (z, axes)
        }}""",
        inits,
    )


def test_several_inputs_and_outputs_every_output_compared(tmp_path):
    u, f = pair(multi_io(), tmp_path)
    report = verify.verify([u, f], provider="cpu")
    assert report.passed, verify.render(report)
    (probe,) = report.probes
    feed = probe.feeds[0]
    assert feed["idx"].dtype == np.int64 and feed["idx"].min() >= 0 and feed["idx"].max() < 7
    assert feed["flag"].dtype == bool and feed["flag"].any() and not feed["flag"].all()
    assert "indices below 7" in probe.source
    for p in report.pairs:
        assert [o.name for o in p.comparison.outputs] == ["y", "total"]
    bad = tmp_path / "bad.onnx"
    tamper(f, bad, "E")
    report = verify.verify([u, bad], provider="cpu", locate=True)
    assert not report.passed
    assert report.locations[0].first.op == "Gather" and report.locations[0].reads == ["E"]


def test_data_for_several_inputs_by_name(tmp_path):
    u, f = pair(multi_io(), tmp_path)
    rng = np.random.default_rng(0)
    data = {
        "x": rng.normal(size=(9, 4)).astype(np.float32),
        "idx": np.array([0, 1, 2, 3, 4, 5, 6, 0, 1]),
        "flag": np.ones((9, 1), bool),
    }
    report = verify.verify([u, f], inputs=data, provider="cpu")
    assert [p.kind for p in report.probes] == ["data", "random"] and report.passed
    assert report.probes[0].rows == 9
    with pytest.raises(InputDataError, match="no data for input"):
        verify.verify([u, f], inputs={"x": data["x"]}, provider="cpu")
    with pytest.raises(UsageError, match=".npz"):
        verify.verify([u, f], inputs=data["x"], provider="cpu")


def test_index_bound_follows_casts_and_constant_offsets():
    from bn_onnx.verify.probes import index_uses

    model = model_from_text(
        f"""{HEAD}
        g (int32[N] i, int64[N] j) => (float[N, 2] y, float[N, 4] z) {{
          c = Cast <to=7> (i)
          k = Add (c, off)
          y = Gather <axis=0> (T, k)
          z = OneHot (j, depth, vals)
        }}""",
        {
            "T": np.zeros((10, 2), np.float32),
            "off": np.array(3, np.int64),
            "depth": np.array([4], np.int64),
            "vals": np.array([0, 1], np.float32),
        },
    )
    assert index_uses(model, "i")[0] == 7  # rows 0..9 of T, shifted by 3
    assert index_uses(model, "j")[0] == 4


def tabular() -> onnx.ModelProto:
    """A string column and a float column with NaN for missing, as issue 14's models take."""
    rng = np.random.default_rng(7)
    inits = {
        "E": rng.normal(size=(4, 2)).astype(np.float32),
        "W": rng.normal(size=(3, 4)).astype(np.float32),
        "B": rng.normal(size=3).astype(np.float32),
        "fill": np.zeros((1, 2), np.float32),
        "flat": np.array([-1, 2], np.int64),
        **bn_params(rng, 3),
    }
    model = model_from_text(
        f"""{ML_HEAD}
        g (string[N, 1] categorical, float[N, 2] continuous) => (float[N, 3] y) {{
          code = ai.onnx.ml.LabelEncoder <keys_strings=["red", "green", "blue"],
                 values_int64s=[1, 2, 3], default_int64=0> (categorical)
          e3 = Gather <axis=0> (E, code)
          e = Reshape (e3, flat)
          nan = IsNaN (continuous)
          v = Where (nan, fill, continuous)
          c = Concat <axis=1> (e, v)
          h = Gemm <transB=1> (c, W, B)
          y = BatchNormalization (h, s, b, mu, var)
        }}""",
        inits,
    )
    columns = [
        {
            "name": "color",
            "kind": "categorical",
            "input": "categorical",
            "index": 0,
            "vocabulary": ["red", "green", "blue"],
        },
        {"name": "a", "kind": "continuous", "input": "continuous", "index": 0},
        {"name": "b", "kind": "continuous", "input": "continuous", "index": 1},
    ]
    helper.set_model_props(model, {"bn_onnx.columns": json.dumps(columns)})
    return model


def test_string_and_missing_value_inputs_from_the_column_metadata(tmp_path):
    u, f = pair(tabular(), tmp_path)
    report = verify.verify([u, f], provider="cpu")
    assert report.passed, verify.render(report)
    feed = report.probes[0].feeds[0]
    seen = set(feed["categorical"].ravel())
    assert seen <= {"red", "green", "blue", "", "<unseen>"} and {"red", ""} <= seen
    assert np.isnan(feed["continuous"]).any() and not np.isnan(feed["continuous"]).all()
    assert all(np.isfinite(r.outputs["random"]["y"]).all() for r in report.runs)
    # given data may hold NaN in a continuous column
    data = {
        "categorical": np.array([["red"], ["blue"], [""]]),
        "continuous": np.array([[1.0, np.nan], [0.5, 2.0], [np.nan, np.nan]], np.float32),
    }
    assert verify.verify([u, f], inputs=data, provider="cpu").passed


def test_labelencoder_keys_are_the_string_probe_without_metadata(tmp_path):
    model = tabular()
    del model.metadata_props[:]
    u, f = pair(model, tmp_path)
    report = verify.verify([u, f], provider="cpu")
    assert set(report.probes[0].feeds[0]["categorical"].ravel()) == {
        "red",
        "green",
        "blue",
        "<unseen>",
    }


# ---- symbolic dims -----------------------------------------------------------------------------


def sequence_model() -> onnx.ModelProto:
    rng = np.random.default_rng(9)
    inits = {"W": rng.normal(size=(4, 4, 3)).astype(np.float32), **bn_params(rng, 4)}
    return model_from_text(
        f"""{HEAD}
        g (float[batch, 4, T] x) => (float[batch, 4, T] y) {{
          c = Conv <pads=[1,1]> (x, W)
          n = BatchNormalization (c, s, b, mu, var)
          y = Relu (n)
        }}""",
        inits,
    )


def test_symbolic_dims_get_defaults_or_the_given_shape(tmp_path):
    from bn_onnx.verify.signature import SMALL_DIM

    u, f = pair(sequence_model(), tmp_path)
    report = verify.verify([u, f], provider="cpu", rows=10)
    (probe,) = report.probes
    assert probe.feeds[0]["x"].shape == (10, 4, SMALL_DIM)
    assert any("T = 16" in n for n in probe.notes) and any("batch = 10" in n for n in probe.notes)
    assert report.passed
    report = verify.verify([u, f], provider="cpu", shapes={"x": (3, 4, 9)})
    assert report.probes[0].feeds[0]["x"].shape == (3, 4, 9)
    # fixed by --shape: the batch is fixed too, so rows come in several runs
    assert report.probes[0].runs == 32 and report.passed
    with pytest.raises(UsageError, match="dim 1 is fixed at 4"):
        verify.verify([u, f], provider="cpu", shapes={"x": (3, 5, 9)})
    with pytest.raises(UsageError, match="names no model input"):
        verify.verify([u, f], provider="cpu", shapes={"y": (3, 4, 9)})


def test_plan_shapes_shares_named_dims_and_fits_the_budget():
    from bn_onnx.verify.signature import TensorSpec, plan_shapes

    specs = [
        TensorSpec("a", onnx.TensorProto.FLOAT, ("N", 3, 224, 224)),
        TensorSpec("b", onnx.TensorProto.INT64, ("N", "L")),
    ]
    plan = plan_shapes(specs, rows=256)
    n = plan.shapes["a"][0]
    assert plan.shapes["b"] == (n, 16) and plan.runs == 1
    assert n * 3 * 224 * 224 <= 1 << 20 and n >= 1
    plan = plan_shapes(specs, {"b": (2, 5)}, rows=256)
    assert plan.shapes == {"a": (2, 3, 224, 224), "b": (2, 5)} and plan.batch is None


# ---- dtypes ----------------------------------------------------------------------------------


def gemm_bn(dtype: str, np_dtype, io: str | None = None) -> onnx.ModelProto:
    rng = np.random.default_rng(30)
    inits = {
        "W": rng.normal(size=(5, 5)).astype(np_dtype),
        "C": rng.normal(size=5).astype(np_dtype),
        **bn_params(rng, 5, np_dtype),
    }
    io = io or dtype
    to = {"float16": 10, "bfloat16": 16, "double": 11, "float": 1}
    cast_in = f"xc = Cast <to={to[dtype]}> (x)" if io != dtype else "xc = Identity (x)"
    cast_out = f"y = Cast <to={to[io]}> (yc)" if io != dtype else "y = Identity (yc)"
    return model_from_text(
        f"""{HEAD}
        g ({io}[N, 5] x) => ({io}[N, 5] y) {{
          {cast_in}
          h = Gemm <transB=1> (xc, W, C)
          r = Relu (h)
          t = BatchNormalization (r, s, b, mu, var)
          yc = MatMul (t, W)
          {cast_out}
        }}""",
        inits,
    )


def test_a_float16_model_shows_its_own_tolerance(tmp_path):
    u, f = pair(gemm_bn("float16", np.float16), tmp_path)
    report = verify.verify([u, f], provider="cpu")
    assert report.passed, verify.render(report)
    text = verify.render(report)
    assert "y (float16): atol 0.01, rtol 0.01 [float16 default]" in text
    assert "float32" not in text.split("runs:")[0]
    assert "(info: float16 vs float16 runs" in text
    assert all(o.origin == "float16 default" for p in report.counted for o in p.comparison.outputs)


def test_a_float32_model_computing_in_float16_gets_float16_tolerance(tmp_path):
    u, f = pair(gemm_bn("float16", np.float16, io="float"), tmp_path)
    report = verify.verify([u, f], provider="cpu")
    assert report.passed, verify.render(report)
    assert "y (float32, of a float16 model): atol 0.01, rtol 0.01" in verify.render(report)


def test_bfloat16_model_runs_in_onnx_reference_where_onnxruntime_has_no_kernel(tmp_path):
    u, f = pair(gemm_bn("bfloat16", ml_dtypes.bfloat16), tmp_path)
    report = verify.verify([u, f], provider="auto")
    assert report.passed, verify.render(report)
    assert [r.provider for r in report.runs if r.kind == "onnx"] == ["reference", "reference"]
    assert any("ran in onnx.reference instead" in w for w in report.warnings)
    assert "[bfloat16 default]" in verify.render(report)
    assert report.runs[1].outputs["random"]["y"].dtype == ml_dtypes.bfloat16


def test_bfloat16_values_pass_through_onnxruntime_bit_for_bit():
    from bn_onnx.verify.runs import OrtSession

    model = model_from_text(
        f"""{HEAD}
        g (bfloat16[N, 3] x) => (bfloat16[N, 3] y, float[N, 3] f) {{
          f = Cast <to=1> (x)
          y = Cast <to=16> (f)
        }}"""
    )
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(ml_dtypes.bfloat16)
    out = OrtSession(model, "cpu").run([{"x": x}])
    assert out["y"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out["y"].view(np.uint16), x.view(np.uint16))
    np.testing.assert_array_equal(out["f"], x.astype(np.float32))


def test_a_double_model_is_compared_at_float64_tolerance(tmp_path):
    u, f = pair(gemm_bn("double", np.float64), tmp_path)
    report = verify.verify([u, f], provider="cpu")
    assert report.passed, verify.render(report)
    assert "y (float64): atol 1e-07, rtol 1e-07 [float64 default]" in verify.render(report)


# ---- quantized: no float64 reference, float32 pairs at a stated tolerance ------------------


def quantized() -> onnx.ModelProto:
    rng = np.random.default_rng(11)
    inits = {
        "W": rng.normal(size=(4, 4)).astype(np.float32),
        "C": rng.normal(size=4).astype(np.float32),
        "sc": np.array(0.05, np.float32),
        "zp": np.array(0, np.int8),
        **bn_params(rng, 4),
    }
    return model_from_text(
        f"""{HEAD}
        g (float[N, 4] x) => (float[N, 4] y) {{
          q = QuantizeLinear (x, sc, zp)
          d = DequantizeLinear (q, sc, zp)
          h = Gemm <transB=1> (d, W, C)
          y = BatchNormalization (h, s, b, mu, var)
        }}""",
        inits,
    )


def test_a_quantized_model_falls_back_to_float32_pairs_and_says_why(tmp_path):
    u, f = pair(quantized(), tmp_path)
    report = verify.verify([u, f], provider="cpu")
    assert report.reference.startswith("none:") and "QuantizeLinear" in report.reference
    assert "float64 reference" not in [r.label for r in report.runs]
    (p,) = report.counted
    assert p.kind == "float32 pair" and p.expected == "m.onnx [cpu]"
    (o,) = p.comparison.outputs
    assert (o.atol, o.rtol) == (2e-5, 2e-4) and o.origin == "float32 default x2 (two float runs)"
    assert report.passed
    assert "so each model is compared with the first one" in verify.render(report)
    bad = tmp_path / "bad.onnx"
    tamper(f, bad)
    assert not verify.verify([u, bad], provider="cpu")
    with pytest.raises(Exception, match="nothing to compare"):
        verify.verify([u], provider="cpu")


# ---- tolerances ------------------------------------------------------------------------------


def test_per_output_tolerance_overrides_are_used_and_named(tmp_path):
    u, f = pair(multi_io(), tmp_path)
    report = verify.verify([u, f], provider="cpu", atol={"total": 0.5}, rtol=0.001)
    by_name = {o.name: o for o in report.counted[0].comparison.outputs}
    assert (by_name["total"].atol, by_name["total"].rtol, by_name["total"].origin) == (
        0.5,
        0.001,
        "--atol total=, --rtol",
    )
    assert (by_name["y"].atol, by_name["y"].origin) == (1e-5, "--rtol, float32 default")
    text = verify.render(report)
    assert "total (float32): atol 0.5, rtol 0.001 [--atol total=, --rtol]" in text
    with pytest.raises(UsageError, match="name no output"):
        verify.verify([u, f], provider="cpu", atol={"nope": 1.0})


def matmul_chain(weights: list[np.ndarray]) -> onnx.ModelProto:
    """x [N, 64] -> MatMul by each weight in turn -> y."""
    inits = [numpy_helper.from_array(w.astype(np.float32), f"w{i}") for i, w in enumerate(weights)]
    names = ["x"] + [f"h{i}" for i in range(len(weights) - 1)] + ["y"]
    nodes = [
        helper.make_node("MatMul", [names[i], f"w{i}"], [names[i + 1]]) for i in range(len(weights))
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 64])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def test_a_model_whose_own_float32_error_exceeds_the_default_raises_the_default(tmp_path):
    # Three 64x64 products of N(0, 0.25) weights: outputs of ~50 with float32 error ~1e-4, so
    # the original fails a fixed atol 1e-5 where its values cross zero. The same map with the
    # first two weights multiplied in float64 (as a fold would) passes at twice that error.
    rng = np.random.default_rng(0)
    w = [0.5 * rng.standard_normal((64, 64)) for _ in range(3)]
    u = save(matmul_chain(w), tmp_path / "chain.onnx")
    f = save(matmul_chain([w[0] @ w[1], w[2]]), tmp_path / "chain.f.onnx")
    fixed = verify.verify([u, f], provider="cpu", atol=1e-5, rtol=1e-4)
    assert not fixed and not fixed.counted[0].passed  # the original fails a fixed default

    report = verify.verify([u, f], provider="cpu")
    assert report, verify.render(report)
    own = report.counted[0].comparison.outputs[0]
    assert own.max_abs > 1e-5
    assert own.max_abs > own.atol / 2 > 1e-5  # twice what the original needs, >= its excess
    assert own.origin.startswith("float32 default raised to 2x the atol chain.onnx [cpu] needs")
    assert "raised to 2x" in verify.render(report)

    tamper(f, tmp_path / "chain.t.onnx", "w0", delta=0.05)
    assert not verify.verify([u, tmp_path / "chain.t.onnx"], provider="cpu")
    alone = verify.verify([u], provider="cpu")  # one model: nothing to calibrate against
    assert alone.counted[0].comparison.outputs[0].origin == "float32 default"


def test_folding_adds_error_only_past_twice_the_unfolded_error_and_half_the_atol(tmp_path):
    rng = np.random.default_rng(1)
    w = 0.1 * rng.standard_normal((64, 64))
    original = matmul_chain([w])
    original.metadata_props.add(key="bn_onnx.folded", value="false")
    u = save(original, tmp_path / "u.onnx")
    shifted = matmul_chain([w])  # the same map plus 6e-6 everywhere: inside atol 1e-5
    shifted.graph.node[0].output[0] = "z"
    shifted.graph.initializer.append(numpy_helper.from_array(np.full(64, 6e-6, np.float32), "s"))
    shifted.graph.node.append(helper.make_node("Add", ["z", "s"], ["y"]))
    shifted.metadata_props.add(key="bn_onnx.folded", value="true")
    f = save(shifted, tmp_path / "f.onnx")
    report = verify.verify([u, f], provider="cpu")
    assert report  # within tolerance, so it passes, and the folding rows say what it added
    assert report.folding and all(row.adds_error for row in report.folding)
    assert "folding ADDS error" in verify.render(report)
    row = report.folding[0]
    half = dataclasses.replace(row, folded_max_abs=0.4 * row.atol)  # twice, but under atol / 2
    assert row.atol == 1e-5 and not half.adds_error


def test_a_raised_default_is_capped_and_the_original_then_fails(tmp_path):
    from bn_onnx.compare import FLOOR_CAP, TolerancePolicy

    policy = TolerancePolicy(atol_floor={"y": (1.0, "2x the atol m needs (0.5)")})
    tol = policy.resolve("y", np.float32)
    assert tol.atol == pytest.approx(FLOOR_CAP * 1e-5)
    assert "capped" in tol.origin
    assert (
        TolerancePolicy(atol=1e-5, atol_floor=policy.atol_floor).resolve("y", np.float32).atol
        == 1e-5
    )


# ---- the float64 reference itself -------------------------------------------------------------


def test_to_double_casts_constants_casts_and_subgraphs():
    from bn_onnx.verify.float64 import to_double

    model = model_from_text(
        f"""{HEAD}
        g (float[2] x, bool c) => (float[2] y) {{
          k = Constant <value_float=0.1> ()
          a = Mul (x, k)
          h = Cast <to=10> (a)
          f = Cast <to=1> (h)
          y = If (c) <then_branch = t () => (float[2] o) {{ o = Add (f, f) }},
                      else_branch = e () => (float[2] o) {{ o = Sub (f, f) }}>
        }}"""
    )
    d = to_double(model)
    onnx.checker.check_model(d, full_check=True)
    casts = [a.i for n in d.graph.node if n.op_type == "Cast" for a in n.attribute]
    assert casts == [onnx.TensorProto.DOUBLE] * 2
    const = next(n for n in d.graph.node if n.op_type == "Constant")
    assert numpy_helper.to_array(const.attribute[0].t).dtype == np.float64
    branch = next(a.g for a in d.graph.node[-1].attribute if a.name == "then_branch")
    assert branch.output[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    from bn_onnx.verify.float64 import build

    ref = build(model, "r", "m")
    x = np.array([1.0, 3.0], np.float32)
    out = ref.run([{"x": x, "c": np.array(True)}])["y"]
    # 0.1 as the float32 attribute holds it, times x, in float64: no float16 rounding
    expected = 2 * np.float64(np.float32(0.1)) * x.astype(np.float64)
    np.testing.assert_allclose(out, expected, rtol=1e-15)


@pytest.mark.parametrize("engine", ["onnxruntime", "onnx.reference"])
def test_float64_reference_equals_the_numpy_mlp_oracle(engine):
    from onnx_forward_oracle import onnx_output

    from bn_onnx import graphs
    from bn_onnx.verify.float64 import build

    widths = [7, 9, 5, 3]
    model = graphs.build_mlp(widths, "unfolded", seed=2, bn="post")
    ref = build(model, "r", "m")
    if engine == "onnx.reference":
        ref._fallback("forced by the test")
    assert ref.engine == engine
    x = np.random.default_rng(1).normal(size=(11, 7)).astype(np.float32)
    np.testing.assert_allclose(
        ref.run([{"input": x}])["logits"],
        onnx_output(model, x),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
def test_float64_reference_honours_opset6_broadcast_axis(op):
    # (4,) on (2, 4, 4, 4) with broadcast=1, axis=1 runs along the channels; numpy's own
    # broadcasting, which onnx.reference used, would have run it along the last axis (also 4)
    from bn_onnx.verify.float64 import build

    rng = np.random.default_rng(3)
    g = rng.uniform(0.5, 2.0, 4).astype(np.float32)
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node(op, ["x", "g"], ["y"], broadcast=1, axis=1)],
            "legacy",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4, 4, 4])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4, 4, 4])],
            [numpy_helper.from_array(g, "g")],
        ),
        opset_imports=[helper.make_opsetid("", 6)],
        ir_version=3,
    )
    x = rng.normal(size=(2, 4, 4, 4)).astype(np.float32)
    ref = build(model, "r", "m")
    assert ref.engine == "onnx.reference"  # onnxruntime runs opset >= 7 only
    fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op]
    expected = fn(x.astype(np.float64), g.astype(np.float64)[:, None, None])
    np.testing.assert_allclose(ref.run([{"x": x}])["y"], expected, rtol=1e-15)


# ---- probes ----------------------------------------------------------------------------------


def test_given_rows_fill_a_fixed_batch_run_by_run():
    from bn_onnx.verify.probes import data_probe
    from bn_onnx.verify.signature import TensorSpec

    spec = [TensorSpec("x", onnx.TensorProto.FLOAT, (2, 3))]
    x = np.arange(15, dtype=np.float64).reshape(5, 3)
    p = data_probe(spec, {"x": x}, "given")
    assert (p.runs, p.rows) == (3, 6) and p.feeds[0]["x"].dtype == np.float32
    np.testing.assert_array_equal(p.feeds[2]["x"], x[[4, 0]])
    assert "filled up with the first rows" in p.notes[0]
    x[3, 1] = np.nan
    with pytest.raises(InputDataError, match=r"1 non-finite value\(s\) .* first at \[3, 1\]"):
        data_probe(spec, {"x": x}, "given")
    with pytest.raises(InputDataError, match=r"has 4 features \(columns\), the model expects 3"):
        data_probe(spec, {"x": np.zeros((2, 4))}, "given")
    with pytest.raises(InputDataError, match="takes float32, got <U1"):
        data_probe(spec, {"x": np.array([["a", "b", "c"]])}, "given")


def test_random_ranges_follow_the_input_bn_then_the_data_then_unit_normal():
    from bn_onnx import graphs
    from bn_onnx.verify.probes import input_ranges, random_probe
    from bn_onnx.verify.signature import plan_shapes, signature

    model = graphs.build_mlp([4, 6, 2], "unfolded", seed=0)
    sig = signature(model)
    data_probe = verify.probes.data_probe(
        sig.inputs, {"input": np.array([[1.0, 5, 0, -2], [3, 5, 0, 4]], np.float32)}, "d"
    )
    ranges = input_ranges(model, sig.inputs, data=data_probe)
    r = ranges["input"]
    assert r.kind == "uniform" and "given data" in r.source and "2 constant feature(s)" in r.source
    np.testing.assert_array_equal(r.center, [1, 0, -1, -2])  # constant 5 and 0 spread by 5 and 1
    np.testing.assert_array_equal(r.spread, [3, 10, 1, 4])
    x = random_probe(sig.inputs, plan_shapes(sig.inputs, rows=500), ranges, 0).feeds[0]["input"]
    assert (x.min(0) >= [1, 0, -1, -2]).all() and (x.max(0) <= [3, 10, 1, 4]).all()
    assert (x.max(0) - x.min(0) > [1.8, 9, 1.8, 5.5]).all()  # spans each range
    # a model whose input goes through a BatchNormalization: its statistics, var + eps
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 2] x) => (float[N, 2] y) {{
          c = Identity (x)
          y = BatchNormalization <epsilon=0.01> (c, s, b, mu, var)
        }}""",
        {"s": np.ones(2), "b": np.zeros(2), "mu": np.array([3.0, -1]), "var": np.array([4.0, 0])},
    )
    (r,) = input_ranges(model, signature(model).inputs).values()
    assert r.kind == "normal" and "BatchNormalization in the graph" in r.source
    np.testing.assert_allclose(r.center, [3, -1])
    np.testing.assert_allclose(r.spread, [np.sqrt(4.01), 0.1])


def test_locate_past_a_dropout_a_bn_was_moved_across(tmp_path):
    # BN -> Dropout -> MatMul: the fold moves the BN through the Dropout into the MatMul, and
    # the Dropout keeps its output name for a value without the BN (without the cleanup,
    # which would remove the inference-mode Dropout)
    rng = np.random.default_rng(12)
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 4] x) => (float[N, 3] y) {{
          n = BatchNormalization (x, s, b, mu, var)
          d = Dropout (n)
          m = MatMul (d, W)
          y = Relu (m)
        }}""",
        {"W": rng.normal(size=(4, 3)).astype(np.float32), **bn_params(rng, 4)},
    )
    u, f = pair(model, tmp_path, cleanup=False)
    assert verify.verify([u, f], provider="cpu").passed
    folded = onnx.load(f)
    weight = next(n.input[1] for n in folded.graph.node if n.op_type in ("MatMul", "Gemm"))
    bad = tmp_path / "bad.onnx"
    tamper(f, bad, weight)
    report = verify.verify([u, bad], provider="cpu", locate=True)
    (loc,) = report.locations
    assert loc.first.name == "d" and loc.weight_free
    assert loc.expected_nodes == ["BatchNormalization -> n", "Dropout -> d"]
    assert loc.weighted is not None and weight in loc.reads
    text = verify.render(report)
    assert "computed without weights from values that agree" in text
    assert "next divergence computed with weights" in text
