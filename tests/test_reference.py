"""The float64 reference against torch (float64), onnx's ReferenceEvaluator and plain numpy."""

from __future__ import annotations

import numpy as np
import onnx_forward_oracle as oracle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from test_verify_models import build_onnx, dataset_checkpoint, make_tensors

from bn_onnx import float64_kernels as kernels
from bn_onnx import graphs
from bn_onnx.checkpoint_forward import checkpoint_forward, forward_tensors
from bn_onnx.errors import InputDataError, UnsupportedModelError
from bn_onnx.model_config import MLPConfig

torch = pytest.importorskip("torch")


def _torch64(config: MLPConfig, tensors: dict, x: np.ndarray) -> np.ndarray:
    from bn_onnx.model import MLP

    model = MLP(config)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()})
    model = model.double().eval()
    with torch.no_grad():
        return model(torch.from_numpy(x.astype(np.float64))).numpy()


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh", "sigmoid"])
@pytest.mark.parametrize("bn", ["pre", "post", "none"])
@pytest.mark.parametrize("input_norm", [True, False])
def test_checkpoint_forward_equals_torch_in_float64(bn, activation, input_norm):
    config = MLPConfig(
        in_features=7,
        out_features=4,
        hidden=(9, 5),
        bn=bn,
        activation=activation,
        input_norm=input_norm,
        dropout=0.2,
    )
    x = (np.random.default_rng(1).standard_normal((30, 7)) * 3 + 1).astype(np.float32)
    tensors = make_tensors(config, x, seed=2)
    fwd = forward_tensors(config, tensors, x)
    np.testing.assert_allclose(fwd.output, _torch64(config, tensors, x), rtol=1e-12, atol=1e-12)
    labels = [label for label, _ in fwd.taps]
    assert labels == [
        "block 0 pre-activation",
        "block 0 activation",
        "block 1 pre-activation",
        "block 1 activation",
        "output",
    ]


def test_checkpoint_forward_reads_a_checkpoint_directory(tmp_path):
    path, config, tensors, x, _ = dataset_checkpoint(tmp_path, "wine", bn="post")
    from_dir = checkpoint_forward(path, x).output
    np.testing.assert_array_equal(from_dir, forward_tensors(config, tensors, x).output)
    np.testing.assert_allclose(from_dir, _torch64(config, tensors, x), rtol=1e-12, atol=1e-10)


def test_checkpoint_forward_refuses_wrong_width():
    config = MLPConfig(in_features=3, out_features=2, hidden=(4,))
    tensors = make_tensors(
        config, np.random.default_rng(0).standard_normal((9, 3)).astype(np.float32)
    )
    with pytest.raises(InputDataError, match="3"):
        forward_tensors(config, tensors, np.zeros((2, 4)))


@settings(max_examples=40, deadline=None)
@given(
    c=st.integers(1, 6),
    eps=st.floats(1e-6, 1e-1),
    seed=st.integers(0, 2**16),
)
def test_bn_with_gamma_sqrt_var_and_beta_mean_is_the_identity(c, eps, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((5, c)) * 4
    mean = rng.standard_normal(c)
    var = rng.uniform(0.01, 9, c)
    y = kernels.batch_norm(x, np.sqrt(var + eps), mean, mean, var, eps)
    np.testing.assert_allclose(y, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bn", graphs.PLACEMENTS)
@pytest.mark.parametrize("variant", graphs.VARIANTS)
def test_onnx_forward_matches_the_graph_builders_float64_oracle(variant, bn):
    widths = [11, 17, 9, 4]
    x = np.random.default_rng(0).standard_normal((13, 11)).astype(np.float32)
    model = graphs.build_mlp(widths, variant, seed=5, bn=bn)
    np.testing.assert_allclose(
        oracle.onnx_output(model, x),
        graphs.mlp_reference(widths, x, variant, seed=5, bn=bn),
        rtol=1e-11,
        atol=1e-11,
    )


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh", "sigmoid"])
@pytest.mark.parametrize("bn", ["pre", "post"])
def test_onnx_forward_of_hand_built_graphs_equals_checkpoint_forward(bn, activation):
    config = MLPConfig(in_features=6, out_features=3, hidden=(8, 5), bn=bn, activation=activation)
    x = np.random.default_rng(3).standard_normal((20, 6)).astype(np.float32)
    tensors = make_tensors(config, x)
    expected = forward_tensors(config, tensors, x).output
    unfolded = oracle.onnx_output(build_onnx(config, tensors, folded=False), x)
    # the unfolded graph holds the same float32 parameters: equal up to float64 rounding (GELU's
    # graph constant sqrt(2) is a float32, off by 1e-8 relative)
    tol = 1e-6 if activation == "gelu" else 1e-10
    np.testing.assert_allclose(unfolded, expected, rtol=tol, atol=tol)
    folded = oracle.onnx_output(build_onnx(config, tensors, folded=True), x)
    # the folded one rounded its folded parameters to float32 once
    np.testing.assert_allclose(folded, expected, rtol=1e-5, atol=1e-5)


def _double_model(nodes, inputs, output_shape, inits=(), opset=18):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.DOUBLE, s) for n, s in inputs],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, output_shape)],
        list(inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 5),
    k=st.integers(1, 5),
    n=st.integers(1, 5),
    alpha=st.floats(-2, 2),
    beta=st.floats(-2, 2),
    trans_a=st.booleans(),
    trans_b=st.booleans(),
    with_c=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_gemm_attributes_match_the_onnx_reference_evaluator(
    m, k, n, alpha, beta, trans_a, trans_b, with_c, seed
):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, m) if trans_a else (m, k))
    b = rng.standard_normal((n, k) if trans_b else (k, n))
    c = rng.standard_normal(n)
    inits = [numpy_helper.from_array(b, "B")] + (
        [numpy_helper.from_array(c, "C")] if with_c else []
    )
    node = helper.make_node(
        "Gemm",
        ["a", "B"] + (["C"] if with_c else []),
        ["y"],
        alpha=alpha,
        beta=beta,
        transA=int(trans_a),
        transB=int(trans_b),
    )
    model = _double_model([node], [("a", list(a.shape))], [m, n], inits)
    got = oracle.onnx_forward(model, a)["y"]
    np.testing.assert_allclose(
        got, ReferenceEvaluator(model).run(None, {"a": a})[0], rtol=1e-12, atol=1e-12
    )


def _const(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


@pytest.mark.parametrize(
    "nodes, inits, out_shape",
    [
        (
            [
                helper.make_node("MatMul", ["x", "W"], ["m"]),
                helper.make_node("Add", ["m", "b"], ["y"]),
            ],
            [
                _const("W", np.arange(12.0).reshape(4, 3) / 7),
                _const("b", np.array([0.5, -1.0, 2.0])),
            ],
            [2, 3],
        ),
        (
            [
                helper.make_node("Sub", ["x", "b"], ["s"]),
                helper.make_node("Div", ["s", "d"], ["y"]),
            ],
            [_const("b", np.arange(4.0)), _const("d", np.array(3.0))],
            [2, 4],
        ),
        ([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], [], [2, 4]),
        ([helper.make_node("Gelu", ["x"], ["y"])], [], [2, 4]),
        ([helper.make_node("Gelu", ["x"], ["y"], approximate="tanh")], [], [2, 4]),
        ([helper.make_node("Flatten", ["x"], ["y"], axis=1)], [], [2, 4]),
        (
            [helper.make_node("Reshape", ["x", "s"], ["y"])],
            [_const("s", np.array([0, 2, 2], np.int64))],
            [2, 2, 2],
        ),
        (
            [
                helper.make_node("Cast", ["x"], ["c"], to=TensorProto.DOUBLE),
                helper.make_node("Identity", ["c"], ["y"]),
            ],
            [],
            [2, 4],
        ),
        ([helper.make_node("Dropout", ["x"], ["y"])], [], [2, 4]),
        (
            [
                helper.make_node("Constant", [], ["k"], value=_const("v", np.array(2.5))),
                helper.make_node("Mul", ["x", "k"], ["y"]),
            ],
            [],
            [2, 4],
        ),
        (
            [
                helper.make_node("Erf", ["x"], ["e"]),
                helper.make_node("Tanh", ["e"], ["t"]),
                helper.make_node("Sigmoid", ["t"], ["y"]),
            ],
            [],
            [2, 4],
        ),
        (
            [
                helper.make_node(
                    "BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], epsilon=1e-3
                )
            ],
            [
                _const("g", np.array([1.0, 2, 3, 4])),
                _const("b", np.array([0.0, 1, 0, -1])),
                _const("m", np.array([0.5, 0, -0.5, 1])),
                _const("v", np.array([1.0, 0.25, 4, 9])),
            ],
            [2, 4],
        ),
    ],
    ids=[
        "matmul-add",
        "sub-div",
        "softmax",
        "gelu",
        "gelu-tanh",
        "flatten",
        "reshape",
        "cast-identity",
        "dropout",
        "constant-mul",
        "erf-tanh-sigmoid",
        "batchnorm",
    ],
)
def test_each_supported_op_matches_the_onnx_reference_evaluator(nodes, inits, out_shape):
    opset = 20 if any(n.op_type == "Gelu" for n in nodes) else 18
    model = _double_model(nodes, [("x", [2, 4])], out_shape, inits, opset=opset)
    x = np.random.default_rng(0).standard_normal((2, 4)) * 2
    got = oracle.onnx_forward(model, x)["y"]
    # the evaluator's Erf/Gelu are good to ~1e-8; ours use math.erf (see the test below)
    tol = 1e-7 if any(n.op_type in ("Gelu", "Erf") for n in nodes) else 1e-12
    np.testing.assert_allclose(
        got, ReferenceEvaluator(model).run(None, {"x": x})[0], rtol=tol, atol=tol
    )


def test_gelu_and_erf_are_exact_at_known_points():
    # GELU(1) = Phi(1) and erf(1), to 16 digits
    np.testing.assert_allclose(kernels.gelu(np.array([1.0])), [0.8413447460685429], rtol=1e-15)
    np.testing.assert_allclose(kernels.erf(np.array([1.0])), [0.8427007929497149], rtol=1e-15)
    np.testing.assert_allclose(kernels.sigmoid(np.array([-800.0, 0.0, 800.0])), [0, 0.5, 1])


# ---- the float64 kernels the float64 reference of any graph uses ------------------------------
def _t(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 4]),
    per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 3),
    k=st.integers(1, 3),
    stride=st.integers(1, 3),
    pad=st.integers(0, 2),
    dilation=st.integers(1, 2),
    size=st.integers(5, 9),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_conv_and_conv_transpose_equal_torch_in_float64(
    n, groups, per_group, out_per_group, k, stride, pad, dilation, size, bias, seed
):
    rng = np.random.default_rng(seed)
    c, m = groups * per_group, groups * out_per_group
    x = rng.normal(size=(n, c, size, size + 1))
    w = rng.normal(size=(m, per_group, k, k))
    b = rng.normal(size=m) if bias else None
    got = kernels.conv(
        x, w, b, strides=[stride] * 2, pads=[pad] * 4, dilations=[dilation] * 2, group=groups
    )
    want = torch.nn.functional.conv2d(
        _t(x), _t(w), None if b is None else _t(b), stride, pad, dilation, groups
    ).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # ConvTranspose: weight [C, M / group, k, k]; output_padding below the stride
    wt = rng.normal(size=(c, out_per_group, k, k))
    extra = stride - 1 if stride > 1 and dilation == 1 else 0
    got = kernels.conv_transpose(
        x,
        wt,
        b,
        strides=[stride] * 2,
        pads=[pad] * 4,
        dilations=[dilation] * 2,
        group=groups,
        output_padding=[extra] * 2,
    )
    want = torch.nn.functional.conv_transpose2d(
        _t(x), _t(wt), None if b is None else _t(b), stride, pad, extra, groups, dilation
    ).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nd", [1, 3])
@pytest.mark.parametrize(
    "groups, per_group, out_per_group, k, stride, pad, dilation",
    [
        (1, 3, 4, 3, 2, 1, 1),  # im2col, one group
        (4, 1, 2, 3, 1, 1, 2),  # depthwise with a multiplier, dilated
        (2, 2, 3, 1, 1, 1, 1),  # 1x1, padded
        (1, 5, 2, 1, 2, 0, 1),  # 1x1, strided
    ],
)
def test_conv_and_conv_transpose_equal_torch_in_1d_and_3d(
    nd, groups, per_group, out_per_group, k, stride, pad, dilation
):
    rng = np.random.default_rng(nd * 100 + groups)
    f = torch.nn.functional
    c, m = groups * per_group, groups * out_per_group
    x = rng.normal(size=(2, c, *([6] * nd)))
    w = rng.normal(size=(m, per_group, *([k] * nd)))
    b = rng.normal(size=m)
    kw = {"strides": [stride] * nd, "pads": [pad] * (2 * nd), "dilations": [dilation] * nd}
    got = kernels.conv(x, w, b, group=groups, **kw)
    conv = f.conv1d if nd == 1 else f.conv3d
    want = conv(_t(x), _t(w), _t(b), stride, pad, dilation, groups).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    wt = rng.normal(size=(c, out_per_group, *([k] * nd)))
    got = kernels.conv_transpose(x, wt, b, group=groups, **kw)
    conv_t = f.conv_transpose1d if nd == 1 else f.conv_transpose3d
    want = conv_t(_t(x), _t(wt), _t(b), stride, pad, 0, groups, dilation).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ceil_mode", [0, 1])
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("count_include_pad", [0, 1])
def test_pools_equal_torch_in_float64(kind, ceil_mode, count_include_pad):
    x = np.random.default_rng(4).normal(size=(2, 3, 9, 8))
    got = kernels.pool(
        x,
        kind,
        [3, 3],
        strides=[2, 2],
        pads=[1, 1, 1, 1],
        ceil_mode=ceil_mode,
        count_include_pad=count_include_pad,
    )
    f = torch.nn.functional
    if kind == "max":
        want = f.max_pool2d(_t(x), 3, 2, 1, ceil_mode=bool(ceil_mode))
    else:
        want = f.avg_pool2d(
            _t(x), 3, 2, 1, ceil_mode=bool(ceil_mode), count_include_pad=bool(count_include_pad)
        )
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "op, attrs",
    [
        ("Conv", {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
        ("Conv", {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
        ("ConvTranspose", {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
        ("ConvTranspose", {"strides": [2, 2], "output_shape": [10, 8]}),
        ("MaxPool", {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]}),
        ("AveragePool", {"kernel_shape": [2, 2], "auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    ],
)
def test_onnx_padding_modes_equal_onnxruntime(op, attrs):
    import onnxruntime as ort

    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
    w = rng.normal(size=(3, 3, 3, 3)).astype(np.float32)
    ins = ["x", "w"] if "Conv" in op else ["x"]
    node = helper.make_node(op, ins, ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ins],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 10
    feeds = {"x": x, "w": w}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {n: feeds[n] for n in ins}
    )[0]
    kw = {k: v for k, v in attrs.items() if k != "kernel_shape"}
    if op == "Conv":
        got = kernels.conv(x, w, **kw)
    elif op == "ConvTranspose":
        got = kernels.conv_transpose(x, w, **kw)
    else:
        got = kernels.pool(x, "max" if op == "MaxPool" else "avg", attrs["kernel_shape"], **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_batch_norm_node_is_inference_in_every_opset_and_spatial0_is_per_element():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(4, 3, 2, 2))
    s, b, m = (rng.normal(size=3) for _ in range(3))
    v = rng.uniform(0.5, 2, 3)
    want = torch.nn.functional.batch_norm(
        _t(x), _t(m), _t(v), _t(s), _t(b), training=False, eps=1e-3
    ).numpy()
    np.testing.assert_allclose(kernels.batch_norm_node(x, s, b, m, v, 1e-3), want, rtol=1e-12)
    # spatial=0 (opset < 9): one value per element of a sample
    s2, b2, m2 = (rng.normal(size=(3, 2, 2)) for _ in range(3))
    v2 = rng.uniform(0.5, 2, (3, 2, 2))
    got = kernels.batch_norm_node(x, s2, b2, m2, v2, 1e-5, spatial=0)
    np.testing.assert_allclose(got, (x - m2) / np.sqrt(v2 + 1e-5) * s2 + b2, rtol=1e-12)
    with pytest.raises(UnsupportedModelError, match="training_mode"):
        kernels.batch_norm_node(x, s, b, m, v, training_mode=1)


def test_checkpoint_forward_takes_feeds_by_input_name():
    config = MLPConfig(in_features=3, out_features=2, hidden=(4,))
    x = np.random.default_rng(0).standard_normal((9, 3)).astype(np.float32)
    tensors = make_tensors(config, x)

    class Ckpt:
        pass

    ckpt = Ckpt()
    ckpt.config, ckpt.tensors = config, tensors
    np.testing.assert_array_equal(
        checkpoint_forward(ckpt, {"input": x}).output,
        forward_tensors(config, tensors, x).output,
    )
    with pytest.raises(InputDataError, match="one input 'input'"):
        checkpoint_forward(ckpt, {"continuous": x, "categorical": x})
