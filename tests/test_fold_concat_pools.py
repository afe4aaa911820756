"""Rules 22-23: a BN after a Concat split across its inputs (issue 12, 2e), and folds through pools
that commute with a per-channel affine map (2f), in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fold_testing import bn_params, fold_and_compare, model_from_text, op_count, reasons
from onnx import helper

HEAD = '<ir_version: 8, opset_import: ["" : 18]>'


def _x(rng, shape):
    return rng.normal(size=shape).astype(np.float32)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# --- rule 22: Concat ---------------------------------------------------------------------


def test_bn_after_concat_of_conv_grouped_conv_and_conv_transpose_splits_across_them():
    """Concat along the channel axis of a Conv (3 ch), a grouped Conv (4 ch) and a
    ConvTranspose (2 ch): each gets its slice of the BN's 9 channels; the Concat stays."""
    rng = np.random.default_rng(200)
    inits = {
        "W1": rng.normal(size=(3, 2, 3, 3)).astype(np.float32),
        "B1": rng.normal(size=(3,)).astype(np.float32),
        "W2": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
        "W3": rng.normal(size=(2, 2, 3, 3)).astype(np.float32),
        **bn_params(rng, 9),
    }
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 2, 6, 6] x) => (float[N, 9, 6, 6] y) {{
          c1 = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
          c2 = Conv <pads = [1, 1, 1, 1], group = 2> (x, W2)
          c3 = ConvTranspose <pads = [1, 1, 1, 1]> (x, W3)
          cat = Concat <axis = 1> (c1, c2, c3)
          y = BatchNormalization (cat, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (2, 2, 6, 6))})
    entry = result.report.entries[0]
    assert (
        entry.direction == "preceding" and entry.target == "Conv(c1), Conv(c2), ConvTranspose(c3)"
    )
    assert _ops(result.model) == ["Conv", "Conv", "ConvTranspose", "Concat"]


def test_mixed_conv_split_then_concat_then_bn_folds():
    """mixnet's MixedConv: Split channels, a 3x3 and a 5x5 depthwise Conv, Concat, BN."""
    rng = np.random.default_rng(201)
    inits = {
        "W3": rng.normal(size=(2, 1, 3, 3)).astype(np.float32),
        "W5": rng.normal(size=(4, 1, 5, 5)).astype(np.float32),
        "sizes": np.array([2, 4], np.int64),
        **bn_params(rng, 6),
    }
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 6, 7, 7] x) => (float[N, 6, 7, 7] y) {{
          p, q = Split <axis = 1> (x, sizes)
          a = Conv <group = 2, pads = [1, 1, 1, 1]> (p, W3)
          d = Conv <group = 4, pads = [2, 2, 2, 2]> (q, W5)
          cat = Concat <axis = -3> (a, d)
          y = BatchNormalization (cat, s, b, mu, var)
        }}""",
        inits,
    )
    fold_and_compare(model, {"x": _x(rng, (2, 6, 7, 7))})


def test_nested_concat_and_layout_ops_on_its_inputs_fold():
    """Concat(Concat(Conv, Identity(Conv)), Transpose(MatMul)) -> BN: every part finds its
    linear node, through Identity and Transpose."""
    rng = np.random.default_rng(202)
    inits = {
        "W1": rng.normal(size=(2, 3, 1)).astype(np.float32),
        "W2": rng.normal(size=(3, 3, 1)).astype(np.float32),
        "W3": rng.normal(size=(3, 4)).astype(np.float32),
        **bn_params(rng, 9),
    }
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 3, 5] x) => (float[N, 9, 5] y) {{
          c1 = Conv (x, W1)
          c2 = Conv (x, W2)
          i2 = Identity (c2)
          inner = Concat <axis = 1> (c1, i2)
          t = Transpose <perm = [0, 2, 1]> (x)
          m = MatMul (t, W3)
          mt = Transpose <perm = [0, 2, 1]> (m)
          cat = Concat <axis = 1> (inner, mt)
          y = BatchNormalization (cat, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (2, 3, 5))})
    assert result.report.entries[0].target_op == "Conv, MatMul"
    assert op_count(result.model, "Add") == 1  # the MatMul's new bias


def test_concat_along_a_non_channel_axis_gives_every_input_the_whole_map():
    rng = np.random.default_rng(203)
    inits = {
        "W1": rng.normal(size=(4, 3, 1, 1)).astype(np.float32),
        "W2": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        **bn_params(rng, 4),
    }
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 3, 6, 6] x) => (float[N, 4, 12, 6] y) {{
          c1 = Conv (x, W1)
          c2 = Conv <pads = [1, 1, 1, 1]> (x, W2)
          cat = Concat <axis = 2> (c1, c2)
          y = BatchNormalization (cat, s, b, mu, var)
        }}""",
        inits,
    )
    fold_and_compare(model, {"x": _x(rng, (2, 3, 6, 6))})


def test_concat_with_inputs_that_do_not_fold_is_left_naming_each():
    """A BN after Concat(Conv read elsewhere too, Conv, Relu): the reason names both inputs
    that do not fold and why; nothing is split."""
    rng = np.random.default_rng(204)
    inits = {
        "W1": rng.normal(size=(2, 3, 1, 1)).astype(np.float32),
        "W2": rng.normal(size=(2, 3, 1, 1)).astype(np.float32),
        **bn_params(rng, 7),
    }
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 3, 4, 4] x) => (float[N, 7, 4, 4] y, float[N, 2, 4, 4] z) {{
          c1 = Conv (x, W1)
          z = Relu (c1)
          c2 = Conv (x, W2)
          r = Relu (x)
          cat = Concat <axis = 1> (c1, c2, r)
          y = BatchNormalization (cat, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (2, 3, 4, 4))}, folded=0)
    assert reasons(result) == [
        "before: after Concat 'Concat(cat)', 2 of 3 inputs do not fold: 'c1' (is also read"
        " by another node), 'r' (comes after Relu 'Relu(r)', not Gemm/MatMul/Conv); after: its"
        " output 'y' is a graph output"
    ]
    assert op_count(result.model, "Conv") == 2


def test_a_concat_reason_names_four_inputs_and_counts_the_rest():
    rng = np.random.default_rng(206)
    names = [f"x{i}" for i in range(6)]
    inputs = ", ".join(f"float[N, 1, 3] {n}" for n in names)
    model = model_from_text(
        f"""{HEAD}
        g ({inputs}) => (float[N, 6, 3] y) {{
          cat = Concat <axis = 1> ({", ".join(names)})
          y = BatchNormalization (cat, s, b, mu, var)
        }}""",
        bn_params(rng, 6),
    )
    result = fold_and_compare(model, {n: _x(rng, (2, 1, 3)) for n in names}, folded=0)
    assert reasons(result)[0].startswith(
        "before: after Concat 'Concat(cat)', 6 of 6 inputs do not fold: 'x0' (is a graph"
        " input), 'x1' (is a graph input), 'x2' (is a graph input), 'x3' (is a graph input)"
        " and 2 more; after:"
    )


def test_concat_of_a_dynamic_channel_count_is_left():
    rng = np.random.default_rng(205)
    inits = {"W1": rng.normal(size=(2, 3, 1, 1)).astype(np.float32), **bn_params(rng, 5)}
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 3, 4, 4] x, float[N, C, 4, 4] v) => (float[N, 5, 4, 4] y) {{
          c1 = Conv (x, W1)
          cat = Concat <axis = 1> (c1, v)
          y = BatchNormalization (cat, s, b, mu, var)
        }}""",
        inits,
    )
    feeds = {"x": _x(rng, (2, 3, 4, 4)), "v": _x(rng, (2, 3, 4, 4))}
    result = fold_and_compare(model, feeds, folded=0)
    assert "Concat 'Concat(cat)': the channel count of input 'v' is unknown" in reasons(result)[0]


# --- rule 23: pools ----------------------------------------------------------------------


POOLS_BEFORE = [
    ("MaxPool <kernel_shape = [2, 2], strides = [2, 2]>", "float[N, 4, 3, 3]"),
    ("MaxPool <kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [2, 2]>", "float[N, 4, 3, 3]"),
    ("MaxPool <kernel_shape = [3, 3], strides = [2, 2], ceil_mode = 1>", "float[N, 4, 3, 3]"),
    ("GlobalMaxPool", "float[N, 4, 1, 1]"),
    ("GlobalAveragePool", "float[N, 4, 1, 1]"),
    ("AveragePool <kernel_shape = [2, 2], strides = [2, 2]>", "float[N, 4, 3, 3]"),
    (
        "AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [2, 2]>",
        "float[N, 4, 3, 3]",
    ),
    (
        "AveragePool <kernel_shape = [2, 2], pads = [0, 0, 1, 1], strides = [2, 2], ceil_mode = 1>",
        "float[N, 4, 4, 4]",
    ),
    (
        'AveragePool <kernel_shape = [3, 3], auto_pad = "SAME_UPPER", strides = [2, 2]>',
        "float[N, 4, 3, 3]",
    ),
    ("AveragePool <kernel_shape = [2, 2], count_include_pad = 1>", "float[N, 4, 5, 5]"),
    (  # ceil_mode without overhang: (6 - 3) % 3 == 0
        "AveragePool <kernel_shape = [3, 3], strides = [3, 3], ceil_mode = 1,"
        " count_include_pad = 1>",
        "float[N, 4, 2, 2]",
    ),
    ("ReduceMean <keepdims = 1> (h, axes)", "float[N, 4, 1, 1]"),
    ("ReduceMean <keepdims = 0> (h, axes)", "float[N, 4]"),
    ("ReduceMax <keepdims = 0> (h, axes)", "float[N, 4]"),
]


@pytest.mark.parametrize(("pool", "out"), POOLS_BEFORE)
def test_bn_after_a_commuting_pool_folds_into_the_conv_before_it(pool, out):
    rng = np.random.default_rng(210)
    p = bn_params(rng, 4)
    p["s"] = np.abs(p["s"]) + 0.1  # positive scales: max commutes
    inits = {
        "W": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "axes": np.array([-1, 2], np.int64),
        **p,
    }
    call = pool if "(" in pool else f"{pool} (h)"
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 3, 8, 8] x) => ({out} y) {{
          h = Conv (x, W)
          p = {call}
          y = BatchNormalization (p, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (2, 3, 8, 8))})
    assert result.report.entries[0].target_op == "Conv"
    assert op_count(result.model, pool.split()[0]) == 1


def test_max_pool_with_negative_scales_is_left_naming_the_channels():
    rng = np.random.default_rng(211)
    p = bn_params(rng, 9)
    p["s"] = np.abs(p["s"]) + 0.1
    p["s"][[3, 7]] *= -1
    inits = {"W": rng.normal(size=(9, 3, 1, 1)).astype(np.float32), **p}
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 3, 4, 4] x) => (float[N, 9, 2, 2] y) {{
          h = Conv (x, W)
          m = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (h)
          y = BatchNormalization (m, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (2, 3, 4, 4))}, folded=0)
    assert reasons(result)[0].startswith(
        "before: MaxPool 'MaxPool(m)': channels 3, 7 have negative scales (max commutes only"
        " with a non-decreasing map)"
    )


def test_a_zero_scale_commutes_with_max():
    rng = np.random.default_rng(212)
    p = bn_params(rng, 4)
    p["s"] = np.abs(p["s"]) + 0.1
    p["s"][1] = 0.0
    inits = {"W": rng.normal(size=(4, 3, 1, 1)).astype(np.float32), **p}
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 3, 4, 4] x) => (float[N, 4, 1, 1] y) {{
          h = Conv (x, W)
          m = GlobalMaxPool (h)
          y = BatchNormalization (m, s, b, mu, var)
        }}""",
        inits,
    )
    fold_and_compare(model, {"x": _x(rng, (2, 3, 4, 4))})


@pytest.mark.parametrize(
    ("pool", "out", "words"),
    [
        (
            "AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1], count_include_pad = 1>",
            "float[N, 4, 6, 6]",
            "has count_include_pad=1 and pads=[1, 1, 1, 1]: padded zeros enter the border averages",
        ),
        (
            'AveragePool <kernel_shape = [3, 3], auto_pad = "SAME_LOWER", count_include_pad = 1>',
            "float[N, 4, 6, 6]",
            "has count_include_pad=1 and auto_pad=SAME_LOWER: padded zeros",
        ),
        (
            "AveragePool <kernel_shape = [3, 3], strides = [2, 2], ceil_mode = 1,"
            " count_include_pad = 1>",
            "float[N, 4, 3, 3]",
            "has count_include_pad=1 and ceil_mode=1: the last window overhangs the input",
        ),
        ("ReduceMean <keepdims = 1> (h, axes)", "float[N, 1, 6, 1]", "reduces the channel axis 1"),
        ("ReduceMean <keepdims = 1> (h)", "float[1, 1, 1, 1]", "reduces the channel axis 1"),
    ],
)
def test_pools_that_do_not_commute_are_left_with_the_reason(pool, out, words):
    rng = np.random.default_rng(213)
    channels = 1 if pool.startswith("Reduce") else 4
    inits = {
        "W": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "axes": np.array([1, 3], np.int64),
        **bn_params(rng, channels),
    }
    call = pool if "(" in pool else f"{pool} (h)"
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 3, 8, 8] x) => ({out} y) {{
          h = Conv (x, W)
          p = {call}
          y = BatchNormalization (p, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (2, 3, 8, 8))}, folded=0)
    name = pool.split()[0]
    assert f"before: {name} '{name}(p)' {words}" in reasons(result)[0]


def test_max_pool_whose_indices_are_read_is_left():
    rng = np.random.default_rng(214)
    p = bn_params(rng, 4)
    p["s"] = np.abs(p["s"]) + 0.1
    inits = {"W": rng.normal(size=(4, 3, 1, 1)).astype(np.float32), **p}
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 3, 4, 4] x) => (float[N, 4, 2, 2] y, int64[N, 4, 2, 2] i) {{
          h = Conv (x, W)
          m, i = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (h)
          y = BatchNormalization (m, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (2, 3, 4, 4))}, folded=0)
    assert "before: MaxPool 'MaxPool(m)': its Indices output is read" in reasons(result)[0]


@pytest.mark.parametrize(
    "head",
    [
        "p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (n)\n          y = Conv (p, W)",
        "p = GlobalAveragePool (n)\n          f = Flatten (p)\n          y = Gemm (f, V)",
        "p = ReduceMean <keepdims = 0> (n, axes)\n          y = MatMul (p, V)",
    ],
)
def test_bn_before_a_commuting_pool_folds_into_the_linear_node_after_it(head):
    rng = np.random.default_rng(215)
    p = bn_params(rng, 4)
    p["s"] = np.abs(p["s"]) + 0.1
    inits = {
        "W": rng.normal(size=(5, 4, 1, 1)).astype(np.float32),
        "V": rng.normal(size=(4, 5)).astype(np.float32),
        "axes": np.array([2, 3], np.int64),
        **p,
    }
    out = "float[N, 5, 3, 3]" if "Conv" in head else "float[N, 5]"
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 4, 6, 6] x) => ({out} y) {{
          r = Relu (x)
          n = BatchNormalization (r, s, b, mu, var)
          {head}
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (2, 4, 6, 6))})
    assert result.report.entries[0].direction == "following"


def _average_pool(attrs: dict, shape=(1, 2, 7, 7)):
    node = helper.make_node("AveragePool", ["x"], ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return lambda x: session.run(None, {"x": x})[0]


@pytest.mark.parametrize(
    ("attrs", "commutes"),
    [
        ({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, True),
        ({"kernel_shape": [3, 3], "pads": [1, 2, 0, 1], "strides": [3, 2], "ceil_mode": 1}, True),
        ({"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]}, True),
        ({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "dilations": [2, 2], "ceil_mode": 1}, True),
        ({"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1, "count_include_pad": 1}, True),
        ({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}, False),
        ({"kernel_shape": [3, 3], "auto_pad": "SAME_LOWER", "count_include_pad": 1}, False),
    ],
)
def test_average_pool_commutes_with_an_affine_map_exactly_when_its_weights_sum_to_one(
    attrs, commutes
):
    """The claim rule 23 rests on, in onnxruntime: avg(a*x + c) == a*avg(x) + c per channel with
    count_include_pad=0 (any pads, auto_pad, ceil_mode, dilations), and without padding with
    count_include_pad=1, where onnxruntime divides a ceil_mode window that overhangs the input
    by the elements inside (the rule still refuses that case: the spec does not say so); not
    with padding and count_include_pad=1."""
    rng = np.random.default_rng(216)
    pool = _average_pool(attrs)
    x = rng.normal(size=(1, 2, 7, 7)).astype(np.float32)
    a = np.array([1.7, -0.6], np.float32).reshape(1, 2, 1, 1)
    c = np.array([3.0, -2.0], np.float32).reshape(1, 2, 1, 1)
    err = float(np.abs(pool(a * x + c) - (a * pool(x) + c)).max())
    assert (err < 1e-5) == commutes, err
