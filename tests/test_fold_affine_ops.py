"""Rule 16 (issue 12, 2g): per-channel Mul/Add/Sub/Div chains by constants fold like a BN.

Each model runs in onnxruntime before and after the fold (`fold_and_compare`); the report
lists each chain as a site of kind "Mul/Add chain" with its nodes. FrozenBatchNorm2d is
written here as torchvision writes it (torchvision may not import in CI) and exported with
both torch exporters.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from fold_testing import bn_params, fold_and_compare, model_from_text, op_count, run_ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bn_onnx.fold import fold_model

HEAD = '<ir_version: 8, opset_import: ["" : 18]>'
KIND = "Mul/Add chain"
ARITH = ("Mul", "Add", "Sub", "Div")


def chain_entries(result):
    return [e for e in result.report.entries if e.kind == KIND]


def arith_count(model: onnx.ModelProto) -> int:
    return sum(op_count(model, op) for op in ARITH)


def _node_texts(model: onnx.ModelProto) -> list[str]:
    return [onnx.printer.to_text(n) for n in model.graph.node]


def conv_inits(rng, c_in=3, c_out=4, k=3):
    return {
        "W": rng.normal(0, 0.4, (c_out, c_in, k, k)).astype(np.float32),
        "B": rng.normal(0, 0.5, c_out).astype(np.float32),
    }


def x4(rng, c=3, hw=6, n=2):
    return rng.normal(0.2, 1.3, (n, c, hw, hw)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# FrozenBatchNorm2d from both torch exporters


def _frozen_net(torch, conv_bias: bool):
    nn = torch.nn

    class FrozenBatchNorm2d(nn.Module):
        """torchvision.ops.misc.FrozenBatchNorm2d: fixed statistics and affine parameters."""

        def __init__(self, num_features: int, eps: float = 1e-5):
            super().__init__()
            self.eps = eps
            self.register_buffer("weight", torch.ones(num_features))
            self.register_buffer("bias", torch.zeros(num_features))
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))

        def forward(self, x):
            w = self.weight.reshape(1, -1, 1, 1)
            b = self.bias.reshape(1, -1, 1, 1)
            rv = self.running_var.reshape(1, -1, 1, 1)
            rm = self.running_mean.reshape(1, -1, 1, 1)
            scale = w * (rv + self.eps).rsqrt()
            bias = b - rm * scale
            return x * scale + bias

    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=conv_bias),
        FrozenBatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 1),
        FrozenBatchNorm2d(6),
    )
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, FrozenBatchNorm2d):
                n = m.weight.numel()
                m.weight.copy_(torch.randn(n, generator=gen) * 0.5 + 1.0)
                m.weight[0] = -0.7  # a negative scale
                m.bias.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_mean.copy_(torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) * 2.5 + 0.25)
    return net.eval()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript", "torchscript-unfolded"])
@pytest.mark.parametrize("conv_bias", [True, False])
def test_frozen_batchnorm2d_from_both_torch_exporters_folds_into_the_convs(
    tmp_path, exporter, conv_bias
):
    torch = pytest.importorskip("torch")
    from bn_onnx.export import _quiet_torch_exporter, _reuse_torchlib_registry

    net = _frozen_net(torch, conv_bias)
    x = torch.randn(2, 3, 10, 10)
    path = tmp_path / "frozen.onnx"
    with _quiet_torch_exporter(), _reuse_torchlib_registry(), torch.no_grad():
        if exporter == "dynamo":
            torch.onnx.export(net, (x,), str(path), dynamo=True, optimize=False, input_names=["x"])
        else:  # unfolded: rsqrt as Div(1, Sqrt(Add(Reshape(var), eps))) and so on
            torch.onnx.export(
                net,
                (x,),
                str(path),
                dynamo=False,
                input_names=["x"],
                opset_version=18,
                do_constant_folding=exporter == "torchscript",
            )
        expected = net(x).numpy()
    model = onnx.load(str(path))
    assert op_count(model, "Mul") >= 2 and op_count(model, "Add") >= 2
    result = fold_and_compare(model, {"x": x.numpy()})
    chains = chain_entries(result)
    assert [e.status for e in chains] == ["folded", "folded"], result.report.to_dict()
    assert [e.target_op for e in chains] == ["Conv", "Conv"]
    assert all(" -> " in e.node for e in chains)  # the report names the chain's nodes
    folded = result.model
    assert arith_count(folded) == 0, onnx.printer.to_text(folded.graph)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "Conv"]
    got = run_ort(folded, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Caffe2 Scale layers, decomposed BN, operand orders, scalars


def test_caffe2_scale_after_bn_folds_into_the_conv():
    rng = np.random.default_rng(50)
    inits = {**conv_inits(rng), **bn_params(rng, 4)}
    inits["gamma"] = rng.normal(1, 0.5, (4, 1, 1)).astype(np.float32)
    inits["beta"] = rng.normal(0, 0.5, (4, 1, 1)).astype(np.float32)
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 3, 6, 6] x) => (float[N, 4, 4, 4] y) {{
          c = Conv (x, W, B)
          t = BatchNormalization (c, s, b, mu, var)
          m = Mul (t, gamma)
          a = Add (m, beta)
          y = Relu (a)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": x4(rng)})
    (chain,) = chain_entries(result)
    # the Conv's output took the BN's name when the BN folded: the Conv is now Conv(t)
    assert (chain.node, chain.status, chain.target) == ("Mul(m) -> Add(a)", "folded", "Conv(t)")
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Relu"]


def test_caffe2_scale_after_a_bn_that_cannot_fold_merges_into_it():
    rng = np.random.default_rng(51)
    inits = {**bn_params(rng, 4)}
    inits["gamma"] = rng.normal(1, 0.5, (1, 4, 1, 1)).astype(np.float32)
    inits["beta"] = rng.normal(0, 0.5, (1, 4, 1, 1)).astype(np.float32)
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 4, 5, 5] x) => (float[N, 4, 5, 5] y) {{
          r = Relu (x)
          t = BatchNormalization (r, s, b, mu, var)
          m = Mul (gamma, t)
          a = Add (beta, m)
          y = Relu (a)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": x4(rng, c=4, hw=5)}, folded=0)
    (chain,) = chain_entries(result)
    assert (chain.status, chain.direction, chain.target) == (
        "folded",
        "merged",
        "BatchNormalization(t)",
    )
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "BatchNormalization", "Relu"]


def test_decomposed_bn_with_constant_subgraphs_folds_into_the_gemm():
    rng = np.random.default_rng(52)
    p = bn_params(rng, 5)
    inits = {
        "W": rng.normal(size=(4, 5)).astype(np.float32),
        "C": rng.normal(size=5).astype(np.float32),
    }
    inits.update(p)
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 4] x) => (float[N, 5] y) {{
          h = Gemm (x, W, C)
          eps = Constant <value = float {{1e-5}}> ()
          ve = Add (var, eps)
          sd = Sqrt (ve)
          d = Sub (h, mu)
          n = Div (d, sd)
          m = Mul (n, s)
          y = Add (m, b)
        }}""",
        inits,
    )
    x = rng.normal(size=(7, 4)).astype(np.float32)
    result = fold_and_compare(model, {"x": x})
    (chain,) = chain_entries(result)
    assert chain.node == "Sub(d) -> Div(n) -> Mul(m) -> Add(y)" and chain.target_op == "Gemm"
    assert [n.op_type for n in result.model.graph.node] == ["Gemm"]
    # the oracle: the BN formula in float64
    h = x.astype(np.float64) @ inits["W"] + inits["C"]
    want = (h - p["mu"]) / np.sqrt(p["var"].astype(np.float64) + 1e-5) * p["s"] + p["b"]
    np.testing.assert_allclose(run_ort(result.model, {"x": x})[0], want, atol=1e-5, rtol=1e-4)


def test_input_normalization_by_sub_and_div_folds_into_the_following_matmul():
    rng = np.random.default_rng(53)
    inits = {
        "mean": rng.normal(size=(1, 4)).astype(np.float32),
        "std": rng.uniform(0.5, 2, size=(4,)).astype(np.float32),
        "W": rng.normal(size=(4, 3)).astype(np.float32),
    }
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 4] x) => (float[N, 3] y) {{
          d = Sub (x, mean)
          n = Div (d, std)
          y = MatMul (n, W)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": rng.normal(size=(6, 4)).astype(np.float32)})
    (chain,) = chain_entries(result)
    assert (chain.status, chain.direction, chain.target_op) == ("folded", "following", "MatMul")
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add"]


def test_sub_with_the_constant_first_has_scale_minus_one():
    rng = np.random.default_rng(54)
    inits = {**conv_inits(rng), "k": rng.normal(size=(4, 1, 1)).astype(np.float32)}
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 3, 6, 6] x) => (float[N, 4, 4, 4] y) {{
          c = Conv (x, W, B)
          y = Sub (k, c)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": x4(rng)})
    assert [e.status for e in chain_entries(result)] == ["folded"]
    w = onnx.numpy_helper.to_array(result.model.graph.initializer[0])
    np.testing.assert_array_equal(w, -inits["W"])  # c - x: every weight negated, exactly


def test_scalar_mul_and_add_fold_into_any_channel_count():
    rng = np.random.default_rng(55)
    inits = {
        **conv_inits(rng),
        "two": np.array(2.5, np.float32),
        "one": np.array([1.25], np.float32),
        "W2": rng.normal(size=(4, 3)).astype(np.float32),
    }
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 3, 6, 6] x, float[N, 4] v) => (float[N, 4, 4, 4] y, float[N, 3] z) {{
          c = Conv (x, W, B)
          m = Mul (two, c)
          y = Add (m, one)
          r = Relu (v)
          s = Div (r, two)
          z = MatMul (s, W2)
        }}""",
        inits,
    )
    feeds = {"x": x4(rng), "v": rng.normal(size=(5, 4)).astype(np.float32)}
    result = fold_and_compare(model, feeds)
    chains = chain_entries(result)
    assert [(e.status, e.target_op) for e in chains] == [("folded", "Conv"), ("folded", "MatMul")]
    assert arith_count(result.model) == 0


def test_scalar_chains_fold_into_a_rank3_matmul_along_its_last_axis():
    # attention-style q = (x @ Wq + bq) * 0.125, and a scalar shift before a rank-3 MatMul
    rng = np.random.default_rng(63)
    inits = {
        "Wq": rng.normal(size=(6, 4)).astype(np.float32),
        "bq": rng.normal(size=(4,)).astype(np.float32),
        "W2": rng.normal(size=(4, 3)).astype(np.float32),
        "eighth": np.array(0.125, np.float32),
        "half": np.array([0.5], np.float32),
    }
    model = model_from_text(
        f"""{HEAD}
        g (float[N, L, 6] x) => (float[N, L, 3] y) {{
          h = MatMul (x, Wq)
          hb = Add (h, bq)
          q = Mul (hb, eighth)
          r = Relu (q)
          s = Sub (r, half)
          y = MatMul (s, W2)
        }}""",
        inits,
    )
    x = rng.normal(size=(2, 5, 6)).astype(np.float32)
    result = fold_and_compare(model, {"x": x})
    chains = chain_entries(result)
    assert [(e.status, e.direction) for e in chains] == [
        ("folded", "preceding"),
        ("folded", "following"),
    ]
    assert [n.op_type for n in result.model.graph.node] == [
        "MatMul",
        "Add",
        "Relu",
        "MatMul",
        "Add",
    ]


def test_a_lone_bias_add_after_matmul_is_the_matmuls_and_no_site():
    rng = np.random.default_rng(64)
    inits = {
        "W": rng.normal(size=(6, 4)).astype(np.float32),
        "b": rng.normal(size=(4,)).astype(np.float32),
    }
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 6] x) => (float[N, 4] y) {{
          h = MatMul (x, W)
          y = Add (h, b)
        }}""",
        inits,
    )
    result = fold_model(model)
    assert result.report.entries == []
    assert _node_texts(result.model) == _node_texts(model)


def test_shape_only_reader_of_an_inner_value_does_not_block_the_chain():
    rng = np.random.default_rng(56)
    inits = {**conv_inits(rng), "k": rng.normal(size=(1, 4, 1, 1)).astype(np.float32)}
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 3, 6, 6] x) => (float[N, 4, 4, 4] y, int64[4] s) {{
          c = Conv (x, W, B)
          m = Mul (c, k)
          s = Shape (m)
          y = Add (m, k)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": x4(rng)})
    assert [e.node for e in chain_entries(result)] == ["Mul(m) -> Add(y)"]
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Shape"]


def test_chain_before_a_bn_merges_into_it():
    rng = np.random.default_rng(57)
    inits = {**bn_params(rng, 4), "k": rng.normal(size=(4, 1, 1)).astype(np.float32)}
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 4, 5, 5] x) => (float[N, 4, 5, 5] y) {{
          r = Relu (x)
          m = Mul (r, k)
          a = Add (m, k)
          y = BatchNormalization (a, s, b, mu, var)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": x4(rng, c=4, hw=5)}, folded=0)
    (chain,) = chain_entries(result)
    assert (chain.status, chain.direction) == ("folded", "merged")
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "BatchNormalization"]


# --------------------------------------------------------------------------------------------
# What is not a site, and sites that are left with a reason


NOT_SITES = {
    # both inputs dynamic
    "dynamic second input": ("float[N, 4, 3, 3] v", "y = Mul (c, v)", {}, "float[N, 4, 3, 3]"),
    # a (4, 1, 1, 1) constant on a rank-4 x whose batch dim is symbolic: it could expand N
    "broadcast along the symbolic batch": ("", "y = Mul (c, k)", {"k": (4, 1, 1, 1)}, None),
    # a constant of higher rank than x: the output has rank 5
    "constant of higher rank": ("", "y = Add (c, k)", {"k": (1, 1, 4, 1, 1)}, "float[1,N,4,3,3]"),
    # (1, 4, 3, 1) varies along channels and rows
    "constant varying along two axes": ("", "y = Mul (c, k)", {"k": (1, 4, 3, 1)}, None),
    # c / x is not affine
    "constant divided by x": ("", "y = Div (k, c)", {"k": (4, 1, 1)}, None),
}


@pytest.mark.parametrize("case", sorted(NOT_SITES))
def test_what_is_not_a_per_channel_affine_map_is_not_a_site(case):
    rng = np.random.default_rng(58)
    extra_input, line, consts, out_type = NOT_SITES[case]
    inits = conv_inits(rng, k=4)
    inits.update({k: rng.uniform(0.5, 2, s).astype(np.float32) for k, s in consts.items()})
    sig = "float[N, 3, 6, 6] x" + (f", {extra_input}" if extra_input else "")
    model = model_from_text(
        f"""{HEAD}
        g ({sig}) => ({out_type or "float[N, 4, 3, 3]"} y) {{
          c = Conv (x, W, B)
          {line}
        }}""",
        inits,
    )
    result = fold_model(model)
    assert chain_entries(result) == []
    assert _node_texts(result.model) == _node_texts(model)


def test_shape_expanding_broadcast_is_not_a_site():
    rng = np.random.default_rng(59)
    inits = {"W": rng.normal(size=(4, 1)).astype(np.float32), "k": np.ones((1, 3), np.float32)}
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 4] x) => (float[N, 3] y) {{
          h = MatMul (x, W)
          y = Mul (h, k)
        }}""",
        inits,
    )
    result = fold_model(model)
    assert chain_entries(result) == []
    assert op_count(result.model, "Mul") == 1


def test_integer_arithmetic_is_not_a_site():
    model = model_from_text(
        f"""{HEAD}
        g (int64[N, 4] x) => (int64[N, 4] y) {{
          k = Constant <value = int64[4] {{1, 2, 3, 4}}> ()
          m = Mul (x, k)
          y = Add (m, k)
        }}"""
    )
    result = fold_model(model)
    assert chain_entries(result) == []
    assert op_count(result.model, "Mul") == 1 and op_count(result.model, "Add") == 1


def test_per_channel_chain_left_is_reported_with_reasons():
    rng = np.random.default_rng(60)
    inits = {"k": rng.normal(size=(1, 4, 1, 1)).astype(np.float32)}
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 4, 5, 5] x) => (float[N, 4, 5, 5] y) {{
          r = Relu (x)
          m = Mul (r, k)
          a = Add (m, k)
          y = Relu (a)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": x4(rng, c=4, hw=5)})
    (chain,) = chain_entries(result)
    assert chain.status == "left" and chain.node == "Mul(m) -> Add(a)"
    assert chain.reason == (
        "before: comes after Relu 'Relu(r)', not Gemm/MatMul/Conv;"
        " after: 'a' is read by Relu 'Relu(y)'"
    )
    assert arith_count(result.model) == 2


def test_scalar_chain_left_is_not_reported():
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 4] x) => (float[N, 4] y) {{
          r = Relu (x)
          k = Constant <value = float {{0.5}}> ()
          m = Mul (r, k)
          y = Relu (m)
        }}"""
    )
    result = fold_and_compare(model, {"x": np.ones((2, 4), np.float32)})
    assert result.report.entries == []
    assert op_count(result.model, "Mul") == 1


def test_chain_along_another_axis_than_the_linear_nodes_is_left():
    rng = np.random.default_rng(61)
    inits = {
        "W": rng.normal(size=(4, 4)).astype(np.float32),
        "rows": rng.normal(size=(4, 1)).astype(np.float32),  # per row of a (4, 4) batch
    }
    model = model_from_text(
        f"""{HEAD}
        g (float[4, 4] x) => (float[4, 4] y) {{
          h = Gemm (x, W)
          y = Mul (h, rows)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": rng.normal(size=(4, 4)).astype(np.float32)})
    (chain,) = chain_entries(result)
    assert chain.status == "left"
    assert (
        "the Mul/Add chain is per channel of axis 0 of the output of Gemm 'Gemm(h)', whose"
        " outputs are on axis 1" in chain.reason
    )


def test_constants_varying_along_different_axes_make_two_chains():
    rng = np.random.default_rng(62)
    inits = {
        **conv_inits(rng),
        "kc": rng.normal(size=(4, 1, 1)).astype(np.float32),
        "kw": rng.normal(size=(4,)).astype(np.float32),  # along the last axis (width 4)
    }
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 3, 6, 6] x) => (float[N, 4, 4, 4] y) {{
          c = Conv (x, W, B)
          m = Mul (c, kc)
          y = Add (m, kw)
        }}""",
        inits,
    )
    result = fold_and_compare(model, {"x": x4(rng)})
    chains = chain_entries(result)
    assert [(e.node, e.status) for e in chains] == [("Mul(m)", "folded"), ("Add(y)", "left")]
    # (the Conv is nameless: its label follows its output's name, now 'm')
    assert (
        "is per channel of axis 3 of the output of Conv 'Conv(m)', whose outputs are on axis 1"
        in chains[1].reason
    )


# --------------------------------------------------------------------------------------------
# The CLI: summary, JSON report, inspect


def test_cli_fold_and_inspect_count_and_list_the_chains(tmp_path, capsys):
    import json

    from bn_onnx.cli import main

    rng = np.random.default_rng(65)
    inits = {**conv_inits(rng), **bn_params(rng, 4)}
    inits["k"] = rng.normal(size=(1, 4, 1, 1)).astype(np.float32)
    model = model_from_text(
        f"""{HEAD}
        g (float[N, 3, 6, 6] x) => (float[N, 4, 4, 4] y) {{
          c = Conv (x, W, B)
          t = BatchNormalization (c, s, b, mu, var)
          r = Relu (t)
          m = Mul (r, k)
          y = Add (m, k)
        }}""",
        inits,
    )
    src, out, rep = tmp_path / "m.onnx", tmp_path / "f.onnx", tmp_path / "r.json"
    onnx.save(model, src)
    assert main(["fold", str(src), "-o", str(out), "--report", str(rep)]) == 0
    text = capsys.readouterr().out
    assert "folded 1 of 1 BatchNormalization nodes, 0 of 1 Mul/Add chains:" in text
    assert "left    Mul(m) -> Add(y): before: comes after Relu" in text
    report = json.loads(rep.read_text())
    assert (report["n_bn"], report["n_folded"], report["n_left"]) == (1, 1, 0)
    assert report["other_sites"] == {KIND: {"n": 1, "folded": 0}}
    assert [(b["kind"], b["status"]) for b in report["bn"]] == [
        ("BatchNormalization", "folded"),
        (KIND, "left"),
    ]
    assert main(["inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "BatchNormalization: 1, 1 foldable" in text
    assert "Mul/Add chain: 1, 0 foldable" in text


# --------------------------------------------------------------------------------------------
# Property: random chains of any constant shape, sites or not, never change an output


# Constant shapes against x of shape (N, 4, 3, 5): per channel, per row, per column, scalar,
# along two axes (not a site), and a full (4, 3, 5) tensor (not a site).
SHAPES = [(4, 1, 1), (1, 4, 1, 1), (3, 1), (5,), (), (1,), (1, 4, 3, 1), (4, 3, 5)]
OPS = ["Mul", "Add", "Sub", "Div"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_chains_after_a_conv_never_change_an_output(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    inits = {
        "W": rng.normal(0, 0.4, (4, 3, 1, 1)).astype(np.float32),
        "B": rng.normal(size=4).astype(np.float32),
    }
    lines = ["c = Conv (x, W, B)"]
    cur = "c"
    for i in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(OPS))
        shape = data.draw(st.sampled_from(SHAPES))
        k = f"k{i}"
        inits[k] = (rng.uniform(0.5, 2, shape) * rng.choice([-1, 1])).astype(np.float32)
        first = data.draw(st.booleans()) and op != "Div"
        lines.append(f"v{i} = {op} ({k}, {cur})" if first else f"v{i} = {op} ({cur}, {k})")
        cur = f"v{i}"
        if data.draw(st.integers(0, 4)) == 0:  # an inner value read by a shape-only reader
            lines.append(f"s{i} = Shape ({cur})")
    tail = data.draw(st.sampled_from(["Relu", "Identity", "Gemm"]))
    if tail == "Gemm":
        inits["G"] = rng.normal(size=(60, 2)).astype(np.float32)
        lines += [f"fl = Flatten ({cur})", "y = Gemm (fl, G)"]
        out = "float[2, 2] y"
    else:
        lines.append(f"y = {tail} ({cur})")
        out = "float[2, 4, 3, 5] y"
    body = "\n          ".join(lines)
    model = model_from_text(
        f"""{HEAD}
        g (float[2, 3, 3, 5] x) => ({out}) {{
          {body}
        }}""",
        inits,
    )
    x = rng.normal(size=(2, 3, 3, 5)).astype(np.float32)
    result = fold_and_compare(model, {"x": x})
    # a chain that is a site and folds leaves none of its nodes
    for e in chain_entries(result):
        assert e.status == "left" or e.target_op in ("Conv", "Gemm", "BatchNormalization")
