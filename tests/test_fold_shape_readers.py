"""Rule 12 (issue 12, 2a): readers of only a shape or a type never block a fold.

A fold changes the values of the linear node's output (or of the BN's input), never their
shape or element type, so `Shape`, `Size` and the second input of `CastLike` may read them.
torch's dynamo exporter writes exactly that for `BatchNorm1d(affine=False)`: its scale and bias
are `Expand(CastLike(Constant, x), Shape(x))` of the BN input x.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from fold_testing import bn_params, fold_and_compare, model_from_text, op_count, reasons

HEAD = '<ir_version: 8, opset_import: ["" : 18]>'


def _x(rng, shape=(4, 5)):
    return rng.normal(size=shape).astype(np.float32)


def test_shape_size_and_castlike_type_readers_do_not_block_a_preceding_fold():
    rng = np.random.default_rng(40)
    inits = {"W": rng.normal(size=(5, 3)).astype(np.float32), **bn_params(rng, 3)}
    inits["half"] = np.array(0.5, np.float64)
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => (float[N, 3] y, int64[2] dims, int64 size, float k) {{
          h = Gemm (x, W)
          y = BatchNormalization (h, s, b, mu, var)
          dims = Shape (h)
          size = Size (h)
          k = CastLike (half, h)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng)}, cleanup=False)
    assert result.report.entries[0].direction == "preceding"
    # the shape and type readers still read the Gemm output, now named after the BN's
    gemm = next(n for n in result.model.graph.node if n.op_type == "Gemm")
    readers = [n for n in result.model.graph.node if gemm.output[0] in n.input]
    assert sorted(n.op_type for n in readers) == ["CastLike", "Shape", "Size"]
    # the cleanup then folds the type reader (and the Shape of static dims would go too)
    cleaned = fold_and_compare(model, {"x": _x(rng)})
    assert "CastLike" not in [n.op_type for n in cleaned.model.graph.node]


def test_shape_reader_of_the_bn_output_does_not_block_a_following_fold():
    rng = np.random.default_rng(41)
    inits = {"W": rng.normal(size=(5, 3)).astype(np.float32), **bn_params(rng, 5)}
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => (float[N, 3] y, int64[2] dims) {{
          r = Relu (x)
          t = BatchNormalization (r, s, b, mu, var)
          y = Gemm (t, W)
          dims = Shape (t)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng)})
    assert result.report.entries[0].direction == "following"


@pytest.mark.parametrize(
    "reader",
    [
        ("double[N, 3]", "z = CastLike (h, like)"),
        ("float[N, 3]", "z = Relu (h)"),
        ("float[M]", "z = Reshape (h, shape)"),
    ],
)
def test_a_reader_of_the_values_still_blocks_the_fold(reader):
    z_type, line = reader
    """CastLike's first input, and any other op, read the values the fold would change."""
    rng = np.random.default_rng(42)
    inits = {"W": rng.normal(size=(5, 3)).astype(np.float32), **bn_params(rng, 3)}
    inits["like"] = np.array(1.0, np.float64)
    inits["shape"] = np.array([-1], np.int64)
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 5] x) => (float[N, 3] y, {z_type} z) {{
          h = Gemm (x, W)
          y = BatchNormalization (h, s, b, mu, var)
          {line}
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": _x(rng)}, folded=0)
    assert "'h' is also read by another node" in reasons(result)[0]


def test_dynamo_export_of_bias_free_linear_then_affine_free_batchnorm_folds(tmp_path):
    torch = pytest.importorskip("torch")
    from torch import nn

    from bn_onnx.export import _quiet_torch_exporter, _reuse_torchlib_registry
    from bn_onnx.fold import fold_file

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4, bias=False), nn.BatchNorm1d(4, affine=False)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    src = tmp_path / "linear_bn.onnx"
    with _quiet_torch_exporter(), _reuse_torchlib_registry(), torch.no_grad():
        torch.onnx.export(
            model,
            (torch.randn(3, 6),),
            str(src),
            dynamo=True,
            optimize=False,
            input_names=["input"],
            output_names=["out"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    original = onnx.load(str(src))
    # the exporter's affine-free BN reads the Linear output through CastLike and Shape too
    linear_out = next(n for n in original.graph.node if n.op_type == "Gemm").output[0]
    assert {n.op_type for n in original.graph.node if linear_out in n.input} >= {
        "BatchNormalization",
        "CastLike",
        "Shape",
    }
    out = tmp_path / "folded.onnx"
    report = fold_file(src, out)
    assert (report.n_bn, report.n_folded) == (1, 1), report.to_dict()
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    assert op_count(folded, "BatchNormalization") == 0
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]  # the constant subgraphs went too
    x = np.random.default_rng(1).normal(0.3, 1.5, size=(17, 6)).astype(np.float32)
    from fold_testing import run_ort

    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_ort(original, {"input": x})[0], expected, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(run_ort(folded, {"input": x})[0], expected, atol=1e-5, rtol=1e-4)
