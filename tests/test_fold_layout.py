"""Rules 19-21: folds through Transpose, Reshape, Flatten, Squeeze and Unsqueeze (issue 12, 2c), and
into a following Conv or ConvTranspose that sees every kernel tap (2d), in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import affine_folds
import numpy as np
import onnx
import pytest
import torch
from fold_testing import bn_params, fold_and_compare, model_from_text, op_count, reasons, run_ort
from hypothesis import given, settings
from hypothesis import strategies as st

from bn_onnx.fold import affine_math as fm
from bn_onnx.fold import fold_model
from bn_onnx.fold.layout import reshape_axis

HEAD = '<ir_version: 8, opset_import: ["" : 18]>'
CASES = Path(__file__).parent / "data" / "fold_cases"


def _x(rng, shape):
    return rng.normal(size=shape).astype(np.float32)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# --- rule 19: layout ops between the linear node and the BN ------------------------------


def test_case_matmul_transpose_bn_transpose_folds_into_the_matmul_columns():
    """tests/data/fold_cases: Linear on (N, L, C) -> Transpose -> BatchNorm1d -> Transpose."""
    model = onnx.load(CASES / "matmul_transpose_bn_transpose.onnx")
    rng = np.random.default_rng(100)
    result = fold_and_compare(model, {"x": _x(rng, (3, 5, 6))})
    entry = result.report.entries[0]
    assert (entry.direction, entry.target_op) == ("preceding", "Add, MatMul")
    assert _ops(result.model) == ["MatMul", "Add", "Transpose", "Transpose"]


@pytest.mark.parametrize("bias", ["none", "left", "right"])
@pytest.mark.parametrize("rank", [3, 4])
def test_linear_on_sequences_then_transpose_then_bn_folds(bias, rank):
    """MatMul with a 2-D weight on a rank-3/4 input (+ bias on either side of the Add), then the
    channels moved to axis 1 by Transpose: the BN folds into the MatMul's columns."""
    rng = np.random.default_rng(101)
    c_in, c = 6, 4
    inits = {"W": rng.normal(size=(c_in, c)).astype(np.float32), **bn_params(rng, c)}
    lead = [2, 5] if rank == 3 else [2, 3, 5]
    perm = [0, rank - 1, *range(1, rank - 1)]
    out = [2, c, *lead[1:]]
    lines = ["mm = MatMul (x, W)"]
    if bias == "none":
        lin = "mm"
    else:
        inits["B"] = rng.normal(size=(c,)).astype(np.float32)
        lines.append("lin = Add (mm, B)" if bias == "left" else "lin = Add (B, mm)")
        lin = "lin"
    body = "\n          ".join(lines)
    dims_in, dims_out = ", ".join(map(str, [*lead, c_in])), ", ".join(map(str, out))
    model = model_from_text(
        f"""{HEAD}
        g (float[{dims_in}] x) => (float[{dims_out}] y) {{
          {body}
          t = Transpose <perm = {perm}> ({lin})
          y = BatchNormalization (t, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (*lead, c_in))})
    assert result.report.entries[0].direction == "preceding"
    assert op_count(result.model, "Transpose") == 1 and op_count(result.model, "Add") == 1


@pytest.mark.parametrize("shape_op", ["Reshape", "Identity-Reshape"])
def test_no_op_reshape_between_conv_and_bn_folds(shape_op):
    rng = np.random.default_rng(102)
    inits = {
        "W": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "shape": np.array([0, 4, 6, 6], np.int64),
        **bn_params(rng, 4),
    }
    pre = (
        "i = Identity (h)\n          r = Reshape (i, shape)"
        if "Identity" in shape_op
        else ("r = Reshape (h, shape)")
    )
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 3, 8, 8] x) => (float[N, 4, 6, 6] y) {{
          h = Conv (x, W)
          {pre}
          y = BatchNormalization (r, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (2, 3, 8, 8))})
    assert result.report.entries[0].target_op == "Conv"
    assert op_count(result.model, "Reshape") == 1


def test_gemm_then_reshape_to_nchw_then_bn_repeats_each_channel_over_its_positions():
    """A generator's Linear -> view(N, C, 4, 4) -> BatchNorm2d: Gemm column o is channel o // 16."""
    rng = np.random.default_rng(103)
    c = 3
    inits = {
        "W": rng.normal(size=(c * 16, 5)).astype(np.float32),
        "C": rng.normal(size=(c * 16,)).astype(np.float32),
        "shape": np.array([-1, c, 4, 4], np.int64),
        **bn_params(rng, c),
    }
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => (float[N, {c}, 4, 4] y) {{
          h = Gemm <transB = 1> (x, W, C)
          r = Reshape (h, shape)
          y = BatchNormalization (r, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (3, 5))})
    assert result.report.entries[0].target_op == "Gemm"


def test_channel_split_and_transposed_reshape_folds_with_a_tiled_pattern():
    """Gemm (N, 12) -> Reshape (N, 3, 4) -> Transpose -> (N, 4, 3) BN: Gemm column o is
    channel o % 4 (the pattern repeats along the column axis)."""
    rng = np.random.default_rng(104)
    inits = {
        "W": rng.normal(size=(5, 12)).astype(np.float32),
        "shape": np.array([0, 3, 4], np.int64),
        **bn_params(rng, 4),
    }
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => (float[N, 4, 3] y) {{
          h = Gemm (x, W)
          r = Reshape (h, shape)
          t = Transpose <perm = [0, 2, 1]> (r)
          y = BatchNormalization (t, s, b, mu, var)
        }}""",
        inits,
    )
    fold_and_compare(model, {"x": _x(rng, (2, 5))})


def test_conv1d_reshaped_to_2d_splits_a_non_channel_dim_and_folds():
    rng = np.random.default_rng(105)
    inits = {
        "W": rng.normal(size=(4, 2, 3)).astype(np.float32),
        "shape": np.array([0, 0, 4, 4], np.int64),
        **bn_params(rng, 4),
    }
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 2, 18] x) => (float[N, 4, 4, 4] y) {{
          h = Conv (x, W)
          r = Reshape (h, shape)
          y = BatchNormalization (r, s, b, mu, var)
        }}""",
        inits,
    )
    fold_and_compare(model, {"x": _x(rng, (2, 2, 18))})


@pytest.mark.parametrize("opset", [11, 18])
@pytest.mark.parametrize("axis", [2, -1])
def test_unsqueeze_bn_squeeze_around_gemm(opset, axis):
    """Gemm -> Unsqueeze -> BatchNorm1d on (N, C, 1) -> Squeeze -> Gemm: the first fold goes
    back through the Unsqueeze (axes as attribute before opset 13, as input from 13)."""
    rng = np.random.default_rng(106)
    inits = {"W1": rng.normal(size=(5, 4)).astype(np.float32), **bn_params(rng, 4)}
    if opset >= 13:
        inits["ax"] = np.array([axis], np.int64)
        unsq, sq = "Unsqueeze (h, ax)", "Squeeze (n, ax)"
    else:
        unsq, sq = f"Unsqueeze <axes = [{axis}]> (h)", f"Squeeze <axes = [{axis}]> (n)"
    model = model_from_text(
        f"""<ir_version: 7, opset_import: ["" : {opset}]>
        g (float[N, 5] x) => (float[N, 4] y) {{
          h = Gemm (x, W1)
          u = {unsq}
          n = BatchNormalization (u, s, b, mu, var)
          y = {sq}
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (3, 5))})
    assert result.report.entries[0].direction == "preceding"
    assert _ops(result.model) == ["Gemm", "Unsqueeze", "Squeeze"]


def test_bn_then_squeeze_folds_into_the_following_gemm():
    rng = np.random.default_rng(107)
    inits = {
        "W": rng.normal(size=(4, 3)).astype(np.float32),
        "ax": np.array([-1], np.int64),
        **bn_params(rng, 4),
    }
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 4, 1] x) => (float[N, 3] y) {{
          r = Relu (x)
          n = BatchNormalization (r, s, b, mu, var)
          q = Squeeze (n, ax)
          y = Gemm (q, W)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (2, 4, 1))})
    assert result.report.entries[0].direction == "following"


@pytest.mark.parametrize("add", [False, True])
def test_bn1d_then_transpose_folds_into_the_following_sequence_matmul(add):
    """BatchNorm1d on (N, C, L) -> Transpose -> Linear on (N, L, C): the channels are the
    MatMul's contracted axis."""
    rng = np.random.default_rng(115)
    inits = {"W": rng.normal(size=(4, 3)).astype(np.float32), **bn_params(rng, 4)}
    tail = "y = MatMul (t, W)"
    if add:
        inits["B"] = rng.normal(size=(3,)).astype(np.float32)
        tail = "m = MatMul (t, W)\n          y = Add (B, m)"
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 4, 5] x) => (float[N, 5, 3] y) {{
          r = Relu (x)
          n = BatchNormalization (r, s, b, mu, var)
          t = Transpose <perm = [0, 2, 1]> (n)
          {tail}
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (2, 4, 5))})
    assert result.report.entries[0].direction == "following"
    assert op_count(result.model, "Add") == 1


def test_bn_then_transpose_folds_into_a_following_gemm_with_trans_a():
    rng = np.random.default_rng(116)
    inits = {"W": rng.normal(size=(5, 3)).astype(np.float32), **bn_params(rng, 5)}
    model = model_from_text(
        f"""{HEAD}
        g (float[4, 5] x) => (float[4, 3] y) {{
          r = Relu (x)
          n = BatchNormalization (r, s, b, mu, var)
          t = Transpose (n)
          y = Gemm <transA = 1> (t, W)
        }}""",
        inits,
    )
    fold_and_compare(model, {"x": _x(rng, (4, 5))})


def test_squeeze_without_axes_on_a_static_shape_folds_both_ways():
    """Squeeze with no axes drops every dim of size 1: Gemm -> Unsqueeze -> Unsqueeze -> BN
    (2, 4, 1, 1) -> Squeeze -> Gemm; the first BN folds back into the Gemm, the second forward."""
    rng = np.random.default_rng(117)
    inits = {
        "W1": rng.normal(size=(5, 4)).astype(np.float32),
        "W2": rng.normal(size=(4, 3)).astype(np.float32),
        "ax": np.array([2, 3], np.int64),
        **bn_params(rng, 4),
    }
    inits.update({k + "2": v for k, v in bn_params(rng, 4).items()})
    model = model_from_text(
        f"""{HEAD}
        g (float[2, 5] x) => (float[2, 3] y) {{
          h = Gemm (x, W1)
          u = Unsqueeze (h, ax)
          n = BatchNormalization (u, s, b, mu, var)
          r = Relu (n)
          n2 = BatchNormalization (r, s2, b2, mu2, var2)
          q = Squeeze (n2)
          y = Gemm (q, W2)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (2, 5))})
    assert [e.direction for e in result.report.entries] == ["preceding", "following"]


# --- rule 20: 4-D BN -> Flatten/Reshape -> Gemm/MatMul (forward) -------------------------


def test_case_relu_bn4d_flatten_gemm_folds_forward():
    model = onnx.load(CASES / "relu_bn4d_flatten_gemm.onnx")
    rng = np.random.default_rng(108)
    result = fold_and_compare(model, {"x": _x(rng, (2, 3, 3, 3))})
    entry = result.report.entries[0]
    assert (entry.direction, entry.target_op) == ("following", "Gemm")
    assert _ops(result.model) == ["Conv", "Relu", "Flatten", "Gemm"]


@pytest.mark.parametrize(
    "flatten",
    ["Flatten", "Flatten <axis = -3>", "Reshape", "Transpose-Reshape"],
)
@pytest.mark.parametrize("reader", ["Gemm", "Gemm-transB", "MatMul"])
def test_bn4d_flatten_then_linear_repeats_each_channel_over_its_positions(flatten, reader):
    rng = np.random.default_rng(109)
    c, h, w, k = 3, 2, 4, 5
    n_in = c * h * w
    inits = {"shape": np.array([0, -1], np.int64), **bn_params(rng, c)}
    if flatten == "Transpose-Reshape":  # channels last, then flattened: column = pos*C + ch
        flat = "t = Transpose <perm = [0, 2, 3, 1]> (n)\n          f = Reshape (t, shape)"
    elif flatten == "Reshape":
        flat = "f = Reshape (n, shape)"
    else:
        flat = f"f = {flatten} (n)"
    if reader == "Gemm-transB":
        inits["W"] = rng.normal(size=(k, n_in)).astype(np.float32)
        inits["C"] = rng.normal(size=(k,)).astype(np.float32)
        lin = "y = Gemm <transB = 1> (f, W, C)"
    else:
        inits["W"] = rng.normal(size=(n_in, k)).astype(np.float32)
        lin = "y = Gemm (f, W)" if reader == "Gemm" else "y = MatMul (f, W)"
    model = model_from_text(
        f"""{HEAD}
        g (float[N, {c}, {h}, {w}] x) => (float[N, {k}] y) {{
          r = Relu (x)
          n = BatchNormalization (r, s, b, mu, var)
          {flat}
          {lin}
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (3, c, h, w))})
    assert result.report.entries[0].direction == "following"


# --- rule 19-20: the reasons -------------------------------------------------------------


def test_bn1d_over_a_flattened_conv_output_is_left_spread_over_several_axes():
    """Conv (N, 2, 3, 3) -> Flatten -> BatchNorm1d(18): the BN's channel is (c, h, w), which
    is no single axis of the Conv output."""
    rng = np.random.default_rng(110)
    inits = {"W": rng.normal(size=(2, 1, 1, 1)).astype(np.float32), **bn_params(rng, 18)}
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 1, 3, 3] x) => (float[N, 18] y) {{
          h = Conv (x, W)
          f = Flatten (h)
          y = BatchNormalization (f, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (2, 1, 3, 3))}, folded=0)
    assert reasons(result) == [
        "before: Flatten 'Flatten(f)' reshapes [?, 2, 3, 3] to [?, 18] (the channels on axis 1"
        " of its output): the channel axis is spread over several axes; after: its output 'y'"
        " is a graph output"
    ]


def test_channels_on_a_non_contracted_axis_after_transpose_are_left():
    rng = np.random.default_rng(111)
    inits = {"W": rng.normal(size=(5, 3)).astype(np.float32), **bn_params(rng, 4)}
    model = model_from_text(
        f"""{HEAD}
        g (float[2, 4, 5] x) => (float[4, 2, 3] y) {{
          r = Relu (x)
          n = BatchNormalization (r, s, b, mu, var)
          t = Transpose <perm = [1, 0, 2]> (n)
          y = MatMul (t, W)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (2, 4, 5))}, folded=0)
    assert reasons(result)[0].endswith(
        "after: through Transpose 'Transpose(t)': MatMul 'MatMul(y)' input has rank 3:"
        " it contracts the last axis, the BN channel is axis 0"
    )


def test_layout_output_read_elsewhere_is_left():
    rng = np.random.default_rng(112)
    inits = {"W": rng.normal(size=(6, 4)).astype(np.float32), **bn_params(rng, 4)}
    model = model_from_text(
        f"""{HEAD}
        g (float[2, 5, 6] x) => (float[2, 4, 5] y, float[2, 4, 5] t) {{
          mm = MatMul (x, W)
          t = Transpose <perm = [0, 2, 1]> (mm)
          y = BatchNormalization (t, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (2, 5, 6))}, folded=0)
    assert reasons(result)[0].startswith("before: 't' is also a graph output")


def test_reshape_with_dynamic_dims_after_the_channel_is_left():
    rng = np.random.default_rng(113)
    inits = {
        "W": rng.normal(size=(4, 3, 1)).astype(np.float32),
        "shape": np.array([0, 0, -1, 2], np.int64),
        **bn_params(rng, 4),
    }
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 3, L] x) => (float[N, 4, M, 2] y) {{
          h = Conv (x, W)
          r = Reshape (h, shape)
          y = BatchNormalization (r, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (2, 3, 6))}, folded=0)
    assert "the dims after the channel axis are not static" in reasons(result)[0]


def test_gemm_channel_on_its_batch_axis_is_left():
    """Gemm (N, 4) -> Transpose -> (4, N): a BN on axis 1 normalizes the Gemm's rows."""
    rng = np.random.default_rng(114)
    inits = {"W": rng.normal(size=(5, 4)).astype(np.float32), **bn_params(rng, 3)}
    model = model_from_text(
        f"""{HEAD}
        g (float[3, 5] x) => (float[4, 3] y) {{
          h = Gemm (x, W)
          t = Transpose (h)
          y = BatchNormalization (t, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (3, 5))}, folded=0)
    assert reasons(result)[0].startswith(
        "before: through Transpose 'Transpose(t)': the BN is per channel of axis 0 of the"
        " output of Gemm 'Gemm(h)', whose outputs are on axis 1"
    )


def _labels(shape, axis, inner, period):
    idx = np.arange(shape[axis]).reshape([-1 if i == axis else 1 for i in range(len(shape))])
    return np.broadcast_to((idx // inner) % period, shape)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_reshape_axis_agrees_with_moving_labelled_elements(data):
    """Property: label every element with its channel, reshape the labels in row-major order;
    `reshape_axis` finds (j, inner') exactly when the labels on the other side are
    (i_j // inner') % period along one axis j, and says why not otherwise."""
    dims = st.integers(1, 6)
    src = tuple(data.draw(st.lists(dims, min_size=1, max_size=4)))
    axis = data.draw(st.integers(0, len(src) - 1))
    divisors = [(i, src[axis] // i) for i in range(1, src[axis] + 1) if src[axis] % i == 0]
    inner, rest = data.draw(st.sampled_from(divisors))
    period = data.draw(st.sampled_from([p for p in range(2, rest + 1) if rest % p == 0] or [1]))
    if period == 1:
        return
    size = int(np.prod(src))
    dst = list(data.draw(st.permutations(_factors(size))))
    split = data.draw(st.lists(st.integers(0, len(dst)), max_size=3))
    dst_shape = _group(dst, sorted(split))
    labels = _labels(src, axis, inner, period).reshape(dst_shape)
    got = reshape_axis(src, dst_shape, axis, inner, period)
    found = []
    for j in range(len(dst_shape)):
        for inner2 in range(1, dst_shape[j] + 1):
            if np.array_equal(labels, _labels(dst_shape, j, inner2, period)):
                found.append((j, inner2))
    if isinstance(got, str):
        assert not found, (src, axis, inner, period, dst_shape, got)
    else:
        assert got in found, (src, axis, inner, period, dst_shape, got, found)


def _factors(n: int) -> list[int]:
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out or [1]


def _group(factors: list[int], cuts: list[int]) -> tuple[int, ...]:
    edges = [0, *cuts, len(factors)]
    return tuple(int(np.prod(factors[a:b])) for a, b in zip(edges, edges[1:], strict=False))


# --- rule 21: BN -> Conv / ConvTranspose that sees every kernel tap ------------------------


def test_case_conv_relu_bn_conv1x1_folds_forward_and_the_padded_case_says_padding():
    rng = np.random.default_rng(120)
    x = {"x": _x(rng, (2, 3, 6, 6))}
    folded = fold_and_compare(onnx.load(CASES / "conv_relu_bn_conv1x1.onnx"), x)
    assert (folded.report.entries[0].direction, folded.report.entries[0].target_op) == (
        "following",
        "Conv",
    )
    left = fold_and_compare(onnx.load(CASES / "conv_relu_bn_conv3x3pad.onnx"), x, folded=0)
    assert reasons(left) == [
        "before: comes after Relu 'Relu(r)', not Gemm/MatMul/Conv; after: the following Conv"
        " 'Conv(y)' pads (pads=[1, 1, 1, 1]): a padded border would see the BN's shift, not zero"
    ]


@pytest.mark.parametrize(
    ("dims", "group", "attrs"),
    [
        (2, 1, ""),
        (2, 2, "strides = [2, 2]"),
        (2, 6, "dilations = [2, 2]"),
        (2, 3, 'auto_pad = "VALID", strides = [1, 2]'),
        (1, 2, "pads = [0, 0]"),
        (3, 1, ""),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_bn_folds_into_a_following_unpadded_conv_group_aware(dims, group, attrs, bias):
    rng = np.random.default_rng(121)
    c_in, c_out = 6, 6
    k = [3] * dims
    inits = {"W": rng.normal(size=(c_out, c_in // group, *k)).astype(np.float32)}
    inits.update(bn_params(rng, c_in))
    b_in = ""
    if bias:
        inits["B"] = rng.normal(size=(c_out,)).astype(np.float32)
        b_in = ", B"
    spatial = [7] * dims
    out = ", ".join(f"d{i}" for i in range(dims))
    model = model_from_text(
        f"""{HEAD}
        g (float[2, {c_in}, {", ".join(map(str, spatial))}] x) => (float[2, {c_out}, {out}] y) {{
          r = Relu (x)
          n = BatchNormalization (r, s, b, mu, var)
          y = Conv <group = {group}{", " if attrs else ""}{attrs}> (n, W{b_in})
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (2, c_in, *spatial))})
    assert result.report.entries[0].direction == "following"


def test_bn_on_the_graph_input_folds_into_an_unpadded_conv():
    rng = np.random.default_rng(122)
    inits = {"W": rng.normal(size=(5, 3, 2, 2)).astype(np.float32), **bn_params(rng, 3)}
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 3, 8, 8] x) => (float[N, 5, 4, 4] y) {{
          n = BatchNormalization (x, s, b, mu, var)
          y = Conv <strides = [2, 2]> (n, W)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (2, 3, 8, 8))})
    assert _ops(result.model) == ["Conv"]


@pytest.mark.parametrize(
    ("attrs", "folds", "words"),
    [
        ('<auto_pad = "SAME_UPPER">', False, "pads (auto_pad=SAME_UPPER)"),
        ('<auto_pad = "SAME_LOWER", kernel_shape = [1, 1]>', True, None),
        ("<pads = [0, 1, 0, 1]>", False, "pads (pads=[0, 1, 0, 1])"),
    ],
)
def test_a_padded_following_conv_is_left_with_the_padding_named(attrs, folds, words):
    rng = np.random.default_rng(123)
    k = 1 if "kernel_shape" in attrs else 3
    inits = {"W": rng.normal(size=(4, 3, k, k)).astype(np.float32), **bn_params(rng, 3)}
    model = model_from_text(
        f"""{HEAD}
        g (float[2, 3, 6, 6] x) => (float[2, 4, N, M] y) {{
          r = Relu (x)
          n = BatchNormalization (r, s, b, mu, var)
          y = Conv {attrs} (n, W)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng, (2, 3, 6, 6))}, folded=int(folds))
    if not folds:
        assert f"after: the following Conv 'Conv(y)' {words}: a padded border" in reasons(result)[0]


def test_a_padded_following_conv_folds_when_the_shift_is_zero():
    """A BN without shift (B = 0, mean = 0) is a pure scale: zero padding sees zero either way."""
    rng = np.random.default_rng(124)
    p = bn_params(rng, 3)
    p["b"][:] = 0
    p["mu"][:] = 0
    inits = {"W": rng.normal(size=(4, 3, 3, 3)).astype(np.float32), **p}
    model = model_from_text(
        f"""{HEAD}
        g (float[2, 3, 6, 6] x) => (float[2, 4, 6, 6] y) {{
          r = Relu (x)
          n = BatchNormalization (r, s, b, mu, var)
          y = Conv <pads = [1, 1, 1, 1]> (n, W)
        }}""",
        inits,
    )
    fold_and_compare(model, {"x": _x(rng, (2, 3, 6, 6))})


def _conv_transpose_after_bn(rng, group, kernel, attrs, c_in=4, c_out=6):
    inits = {"W": rng.normal(size=(c_in, c_out // group, *kernel)).astype(np.float32)}
    inits["B"] = rng.normal(size=(c_out,)).astype(np.float32)
    inits.update(bn_params(rng, c_in))
    sep = ", " if attrs else ""
    return model_from_text(
        f"""{HEAD}
        g (float[2, {c_in}, 7, 6] x) => (float[2, {c_out}, N, M] y) {{
          r = Relu (x)
          n = BatchNormalization (r, s, b, mu, var)
          y = ConvTranspose <group = {group}{sep}{attrs}> (n, W, B)
        }}""",
        inits,
    )


@pytest.mark.parametrize(
    ("kernel", "attrs"),
    [
        ((1, 1), ""),  # a 1x1 ConvTranspose of stride 1: every output sees its one tap
        ((3, 2), "pads = [2, 1, 2, 1]"),  # pads crop every border that sees fewer taps
        ((3, 3), "dilations = [2, 1], pads = [4, 2, 4, 2]"),
        ((1, 1), "pads = [0, 1, 1, 0]"),
    ],
)
@pytest.mark.parametrize("group", [1, 2])
def test_bn_folds_into_a_following_conv_transpose_where_every_output_sees_every_tap(
    kernel, attrs, group
):
    rng = np.random.default_rng(125)
    model = _conv_transpose_after_bn(rng, group, kernel, attrs)
    result = fold_and_compare(model, {"x": _x(rng, (2, 4, 7, 6))})
    assert result.report.entries[0].target_op == "ConvTranspose"


@pytest.mark.parametrize(
    ("kernel", "attrs", "words"),
    [
        ((2, 2), "strides = [2, 2]", "has strides=[2, 2]: its outputs see different kernel taps"),
        ((1, 1), "strides = [2, 1]", "has strides=[2, 1]"),
        ((3, 3), "", "has pads=[0, 0, 0, 0], less than dilation*(kernel-1)"),
        ((3, 3), "pads = [2, 2, 1, 2]", "has pads=[2, 2, 1, 2], less than"),
        ((3, 3), 'auto_pad = "SAME_UPPER"', "pads (auto_pad=SAME_UPPER): border outputs"),
    ],
)
def test_a_following_conv_transpose_whose_outputs_see_fewer_taps_is_left(kernel, attrs, words):
    rng = np.random.default_rng(126)
    model = _conv_transpose_after_bn(rng, 1, kernel, attrs)
    result = fold_and_compare(model, {"x": _x(rng, (2, 4, 7, 6))}, folded=0)
    assert f"after: the following ConvTranspose 'ConvTranspose(y)' {words}" in reasons(result)[0]


@pytest.mark.parametrize("chunk", [fm.CHUNK, 13])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("transpose", [False, True])
def test_fold_conv_following_matches_torch_in_float64(group, transpose, chunk, monkeypatch):
    """affine_folds.fold_conv_following: Conv(a*x + c) == Conv'(x) for an unpadded Conv (strided,
    dilated) and a ConvTranspose of stride 1 whose pads crop to full taps, to 1e-12; also with
    blocks of a few rows (the path of a big weight)."""
    monkeypatch.setattr(fm, "CHUNK", chunk)
    rng = np.random.default_rng(129)
    c_in, c_out, kernel = 8, 12, (3, 2)
    shape = (c_in, c_out // group, *kernel) if transpose else (c_out, c_in // group, *kernel)
    w, bias = rng.normal(size=shape), rng.normal(size=c_out)
    a, c = rng.normal(size=c_in), rng.normal(size=c_in)
    x = torch.tensor(rng.normal(size=(2, c_in, 9, 7)))

    def conv(inp, weight, b):
        weight, b = torch.tensor(weight), torch.tensor(b)
        if transpose:
            return torch.nn.functional.conv_transpose2d(
                inp, weight, b, groups=group, padding=(2, 1)
            )
        return torch.nn.functional.conv2d(inp, weight, b, groups=group, stride=(2, 1), dilation=2)

    want = conv(x * torch.tensor(a)[:, None, None] + torch.tensor(c)[:, None, None], w, bias)
    w2, b2 = affine_folds.fold_conv_following(w, bias, a, c, group=group, transpose=transpose)
    np.testing.assert_allclose(conv(x, w2, b2).numpy(), want.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("stride", "padding", "output_padding"),
    [(2, 0, 0), (1, 0, 0), (1, 1, 0), (2, 1, 1)],
)
def test_the_refused_conv_transpose_folds_would_change_the_output(stride, padding, output_padding):
    """Why rule 21 refuses these: the shift folded as a per-channel bias (the only form a
    ConvTranspose bias has) differs from the BN's shift pushed through the ConvTranspose, by
    up to the whole shift, at the borders or between input strides (torch float64)."""
    rng = np.random.default_rng(127)
    w = torch.tensor(rng.normal(size=(3, 2, 3, 3)))
    a, c = rng.normal(size=3), rng.normal(size=3)
    x = torch.tensor(rng.normal(size=(1, 3, 5, 5)))

    def convt(inp, weight, bias):
        return torch.nn.functional.conv_transpose2d(
            inp, weight, bias, stride=stride, padding=padding, output_padding=output_padding
        )

    want = convt(x * torch.tensor(a)[:, None, None] + torch.tensor(c)[:, None, None], w, None)
    w2, b2 = affine_folds.fold_conv_following(w.numpy(), None, a, c, transpose=True)
    got = convt(x, torch.tensor(w2), torch.tensor(b2))
    assert float((got - want).abs().max()) > 0.1


def test_a_bn_read_by_a_conv_as_its_weight_is_left():
    rng = np.random.default_rng(128)
    model = model_from_text(
        f"""{HEAD}
        g (float[2, 3, 5, 5] x, float[4, 3, 1, 1] w) => (float[2, 4, 5, 5] y) {{
          n = BatchNormalization (w, s, b, mu, var)
          y = Conv (x, n)
        }}""",
        bn_params(rng, 3),
    )
    result = fold_model(model)
    assert result.report.n_folded == 0
    assert "'Conv(y)' reads 'n' as its weight or bias" in reasons(result)[0]
    feeds = {"x": _x(rng, (2, 3, 5, 5)), "w": _x(rng, (4, 3, 1, 1))}
    np.testing.assert_allclose(run_ort(result.model, feeds)[0], run_ort(model, feeds)[0])


def _random_layout_chain(rng, shape, n_ops):
    """1-3 random layout ops on a static shape: (ONNX lines, initializers, final shape)."""
    lines, inits, cur = [], {}, "v0"
    shape = list(shape)
    for name in range(1, n_ops + 1):
        out = f"v{name}"
        kind = rng.integers(0, 4)
        if kind == 0:
            perm = [int(p) for p in rng.permutation(len(shape))]
            lines.append(f"{out} = Transpose <perm = {perm}> ({cur})")
            shape = [shape[p] for p in perm]
        elif kind == 1:  # Reshape to a random regrouping of the prime factors
            factors = [f for d in shape for f in _factors(d) if f > 1]
            if rng.random() < 0.3:  # mostly row-major regroupings; sometimes anything
                rng.shuffle(factors)
            cuts = sorted(rng.choice(len(factors) + 1, size=rng.integers(1, 4)).tolist())
            shape = list(_group(factors, cuts)) if factors else [1]
            inits[f"s{name}"] = np.array(shape, np.int64)
            lines.append(f"{out} = Reshape ({cur}, s{name})")
        elif kind == 2 and len(shape) > 1:
            axis = int(rng.integers(0, len(shape) + 1))
            lines.append(f"{out} = Flatten <axis = {axis}> ({cur})")
            shape = [int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))]
        else:
            axis = int(rng.integers(0, len(shape) + 1))
            inits[f"a{name}"] = np.array([axis], np.int64)
            lines.append(f"{out} = Unsqueeze ({cur}, a{name})")
            shape.insert(axis, 1)
        cur = out
    return lines, inits, cur, shape


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.booleans())
def test_random_layout_chains_fold_or_are_left_and_never_change_outputs(seed, n_ops, before):
    """Property: Conv -> random Transpose/Reshape/Flatten/Unsqueeze chain -> BN (on axis 1 of
    whatever comes out), or BN -> chain -> MatMul: the fold keeps every output, whether it folds
    or says why not."""
    rng = np.random.default_rng(seed)
    lines, inits, last, shape = _random_layout_chain(rng, (2, 6, 2, 3), n_ops)
    if len(shape) < 2 or shape[1] == 1:
        return
    if before:
        inits.update(bn_params(rng, shape[1]))
        inits["W"] = rng.normal(size=(6, 3, 1, 1)).astype(np.float32)
        body = ["v0 = Conv (x, W)", *lines, f"y = BatchNormalization ({last}, s, b, mu, var)"]
        out = shape
        x_shape = (2, 3, 2, 3)
    else:
        inits.update(bn_params(rng, 6))
        inits["W"] = rng.normal(size=(shape[-1], 3)).astype(np.float32)
        body = ["r = Relu (x)", "v0 = BatchNormalization (r, s, b, mu, var)", *lines]
        body.append(f"y = MatMul ({last}, W)")
        out = [*shape[:-1], 3]
        x_shape = (2, 6, 2, 3)
    text = "\n          ".join(body)
    model = model_from_text(
        f"""{HEAD}
        g (float[{", ".join(map(str, x_shape))}] x) => (float[{", ".join(map(str, out))}] y) {{
          {text}
        }}""",
        inits,
    )
    result = fold_model(model)
    fold_and_compare(model, {"x": _x(rng, x_shape)}, folded=result.report.n_folded)
