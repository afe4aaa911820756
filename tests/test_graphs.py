"""The synthetic MLP builders against numpy float64, the onnx reference evaluator and torch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx.reference import ReferenceEvaluator

from bn_onnx import graphs
from bn_onnx.errors import UsageError

WIDTHS = [12, 20, 16, 5]
ATOL, RTOL = 1e-5, 1e-4


def _ort(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    src = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {graphs.INPUT_NAME: x})[0]


def _x(n: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("bn", graphs.PLACEMENTS)
@pytest.mark.parametrize("variant", graphs.VARIANTS)
def test_each_variant_runs_in_onnxruntime_like_its_float64_reference(variant, bn):
    model = graphs.build_mlp(WIDTHS, variant, seed=4, bn=bn)
    onnx.checker.check_model(model, full_check=True)
    x = _x(9, WIDTHS[0])
    np.testing.assert_allclose(
        _ort(model, x),
        graphs.mlp_reference(WIDTHS, x, variant, seed=4, bn=bn),
        atol=ATOL,
        rtol=RTOL,
    )


@pytest.mark.parametrize("bn", graphs.PLACEMENTS)
def test_folded_variant_computes_the_unfolded_network(bn):
    x = _x(11, WIDTHS[0], seed=1)
    folded = _ort(graphs.build_mlp(WIDTHS, "folded", seed=2, bn=bn), x)
    expected = graphs.mlp_reference(WIDTHS, x, "unfolded", seed=2, bn=bn)
    np.testing.assert_allclose(folded, expected, atol=ATOL, rtol=RTOL)


def test_no_bn_variant_differs_from_unfolded_so_benchmarks_compare_shapes_not_values():
    x = _x(8, WIDTHS[0])
    a = graphs.mlp_reference(WIDTHS, x, "unfolded")
    b = graphs.mlp_reference(WIDTHS, x, "no_bn")
    assert np.abs(a - b).max() > 0.1


def test_unfolded_batchnorm_matches_onnx_reference_evaluator():
    model = graphs.build_mlp(WIDTHS, "unfolded", seed=7)
    x = _x(6, WIDTHS[0])
    (got,) = ReferenceEvaluator(model).run(None, {graphs.INPUT_NAME: x})
    np.testing.assert_allclose(got, graphs.mlp_reference(WIDTHS, x, seed=7), atol=ATOL, rtol=RTOL)


def test_node_layout_of_the_variants():
    widths = [8, 16, 16, 16, 3]
    unfolded = graphs.build_mlp(widths, "unfolded")
    folded = graphs.build_mlp(widths, "folded")
    no_bn = graphs.build_mlp(widths, "no_bn")
    assert _ops(unfolded) == ["Gemm", "BatchNormalization", "Relu"] * 3 + ["Gemm"]
    assert _ops(folded) == _ops(no_bn) == ["Gemm", "Relu"] * 3 + ["Gemm"]
    post = graphs.build_mlp(widths, "unfolded", bn="post")
    assert _ops(post) == ["Gemm", "Relu", "BatchNormalization"] * 3 + ["Gemm"]
    for m in (unfolded, folded, no_bn):
        assert m.graph.input[0].name == "input" and m.graph.output[0].name == "logits"
        dims = m.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch" and dims[1].dim_value == widths[0]
    props = {p.key: p.value for p in folded.metadata_props}
    assert props["bn_onnx.folded"] == "true"


def test_folded_weights_match_torch_fuse_linear_bn_weights():
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_linear_bn_weights

    raw = graphs.block_params(WIDTHS, 0, seed=5)
    folded = next(graphs.gemm_params(WIDTHS, "folded", seed=5))
    t = {k: torch.from_numpy(getattr(raw, k).astype(np.float64)) for k in raw.__dataclass_fields__}
    w, b = fuse_linear_bn_weights(
        t["weight"], t["bias"], t["bn_mean"], t["bn_var"], 1e-5, t["bn_scale"], t["bn_bias"]
    )
    np.testing.assert_allclose(folded.weight, w.detach().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(folded.bias, b.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_same_seed_same_model_other_seed_other_weights():
    a = graphs.build_mlp(WIDTHS, seed=1).SerializeToString()
    assert a == graphs.build_mlp(WIDTHS, seed=1).SerializeToString()
    assert a != graphs.build_mlp(WIDTHS, seed=2).SerializeToString()


@settings(max_examples=15, deadline=None)
@given(
    widths=st.lists(st.integers(1, 24), min_size=2, max_size=5),
    seed=st.integers(0, 2**16),
    bn=st.sampled_from(graphs.PLACEMENTS),
)
def test_folded_equals_unfolded_for_any_shape(widths, seed, bn):
    x = _x(4, widths[0], seed=seed)
    folded = graphs.mlp_reference(widths, x, "folded", seed=seed, bn=bn)
    unfolded = graphs.mlp_reference(widths, x, "unfolded", seed=seed, bn=bn)
    # Folded weights are rounded once to float32; the float64 forward shows only that rounding.
    np.testing.assert_allclose(folded, unfolded, atol=1e-5, rtol=1e-5)


def test_external_data_model_loads_and_matches_in_memory_model(tmp_path):
    path = tmp_path / "m.onnx"
    files = graphs.write_mlp_external(path, WIDTHS, seed=3, align=256)
    assert files == [path, tmp_path / "m.onnx.data"]
    loaded = onnx.load(str(path))
    onnx.checker.check_model(str(path))
    built = graphs.build_mlp(WIDTHS, seed=3)
    assert [t.name for t in loaded.graph.initializer] == [t.name for t in built.graph.initializer]
    for a, b in zip(loaded.graph.initializer, built.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    head = onnx.load(str(path), load_external_data=False)
    offsets = [
        int(e.value) for t in head.graph.initializer for e in t.external_data if e.key == "offset"
    ]
    assert offsets and all(o % 256 == 0 for o in offsets)
    x = _x(5, WIDTHS[0])
    np.testing.assert_allclose(
        _ort(str(path), x), graphs.mlp_reference(WIDTHS, x, seed=3), atol=ATOL, rtol=RTOL
    )


def test_model_nbytes_counts_the_stored_tensors():
    for variant in graphs.VARIANTS:
        m = graphs.build_mlp(WIDTHS, variant)
        assert graphs.model_nbytes(WIDTHS, variant) == sum(
            len(t.raw_data) for t in m.graph.initializer
        )


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"widths": [4]}, "widths"),
        ({"widths": [4, 0, 2]}, "widths"),
        ({"widths": [4, 2], "variant": "half"}, "variant"),
        ({"widths": [4, 2], "bn": "middle"}, "bn"),
    ],
)
def test_bad_arguments_raise_usage_error(kwargs, word):
    with pytest.raises(UsageError, match=word):
        graphs.build_mlp(**kwargs)
