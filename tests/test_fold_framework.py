"""The fold framework: affine sites, rules in order, refusals combined, new rules plugged in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from fold_testing import bn_params, model_from_text, run_ort

from bn_onnx.fold import DEFAULT_RULES, FoldBatchNormPass, Plan, Refusal, Rule, fold_model
from bn_onnx.fold.bn_site import batch_norm_site
from bn_onnx.fold.context import FoldContext
from bn_onnx.fold.rules import combine
from bn_onnx.fold.sites import AffineSite
from bn_onnx.fold.validate import validate_model

HEAD = '<ir_version: 8, opset_import: ["" : 18]>'


def _relu_bn_tanh(params, eps=0.01):
    return model_from_text(
        f"""{HEAD}
        g (float[N, 3, 4] x) => (float[N, 3, 4] y) {{
          r = Relu (x)
          t = BatchNormalization <epsilon={eps}> (r, s, b, mu, var)
          y = Tanh (t)
        }}""",
        params,
    )


def test_batch_norm_site_is_the_float64_affine_map_on_axis_1():
    rng = np.random.default_rng(50)
    p = bn_params(rng, 3)
    model = ir.serde.deserialize_model(_relu_bn_tanh(p))
    ctx = FoldContext(model, validate_model(model))
    bn = next(n for n in model.graph if n.op_type == "BatchNormalization")
    site = batch_norm_site(bn, ctx)
    assert isinstance(site, AffineSite)
    a = p["s"].astype(np.float64) / np.sqrt(p["var"].astype(np.float64) + np.float32(0.01))
    c = p["b"].astype(np.float64) - a * p["mu"].astype(np.float64)
    np.testing.assert_allclose(site.a, a, rtol=1e-15)
    np.testing.assert_allclose(site.c, c, rtol=1e-12, atol=1e-15)
    assert (site.kind, site.axis, site.rank, site.where) == ("BatchNormalization", 1, 3, "main")
    assert site.nodes == (bn,) and site.x is bn.inputs[0] and site.y is bn.outputs[0]
    assert site.dtype == ir.DataType.FLOAT and site.label == "BatchNormalization(t)"


def test_refusals_are_combined_in_rule_order_with_their_labels():
    def refuse(text, silent=False):
        return lambda site, ctx: Refusal(text, silent=silent)

    rules = [
        (Rule("a", "first", refuse("no A")), Refusal("no A")),
        (Rule("b", "", refuse("plain")), Refusal("plain")),
        (Rule("c", "third", refuse("", silent=True)), Refusal("", silent=True)),
    ]
    assert combine(rules).reason == "first: no A; plain"


def test_report_entry_says_kind_and_where():
    rng = np.random.default_rng(51)
    result = fold_model(_relu_bn_tanh(bn_params(rng, 3)))
    entry = result.report.to_dict()["bn"][0]
    assert (entry["kind"], entry["where"], entry["status"]) == (
        "BatchNormalization",
        "main",
        "left",
    )
    assert entry["reason"].startswith("before: comes after Relu 'Relu(r)'")


def test_only_the_rules_given_are_tried():
    rng = np.random.default_rng(52)
    model = ir.serde.deserialize_model(_relu_bn_tanh(bn_params(rng, 3)))
    result = FoldBatchNormPass(rules=DEFAULT_RULES[:1])(model)
    assert (
        result.report.entries[0].reason
        == "before: comes after Relu 'Relu(r)', not Gemm/MatMul/Conv"
    )


def _drop_identity(site: AffineSite, ctx: FoldContext) -> Plan | Refusal:
    """A toy rule family: a site that is the identity map is simply removed."""
    if not (np.all(site.a == 1.0) and np.all(site.c == 0.0)):
        return Refusal("not the identity")

    def rewrite() -> None:
        ctx.remove_site(site, keep_name=False)

    return Plan("removed", [], rewrite)


@pytest.mark.parametrize("identity", [True, False])
def test_a_new_rule_family_plugs_in_without_touching_the_driver(identity):
    rng = np.random.default_rng(53)
    p = bn_params(rng, 3)
    if identity:  # scale = sqrt(var + eps) = 1, B = mean: the identity, exactly
        p["var"] = np.full(3, 0.75, np.float32)
        p["s"] = np.ones(3, np.float32)
        p["b"] = p["mu"].copy()
    proto = _relu_bn_tanh(p, eps=0.25)
    model = ir.serde.deserialize_model(proto)
    rules = (*DEFAULT_RULES, Rule("identity", "identity", _drop_identity))
    result = FoldBatchNormPass(rules=rules)(model)
    entry = result.report.entries[0]
    if not identity:
        assert entry.status == "left" and entry.reason.endswith("; identity: not the identity")
        return
    assert (entry.status, entry.direction) == ("folded", "removed")
    folded = ir.serde.serialize_model(model)
    assert [n.op_type for n in folded.graph.node] == ["Relu", "Tanh"]
    assert {t.name for t in folded.graph.initializer} == set()  # parameters swept
    x = rng.normal(size=(2, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(run_ort(folded, {"x": x})[0], run_ort(proto, {"x": x})[0], 1e-5)


def test_where_names_the_graph_of_a_node_in_a_subgraph_or_function():
    """The report's path of a graph: a subgraph by the nodes holding it, a function body by name."""
    cases = Path(__file__).parent / "data" / "fold_cases"
    found = []
    for name in ("bn_in_if_branches.onnx", "bn_in_local_function.onnx"):
        model = ir.load(cases / name)
        ctx = FoldContext(model, validate_model(model))
        nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
        for function in model.functions.values():
            nodes += list(function)
        found += sorted(ctx.where(n.graph) for n in nodes if n.op_type == "BatchNormalization")
    assert found == [
        "main/If 'If(y)'/else_branch",
        "main/If 'If(y)'/then_branch",
        "function pkg.blocks::ConvBn",
    ]
