"""The cleanup after the fold: each pattern folded, each refusal kept, the contract unchanged.

Every model is run before and after in onnxruntime with graph optimizations off (the oracle)
and the cleaned one also in onnx.reference.
"""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper, parser
from onnx.reference import ReferenceEvaluator

from bn_onnx.fold.cleanup import CleanupResult, cleanup, needs_constant_folder

ROOT = Path(__file__).resolve().parents[1]
DIGITS_FOLDED = ROOT / "models" / "digits" / "model.folded.onnx"


# --------------------------------------------------------------------------------------------
# Helpers


def from_text(text: str, inits: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    model = parser.parse_model(text)
    for name, value in (inits or {}).items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return model


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every node: main graph, subgraphs at any depth, functions."""
    out: list[onnx.NodeProto] = []

    def walk(nodes):
        for n in nodes:
            out.append(n)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g.node)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        walk(g.node)

    walk(model.graph.node)
    for f in model.functions:
        walk(f.node)
    return out


def ops(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in all_nodes(model))


def interface(model: onnx.ModelProto) -> tuple:
    def values(vs):
        return [(v.name, v.type.SerializeToString()) for v in vs]

    return (
        values(model.graph.input),
        values(model.graph.output),
        # a key-value map: onnx-ir writes it sorted by key
        sorted((p.key, p.value) for p in model.metadata_props),
        [(o.domain, o.version) for o in model.opset_import],
    )


def signatures(model: onnx.ModelProto) -> set[tuple]:
    """Each model-local function's name, inputs, outputs, attributes and opset imports."""
    return {
        (
            f.domain,
            f.name,
            tuple(f.input),
            tuple(f.output),
            tuple(f.attribute),
            tuple((o.domain, o.version) for o in f.opset_import),
        )
        for f in model.functions
    }


def clean(model: onnx.ModelProto, **kwargs) -> tuple[onnx.ModelProto, CleanupResult]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the onnx-ir model shares tensors with the proto it was read from
    model_ir = ir.serde.deserialize_model(copy)
    result = cleanup(model_ir, **kwargs)
    assert result.model is model_ir
    return ir.serde.serialize_model(model_ir), result


def clean_and_compare(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    *,
    reference: bool = True,
    compare: list[int] | None = None,
    **kwargs,
) -> tuple[onnx.ModelProto, CleanupResult]:
    """Clean `model`; check validity, the contract, and outputs against the original.

    `compare` lists the output indices to compare (all by default: leave out random outputs).
    """
    onnx.checker.check_model(model, full_check=True)
    before = model.SerializeToString()
    out, result = clean(model, **kwargs)
    assert model.SerializeToString() == before  # the proto given was not touched
    onnx.checker.check_model(out, full_check=True)
    assert interface(out) == interface(model)
    assert signatures(out) <= signatures(model)  # unused functions may go, none changes
    domains_before = {n.domain for n in all_nodes(model)}
    assert {n.domain for n in all_nodes(out)} <= domains_before
    want = run_ort(model, feeds)
    got = run_ort(out, feeds)
    idx = range(len(want)) if compare is None else compare
    for i in idx:
        assert got[i].dtype == want[i].dtype and got[i].shape == want[i].shape
        np.testing.assert_allclose(got[i], want[i], rtol=1e-6, atol=1e-7)
    if reference:
        ref = ReferenceEvaluator(out).run(None, feeds)
        for i in idx:
            np.testing.assert_allclose(ref[i], want[i], rtol=1e-4, atol=1e-4)
    # A second cleanup finds nothing left to do.
    again, second = clean(out, **kwargs)
    assert not second.modified, second.to_dict()
    assert ops(again) == ops(out)
    return out, result


def x_feed(*shape: int, dtype=np.float32, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=shape) * 4).astype(dtype)


HEADER = '<ir_version: 10, opset_import: ["" : 18]>'


# --------------------------------------------------------------------------------------------
# Patterns folded


@pytest.mark.parametrize(
    ("onnx_type", "np_type"),
    [("float", np.float32), ("float16", np.float16), ("double", np.float64)],
)
def test_castlike_with_a_dynamic_second_input_becomes_a_constant_of_its_type(onnx_type, np_type):
    model = from_text(f"""{HEADER}
    g ({onnx_type}[N, 4] x) => ({onnx_type}[N, 4] y) {{
        lo = Constant<value_float = 0.0>()
        hi = Constant<value_float = 6.0>()
        lo_c = CastLike(lo, x)
        hi_c = CastLike(hi, x)
        y = Clip(x, lo_c, hi_c)
    }}""")
    out, result = clean_and_compare(model, {"x": x_feed(3, 4, dtype=np_type)})
    assert ops(out) == {"Clip": 1}
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    clip = out.graph.node[0]
    assert inits[clip.input[1]].dtype == np_type and inits[clip.input[1]] == 0
    assert inits[clip.input[2]].dtype == np_type and inits[clip.input[2]] == 6
    assert result.removed_ops == {"CastLike": 2, "Constant": 2}
    assert result.used_constant_folder


def test_shape_of_static_dims_and_gather_of_them_fold_while_the_dynamic_dim_stays():
    model = from_text(f"""{HEADER}
    g (float[N, 3, 4] x) => (float[N, 12] y, int64 n_el) {{
        s = Shape(x)
        i0 = Constant<value_ints = [0]>()
        i1 = Constant<value_ints = [1]>()
        i2 = Constant<value_ints = [2]>()
        n = Gather<axis = 0>(s, i0)
        c = Gather<axis = 0>(s, i1)
        w = Gather<axis = 0>(s, i2)
        cw = Mul(c, w)
        shp = Concat<axis = 0>(n, cw)
        y = Reshape(x, shp)
        tail = Shape<start = 1>(x)
        n_el = ReduceProd<keepdims = 0>(tail)
    }}""")
    out, _ = clean_and_compare(model, {"x": x_feed(2, 3, 4)}, rewrite=False)
    # Only the batch dimension is still read at run time.
    assert ops(out) == {"Shape": 1, "Gather": 1, "Concat": 1, "Reshape": 1}
    # The rewriter writes that Reshape's shape as [-1, 12] from y's known shape [N, 12].
    rewritten, result = clean_and_compare(model, {"x": x_feed(2, 3, 4)})
    assert ops(rewritten) == {"Reshape": 1} and result.rewrites == 1
    consts = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert consts["n_el"] == 12  # a constant graph output keeps its name


def test_the_scan_sees_a_static_dim_behind_a_dynamic_one():
    model = from_text(f"""{HEADER}
    g (float[N, 3] x) => (float[N, 3] y) {{
        s = Shape(x)
        i = Constant<value_ints = [1]>()
        c = Gather<axis = 0>(s, i)
        f = Cast<to = 1>(c)
        y = Div(x, f)
    }}""")
    assert needs_constant_folder(ir.serde.deserialize_model(model))
    out, _ = clean_and_compare(model, {"x": x_feed(2, 3)})
    assert ops(out) == {"Div": 1}


def test_size_of_a_static_shape_folds():
    model = from_text(f"""{HEADER}
    g (float[2, 3] x) => (float[2, 3] y) {{
        n = Size(x)
        f = Cast<to = 1>(n)
        y = Div(x, f)
    }}""")
    out, _ = clean_and_compare(model, {"x": x_feed(2, 3)})
    assert ops(out) == {"Div": 1}


def test_expand_and_constant_of_shape_of_constants_fold():
    model = from_text(f"""{HEADER}
    g (float[2, 3] x) => (float[2, 3] y) {{
        shp = Constant<value_ints = [2, 3]>()
        one = Constant<value = float[1] {{1.5}}>()
        e = Expand(one, shp)
        z = ConstantOfShape<value = float[1] {{0.25}}>(shp)
        a = Add(x, e)
        y = Add(a, z)
    }}""")
    out, result = clean_and_compare(model, {"x": x_feed(2, 3)})
    assert ops(out) == {"Add": 2}
    assert sorted(numpy_helper.to_array(t).shape for t in out.graph.initializer) == [(2, 3)] * 2
    assert result.removed_ops == {"Constant": 2, "Expand": 1, "ConstantOfShape": 1}


def test_reshape_unsqueeze_squeeze_concat_cast_of_constants_fold():
    model = from_text(
        f"""{HEADER}
    g (float[2, 3] x) => (float[2, 3] y) {{
        ax = Constant<value_ints = [0]>()
        u = Unsqueeze(w, ax)
        s = Squeeze(u, ax)
        cc = Concat<axis = 0>(s, s)
        shp = Constant<value_ints = [2, 3]>()
        r = Reshape(cc, shp)
        d = Cast<to = 1>(r)
        y = Mul(x, d)
    }}""",
        {"w": np.arange(3, dtype=np.float64)},
    )
    out, _ = clean_and_compare(model, {"x": x_feed(2, 3)})
    assert ops(out) == {"Mul": 1}
    (t,) = out.graph.initializer
    assert t.data_type == TensorProto.FLOAT


def test_transpose_of_a_weight_becomes_the_transposed_weight_without_onnxscript():
    # torch's dynamo export of Linear on 3-D input
    model = from_text(
        f"""{HEADER}
    g (float[N, 5, 8] x) => (float[N, 5, 16] y) {{
        wt = Transpose<perm = [1, 0]>(w)
        y = MatMul(x, wt)
    }}""",
        {"w": x_feed(16, 8, seed=3)},
    )
    out, result = clean_and_compare(model, {"x": x_feed(2, 5, 8)})
    assert ops(out) == {"MatMul": 1}
    (t,) = out.graph.initializer
    np.testing.assert_array_equal(numpy_helper.to_array(t), x_feed(16, 8, seed=3).T)
    assert result.removed_ops == {"Transpose": 1} and not result.used_constant_folder


def test_identity_chains_go_but_identities_that_keep_an_output_name_stay():
    model = from_text(
        f"""{HEADER}
    g (float[N] x) => (float[N] y, float[N] z, float[2] k, float[N] r, float[N] r2) {{
        a = Relu(x)
        b = Identity(a)
        c = Identity(b)
        y = Identity(c)
        z = Identity(x)
        k = Identity(w)
        r = Neg(x)
        r2 = Identity(r)
    }}""",
        {"w": np.array([1.0, 2.0], np.float32)},
    )
    out, _ = clean_and_compare(model, {"x": x_feed(5)})
    # y: the chain collapses, Relu writes y. z (a graph input) and r2 (its input r is itself
    # an output) keep their Identity; k, a constant, becomes an initializer named k.
    assert ops(out) == {"Relu": 1, "Neg": 1, "Identity": 2}
    assert [n.output[0] for n in out.graph.node if n.op_type == "Relu"] == ["y"]
    assert [t.name for t in out.graph.initializer] == ["k"]


def test_duplicated_initializers_are_merged_small_and_large():
    rng = np.random.default_rng(1)
    small = rng.normal(size=4).astype(np.float32)
    large = rng.normal(size=(40, 40)).astype(np.float32)
    model = from_text(
        f"""{HEADER}
    g (float[40, 4] x) => (float[40, 4] y) {{
        a = Add(x, s1)
        b = Add(a, s2)
        m1 = MatMul(l1, b)
        y = MatMul(l2, m1)
    }}""",
        {"s1": small, "s2": small.copy(), "l1": large, "l2": large.copy()},
    )
    out, result = clean_and_compare(model, {"x": x_feed(40, 4)})
    assert len(out.graph.initializer) == 2
    assert result.deduplicated == 2


def test_common_subexpressions_are_merged():
    # torch's dynamo exporter writes one Split (or MaxPool) per reader of the same value
    model = from_text(
        f"""{HEADER}
    g (float[2, 4, 6, 6] x) => (float[2, 2, 6, 6] y, float[2, 4, 3, 3] z) {{
        s1a, s1b = Split <axis = 1, num_outputs = 2> (x)
        s2a, s2b = Split <axis = 1, num_outputs = 2> (x)
        y = Add(s1a, s2b)
        p1 = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (x)
        p2 = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (x)
        z = Add(p1, p2)
    }}"""
    )
    out, _ = clean_and_compare(model, {"x": x_feed(2, 4, 6, 6)})
    assert ops(out) == {"Split": 1, "MaxPool": 1, "Add": 2}


def test_common_subexpressions_of_random_kept_and_custom_ops_are_not_merged():
    rng = np.random.default_rng(3)
    bn = {k: rng.uniform(0.5, 1.5, 4).astype(np.float32) for k in ("sc", "bi", "mu", "var")}
    model = from_text(
        """<ir_version: 10, opset_import: ["" : 18, "custom.domain" : 1]>
    g (float[2, 4] x, bool t) => (float[2, 4] a, float[2, 4] b, float[2, 4] c) {
        d1 = Dropout (x, r, t)
        d2 = Dropout (x, r, t)
        a = Add(d1, d2)
        n1 = BatchNormalization (x, sc, bi, mu, var)
        n2 = BatchNormalization (x, sc, bi, mu, var)
        b = Add(n1, n2)
        c1 = custom.domain.Op (x)
        c2 = custom.domain.Op (x)
        c = Add(c1, c2)
    }""",
        {**bn, "r": np.array(0.5, np.float32)},
    )
    out, _ = clean(model)
    assert ops(out) == {"Dropout": 2, "BatchNormalization": 2, "Op": 2, "Add": 3}
    assert all(a.name != "bn_onnx_cleanup_cse_keep" for n in out.graph.node for a in n.attribute)


def test_large_initializers_that_differ_only_in_the_middle_are_not_merged():
    a = np.random.default_rng(2).normal(size=(64, 64)).astype(np.float32)
    b = a.copy()
    b[32, 5] += 1.0  # same first and last 4 KiB
    model = from_text(
        f"""{HEADER}
    g (float[64, 64] x) => (float[64, 64] y) {{
        m = Add(x, a)
        n = Add(m, b)
        y = Add(n, a2)
    }}""",
        {"a": a, "b": b, "a2": a.copy()},
    )
    out, result = clean_and_compare(model, {"x": x_feed(64, 64)})
    assert sorted(t.name for t in out.graph.initializer) == ["a", "b"]
    assert result.deduplicated == 1


def test_dead_nodes_unused_initializers_and_unused_functions_are_removed():
    model = from_text(
        """<ir_version: 10, opset_import: ["" : 18, "local" : 1]>
    g (float[N] x) => (float[N] y) {
        dead = Relu(x)
        dead2 = Add(dead, unused_w)
        y = Neg(x)
    }
    <domain: "local", opset_import: ["" : 18]>
    never (a) => (b) {
        b = Relu(a)
    }""",
        {"unused_w": np.ones(1, np.float32), "unread": np.ones(3, np.float32)},
    )
    out, result = clean_and_compare(model, {"x": x_feed(4)})
    assert ops(out) == {"Neg": 1}
    assert len(out.graph.initializer) == 0
    assert [f.name for f in out.functions] == []
    # the now unused "local" opset import stays: the opset list never changes
    assert [(o.domain, o.version) for o in out.opset_import] == [("", 18), ("local", 1)]
    assert result.removed_ops == {"Add": 1, "Relu": 2}


def test_rewrite_rules_merge_relu_and_clip_chains_and_drop_a_zero_conv_bias():
    model = from_text(
        f"""{HEADER}
    g (float[1, 2, 5, 5] x) => (float[1, 2, 5, 5] y) {{
        lo = Constant<value_float = 0.0>()
        hi = Constant<value_float = 6.0>()
        lo_c = CastLike(lo, x)
        hi_c = CastLike(hi, x)
        r1 = Relu(x)
        r2 = Relu(r1)
        c = Conv<pads = [1, 1, 1, 1]>(r2, w, zero)
        y = Clip(c, lo_c, hi_c)
    }}""",
        {"w": x_feed(2, 2, 3, 3, seed=1), "zero": np.zeros(2, np.float32)},
    )
    out, result = clean_and_compare(model, {"x": x_feed(1, 2, 5, 5)})
    assert [n.op_type for n in out.graph.node] == ["Relu", "Conv", "Clip"]
    assert len(out.graph.node[1].input) == 2  # the zero bias is gone
    assert result.rewrites == 2


def test_inexact_rewrites_and_the_bn_fusion_are_left_out():
    model = from_text(
        f"""{HEADER}
    g (float[1, 2, 4, 4] x, double[3] d) => (float[1, 2, 4, 4] y, float16[3] h) {{
        lo = Constant<value_float = 0.0>()
        lo_c = CastLike(lo, x)
        near_one = Constant<value_float = 1.000001>()
        m = Mul(x, near_one)
        c = Conv(m, w, b)
        bn = BatchNormalization(c, s, b, mu, var)
        y = Max(bn, lo_c)
        f = Cast<to = 1>(d)
        h = Cast<to = 10>(f)
    }}""",
        {
            "w": x_feed(2, 2, 1, 1, seed=1),
            "b": np.array([0.5, -0.5], np.float32),
            "s": np.array([2.0, 0.5], np.float32),
            "mu": np.array([0.1, 0.2], np.float32),
            "var": np.array([1.5, 0.7], np.float32),
        },
    )
    feeds = {"x": x_feed(1, 2, 4, 4), "d": np.array([1 + 2**-11, 0.1, 65519.0])}
    out, _ = clean_and_compare(model, feeds)
    left = ops(out)
    assert left["Mul"] == 1 and left["BatchNormalization"] == 1 and left["Cast"] == 2


# --------------------------------------------------------------------------------------------
# Subgraphs and functions


IF_MODEL = f"""{HEADER}
g (bool cond, float[N, 4] x) => (float[N, 4] y) {{
    v = Relu(x)
    y = If(cond) <
        then_branch = then_g () => (float[N, 4] t_out) {{
            lo = Constant<value_float = 0.0>()
            hi = Constant<value_float = 6.0>()
            lo_c = CastLike(lo, v)
            hi_c = CastLike(hi, v)
            t_id = Identity(v)
            t_out = Clip(t_id, lo_c, hi_c)
        }},
        else_branch = else_g () => (float[N, 4] e_out) {{
            e_out = Identity(v)
        }}
    >
}}"""


@pytest.mark.parametrize("cond", [True, False])
def test_if_branches_are_cleaned_and_keep_their_outer_scope_references(cond):
    model = from_text(IF_MODEL)
    feeds = {"cond": np.array(cond), "x": x_feed(3, 4)}
    out, _ = clean_and_compare(model, feeds)
    then_g = out.graph.node[1].attribute[0].g
    else_g = out.graph.node[1].attribute[1].g
    assert [n.op_type for n in then_g.node] == ["Clip"]
    assert then_g.node[0].input[0] == "v"  # reads the outer value directly
    # onnxruntime rejects a subgraph that returns an outer value without a node between.
    assert [n.op_type for n in else_g.node] == ["Identity"]


def test_nested_subgraphs_are_cleaned_and_keep_references_two_levels_up():
    model = from_text(f"""{HEADER}
    g (bool c1, bool c2, float[N, 4] x) => (float[N, 4] y) {{
        v = Relu(x)
        y = If(c1) <
            then_branch = outer_then () => (float[N, 4] o1) {{
                o1 = If(c2) <
                    then_branch = inner_then () => (float[N, 4] i1) {{
                        lo = Constant<value_float = 0.0>()
                        lo_c = CastLike(lo, v)
                        i1 = Max(v, lo_c)
                    }},
                    else_branch = inner_else () => (float[N, 4] i2) {{
                        i2 = Identity(v)
                    }}
                >
            }},
            else_branch = outer_else () => (float[N, 4] o2) {{
                o2 = Neg(v)
            }}
        >
    }}""")
    for c1, c2 in [(True, True), (True, False), (False, True)]:
        feeds = {"c1": np.array(c1), "c2": np.array(c2), "x": x_feed(3, 4)}
        out, _ = clean_and_compare(model, feeds)
    inner = out.graph.node[1].attribute[0].g.node[0]
    assert [n.op_type for n in inner.attribute[0].g.node] == ["Max"]
    assert [n.op_type for n in inner.attribute[1].g.node] == ["Identity"]


def test_if_with_a_constant_condition_is_replaced_by_its_branch():
    model = from_text(
        IF_MODEL.replace("(bool cond, float[N, 4] x)", "(float[N, 4] x)").replace(
            "v = Relu(x)", "v = Relu(x)\n    cond = Constant<value = bool {1}>()"
        )
    )
    out, _ = clean_and_compare(model, {"x": x_feed(3, 4)})
    assert ops(out) == {"Relu": 1, "Clip": 1}


def test_loop_body_is_cleaned():
    model = from_text(f"""{HEADER}
    g (int64 trips, float[4] x) => (float[4] y) {{
        t = Constant<value = bool {{1}}>()
        y = Loop(trips, t, x) <
            body = body_g (int64 i, bool c_in, float[4] acc) => (bool c_out, float[4] acc_out) {{
                c_out = Identity(c_in)
                k = Constant<value_float = 0.5>()
                k_c = CastLike(k, acc)
                two = Add(k_c, k_c)
                acc_out = Mul(acc, two)
            }}
        >
    }}""")
    out, _ = clean_and_compare(model, {"trips": np.array(3, np.int64), "x": x_feed(4)})
    body = out.graph.node[-1].attribute[0].g
    # c_out = Identity(c_in) returns a body input: kept. The rest folds to one Mul.
    assert sorted(n.op_type for n in body.node) == ["Identity", "Mul"]


def test_model_local_functions_are_cleaned_and_keep_their_signature():
    model = from_text(
        """<ir_version: 10, opset_import: ["" : 18, "local" : 1]>
    g (float[N] x) => (float[N] y) {
        y = local.scale(x)
    }
    <domain: "local", opset_import: ["" : 18]>
    scale (a) => (b) {
        one = Constant<value_float = 1.0>()
        two = Add(one, one)
        dead = Relu(a)
        t = Identity(two)
        b = Mul(a, t)
    }"""
    )
    out, _ = clean_and_compare(model, {"x": x_feed(5)})
    (f,) = out.functions
    # Functions hold no initializers: a folded value stays a Constant node there.
    assert [n.op_type for n in f.node] == ["Constant", "Mul"]
    assert ops(out)["Add"] == 0 and [n.op_type for n in out.graph.node] == ["scale"]


def test_a_function_node_whose_attribute_comes_from_the_call_is_not_folded():
    # Folded without the call's perm, Transpose would reverse the axes: (2, 4, 3), not (2, 3, 4).
    model = from_text(
        """<ir_version: 10, opset_import: ["" : 18, "local" : 1]>
    g (float[2, 3, 4] x) => (float[2, 3, 4] y) {
        y = local.add_t<perm = [0, 2, 1]>(x)
    }
    <domain: "local", opset_import: ["" : 18]>
    add_t <perm> (a) => (b) {
        c = Constant<value = float[2, 4, 3] {
            0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23
        }>()
        t = Transpose<perm: ints = @perm>(c)
        b = Add(a, t)
    }"""
    )
    out, _ = clean_and_compare(model, {"x": x_feed(2, 3, 4)})
    assert [n.op_type for n in out.functions[0].node] == ["Constant", "Transpose", "Add"]


# --------------------------------------------------------------------------------------------
# Refusals


def test_random_ops_bernoulli_and_training_dropout_are_never_folded():
    model = from_text(
        f"""{HEADER}
    g (float[3] x) => (float[3] y, float[3] r1, float[3] r2, float[3] r3, float[3] r4) {{
        p = Constant<value = float[3] {{0.5, 0.5, 0.5}}>()
        r1 = Bernoulli(p)
        r2 = RandomUniformLike(p)
        r3 = RandomNormal<shape = [3]>()
        ratio = Constant<value_float = 0.5>()
        train = Constant<value = bool {{1}}>()
        r4, mask = Dropout(p, ratio, train)
        y = Neg(x)
    }}"""
    )
    out, result = clean_and_compare(model, {"x": x_feed(3)}, compare=[0], reference=False)
    left = ops(out)
    for op in ("Bernoulli", "RandomUniformLike", "RandomNormal", "Dropout"):
        assert left[op] == 1, op
    assert result.used_constant_folder


@pytest.mark.parametrize(
    "bomb",
    [
        "big = Expand(one, shp)",
        "big = ConstantOfShape<value = float[1] {1.0}>(shp)",
        "big = Tile(one2d, reps)",
    ],
)
def test_no_huge_constant_is_made_from_small_ones(bomb):
    # 1e10 elements (40 GB): evaluating it would kill the process.
    model = from_text(
        f"""{HEADER}
    g (float[N] x) => (float[N] y, float[1] s) {{
        one = Constant<value = float[1] {{1.0}}>()
        one2d = Constant<value = float[1, 1] {{1.0}}>()
        shp = Constant<value_ints = [100000, 100000]>()
        reps = Constant<value_ints = [100000, 100000]>()
        {bomb}
        s = ReduceSum<keepdims = 0>(big)
        y = Neg(x)
    }}"""
    )
    out, result = clean(model)
    assert ops(out)[bomb.split()[2].split("(")[0].split("<")[0]] == 1
    assert result.removed_ops == {"Constant": 4}  # the unused ones; the rest lifted


def test_the_size_bound_ignores_a_value_info_that_understates_an_output():
    model = from_text(f"""{HEADER}
    g (float[N] x) => (float[N] y, float[1] s) {{
        one = Constant<value = float[1] {{1.0}}>()
        shp = Constant<value_ints = [100000, 100000]>()
        big = Expand(one, shp)
        s = ReduceSum<keepdims = 0>(big)
        y = Neg(x)
    }}""")
    model.graph.value_info.append(helper.make_tensor_value_info("big", TensorProto.FLOAT, [1]))
    out, _ = clean(model)
    assert ops(out)["Expand"] == 1


def test_a_constant_within_the_size_bound_is_folded_and_one_beyond_is_not():
    text = f"""{HEADER}
    g (float[N] x) => (float[N] y, float s) {{
        one = Constant<value = float[1] {{1.0}}>()
        shp = Constant<value_ints = [30, 40]>()
        big = Expand(one, shp)
        s = ReduceSum<keepdims = 0>(big)
        y = Neg(x)
    }}"""
    feeds = {"x": x_feed(3)}
    kept, _ = clean_and_compare(from_text(text), feeds, max_new_elements=1000)
    assert ops(kept)["Expand"] == 1
    folded, _ = clean_and_compare(from_text(text), feeds, max_new_elements=1200)
    assert ops(folded)["Expand"] == 0


def test_batchnorm_quantization_and_custom_domain_nodes_of_constants_are_kept():
    model = from_text(
        """<ir_version: 10, opset_import: ["" : 18, "custom" : 1]>
    g (float[2] x) => (float[2] y, uint8[2] q, float[1, 2] bn) {
        sc = Constant<value_float = 0.5>()
        zp = Constant<value = uint8 {3}>()
        q = QuantizeLinear(w, sc, zp)
        dq = DequantizeLinear(q, sc, zp)
        c = custom.Thing(w)
        a = Add(x, dq)
        a2 = Add(a, c)
        lo = Constant<value_float = 0.0>()
        lo_c = CastLike(lo, x)
        y = Max(a2, lo_c)
        bn = BatchNormalization(w2, s, b, m, v)
    }""",
        {
            "w": np.array([1.0, -2.0], np.float32),
            "w2": np.array([[1.0, -2.0]], np.float32),
            "s": np.ones(2, np.float32),
            "b": np.zeros(2, np.float32),
            "m": np.zeros(2, np.float32),
            "v": np.ones(2, np.float32),
        },
    )
    out, result = clean(model)
    assert result.used_constant_folder and result.removed_ops["CastLike"] == 1
    assert interface(out) == interface(model)
    left = ops(out)
    for op in ("QuantizeLinear", "DequantizeLinear", "Thing", "BatchNormalization"):
        assert left[op] == 1, op


# --------------------------------------------------------------------------------------------
# The contract


def test_metadata_opsets_and_declared_output_shapes_never_change():
    model = from_text(
        """<ir_version: 10, opset_import: ["" : 18, "com.microsoft" : 1, "ai.onnx.ml" : 3]>
    g (float[2, 3] x) => (float[M, 3] y, float[K] k) {
        a = Relu(x)
        y = Identity(a)
        c1 = Constant<value = float[2] {1.0, 2.0}>()
        k = Add(c1, c1)
    }"""
    )
    onnx.helper.set_model_props(model, {"bn_onnx.folded": "true", "author": "me"})
    out, _ = clean_and_compare(model, {"x": x_feed(2, 3)})
    # shape inference knows y is [2, 3] and k is [2]; the declared M and K stay
    assert [d.dim_param for d in out.graph.output[0].type.tensor_type.shape.dim] == ["M", ""]
    assert out.graph.output[1].type.tensor_type.shape.dim[0].dim_param == "K"
    assert [o.name for o in out.graph.output] == ["y", "k"]
    assert {(p.key, p.value) for p in out.metadata_props} == {
        ("bn_onnx.folded", "true"),
        ("author", "me"),
    }
    # the folder's provenance tags do not leak into the file
    assert "folded_from" not in out.SerializeToString().decode("latin-1")


def test_the_contract_check_sees_each_kind_of_change():
    from bn_onnx.fold.cleanup import _Interface

    text = f"""{HEADER}
    g (float[N] x) => (float[N] y) {{
        y = Relu(x)
    }}"""

    def changed(change) -> list[str]:
        model = ir.serde.deserialize_model(from_text(text))
        contract = _Interface.capture(model)
        change(model)
        return contract.differences(model)

    assert changed(lambda m: None) == []
    assert changed(lambda m: setattr(m.graph.outputs[0], "name", "z")) == ["outputs changed"]
    assert changed(lambda m: setattr(m.graph.inputs[0], "shape", ir.Shape([3]))) == [
        "inputs changed"
    ]
    assert changed(lambda m: m.metadata_props.update(k="v")) == ["metadata_props changed"]
    assert changed(lambda m: m.opset_imports.update({"x.y": 1})) == ["opsets changed"]

    def custom_node(m: ir.Model) -> None:
        m.graph.append(ir.Node("com.microsoft", "Gelu", [m.graph.inputs[0]]))

    assert changed(custom_node) == ["nodes of new domains ['com.microsoft']"]


def test_overridable_initializers_are_not_folded():
    # An initializer that is also a graph input (IR < 4 style) can be fed at run time.
    model = from_text(
        """<ir_version: 10, opset_import: ["" : 18]>
    g (float[2] x, float[2] w) => (float[2] y) {
        w2 = Add(w, w)
        y = Mul(x, w2)
    }""",
        {"w": np.array([1.0, 2.0], np.float32)},
    )
    out, result = clean_and_compare(model, {"x": x_feed(2)})
    assert ops(out) == {"Add": 1, "Mul": 1}
    out_w = run_ort(out, {"x": x_feed(2), "w": np.array([3.0, 4.0], np.float32)})
    assert np.allclose(out_w[0], x_feed(2) * np.array([6.0, 8.0], np.float32))
    assert not result.modified


# --------------------------------------------------------------------------------------------
# Import cost: onnxscript only when there is folding to do


def _probe(path: Path, extra: str = "") -> str:
    code = (
        "import sys, onnx_ir as ir\n"
        "from bn_onnx.fold.cleanup import cleanup, needs_constant_folder\n"
        f"m = ir.load({str(path)!r})\n"
        "need = needs_constant_folder(m)\n"
        f"r = cleanup(m{extra})\n"
        "print(need, r.used_constant_folder, 'onnxscript' in sys.modules)\n"
        "assert 'torch' not in sys.modules  # the fold layer never imports torch\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_a_clean_model_never_imports_onnxscript():
    assert _probe(DIGITS_FOLDED) == "False False False"


def test_a_cluttered_model_imports_onnxscript_unless_folding_is_off(tmp_path):
    path = tmp_path / "clutter.onnx"
    model = from_text(f"""{HEADER}
    g (float[N, 4] x) => (float[N, 4] y) {{
        lo = Constant<value_float = 0.0>()
        lo_c = CastLike(lo, x)
        y = Max(x, lo_c)
    }}""")
    onnx.save(model, path)
    assert _probe(path) == "True True True"
    assert _probe(path, ", fold_constants=False") == "True False False"


def test_the_digits_model_is_unchanged_by_cleanup():
    model = onnx.load(DIGITS_FOLDED)
    out, result = clean(model)
    assert not result.modified
    assert ops(out) == ops(model)
    assert interface(out) == interface(model)


# --------------------------------------------------------------------------------------------
# Property: random small graphs mixing constant and dynamic parts


_UNARY = ("Relu", "Neg", "Identity", "Abs")
_BINARY = ("Add", "Mul", "Sub", "Max", "Min")


def _random_graph(draw) -> onnx.ModelProto:
    """A chain over float[2, 3] values; some built only from constants, some from x."""
    nodes: list[onnx.NodeProto] = []
    inits = []
    pool = ["x"]  # names of float[2, 3] values
    counter = iter(range(1000))

    def fresh(prefix: str) -> str:
        return f"{prefix}{next(counter)}"

    def constant() -> str:
        name = fresh("c")
        value = np.round(np.random.default_rng(draw(st.integers(0, 99))).normal(size=(2, 3)), 2)
        if draw(st.booleans()):
            inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        else:
            nodes.append(
                helper.make_node(
                    "Constant", [], [name], value=numpy_helper.from_array(value.astype(np.float32))
                )
            )
        return name

    for _ in range(draw(st.integers(1, 10))):
        kind = draw(
            st.sampled_from(["const", "unary", "binary", "castlike", "expand", "reshape", "shape"])
        )
        out = fresh("v")
        if kind == "const":
            pool.append(constant())
            continue
        a = draw(st.sampled_from(pool))
        if kind == "unary":
            nodes.append(helper.make_node(draw(st.sampled_from(_UNARY)), [a], [out]))
        elif kind == "binary":
            b = draw(st.sampled_from(pool)) if draw(st.booleans()) else constant()
            nodes.append(helper.make_node(draw(st.sampled_from(_BINARY)), [a, b], [out]))
        elif kind == "castlike":  # a float64 scalar cast like a float32 value
            k = fresh("k")
            nodes.append(
                helper.make_node("Constant", [], [k], value=numpy_helper.from_array(np.array(0.5)))
            )
            kc = fresh("kc")
            nodes.append(helper.make_node("CastLike", [k, a], [kc]))
            nodes.append(helper.make_node("Mul", [a, kc], [out]))
        elif kind == "expand":
            s, e = fresh("s"), fresh("e")
            nodes.append(helper.make_node("Shape", [a], [s]))
            nodes.append(helper.make_node("Expand", [draw(st.sampled_from(pool)), s], [e]))
            nodes.append(helper.make_node("Add", [e, a], [out]))
        elif kind == "reshape":
            s1, s2, r = fresh("s"), fresh("s"), fresh("r")
            nodes.append(helper.make_node("Constant", [], [s1], value_ints=[3, 2]))
            nodes.append(helper.make_node("Constant", [], [s2], value_ints=[2, 3]))
            nodes.append(helper.make_node("Reshape", [a, s1], [r]))
            nodes.append(helper.make_node("Reshape", [r, s2], [out]))
        else:  # Shape -> Cast -> ReduceSum: a float scalar from a static shape
            s, f, t = fresh("s"), fresh("f"), fresh("t")
            nodes.append(helper.make_node("Shape", [a], [s]))
            nodes.append(helper.make_node("Cast", [s], [f], to=TensorProto.FLOAT))
            nodes.append(helper.make_node("ReduceSum", [f], [t], keepdims=0))
            nodes.append(helper.make_node("Add", [a, t], [out]))
        pool.append(out)
    outputs = [pool[-1]] if pool[-1] != "x" else []
    extra = draw(st.sampled_from(pool))
    if extra not in ("x", *outputs) and extra not in {i.name for i in inits}:
        outputs.append(extra)
    if not outputs:
        nodes.append(helper.make_node("Neg", ["x"], ["y"]))
        outputs = ["y"]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [2, 3]) for o in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_graphs_keep_their_outputs_and_contract(data):
    model = _random_graph(data.draw)
    out, result = clean_and_compare(model, {"x": x_feed(2, 3)})
    # No Constant node is left, nor a node whose inputs are all constants.
    consts = {t.name for t in out.graph.initializer}
    outputs = {o.name for o in out.graph.output}
    for node in out.graph.node:
        if node.op_type in ("Identity", "Constant") and node.output[0] in outputs:
            continue  # keeps the name of a constant graph output
        assert node.op_type != "Constant"
        assert not all(i in consts for i in node.input), node
    assert ops(out)["CastLike"] == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_cheap_scan_never_misses_work_for_the_folder(data):
    from onnxscript.optimizer import _constant_folding

    model = _random_graph(data.draw)
    model_ir = ir.serde.deserialize_model(model)
    if needs_constant_folder(model_ir):
        return
    folder = _constant_folding.FoldConstantsPass(
        shape_inference=True,
        input_size_limit=1 << 16,
        output_size_limit=1 << 20,
    )  # onnxscript's own rules: they fold more than the cleanup allows
    ops = [n.op_type for n in model_ir.graph]
    inits = len(model_ir.graph.initializers)
    folder(model_ir)
    # The folder may rename around an Identity before a graph output ("modified", with the
    # same nodes): Identity nodes are the cleanup's own pass's work, not the folder's.
    assert [n.op_type for n in model_ir.graph] == ops
    assert len(model_ir.graph.initializers) == inits
