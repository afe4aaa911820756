"""Fold rules 3, 4, 7-10 and every reason a BN is left, on tiny models in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from fold_testing import bn_params, fold_and_compare, model_from_text, op_count, reasons
from onnx import helper, numpy_helper

from bn_onnx.errors import UnsupportedModelError
from bn_onnx.fold import fold_model, inspect_model

HEAD = '<ir_version: 8, opset_import: ["" : 18]>'


def _x(rng, shape=(4, 5)):
    return rng.normal(size=shape).astype(np.float32)


# --- rule 3 and 4: Conv and ConvTranspose ------------------------------------------------


@pytest.mark.parametrize("group", [1, 2, 6])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dims", [1, 2])
def test_fold_into_preceding_conv_grouped_and_depthwise(group, bias, dims):
    rng = np.random.default_rng(10)
    c_in, c_out = 6, 6
    k = (3,) * dims
    inits = {"W": rng.normal(size=(c_out, c_in // group, *k)).astype(np.float32)}
    inits.update(bn_params(rng, c_out))
    b_in = ""
    if bias:
        inits["B"] = rng.normal(size=(c_out,)).astype(np.float32)
        b_in = ", B"
    spatial = ", ".join(["8"] * dims)
    model = model_from_text(
        f"""{HEAD}
        g (float[2, {c_in}, {spatial}] x) => (float[2, {c_out}, {spatial}] y) {{
          h = Conv <group={group}, pads=[{", ".join(["1"] * 2 * dims)}]> (x, W{b_in})
          y = BatchNormalization (h, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (2, c_in, *([8] * dims)))})
    assert result.report.entries[0].target_op == "Conv"


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_fold_into_preceding_conv_transpose_is_group_aware(group, bias):
    rng = np.random.default_rng(11)
    c_in, c_out = 4, 8
    inits = {"W": rng.normal(size=(c_in, c_out // group, 3, 3)).astype(np.float32)}
    inits.update(bn_params(rng, c_out))
    b_in = ""
    if bias:
        inits["B"] = rng.normal(size=(c_out,)).astype(np.float32)
        b_in = ", B"
    model = model_from_text(
        f"""{HEAD}
        g (float[2, {c_in}, 5, 5] x) => (float[2, {c_out}, 7, 7] y) {{
          h = ConvTranspose <group={group}> (x, W{b_in})
          y = BatchNormalization (h, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (2, c_in, 5, 5))})
    assert result.report.entries[0].target_op == "ConvTranspose"


# --- rule 7 and 8: chains, Identity, Dropout ---------------------------------------------


def test_bn_chain_after_gemm_folds_both():
    rng = np.random.default_rng(12)
    p1, p2 = bn_params(rng, 3), bn_params(rng, 3)
    inits = {"W": rng.normal(size=(5, 3)).astype(np.float32)}
    inits.update({k + "1": v for k, v in p1.items()})
    inits.update({k + "2": v for k, v in p2.items()})
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => (float[N, 3] y) {{
          h = Gemm (x, W)
          t = BatchNormalization (h, s1, b1, mu1, var1)
          y = BatchNormalization (t, s2, b2, mu2, var2)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng)})
    assert result.model.graph.node[0].op_type == "Gemm" and len(result.model.graph.node) == 1


def test_bn_chain_between_activations_merges_into_one_bn():
    rng = np.random.default_rng(13)
    inits = {}
    for j in (1, 2, 3):
        inits.update({k + str(j): v for k, v in bn_params(rng, 5).items()})
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => (float[N, 5] y) {{
          r = Relu (x)
          t1 = BatchNormalization <epsilon=0.001> (r, s1, b1, mu1, var1)
          t2 = BatchNormalization (t1, s2, b2, mu2, var2)
          t3 = BatchNormalization (t2, s3, b3, mu3, var3)
          y = Relu (t3)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng)}, folded=2)
    statuses = [(e.status, e.direction) for e in result.report.entries]
    assert statuses == [("folded", "merged"), ("folded", "merged"), ("left", None)]


def test_bn_chain_between_activation_and_gemm_folds_completely():
    rng = np.random.default_rng(14)
    inits = {"W": rng.normal(size=(5, 3)).astype(np.float32)}
    for j in (1, 2):
        inits.update({k + str(j): v for k, v in bn_params(rng, 5).items()})
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => (float[N, 3] y) {{
          r = Relu (x)
          t1 = BatchNormalization (r, s1, b1, mu1, var1)
          t2 = BatchNormalization (t1, s2, b2, mu2, var2)
          y = Gemm (t2, W)
        }}""",
        inits,
    )
    fold_and_compare(model, {"x": _x(rng)})


@pytest.mark.parametrize(
    "between",
    [
        "z = Identity (h)",
        "z = Dropout (h)",
        "z, mask = Dropout (h, ratio, off)",
        "i1 = Identity (h)\n z = Dropout (i1, ratio)",
    ],
)
def test_fold_through_identity_and_inference_dropout(between):
    rng = np.random.default_rng(15)
    inits = {"W": rng.normal(size=(5, 3)).astype(np.float32), **bn_params(rng, 3)}
    inits["ratio"] = np.array(0.5, np.float32)
    inits["off"] = np.array(False)
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => (float[N, 3] y) {{
          h = Gemm (x, W)
          {between}
          y = BatchNormalization (z, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng)})
    assert result.report.entries[0].direction == "preceding"


def test_fold_into_following_through_dropout():
    rng = np.random.default_rng(16)
    inits = {"W": rng.normal(size=(5, 3)).astype(np.float32), **bn_params(rng, 5)}
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => (float[N, 3] y) {{
          r = Relu (x)
          t = BatchNormalization (r, s, b, mu, var)
          d = Dropout (t)
          y = Gemm (d, W)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng)})
    assert result.report.entries[0].direction == "following"


def test_training_dropout_is_not_looked_through():
    rng = np.random.default_rng(17)
    inits = {"W": rng.normal(size=(5, 3)).astype(np.float32), **bn_params(rng, 3)}
    inits["ratio"] = np.array(0.0, np.float32)
    inits["on"] = np.array(True)
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => (float[N, 3] y) {{
          h = Gemm (x, W)
          z = Dropout (h, ratio, on)
          y = BatchNormalization (z, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng)}, folded=0)
    assert "Dropout" in reasons(result)[0]


# --- rule 9: parameters from Constant nodes and constant subgraphs -------------------------


def test_parameters_from_constant_nodes_and_constant_subgraphs():
    rng = np.random.default_rng(18)
    s = rng.normal(1, 0.3, 3)
    w = rng.normal(size=(5, 3)).astype(np.float32)
    var = rng.uniform(0.5, 2, 3).astype(np.float32)
    inits = {"s64": s, "var": var}
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x, float[N, 3] z) => (float[N, 3] y) {{
          W = Constant <value = float[5, 3] {{{", ".join(map(str, w.ravel()))}}}> ()
          h = Gemm (x, W)
          sc = CastLike (s64, x)
          n3 = Shape <start=1> (z)
          mu = ConstantOfShape <value = float[1] {{0.25}}> (n3)
          one = Constant <value_float = 0.5> ()
          bb = Expand (one, n3)
          b = Identity (bb)
          v = Cast <to=1> (var)
          y = BatchNormalization (h, sc, b, mu, v)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng), "z": _x(rng, (4, 3))})
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["Gemm"], ops  # the constant subgraphs went away with the BN
    assert {t.name for t in result.model.graph.initializer}.isdisjoint({"s64", "var"})


def test_parameters_as_graph_inputs_are_left():
    rng = np.random.default_rng(19)
    inits = {"W": rng.normal(size=(5, 3)).astype(np.float32)}
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x, float[3] s) => (float[N, 3] y) {{
          h = Gemm (x, W)
          y = BatchNormalization (h, s, b, mu, var)
        }}""",
        {**inits, **{k: v for k, v in bn_params(rng, 3).items() if k != "s"}},
    )
    feeds = {"x": _x(rng), "s": np.ones(3, np.float32)}
    result = fold_and_compare(model, feeds, folded=0)
    assert "graph input" in reasons(result)[0]


def test_initializer_overridable_as_graph_input_is_left():
    rng = np.random.default_rng(20)
    inits = {"W": rng.normal(size=(5, 3)).astype(np.float32), **bn_params(rng, 3)}
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x, float[3] var) => (float[N, 3] y) {{
          h = Gemm (x, W)
          y = BatchNormalization (h, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng)}, folded=0)
    assert "'var' is a graph input" in reasons(result)[0]


# --- the reasons a BN is left ---------------------------------------------------------------


def test_training_mode_bn_is_left():
    rng = np.random.default_rng(21)
    inits = {"W": rng.normal(size=(5, 3)).astype(np.float32), **bn_params(rng, 3)}
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => (float[N, 3] y) {{
          h = Gemm (x, W)
          y, rm, rv = BatchNormalization <training_mode=1> (h, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_model(model)
    assert result.report.n_folded == 0 and reasons(result) == ["training_mode=1"]


def test_bn_with_running_stat_outputs_is_left():
    rng = np.random.default_rng(22)
    inits = {"W": rng.normal(size=(5, 3)).astype(np.float32), **bn_params(rng, 3)}
    model = model_from_text(
        """<ir_version: 7, opset_import: ["" : 13]>
        g (float[N, 5] x) => (float[N, 3] y) {
          h = Gemm (x, W)
          y, rm, rv, sm, sv = BatchNormalization (h, s, b, mu, var)
        }""",
        inits,
    )
    result = fold_model(model)
    assert result.report.n_folded == 0 and "training mode" in reasons(result)[0]


@pytest.mark.parametrize("where", ["graph output", "other reader"])
def test_producer_output_read_elsewhere_is_left(where):
    rng = np.random.default_rng(23)
    inits = {"W": rng.normal(size=(5, 3)).astype(np.float32), **bn_params(rng, 3)}
    if where == "graph output":
        sig, extra = "float[N, 3] y, float[N, 3] h", ""
    else:
        sig, extra = "float[N, 3] y, float[N, 3] z", "z = Relu (h)"
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => ({sig}) {{
          h = Gemm (x, W)
          y = BatchNormalization (h, s, b, mu, var)
          {extra}
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng)}, folded=0)
    assert ("graph output" if where == "graph output" else "another node") in reasons(result)[0]


def test_bn_between_two_nonlinear_nodes_is_left():
    rng = np.random.default_rng(24)
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => (float[N, 5] y) {{
          r = Relu (x)
          t = BatchNormalization (r, s, b, mu, var)
          y = Tanh (t)
        }}""",
        bn_params(rng, 5),
    )
    result = fold_and_compare(model, {"x": _x(rng)}, folded=0)
    reason = reasons(result)[0]
    assert "Relu" in reason and "Tanh" in reason
    info = inspect_model(model)
    assert [i.foldable for i in info] == [False] and info[0].reason == reason


@pytest.mark.parametrize(
    "var_value,eps", [(-1.0, 1e-5), (0.0, 0.0), (np.inf, 1e-5), (np.nan, 1e-5)]
)
def test_degenerate_variance_is_left(var_value, eps):
    rng = np.random.default_rng(25)
    params = bn_params(rng, 3)
    params["var"][1] = var_value
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => (float[N, 3] y) {{
          h = Gemm (x, W)
          y = BatchNormalization <epsilon={eps}> (h, s, b, mu, var)
        }}""",
        {"W": rng.normal(size=(5, 3)).astype(np.float32), **params},
    )
    result = fold_model(model)
    assert result.report.n_folded == 0 and "variance" in reasons(result)[0]
    assert op_count(result.model, "BatchNormalization") == 1


def test_float16_overflow_is_left():
    rng = np.random.default_rng(26)
    params = bn_params(rng, 3, np.float16)
    params["var"][:] = 1e-4  # a = s / 0.01: weights of 1000 become ~1e5 > float16 max
    model = model_from_text(
        f"""{HEAD}
        g (float16[N, 5] x) => (float16[N, 3] y) {{
          h = Gemm (x, W)
          y = BatchNormalization <epsilon=0.0> (h, s, b, mu, var)
        }}""",
        {"W": np.full((5, 3), 1000, np.float16), **params},
    )
    result = fold_model(model)
    assert result.report.n_folded == 0 and "overflows float16" in reasons(result)[0]


def test_float16_underflow_is_left():
    rng = np.random.default_rng(27)
    params = bn_params(rng, 3, np.float16)
    params["s"][:] = 1e-3
    model = model_from_text(
        f"""{HEAD}
        g (float16[N, 5] x) => (float16[N, 3] y) {{
          h = Gemm (x, W)
          y = BatchNormalization (h, s, b, mu, var)
        }}""",
        {"W": np.full((5, 3), 1e-5, np.float16), **params},
    )
    result = fold_model(model)
    assert result.report.n_folded == 0 and "underflow" in reasons(result)[0]


def test_channel_count_mismatch_is_a_user_error():
    rng = np.random.default_rng(28)
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => (float[N, 3] y) {{
          h = Gemm (x, W)
          y = BatchNormalization (h, s, b, mu, var)
        }}""",
        {"W": rng.normal(size=(5, 3)).astype(np.float32), **bn_params(rng, 4)},
    )
    with pytest.raises(UnsupportedModelError, match="invalid ONNX model"):
        fold_model(model)


def test_bn_inside_subgraph_readers_block_fold():
    """A BN output read inside an If branch is not only read by linear nodes."""
    rng = np.random.default_rng(29)
    w = rng.normal(size=(5, 3)).astype(np.float32)
    then_g = helper.make_graph(
        [helper.make_node("Identity", ["t"], ["o1"])],
        "then",
        [],
        [helper.make_tensor_value_info("o1", onnx.TensorProto.FLOAT, ["N", 5])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["t"], ["o2"])],
        "else",
        [],
        [helper.make_tensor_value_info("o2", onnx.TensorProto.FLOAT, ["N", 5])],
    )
    params = bn_params(rng, 5)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("BatchNormalization", ["r", "s", "b", "mu", "var"], ["t"]),
        helper.make_node("Gemm", ["t", "W"], ["y"]),
        helper.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 5]),
            helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", 5]),
        ],
        [numpy_helper.from_array(v, k) for k, v in {"W": w, **params}.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    feeds = {"x": _x(rng), "cond": np.array(True)}
    result = fold_and_compare(model, feeds, folded=0)
    assert "If" in reasons(result)[0]


def test_ir3_initializers_listed_as_inputs_are_constants():
    """Before IR 4 every initializer is also a graph input, and still a constant."""
    rng = np.random.default_rng(30)
    inits = {
        "W": rng.normal(size=(5, 4)).astype(np.float32),
        "V": rng.normal(size=(4, 3)).astype(np.float32),
        **bn_params(rng, 4),
    }
    inits.update({k + "2": v for k, v in bn_params(rng, 4).items()})
    model = model_from_text(
        """<ir_version: 3, opset_import: ["" : 9]>
        g (float[N, 5] x, float[5, 4] W, float[4, 3] V, float[4] s, float[4] b, float[4] mu,
           float[4] var, float[4] s2, float[4] b2, float[4] mu2, float[4] var2)
          => (float[N, 3] y) {
          h = Gemm (x, W, b)
          t = BatchNormalization (h, s, b, mu, var)
          r = Relu (t)
          u = BatchNormalization (r, s2, b2, mu2, var2)
          y = MatMul (u, V)
        }""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng)})
    inputs = {i.name for i in result.model.graph.input}
    assert {t.name for t in result.model.graph.initializer} <= inputs
    assert "mu" not in inputs and "x" in inputs


def test_weight_from_a_constant_subgraph_is_replaced_by_an_initializer():
    rng = np.random.default_rng(31)
    inits = {"Wt": rng.normal(size=(3, 5)).astype(np.float32), **bn_params(rng, 3)}
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => (float[N, 3] y) {{
          W = Transpose <perm=[1, 0]> (Wt)
          h = MatMul (x, W)
          y = BatchNormalization (h, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng)})
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add"]
    assert "Wt" not in {t.name for t in result.model.graph.initializer}


def test_non_constant_gemm_bias_is_left():
    rng = np.random.default_rng(32)
    inits = {"W": rng.normal(size=(5, 3)).astype(np.float32), **bn_params(rng, 3)}
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x, float[3] c) => (float[N, 3] y) {{
          h = Gemm (x, W, c)
          y = BatchNormalization (h, s, b, mu, var)
        }}""",
        inits,
    )
    feeds = {"x": _x(rng), "c": np.ones(3, np.float32)}
    result = fold_and_compare(model, feeds, folded=0)
    assert "bias 'c' is a graph input" in reasons(result)[0]
