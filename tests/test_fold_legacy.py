"""Rule 17 (issue 12, 2h): legacy opsets. spatial=0, broadcast=1 before opset 7, is_test and
consumed_inputs.

onnxruntime runs only opset 7 and later, and neither onnx.reference nor onnx's version
converter reads the legacy `broadcast`/`axis` attributes right (the reference ignores them;
the 6 -> 7 converter lines a B of rank 1 with `axis=1` up at the end of a rank-4 A). So the
oracle here is `modernize`: it checks every Add/Sub/Mul/Div/Gemm against the opset-6 rule
(different input shapes need `broadcast=1`), spells each legacy broadcast out by reshaping
the constant B as the spec says (B's dims line up with A's from `axis`, suffix matching when
there is no `axis`), and then lets the version converter bring the model to opset 7 for
onnxruntime. The original and the folded model both go through it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from fold_testing import bn_params, model_from_text, op_count, reasons, run_ort
from onnx import helper, numpy_helper, version_converter

from bn_onnx.fold import fold_model

CASES = Path(__file__).parent / "data" / "fold_cases"
BINARY = ("Add", "Sub", "Mul", "Div")


def head(opset: int) -> str:
    return f'<ir_version: 3, opset_import: ["" : {opset}]>'


def consumed(opset: int) -> str:
    """BatchNormalization-1 (opsets 1-5) requires `consumed_inputs`."""
    return ", consumed_inputs=[0, 0, 0, 1, 1]" if opset < 6 else ""


def legacy_model(text: str, inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    """An IR 3 model from text: its initializers are listed as graph inputs too, as IR < 4
    requires (they stay constants: `FoldContext.legacy_inputs`)."""
    model = model_from_text(text, inits)
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return model


def modernize(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model at opset 7 with its legacy broadcasting spelled out (see the module doc).

    Fails the test if a binary node broadcasts without `broadcast=1`.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(m)
    shapes = {}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        shapes[vi.name] = [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
    inits = {t.name: t for t in m.graph.initializer}
    for t in m.graph.initializer:
        shapes[t.name] = list(t.dims)
    for node in m.graph.node:
        if node.op_type not in (*BINARY, "Gemm"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm":
            if attrs.get("broadcast", 0) == 0:
                (m_, n_) = shapes[node.output[0]]
                assert shapes[node.input[2]] == [m_, n_], f"Gemm {node.name}: C needs broadcast=1"
        else:
            a_shape, b_shape = shapes[node.input[0]], shapes[node.input[1]]
            if attrs.get("broadcast", 0) == 0:
                assert a_shape == b_shape, (
                    f"{node.op_type} {node.name}: broadcasts without broadcast=1"
                )
            elif node.input[1] in inits and len(b_shape) < len(a_shape):
                axis = attrs.get("axis", len(a_shape) - len(b_shape))
                axis = axis + len(a_shape) if axis < 0 else axis
                b = numpy_helper.to_array(inits[node.input[1]])
                if b.size > 1:
                    assert b_shape == a_shape[axis : axis + len(b_shape)], node.name
                    trail = len(a_shape) - axis - len(b_shape)
                    b = b.reshape(b.shape + (1,) * trail)
                name = node.input[1] + "_spelled_out"
                m.graph.initializer.append(numpy_helper.from_array(b, name))
                if m.ir_version < 4:
                    m.graph.input.append(helper.make_tensor_value_info(name, 1, list(b.shape)))
                node.input[1] = name
        keep = [a for a in node.attribute if a.name not in ("broadcast", "axis")]
        del node.attribute[:]
        node.attribute.extend(keep)
    return version_converter.convert_version(m, 7)


def run_legacy(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return run_ort(modernize(model), feeds)


def fold_legacy_and_compare(model, feeds, *, bn_left: int = 0):
    """Fold, check the result (full checker, legacy broadcasting, opset and IR unchanged) and
    compare it with the original through `modernize` in onnxruntime."""
    result = fold_model(model)
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version == model.ir_version
    assert [(o.domain, o.version) for o in out.opset_import] == [
        (o.domain, o.version) for o in model.opset_import
    ]
    assert op_count(out, "BatchNormalization") == bn_left, onnx.printer.to_text(out.graph)
    want, got = run_legacy(model, feeds), run_legacy(out, feeds)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)
    return result


def attrs_of(model: onnx.ModelProto, op: str) -> list[dict]:
    return [
        {a.name: helper.get_attribute_value(a) for a in n.attribute}
        for n in model.graph.node
        if n.op_type == op
    ]


# --------------------------------------------------------------------------------------------
# spatial=0


@pytest.mark.parametrize("name", ["spatial0_chw_params", "spatial0_vector_params"])
def test_spatial0_bn_on_a_4d_input_is_left_and_the_reason_says_spatial0(name):
    model = onnx.load(str(CASES / f"{name}.onnx"))
    result = fold_model(model)
    assert result.report.n_folded == 0
    (reason,) = reasons(result)
    assert reason.startswith("spatial=0 (opset 7) on an input of rank 4"), reason
    assert op_count(result.model, "BatchNormalization") == 1


def test_spatial0_bn_on_a_2d_input_folds_as_both_modes_agree():
    rng = np.random.default_rng(70)
    inits = {"W": rng.normal(size=(5, 4)).astype(np.float32), **bn_params(rng, 4)}
    model = legacy_model(
        f"""{head(7)}
        g (float[3, 5] x) => (float[3, 4] y) {{
          h = MatMul (x, W)
          y = BatchNormalization <spatial=0> (h, s, b, mu, var)
        }}""",
        inits,
    )
    x = rng.normal(size=(3, 5)).astype(np.float32)
    result = fold_model(model)
    assert result.report.n_folded == 1
    onnx.checker.check_model(result.model, full_check=True)
    np.testing.assert_allclose(
        run_ort(result.model, {"x": x})[0], run_ort(model, {"x": x})[0], atol=1e-5, rtol=1e-4
    )


# --------------------------------------------------------------------------------------------
# broadcast=1 before opset 7


def test_opset6_matmul_bn_file_gives_a_valid_opset6_graph():
    model = onnx.load(str(CASES / "opset6_matmul_bn.onnx"))
    x = np.random.default_rng(71).normal(size=(3, 5)).astype(np.float32)
    result = fold_legacy_and_compare(model, {"x": x})
    assert attrs_of(result.model, "Add") == [{"broadcast": 1}]


@pytest.mark.parametrize("opset", [1, 5, 6])
def test_inserted_add_carries_broadcast_before_opset7(opset):
    rng = np.random.default_rng(72)
    inits = {"W": rng.normal(size=(5, 4)).astype(np.float32), **bn_params(rng, 4)}
    model = legacy_model(
        f"""{head(opset)}
        g (float[3, 5] x) => (float[3, 4] y) {{
          h = MatMul (x, W)
          y = BatchNormalization <is_test=1{consumed(opset)}> (h, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_legacy_and_compare(model, {"x": rng.normal(size=(3, 5)).astype(np.float32)})
    assert attrs_of(result.model, "Add") == [{"broadcast": 1}]


def test_rewritten_legacy_add_drops_its_axis_and_keeps_broadcast():
    # A scalar bias added with axis=0: the folded bias is a vector along the last axis.
    rng = np.random.default_rng(73)
    inits = {
        "W": rng.normal(size=(5, 4)).astype(np.float32),
        "b0": np.array([0.75], np.float32),
        **bn_params(rng, 4),
    }
    model = legacy_model(
        f"""{head(6)}
        g (float[4, 5] x) => (float[4, 4] y) {{
          h = MatMul (x, W)
          z = Add <broadcast=1, axis=0> (h, b0)
          y = BatchNormalization <is_test=1> (z, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_legacy_and_compare(model, {"x": rng.normal(size=(4, 5)).astype(np.float32)})
    assert attrs_of(result.model, "Add") == [{"broadcast": 1}]


def test_legacy_add_with_a_per_row_bias_is_left():
    rng = np.random.default_rng(74)
    inits = {
        "W": rng.normal(size=(5, 4)).astype(np.float32),
        "rows": rng.normal(size=(4,)).astype(np.float32),  # one value per row of (4, 4)
        **bn_params(rng, 4),
    }
    model = legacy_model(
        f"""{head(6)}
        g (float[4, 5] x) => (float[4, 4] y) {{
          h = MatMul (x, W)
          z = Add <broadcast=1, axis=0> (h, rows)
          y = BatchNormalization <is_test=1> (z, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_legacy_and_compare(
        model, {"x": rng.normal(size=(4, 5)).astype(np.float32)}, bn_left=1
    )
    assert reasons(result) == [
        "before: Add 'Add(z)' (opset 6) lines its bias up at axis 0, not with the last axis;"
        " after: its output 'y' is a graph output"
    ]


def test_legacy_gemm_gets_broadcast_for_its_folded_bias():
    rng = np.random.default_rng(75)
    inits = {
        "W": rng.normal(size=(4, 5)).astype(np.float32),
        "C": rng.normal(size=(3, 4)).astype(np.float32),  # full (M, N): no broadcast yet
        "W2": rng.normal(size=(4, 2)).astype(np.float32),
        "C2": rng.normal(size=(3, 2)).astype(np.float32),
        **bn_params(rng, 4),
    }
    model = legacy_model(
        f"""{head(6)}
        g (float[3, 5] x) => (float[3, 2] y) {{
          h = Gemm <transB=1> (x, W, C)
          r = Relu (h)
          t = BatchNormalization <is_test=1> (r, s, b, mu, var)
          y = Gemm (t, W2, C2)
        }}""",
        inits,
    )
    result = fold_legacy_and_compare(model, {"x": rng.normal(size=(3, 5)).astype(np.float32)})
    assert attrs_of(result.model, "Gemm")[1] == {"broadcast": 1}


def test_caffe2_scale_layers_at_opset6_fold_into_the_conv():
    rng = np.random.default_rng(76)
    inits = {
        "W": rng.normal(0, 0.4, (4, 3, 3, 3)).astype(np.float32),
        "B": rng.normal(size=4).astype(np.float32),
        "gamma": rng.normal(1, 0.5, 4).astype(np.float32),
        "beta": rng.normal(0, 0.5, 4).astype(np.float32),
        **bn_params(rng, 4),
    }
    model = legacy_model(
        f"""{head(6)}
        g (float[2, 3, 6, 6] x) => (float[2, 4, 4, 4] y) {{
          c = Conv (x, W, B)
          t = BatchNormalization <is_test=1> (c, s, b, mu, var)
          m = Mul <broadcast=1, axis=1> (t, gamma)
          a = Add <broadcast=1, axis=1> (m, beta)
          y = Relu (a)
        }}""",
        inits,
    )
    x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
    result = fold_legacy_and_compare(model, {"x": x})
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Relu"]
    (chain,) = [e for e in result.report.entries if e.kind == "Mul/Add chain"]
    assert chain.status == "folded"


def test_legacy_mul_without_broadcast_is_not_a_site():
    # Mul-6 without broadcast=1 needs equal shapes: a (4,) constant on (2, 4, 3, 3) is not
    # a per-channel map of that op (the model is not valid opset 6).
    rng = np.random.default_rng(77)
    inits = {"k": rng.normal(size=(4, 1, 1)).astype(np.float32)}
    model = legacy_model(
        f"""{head(6)}
        g (float[2, 4, 3, 3] x) => (float[2, 4, 3, 3] y) {{
          r = Relu (x)
          y = Mul (r, k)
        }}""",
        inits,
    )
    result = fold_model(model)
    assert result.report.entries == []


# --------------------------------------------------------------------------------------------
# is_test and consumed_inputs


@pytest.mark.parametrize("opset", [5, 6])
def test_is_test_0_before_opset7_is_training_mode_and_left(opset):
    rng = np.random.default_rng(78)
    inits = {"W": rng.normal(size=(5, 4)).astype(np.float32), **bn_params(rng, 4)}
    model = legacy_model(
        f"""{head(opset)}
        g (float[3, 5] x) => (float[3, 4] y) {{
          h = MatMul (x, W)
          y = BatchNormalization <is_test=0{consumed(opset)}> (h, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_model(model)
    assert result.report.n_folded == 0
    version = 6 if opset == 6 else 1
    assert reasons(result) == [
        f"is_test=0 (opset {opset}): BatchNormalization-{version} normalizes with the batch's"
        " statistics (training mode)"
    ]


def test_consumed_inputs_bn_in_test_mode_folds():
    # BatchNormalization-1: consumed_inputs marks mean and var as updated in place in
    # training; with is_test=1 and no extra outputs, Y is the inference map.
    rng = np.random.default_rng(79)
    inits = {
        "W": rng.normal(0, 0.4, (4, 3, 3, 3)).astype(np.float32),
        "B": rng.normal(size=4).astype(np.float32),
        **bn_params(rng, 4),
    }
    model = legacy_model(
        f"""{head(5)}
        g (float[2, 3, 6, 6] x) => (float[2, 4, 4, 4] y) {{
          c = Conv (x, W, B)
          y = BatchNormalization <is_test=1, consumed_inputs=[0, 0, 0, 1, 1]> (c, s, b, mu, var)
        }}""",
        inits,
    )
    x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
    result = fold_legacy_and_compare(model, {"x": x})
    assert result.report.n_folded == 1
