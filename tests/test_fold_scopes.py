"""Rule 2b: BN in If/Loop/Scan bodies (any depth) and in model-local functions.

Each fold is checked in onnxruntime before and after (every branch taken: the If conditions are
inputs fed both ways, or computed from the loop counter), the result passes the full checker,
and the interface, opsets, function signatures and subgraph outputs are the input's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from fold_testing import ATOL, RTOL, _interface, bn_params, model_from_text, run_ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from bn_onnx.cli import main
from bn_onnx.fold import FoldResult, fold_model, inspect_model

CASES = Path(__file__).parent / "data" / "fold_cases"
GRAPH, GRAPHS = onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS


# --- helpers ----------------------------------------------------------------------------------


def subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    found = []
    for a in node.attribute:
        if a.type == GRAPH:
            found.append((a.name, a.g))
        elif a.type == GRAPHS:
            found += [(f"{a.name}[{i}]", g) for i, g in enumerate(a.graphs)]
    return found


def all_graphs(model: onnx.ModelProto) -> list[tuple[str, onnx.GraphProto]]:
    """Every GraphProto with its path: the main graph and its subgraphs at any depth."""
    out, stack = [], [("main", model.graph)]
    for f in model.functions:
        for n in f.node:
            stack += [
                (f"{f.domain}::{f.name}/{n.op_type} {n.name!r}/{k}", g) for k, g in subgraphs(n)
            ]
    while stack:
        path, g = stack.pop()
        out.append((path, g))
        for n in g.node:
            stack += [(f"{path}/{n.op_type} {n.name!r}/{k}", s) for k, s in subgraphs(n)]
    return out


def all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every node: main graph, subgraphs, function bodies (and their subgraphs)."""
    nodes, stack = [], [*model.graph.node, *(n for f in model.functions for n in f.node)]
    while stack:
        n = stack.pop()
        nodes.append(n)
        stack += [m for _, g in subgraphs(n) for m in g.node]
    return nodes


def count_bn(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in all_nodes(model))


def signatures(model: onnx.ModelProto) -> list[tuple]:
    return [
        (
            f.domain,
            f.name,
            f.overload,
            list(f.input),
            list(f.output),
            list(f.attribute),
            [a.SerializeToString() for a in f.attribute_proto],
            [(o.domain, o.version) for o in f.opset_import],
        )
        for f in model.functions
    ]


def subgraph_outputs(model: onnx.ModelProto) -> list[tuple[str, list[tuple[str, bytes]]]]:
    return sorted(
        (path, [(vi.name, vi.type.SerializeToString()) for vi in g.output])
        for path, g in all_graphs(model)
        if path != "main"
    )


def scalar_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The text parser writes `int64[] M` without a shape; the checker wants rank 0."""
    for _, g in all_graphs(model):
        for vi in (*g.input, *g.output):
            if vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape"):
                vi.type.tensor_type.shape.SetInParent()
    return model


def parse(text: str, inits: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    return scalar_shapes(model_from_text(text, inits))


def fold_scoped(
    model: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
    *,
    folded: int | None = None,
    atol: float = ATOL,
    rtol: float = RTOL,
    cleanup: bool = True,
) -> FoldResult:
    """Fold, then check: valid (full checker), the BN count, the interface, opsets, function
    signatures and subgraph outputs unchanged, and equal outputs in onnxruntime for each feed."""
    before = model.SerializeToString()
    result = fold_model(model, check_output=True, cleanup=cleanup)
    assert model.SerializeToString() == before, "fold_model changed its input"
    onnx.checker.check_model(result.model, full_check=True)
    n_bn = count_bn(model)
    expect = n_bn if folded is None else folded
    assert result.report.n_bn == n_bn
    assert result.report.n_folded == expect, result.report.to_dict()
    assert count_bn(result.model) == n_bn - expect
    assert _interface(result.model) == _interface(model)
    assert [(o.domain, o.version) for o in result.model.opset_import] == [
        (o.domain, o.version) for o in model.opset_import
    ]
    assert signatures(result.model) == signatures(model)
    assert subgraph_outputs(result.model) == subgraph_outputs(model)
    for f in feeds:
        for w, g in zip(run_ort(model, f), run_ort(result.model, f), strict=True):
            assert w.shape == g.shape and w.dtype == g.dtype
            np.testing.assert_allclose(g, w, atol=atol, rtol=rtol)
    return result


def entries(result: FoldResult) -> dict[str, tuple[str, str, str | None]]:
    """BN label -> (status, where, reason)."""
    return {e.node: (e.status, e.where, e.reason) for e in result.report.entries}


def floats(a: np.ndarray) -> str:
    return ", ".join(repr(float(v)) for v in np.ravel(a))


def const(name: str, a: np.ndarray) -> str:
    dims = ", ".join(map(str, a.shape))
    return f"{name} = Constant <value = float[{dims}] {{{floats(a)}}}> ()"


def params(rng: np.random.Generator, n: int, suffix: str) -> dict[str, np.ndarray]:
    return {f"{k}{suffix}": v for k, v in bn_params(rng, n).items()}


def bn(out: str, x: str, suffix: str) -> str:
    return f"{out} = BatchNormalization ({x}, s{suffix}, b{suffix}, mu{suffix}, var{suffix})"


HEAD = '<ir_version: 8, opset_import: ["" : 18]>'
FHEAD = '<ir_version: 8, opset_import: ["" : 18, "pkg" : 1]>'
FDOM = '<domain: "pkg", opset_import: ["" : 18]>'


# --- the case files ---------------------------------------------------------------------------


def test_case_file_bn_in_if_branches_folds_both_branches():
    model = onnx.load(CASES / "bn_in_if_branches.onnx")
    x = np.random.default_rng(0).normal(size=(1, 3, 5, 5)).astype(np.float32)
    feeds = [{"cond": np.array(c), "x": x} for c in (True, False)]
    result = fold_scoped(model, feeds)
    assert entries(result) == {
        "BatchNormalization(y_else)": ("folded", "main/If 'If(y)'/else_branch", None),
        "BatchNormalization(y_then)": ("folded", "main/If 'If(y)'/then_branch", None),
    }
    assert {e.target_op for e in result.report.entries} == {"Conv"}
    # the new biases are initializers of their branches; the BN parameters are gone
    graphs = dict(all_graphs(result.model))
    assert [t.name for t in graphs["main"].initializer] == ["W_then", "W_else"]
    for path, g in graphs.items():
        if path != "main":
            assert [n.op_type for n in g.node] == ["Conv"]
            assert [t.dims for t in g.initializer] == [[4]]
            assert g.node[0].input[2] == g.initializer[0].name


def test_case_file_bn_in_local_function_folds_inside_the_function():
    model = onnx.load(CASES / "bn_in_local_function.onnx")
    x = np.random.default_rng(1).normal(size=(1, 3, 5, 5)).astype(np.float32)
    result = fold_scoped(model, [{"x": x}])
    assert entries(result) == {
        "BatchNormalization(y)": ("folded", "function pkg.blocks::ConvBn", None)
    }
    folded = result.model
    body = folded.functions[0]
    assert [n.op_type for n in body.node] == ["Constant", "Conv"]  # the bias: a Constant node
    assert body.node[1].input[:2] == ["x", "W"]  # the weight still comes from the call
    # The call's initializer W holds the folded weight: stored once, not twice.
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert set(after) == set(before)
    assert not np.array_equal(after["W"], before["W"])
    assert [n.op_type for n in folded.graph.node] == ["ConvBn"]


# --- subgraphs ----------------------------------------------------------------------------------


def _depth3(rng: np.random.Generator) -> onnx.ModelProto:
    """If (input) -> Loop -> If (computed from the loop counter): Gemm -> BN -> Tanh in one
    inner branch, MatMul -> BN (the branch's output) in the other; parameters in main."""
    inits = {
        "W1": rng.normal(size=(5, 5)).astype(np.float32),
        "C1": rng.normal(size=(5,)).astype(np.float32),
        "W2": rng.normal(size=(5, 5)).astype(np.float32) / 2,
        **params(rng, 5, "1"),
        **params(rng, 5, "2"),
    }
    return parse(
        f"""{HEAD}
        g (float[N, 5] x, int64[] M, bool[] c) => (float[N, 5] y) {{
          [outer] y = If (c) <then_branch: graph = outer_then () => (float[N, 5] t_out) {{
            yes = Constant <value = bool {{1}}> ()
            [loop] t_out = Loop (M, yes, x) <body: graph = body (int64[] i, bool[] cin,
                                                                  float[N, 5] v)
                                                          => (bool[] cout, float[N, 5] vout) {{
              cout = Identity (cin)
              two = Constant <value = int64 {{2}}> ()
              small = Less (i, two)
              [inner] vout = If (small) <then_branch: graph = inner_then () => (float[N, 5] a) {{
                h1 = Gemm (v, W1, C1)
                {bn("n1", "h1", "1")}
                a = Tanh (n1)
              }}, else_branch: graph = inner_else () => (float[N, 5] b_out) {{
                h2 = MatMul (v, W2)
                {bn("b_out", "h2", "2")}
              }}>
            }}>
          }}, else_branch: graph = outer_else () => (float[N, 5] e_out) {{
            e_out = Identity (x)
          }}>
        }}""",
        inits,
    )


def test_nested_if_in_loop_in_if_depth_3_folds_and_says_where():
    rng = np.random.default_rng(2)
    model = _depth3(rng)
    x = rng.normal(size=(3, 5)).astype(np.float32)
    feeds = [{"x": x, "M": np.array(m), "c": np.array(c)} for m in (1, 4) for c in (True, False)]
    result = fold_scoped(model, feeds)
    inner = "main/If 'outer'/then_branch/Loop 'loop'/body/If 'inner'"
    assert entries(result) == {
        "BatchNormalization(n1)": ("folded", f"{inner}/then_branch", None),
        "BatchNormalization(b_out)": ("folded", f"{inner}/else_branch", None),
    }
    # MatMul -> BN needs the rank of h2 (from the subgraph's shape inference); the bias Add
    # inserted for it computes the branch's output under its name
    else_g = dict(all_graphs(result.model))[f"{inner}/else_branch"]
    assert [(n.op_type, list(n.output)) for n in else_g.node][-1] == ("Add", ["b_out"])


def test_scan_body_folds_preceding_and_following():
    rng = np.random.default_rng(3)
    inits = {
        "W1": rng.normal(size=(5, 4)).astype(np.float32),
        "W2": rng.normal(size=(4, 3)).astype(np.float32),
        **params(rng, 4, "1"),
        **params(rng, 4, "2"),
    }
    model = parse(
        f"""{HEAD}
        g (float[T, N, 5] xs) => (float[T, N, 3] ys) {{
          [scan] ys = Scan <num_scan_inputs: int = 1, body: graph = step (float[N, 5] x_t)
                                                                 => (float[N, 3] y_t) {{
            h = Gemm (x_t, W1)
            {bn("n", "h", "1")}
            r = Relu (n)
            {bn("m", "r", "2")}
            y_t = MatMul (m, W2)
          }}> (xs)
        }}""",
        inits,
    )
    xs = rng.normal(size=(4, 2, 5)).astype(np.float32)
    result = fold_scoped(model, [{"xs": xs}])
    where = "main/Scan 'scan'/body"
    assert {(e.node, e.direction, e.where) for e in result.report.entries} == {
        ("BatchNormalization(n)", "preceding", where),
        ("BatchNormalization(m)", "following", where),  # needs rank 2 of m in the body
    }


def test_bn_in_branch_reads_an_outer_weight_shared_by_both_branches():
    """W is a main-graph initializer read by a Conv in each branch: the first fold gives its
    branch a new initializer of its own (a subgraph initializer), W stays for the other."""
    rng = np.random.default_rng(4)
    inits = {
        "W": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        **params(rng, 4, "1"),
        **params(rng, 4, "2"),
    }
    model = parse(
        f"""{HEAD}
        g (bool[] c, float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y) {{
          [sel] y = If (c) <then_branch: graph = t () => (float[1, 4, 6, 6] yt) {{
            ct = Conv <pads = [1, 1, 1, 1]> (x, W)
            {bn("yt", "ct", "1")}
          }}, else_branch: graph = e () => (float[1, 4, 6, 6] ye) {{
            ce = Conv <pads = [1, 1, 1, 1]> (x, W)
            {bn("ye", "ce", "2")}
          }}>
        }}""",
        inits,
    )
    x = rng.normal(size=(1, 3, 6, 6)).astype(np.float32)
    result = fold_scoped(model, [{"c": np.array(c), "x": x} for c in (True, False)])
    graphs = dict(all_graphs(result.model))
    then_g = graphs["main/If 'sel'/then_branch"]
    else_g = graphs["main/If 'sel'/else_branch"]
    # then: a copy of the weight and its bias, as initializers of the branch; else: W itself
    # (read only by it by then, rewritten in place) and its bias
    assert [t.name for t in then_g.initializer] == list(then_g.node[0].input[1:])
    assert list(else_g.node[0].input[:2]) == ["x", "W"] and len(else_g.initializer) == 1
    assert [t.name for t in graphs["main"].initializer] == ["W"]


def test_bn_params_outer_initializers_and_constants_but_not_runtime_values():
    """Parameters of a BN in a Loop body: main-graph initializers and Constant nodes are
    constants there; a value computed at run time in main is not, nor a loop-carried value."""
    rng = np.random.default_rng(5)
    p = bn_params(rng, 5)
    w = rng.normal(size=(5, 5)).astype(np.float32)
    model = parse(
        f"""{HEAD}
        g (float[N, 5] x, int64[] M, float[5] gain) => (float[N, 5] y, float[N, 5] z,
                                                         float[N, 5] u) {{
          {const("s", p["s"])}
          {const("b", p["b"])}
          sr = Abs (gain)
          yes = Constant <value = bool {{1}}> ()
          [loop] y, z, u = Loop (M, yes, x, x, x) <body: graph = body (
              int64[] i, bool[] cin, float[N, 5] v, float[N, 5] v2, float[N, 5] v3)
              => (bool[] cout, float[N, 5] vo, float[N, 5] vo2, float[N, 5] vo3) {{
            cout = Identity (cin)
            h = Gemm (v, W)
            n = BatchNormalization (h, s, b, mu, var)
            vo = Tanh (n)
            h2 = Gemm (v2, W)
            n2 = BatchNormalization (h2, sr, b, mu, var)
            vo2 = Tanh (n2)
            ax = Constant <value = int64[1] {{0}}> ()
            sc = ReduceMean <keepdims = 0> (v3, ax)
            h3 = Gemm (v3, W)
            n3 = BatchNormalization (h3, sc, b, mu, var)
            vo3 = Tanh (n3)
          }}>
        }}""",
        {"W": w, "mu": p["mu"], "var": p["var"]},
    )
    x = rng.normal(size=(2, 5)).astype(np.float32)
    feeds = [{"x": x, "M": np.array(2), "gain": rng.normal(size=5).astype(np.float32)}]
    result = fold_scoped(model, feeds, folded=1)
    got = entries(result)
    assert got["BatchNormalization(n)"][0] == "folded"
    assert got["BatchNormalization(n2)"][2] == "parameter 'sr' is not a constant"
    assert got["BatchNormalization(n3)"][2] == "parameter 'sc' is not a constant"


def test_loop_carried_weight_is_a_body_input_not_a_constant():
    rng = np.random.default_rng(6)
    inits = {"W0": rng.normal(size=(5, 5)).astype(np.float32), **params(rng, 5, "")}
    model = parse(
        f"""{HEAD}
        g (float[N, 5] x, int64[] M) => (float[5, 5] wl, float[N, 5] y) {{
          yes = Constant <value = bool {{1}}> ()
          [loop] wl, y = Loop (M, yes, W0, x) <body: graph = body (int64[] i, bool[] cin,
                                                            float[5, 5] w, float[N, 5] v)
                  => (bool[] cout, float[5, 5] wo, float[N, 5] vo) {{
            cout = Identity (cin)
            wo = Identity (w)
            h = Gemm (v, w)
            {bn("n", "h", "")}
            vo = Tanh (n)
          }}>
        }}""",
        inits,
    )
    feeds = [{"x": rng.normal(size=(2, 5)).astype(np.float32), "M": np.array(2)}]
    result = fold_scoped(model, feeds, folded=0)
    assert entries(result)["BatchNormalization(n)"] == (
        "left",
        "main/Loop 'loop'/body",
        "before: weight 'w' is an input of main/Loop 'loop'/body, not a constant; "
        "after: 'n' is read by Tanh 'Tanh(vo)'",
    )


def test_bn_in_subgraph_after_an_outer_linear_node_is_left():
    """The Gemm before the BN is in main: folding into it would make the branch return a
    main-graph value (onnxruntime rejects a subgraph that returns an outer value directly)."""
    rng = np.random.default_rng(7)
    inits = {"W": rng.normal(size=(5, 4)).astype(np.float32), **params(rng, 4, "")}
    model = parse(
        f"""{HEAD}
        g (bool[] c, float[N, 5] x) => (float[N, 4] y) {{
          h = Gemm (x, W)
          [sel] y = If (c) <then_branch: graph = t () => (float[N, 4] yt) {{
            {bn("yt", "h", "")}
          }}, else_branch: graph = e () => (float[N, 4] ye) {{
            ye = Relu (h)
          }}>
        }}""",
        inits,
    )
    x = rng.normal(size=(3, 5)).astype(np.float32)
    result = fold_scoped(model, [{"c": np.array(c), "x": x} for c in (True, False)], folded=0)
    assert "'h' is also read by another node" in entries(result)["BatchNormalization(yt)"][2]


def test_bn_in_subgraph_after_an_outer_gemm_read_only_by_it_is_left_with_where():
    rng = np.random.default_rng(8)
    inits = {
        "W": rng.normal(size=(5, 4)).astype(np.float32),
        "W2": rng.normal(size=(5, 4)).astype(np.float32),
        **params(rng, 4, ""),
    }
    model = parse(
        f"""{HEAD}
        g (bool[] c, float[N, 5] x) => (float[N, 4] y) {{
          [gemm] h = Gemm (x, W)
          [sel] y = If (c) <then_branch: graph = t () => (float[N, 4] yt) {{
            {bn("yt", "h", "")}
          }}, else_branch: graph = e () => (float[N, 4] ye) {{
            ye = Gemm (x, W2)
          }}>
        }}""",
        inits,
    )
    x = rng.normal(size=(3, 5)).astype(np.float32)
    result = fold_scoped(model, [{"c": np.array(c), "x": x} for c in (True, False)], folded=0)
    assert entries(result)["BatchNormalization(yt)"] == (
        "left",
        "main/If 'sel'/then_branch",
        "before: Gemm 'gemm' is in main, outside the BN's graph main/If 'sel'/then_branch; "
        "after: its output 'yt' is a graph output",
    )


def test_bn_output_read_inside_a_branch():
    """Main-graph BN whose output an If branch reads: after a Relu it is left (the reader in
    the branch is no linear node); after a Gemm it folds into the Gemm, and the branch reads
    the same values under the same name."""
    rng = np.random.default_rng(9)
    inits = {"W": rng.normal(size=(5, 4)).astype(np.float32), **params(rng, 4, "")}
    for before, folded in (("Relu (x4)", 0), ("Gemm (x, W)", 1)):
        model = parse(
            f"""{HEAD}
            g (bool[] c, float[N, 5] x, float[N, 4] x4) => (float[N, 4] y) {{
              h = {before}
              {bn("t", "h", "")}
              [sel] y = If (c) <then_branch: graph = th () => (float[N, 4] yt) {{
                yt = Tanh (t)
              }}, else_branch: graph = el () => (float[N, 4] ye) {{
                ye = Sigmoid (t)
              }}>
            }}""",
            inits,
        )
        x = rng.normal(size=(3, 5)).astype(np.float32)
        x4 = rng.normal(size=(3, 4)).astype(np.float32)
        feeds = [{"c": np.array(c), "x": x, "x4": x4} for c in (True, False)]
        result = fold_scoped(model, feeds, folded=folded)
        status, where, reason = entries(result)["BatchNormalization(t)"]
        assert where == "main"
        if not folded:
            assert reason == (
                "before: comes after Relu 'Relu(h)', not Gemm/MatMul/Conv; "
                "after: 't' is read by If 'sel'"
            )


def test_ir3_model_new_constant_for_a_branch_goes_into_the_main_graph_and_its_inputs():
    """IR < 4 lists every initializer as a graph input: a new one (the Conv's bias) joins the
    main graph's, never a branch's (an If branch has no inputs)."""
    rng = np.random.default_rng(10)
    inits = {"W": rng.normal(size=(4, 3, 1, 1)).astype(np.float32), **params(rng, 4, "")}
    model = parse(
        f"""<ir_version: 3, opset_import: ["" : 8]>
        g (bool[] c, float[1, 3, 4, 4] x) => (float[1, 4, 4, 4] y) {{
          [sel] y = If (c) <then_branch: graph = th () => (float[1, 4, 4, 4] yt) {{
            ct = Conv (x, W)
            {bn("yt", "ct", "")}
          }}, else_branch: graph = el () => (float[1, 4, 4, 4] ye) {{
            ye = Conv (x, W)
          }}>
        }}""",
        inits,
    )
    for t in model.graph.initializer:  # IR 3: initializers are inputs too
        model.graph.input.append(
            onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        )
    x = rng.normal(size=(1, 3, 4, 4)).astype(np.float32)
    result = fold_scoped(model, [{"c": np.array(c), "x": x} for c in (True, False)])
    main_g = result.model.graph
    inits_after = {t.name for t in main_g.initializer}
    assert inits_after <= {i.name for i in main_g.input}
    assert all(len(g.initializer) == 0 for p, g in all_graphs(result.model) if p != "main")


# --- functions --------------------------------------------------------------------------------


def _function_model(body: str, calls: str, inputs: str, outputs: str, inits) -> onnx.ModelProto:
    return parse(
        f"""{FHEAD}
        g ({inputs}) => ({outputs}) {{
          {calls}
        }}
        {FDOM}
        {body}""",
        inits,
    )


def test_function_called_twice_with_constants_in_its_body():
    rng = np.random.default_rng(11)
    w = rng.normal(size=(5, 4)).astype(np.float32)
    p = bn_params(rng, 4)
    body = f"""Block (x) => (y) {{
          {const("W", w)}
          {const("s", p["s"])}
          {const("b", p["b"])}
          {const("mu", p["mu"])}
          {const("var", p["var"])}
          h = MatMul (x, W)
          n = BatchNormalization (h, s, b, mu, var)
          y = Relu (n)
        }}"""
    model = _function_model(
        body,
        "y1 = pkg.Block (x1)\n y2 = pkg.Block (x2)",
        "float[N, 5] x1, float[M, 5] x2",
        "float[N, 4] y1, float[M, 4] y2",
        {},
    )
    feeds = [
        {
            "x1": rng.normal(size=(3, 5)).astype(np.float32),
            "x2": rng.normal(size=(2, 5)).astype(np.float32),
        }
    ]
    result = fold_scoped(model, feeds)
    assert entries(result)["BatchNormalization(n)"] == ("folded", "function pkg::Block", None)
    ops = [n.op_type for n in result.model.functions[0].node]
    assert "BatchNormalization" not in ops and ops.count("Add") == 1


def test_function_called_twice_with_the_same_initializers_writes_them_once():
    rng = np.random.default_rng(12)
    inits = {"W": rng.normal(size=(5, 4)).astype(np.float32), **params(rng, 4, "")}
    body = f"""Block (x, W, s, b, mu, var) => (y) {{
          h = Gemm (x, W)
          {bn("y", "h", "")}
        }}"""
    model = _function_model(
        body,
        "y1 = pkg.Block (x1, W, s, b, mu, var)\n y2 = pkg.Block (x2, W, s, b, mu, var)",
        "float[N, 5] x1, float[N, 5] x2",
        "float[N, 4] y1, float[N, 4] y2",
        inits,
    )
    feeds = [{k: rng.normal(size=(3, 5)).astype(np.float32) for k in ("x1", "x2")}]
    result = fold_scoped(model, feeds)
    assert entries(result)["BatchNormalization(y)"][:2] == ("folded", "function pkg::Block")
    names = [t.name for t in result.model.graph.initializer]
    assert names == list(inits)  # W rewritten in place, no copy; the bias is in the body
    body_ops = [n.op_type for n in result.model.functions[0].node]
    assert body_ops == ["Constant", "Gemm"]


def test_function_calls_with_different_weights_or_runtime_parameters_are_left():
    rng = np.random.default_rng(13)
    inits = {
        "W": rng.normal(size=(5, 4)).astype(np.float32),
        **params(rng, 4, ""),
        **params(rng, 4, "2"),
    }
    body = f"""Block (x, W, s, b, mu, var) => (y) {{
          h = Gemm (x, W)
          {bn("y", "h", "")}
        }}"""
    different = _function_model(
        body,
        "y1 = pkg.Block (x1, W, s, b, mu, var)\n y2 = pkg.Block (x2, W, s2, b, mu, var)",
        "float[N, 5] x1, float[N, 5] x2",
        "float[N, 4] y1, float[N, 4] y2",
        inits,
    )
    feeds = [{k: rng.normal(size=(3, 5)).astype(np.float32) for k in ("x1", "x2")}]
    result = fold_scoped(different, feeds, folded=0)
    assert entries(result)["BatchNormalization(y)"][2] == (
        "parameter 's' is a function input whose calls pass different values, not a constant"
    )
    runtime = _function_model(
        body,
        "y1 = pkg.Block (x1, W, s_in, b, mu, var)",
        "float[N, 5] x1, float[4] s_in",
        "float[N, 4] y1",
        inits,
    )
    feeds = [{"x1": feeds[0]["x1"], "s_in": np.ones(4, np.float32)}]
    result = fold_scoped(runtime, feeds, folded=0)
    assert entries(result)["BatchNormalization(y)"] == (
        "left",
        "function pkg::Block",
        "parameter 's' is a function input, not a constant",
    )


def test_function_attribute_references_are_not_constants():
    rng = np.random.default_rng(14)
    w = rng.normal(size=(5, 4)).astype(np.float32)
    p = bn_params(rng, 4)
    consts = "\n".join(const(k, v) for k, v in {"W": w, **p}.items())
    cases = {
        # epsilon set by each call
        "eps": (
            "h = Gemm (x, W)",
            "y = BatchNormalization <epsilon: float = @eps> (h, s, b, mu, var)",
            0,
        ),
        # the Gemm's alpha set by each call
        "alpha": (
            "h = Gemm <alpha: float = @alpha> (x, W)",
            "y = BatchNormalization (h, s, b, mu, var)",
            0,
        ),
        # a weight computed with an attribute reference
        "perm": (
            "Wt = Transpose <perm: ints = @perm> (W)\n h = Gemm <transB = 1> (x, Wt)",
            "y = BatchNormalization (h, s, b, mu, var)",
            0,
        ),
        # a reference elsewhere in the body changes nothing
        "slope": (
            "g = Gemm (x, W)\n h = Identity (g)",
            "n = BatchNormalization (h, s, b, mu, var)\n y = LeakyRelu <alpha: float = @slope> (n)",
            1,
        ),
    }
    call_attrs = {
        "eps": "eps: float = 0.25",
        "alpha": "alpha: float = 0.5",
        "perm": "perm: ints = [1, 0]",
        "slope": "slope: float = 0.1",
    }
    for key, (first, second, folded) in cases.items():
        body = f"""Block <{key}> (x) => (y) {{
          {consts}
          {first}
          {second}
        }}"""
        model = _function_model(
            body,
            f"y1 = pkg.Block <{call_attrs[key]}> (x1)",
            "float[N, 5] x1",
            "float[N, 4] y1",
            {},
        )
        feeds = [{"x1": rng.normal(size=(3, 5)).astype(np.float32)}]
        result = fold_scoped(model, feeds, folded=folded)
        reason = result.report.entries[0].reason
        if key == "eps":
            assert reason == (
                "BatchNormalization 'BatchNormalization(y)': attribute 'epsilon' refers to the "
                "function's attribute 'eps' (its value is set by each call)"
            )
        elif key == "alpha":
            assert reason.startswith("before: Gemm 'Gemm(h)': attribute 'alpha' refers to")
        elif key == "perm":
            assert reason.startswith("before: weight 'Wt' is not a constant")


def test_function_body_shapes_come_from_its_calls():
    """MatMul -> BN in a function needs rank 2: known from the calls' argument types when they
    agree, unknown (the BN left) when one call passes rank 2 and another rank 3."""
    rng = np.random.default_rng(15)
    w = rng.normal(size=(5, 4)).astype(np.float32)
    p = bn_params(rng, 4)
    consts = "\n".join(const(k, v) for k, v in {"W": w, **p}.items())
    body = f"""Block (x) => (y) {{
          {consts}
          h = MatMul (x, W)
          y = BatchNormalization (h, s, b, mu, var)
        }}"""
    same = _function_model(
        body,
        "y1 = pkg.Block (x1)\n y2 = pkg.Block (x2)",
        "float[N, 5] x1, float[3, 5] x2",
        "float[N, 4] y1, float[3, 4] y2",
        {},
    )
    feeds = [
        {
            "x1": rng.normal(size=(2, 5)).astype(np.float32),
            "x2": rng.normal(size=(3, 5)).astype(np.float32),
        }
    ]
    fold_scoped(same, feeds)
    mixed = _function_model(
        body,
        "y1 = pkg.Block (x1)\n y2 = pkg.Block (x2)",
        "float[N, 5] x1, float[2, 4, 5] x2",
        "float[N, 4] y1, float[2, 4, 4] y2",
        {},
    )
    mixed_feeds = [
        {
            "x1": rng.normal(size=(2, 5)).astype(np.float32),
            "x2": rng.normal(size=(2, 4, 5)).astype(np.float32),
        }
    ]
    result = fold_scoped(mixed, mixed_feeds, folded=0)
    assert entries(result)["BatchNormalization(y)"][2] == (
        "before: rank of 'h' is unknown; after: its output 'y' is a graph output"
    )


def test_function_with_subgraph_in_its_body_and_a_nested_call():
    """A function whose body holds an If (BN in a branch) and is called from a Loop body."""
    rng = np.random.default_rng(16)
    inits = {"W": rng.normal(size=(5, 5)).astype(np.float32)}
    p = bn_params(rng, 5)
    consts = "\n".join(const(k, v) for k, v in p.items())
    model = parse(
        f"""{FHEAD}
        g (float[N, 5] x, int64[] M) => (float[N, 5] y) {{
          yes = Constant <value = bool {{1}}> ()
          [loop] y = Loop (M, yes, x) <body: graph = body (int64[] i, bool[] cin, float[N, 5] v)
                                                   => (bool[] cout, float[N, 5] vo) {{
            cout = Identity (cin)
            vo = pkg.Block (v, W, i)
          }}>
        }}
        {FDOM}
        Block (x, W, i) => (y) {{
          {consts}
          one = Constant <value = int64 {{1}}> ()
          odd = Less (i, one)
          [pick] y = If (odd) <then_branch: graph = th () => (float[N, 5] yt) {{
            h = Gemm (x, W)
            n = BatchNormalization (h, s, b, mu, var)
            yt = Tanh (n)
          }}, else_branch: graph = el () => (float[N, 5] ye) {{
            ye = Sigmoid (x)
          }}>
        }}""",
        inits,
    )
    feeds = [{"x": rng.normal(size=(2, 5)).astype(np.float32), "M": np.array(m)} for m in (1, 3)]
    result = fold_scoped(model, feeds)
    assert entries(result)["BatchNormalization(n)"] == (
        "folded",
        "function pkg::Block/If 'pick'/then_branch",
        None,
    )


def test_function_never_called_keeps_its_bn_with_the_reason():
    rng = np.random.default_rng(18)
    inits = {"W": rng.normal(size=(5, 4)).astype(np.float32)}
    model = _function_model(
        f"""Block (x, W, s, b, mu, var) => (y) {{
          h = Gemm (x, W)
          {bn("y", "h", "")}
        }}""",
        "y1 = Gemm (x1, W)",
        "float[N, 5] x1",
        "float[N, 4] y1",
        inits,
    )
    feeds = [{"x1": rng.normal(size=(3, 5)).astype(np.float32)}]
    result = fold_scoped(model, feeds, folded=0, cleanup=False)
    assert result.report.entries[0].reason == (
        "parameter 's' is a function input of a function the model never calls, not a constant"
    )
    # the cleanup then removes the function nothing calls, its BN with it
    cleaned = fold_model(model)
    assert not cleaned.model.functions and count_bn(cleaned.model) == 0


# --- shapes per scope and the cleanup after the fold --------------------------------------------


def test_shape_table_knows_subgraph_and_function_values():
    import onnx_ir as ir

    from bn_onnx.fold.validate import validate_model

    model = ir.serde.deserialize_model(_depth3(np.random.default_rng(19)))
    table = validate_model(model)
    nodes = {n.outputs[0].name: n for n in ir.traversal.RecursiveGraphIterator(model.graph)}
    assert table.shape(nodes["h2"].outputs[0]) == (None, 5)  # N is symbolic
    assert table.elem_type(nodes["h1"].outputs[0]) == onnx.TensorProto.FLOAT
    assert table.shape(nodes["vout"].outputs[0]) == (None, 5)
    assert table.shape(nodes["vout"].inputs[0]) == ()  # `small`, a bool scalar
    fn = ir.load(CASES / "bn_in_local_function.onnx")
    table = validate_model(fn)
    body = next(iter(fn.functions.values()))
    assert [table.shape(n.outputs[0]) for n in body] == [(1, 4, 5, 5), (1, 4, 5, 5)]
    # the same name in the main graph and in a body are different values
    assert table.shape(body.inputs[0]) == (1, 3, 5, 5)


def test_cleanup_after_the_fold_keeps_every_scope_valid_and_equal():
    """The cleanup pass (which `fold` will run next) accepts what the scoped folds leave:
    subgraph initializers, Constant nodes in function bodies, unused function inputs."""
    import onnx_ir as ir

    from bn_onnx.fold.cleanup import cleanup

    rng = np.random.default_rng(20)
    x4 = rng.normal(size=(1, 3, 5, 5)).astype(np.float32)
    x2 = rng.normal(size=(3, 5)).astype(np.float32)
    cases = [
        (
            onnx.load(CASES / "bn_in_if_branches.onnx"),
            [{"cond": np.array(c), "x": x4} for c in (True, False)],
        ),
        (onnx.load(CASES / "bn_in_local_function.onnx"), [{"x": x4}]),
        (_depth3(rng), [{"x": x2, "M": np.array(3), "c": np.array(c)} for c in (True, False)]),
    ]
    for model, feeds in cases:
        work = ir.serde.deserialize_model(model)
        folded = fold_model(work).model
        cleanup(folded)
        out = ir.serde.serialize_model(folded)
        onnx.checker.check_model(out, full_check=True)
        assert count_bn(out) == 0 and signatures(out) == signatures(model)
        for f in feeds:
            for w, g in zip(run_ort(model, f), run_ort(out, f), strict=True):
                np.testing.assert_allclose(g, w, atol=ATOL, rtol=RTOL)


# --- the report and the CLI ---------------------------------------------------------------------


def test_inspect_and_fold_cli_say_where(tmp_path, capsys):
    src = CASES / "bn_in_if_branches.onnx"
    assert main(["inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "BatchNormalization: 2, 2 foldable" in text
    assert "foldable  BatchNormalization(y_then)  in main/If 'If(y)'/then_branch" in text
    assert main(["inspect", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {b["where"] for b in info["batch_norm"]} == {
        "main/If 'If(y)'/then_branch",
        "main/If 'If(y)'/else_branch",
    }
    fn = CASES / "bn_in_local_function.onnx"
    out, rep = tmp_path / "f.onnx", tmp_path / "r.json"
    assert main(["fold", str(fn), "-o", str(out), "--report", str(rep)]) == 0
    text = capsys.readouterr().out
    assert "folded 1 of 1 BatchNormalization" in text
    assert "folded  BatchNormalization(y)  in function pkg.blocks::ConvBn  preceding" in text
    report = json.loads(rep.read_text())
    assert report["bn"][0]["where"] == "function pkg.blocks::ConvBn"
    assert main(["inspect", str(fn)]) == 0
    assert "pkg.blocks::ConvBn (x, W, s, b, m, v) => (y)" in capsys.readouterr().out


def test_inspect_model_lists_bn_in_every_scope():
    infos = inspect_model(_depth3(np.random.default_rng(17)))
    assert [(i.foldable, i.where.split("/")[-1]) for i in infos] == [
        (True, "then_branch"),
        (True, "else_branch"),
    ]


# --- property test ------------------------------------------------------------------------------


def _wrap(levels: list[str], block, vin: str, out: str, n: int, depth: int = 1) -> list[str]:
    """Lines computing `out` from `vin`: `block(vin, out)` inside the scopes `levels`
    (outermost first). An If takes the block in one branch and Neg in the other."""
    if not levels:
        return block(vin, out)
    level, rest = levels[0], levels[1:]
    d = depth
    if level == "If":
        inner = "\n".join(_wrap(rest, block, vin, f"ot{d}", n, d + 1))
        return [
            f"""{out} = If (c) <then_branch: graph = t{d} () => (float[N, {n}] ot{d}) {{
              {inner}
            }}, else_branch: graph = e{d} () => (float[N, {n}] oe{d}) {{
              oe{d} = Neg ({vin})
            }}>"""
        ]
    inner = "\n".join(_wrap(rest, block, f"v{d}", f"ol{d}", n, d + 1))
    return [
        f"yes{d} = Constant <value = bool {{1}}> ()",
        f"""{out} = Loop (M, yes{d}, {vin}) <body: graph = b{d} (int64[] i{d}, bool[] c{d},
                                                          float[N, {n}] v{d})
                                                 => (bool[] co{d}, float[N, {n}] ol{d}) {{
              co{d} = Identity (c{d})
              {inner}
            }}>""",
    ]


@st.composite
def scoped_models(draw):
    """Gemm/MatMul(+Add) before or after a BN, inside a random nest of If and Loop bodies,
    perhaps inside a model-local function; parameters from main initializers, main Constant
    nodes or Constant nodes beside the BN (always the last inside a function)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    n = draw(st.integers(2, 5))
    kind = draw(st.sampled_from(["Gemm", "MatMul", "MatMulAdd"]))
    before = draw(st.booleans())  # linear -> BN -> Tanh, else Tanh -> BN -> linear
    in_function = draw(st.booleans())
    levels = draw(
        st.lists(st.sampled_from(["If", "Loop"]), min_size=0 if in_function else 1, max_size=3)
    )
    arrays = {"W": rng.normal(size=(n, n)).astype(np.float32), **bn_params(rng, n)}
    if kind == "MatMulAdd":
        arrays["B"] = rng.normal(size=(n,)).astype(np.float32)
    inits: dict[str, np.ndarray] = {}
    outer: list[str] = []
    local: list[str] = []
    for name, a in arrays.items():
        place = "local" if in_function else draw(st.sampled_from(["init", "const", "local"]))
        if place == "init":
            inits[name] = a
        else:
            (outer if place == "const" else local).append(const(name, a))

    def linear(src: str, dst: str) -> list[str]:
        if kind == "Gemm":
            return [f"{dst} = Gemm ({src}, W)"]
        if kind == "MatMul":
            return [f"{dst} = MatMul ({src}, W)"]
        return [f"mm = MatMul ({src}, W)", f"{dst} = Add (mm, B)"]

    def block(vin: str, out: str) -> list[str]:
        if before:
            return [
                *local,
                *linear(vin, "h"),
                "z = BatchNormalization (h, s, b, mu, var)",
                f"{out} = Tanh (z)",
            ]
        return [
            *local,
            f"t = Tanh ({vin})",
            "z = BatchNormalization (t, s, b, mu, var)",
            *linear("z", out),
        ]

    lines = "\n".join(outer + _wrap(levels, block, "v", "o", n))
    if not in_function:
        return (
            f"""{HEAD}
        g (float[N, {n}] v, bool[] c, int64[] M) => (float[N, {n}] o) {{
          {lines}
        }}""",
            inits,
            n,
        )
    return (
        f"""{FHEAD}
        g (float[N, {n}] x, bool[] c, int64[] M) => (float[N, {n}] y) {{
          y = pkg.Blk (x, c, M)
        }}
        {FDOM}
        Blk (v, c, M) => (o) {{
          {lines}
        }}""",
        inits,
        n,
    )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_bn_in_random_scopes_folds_and_computes_the_same(data):
    text, inits, n = data.draw(scoped_models())
    model = parse(text, inits)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, n)).astype(np.float32)
    name = "v" if not model.functions else "x"
    feeds = [{name: x, "c": np.array(c), "M": np.array(m)} for c in (True, False) for m in (1, 2)]
    result = fold_scoped(model, feeds)
    assert all(e.where != "main" for e in result.report.entries)
    for f in feeds[:2]:  # onnx.reference as a second, independent oracle
        want = ReferenceEvaluator(model).run(None, f)[0]
        got = ReferenceEvaluator(result.model).run(None, f)[0]
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)
