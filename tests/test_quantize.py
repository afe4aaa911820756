"""`bn-onnx quantize`: the quantization-aware fold, the CPU-dependent kernels, the INT8 proof,
QDQ models in, and INT8 models in run / Predictor / serve."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bn_onnx.cli import main
from bn_onnx.fold import fold_model, quant_guard
from bn_onnx.quantize import choose_kernels, cpu_flags
from bn_onnx.quantize import kernels as kernels_module
from bn_onnx.quantize.proof import prove, render, sqnr_db
from bn_onnx.runtime import Predictor

N_IN, HIDDEN, N_OUT = 32, 16, 4


def _bn(name: str, x: str, y: str, p: dict[str, np.ndarray]) -> tuple[onnx.NodeProto, list]:
    names = [f"{name}.{k}" for k in ("s", "b", "mu", "var")]
    inits = [
        numpy_helper.from_array(p[k], n)
        for k, n in zip(("s", "b", "mu", "var"), names, strict=True)
    ]
    return helper.make_node("BatchNormalization", [x, *names], [y], name=name), inits


def tiny_mlp(var: np.ndarray, seed: int = 0, mean: float = 4.0) -> onnx.ModelProto:
    """BN(input, variances `var`, means about `mean`) -> Gemm -> BN -> Relu -> Gemm -> logits,
    float32."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    in_bn = {
        "s": np.ones(N_IN, f32),
        "b": np.zeros(N_IN, f32),
        "mu": (mean + rng.normal(0, 1, N_IN) * (mean != 0)).astype(f32),
        "var": var.astype(f32),
    }
    hid_bn = {
        "s": rng.uniform(0.5, 1.5, HIDDEN).astype(f32),
        "b": rng.normal(0, 0.3, HIDDEN).astype(f32),
        "mu": rng.normal(0, 0.3, HIDDEN).astype(f32),
        "var": rng.uniform(0.5, 2, HIDDEN).astype(f32),
    }
    n0, i0 = _bn("in_bn", "input", "z", in_bn)
    n1, i1 = _bn("hid_bn", "h", "hn", hid_bn)
    w = {
        "W1": rng.normal(0, 0.4, (N_IN, HIDDEN)).astype(f32),
        "b1": rng.normal(0, 0.1, HIDDEN).astype(f32),
        "W2": rng.normal(0, 0.4, (HIDDEN, N_OUT)).astype(f32),
        "b2": rng.normal(0, 0.1, N_OUT).astype(f32),
    }
    nodes = [
        n0,
        helper.make_node("Gemm", ["z", "W1", "b1"], ["h"], name="gemm1"),
        n1,
        helper.make_node("Relu", ["hn"], ["a"], name="relu"),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["logits"], name="gemm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", N_IN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", N_OUT])],
        [*i0, *i1, *(numpy_helper.from_array(v, k) for k, v in w.items())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    model.metadata_props.add(key="bn_onnx.task", value="classification")
    onnx.checker.check_model(model, full_check=True)
    return model


def _uneven_var() -> np.ndarray:
    var = np.ones(N_IN)
    var[0] = 1e-4  # a near-constant feature: its row of W1 grows 100x when folded
    return var


def _inputs(model: onnx.ModelProto, n: int, seed: int = 1) -> np.ndarray:
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    x = init["in_bn.mu"] + np.sqrt(init["in_bn.var"]) * rng.standard_normal((n, N_IN))
    return x.astype(np.float32)


def _run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _entry(result, node: str):
    return next(e for e in result.report.entries if e.node == node)


# --- the quantization-aware fold --------------------------------------------------------------


def test_forward_fold_guard_keeps_the_bn_that_widens_the_next_weight() -> None:
    model = tiny_mlp(_uneven_var())
    full = fold_model(model)
    guarded = fold_model(model, max_row_range_growth=2.0)
    assert full.report.n_folded == 2
    kept = _entry(guarded, "in_bn")
    assert kept.status == "left"
    assert "quantization-aware" in kept.reason and "past the bound 2x" in kept.reason
    assert _entry(guarded, "hid_bn").status == "folded"  # backwards into gemm1: not guarded
    assert _entry(guarded, "hid_bn").direction == "preceding"
    x = _inputs(model, 64)
    np.testing.assert_allclose(_run(guarded.model, x), _run(model, x), rtol=1e-4, atol=1e-5)


def test_forward_fold_guard_folds_an_even_scale() -> None:
    # Every input row scaled alike: the weight's range is unchanged; centred inputs of one
    # spread: so is the activation range.
    guarded = fold_model(tiny_mlp(np.full(N_IN, 0.25), mean=0.0), max_row_range_growth=2.0)
    assert guarded.report.n_folded == 2


def test_weight_range_is_mean_max_over_rms_per_output_channel() -> None:
    w = np.array([[3.0, 1.0], [4.0, 1.0]])  # columns are the output channels (axis 1)
    want = np.mean([4.0 / np.sqrt((9 + 16) / 2), 1.0])
    assert quant_guard.weight_range(w, 1) == pytest.approx(want, rel=1e-12)
    assert quant_guard.range_growth(w, np.full((2, 1), 7.0), 1) == pytest.approx(1.0, rel=1e-12)
    assert quant_guard.range_growth(w, np.array([[10.0], [1.0]]), 1) > 1.2


# --- kernels by CPU -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "name", "reduce_range"),
    [
        ({"avx2", "fma"}, "u8s8", True),
        ({"avx2", "avx512f"}, "u8s8", True),
        ({"avx2", "avx512f", "avx512_vnni"}, "u8s8", False),
        ({"avx2", "avx_vnni"}, "u8s8", False),
        ({"amx_tile", "amx_int8"}, "u8s8", False),
    ],
)
def test_default_kernels_follow_vnni(flags: set[str], name: str, reduce_range: bool) -> None:
    k = choose_kernels(flags=flags)
    assert (k.name, k.reduce_range) == (name, reduce_range)
    assert choose_kernels(accurate=True, flags=flags).name == "u8u8"


def test_cpu_flags_reads_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni\n\nflags\t: other\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_vnni"}
    assert cpu_flags(tmp_path / "missing") is None
    assert choose_kernels(flags=None).why  # this machine: whatever it has, a reason is given


# --- the command ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("quantize")
    model = tiny_mlp(_uneven_var())
    onnx.save(model, d / "mlp.onnx")
    np.save(d / "calib.npy", _inputs(model, 512, seed=2))
    np.save(d / "probe.npy", _inputs(model, 256, seed=3))
    return {"dir": d, "model": d / "mlp.onnx", "calib": d / "calib.npy", "probe": d / "probe.npy"}


def test_quantize_writes_an_int8_model_within_budget(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(kernels_module, "cpu_flags", lambda: {"avx2"})  # no VNNI
    out, report = files["dir"] / "mlp.int8.onnx", files["dir"] / "q.json"
    argv = ["quantize", str(files["model"]), "-o", str(out), "--calibrate", str(files["calib"])]
    # A random net has near-ties: without labels the budget is on the top-1 disagreement.
    assert main([*argv, "--report", str(report), "--max-accuracy-drop", "5"]) == 0
    text = capsys.readouterr().out
    assert "reduce_range on: this CPU lacks VNNI" in text.splitlines()[0]
    assert "float ops: 1" in text and "BatchNormalization in_bn: left by the fold" in text
    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)
    ops = [n.op_type for n in q.graph.node]
    assert (
        ops.count("Gemm") == 2 and "QuantizeLinear" in ops and ops.count("BatchNormalization") == 1
    )
    weights = [t for t in q.graph.initializer if t.data_type == TensorProto.INT8]
    assert len(weights) >= 2  # both Gemm weights stored as int8
    meta = {p.key: p.value for p in q.metadata_props}
    assert json.loads(meta["bn_onnx.quantized"])["reduce_range"] is True
    assert meta["bn_onnx.task"] == "classification"
    # An independent check of the proof's figures: float vs INT8 on held-out rows.
    x = np.load(files["probe"])
    y, yq = _run(str(files["model"]), x), _run(str(out), x)
    signal = 10 * np.log10((y.astype(np.float64) ** 2).sum() / ((y - yq) ** 2).sum())
    assert signal > 20.0
    assert (y.argmax(1) == yq.argmax(1)).mean() >= 0.95
    proof = json.loads(report.read_text())["proof"]
    assert proof["passed"] and proof["float_ops"][0]["node"] == "in_bn"


def test_int8_model_runs_in_predictor_run_and_serve(files: dict[str, Path]) -> None:
    out = files["dir"] / "apps.int8.onnx"
    argv = ["quantize", str(files["model"]), "-o", str(out), "--calibrate", str(files["calib"])]
    assert main([*argv, "-q", "--max-accuracy-drop", "5"]) == 0
    x = np.load(files["probe"])[:9]
    p = Predictor(out, provider="cpu")
    assert p.predict(x).shape == (9, N_OUT) and p.n_features == N_IN
    y = files["dir"] / "y.npy"
    assert main(["run", str(out), "--input", str(files["probe"]), "-o", str(y), "-q"]) == 0
    np.testing.assert_array_equal(np.load(y)[:9], p.predict(x))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
        from starlette.testclient import TestClient

    from bn_onnx.serve import create_app

    with TestClient(create_app(p, model_name="mlp.int8.onnx")) as client:
        r = client.post("/predict", json={"inputs": x.tolist()})
    assert r.status_code == 200
    np.testing.assert_allclose(np.asarray(r.json()["outputs"]), p.predict(x), rtol=1e-6)


def test_quantize_bad_input_is_one_line_and_writes_nothing(
    files: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    d, model, calib = files["dir"], str(files["model"]), str(files["calib"])
    junk = d / "junk.onnx"
    junk.write_text("not a model")
    wrong = d / "wrong.npy"
    np.save(wrong, np.zeros((4, N_IN + 1), np.float32))
    before = files["model"].read_bytes()
    cases = [
        ["quantize", str(junk), "-o", str(d / "a.onnx"), "--calibrate", calib],
        ["quantize", model, "-o", model, "--calibrate", calib],
        ["quantize", model, "-o", str(d / "b.onnx")],
        ["quantize", model, "-o", str(d / "c.onnx"), "--calibrate", str(wrong)],
    ]
    for argv in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("bn-onnx quantize: error:") and "\n" not in err
    assert files["model"].read_bytes() == before
    assert not any((d / n).exists() for n in ("a.onnx", "b.onnx", "c.onnx"))


def test_quantize_over_budget_exits_1_and_writes_nothing(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from bn_onnx.quantize import proof

    real = proof.prove
    monkeypatch.setattr(proof, "prove", lambda *a, **k: real(*a, **{**k, "max_accuracy_drop": -1}))
    out = files["dir"] / "over.int8.onnx"
    argv = ["quantize", str(files["model"]), "-o", str(out), "--calibrate", str(files["calib"])]
    assert main(argv) == 1
    assert "not written" in capsys.readouterr().out.splitlines()[-1]
    assert not out.exists()


# --- the proof --------------------------------------------------------------------------------


def test_proof_fails_over_the_accuracy_budget() -> None:
    model = tiny_mlp(np.ones(N_IN))
    worse = onnx.ModelProto()
    worse.CopyFrom(model)
    for t in worse.graph.initializer:
        if t.name == "W2":  # a different head: many top-1 answers change
            w = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(np.roll(w, 1, axis=1), "W2"))
    x = _inputs(model, 200)
    labels = _run(model, x).argmax(1)  # the float model is right on every row
    feeds = {"input": x}
    proof = prove(model, worse, [("labelled", feeds, labels)], classifier=["logits"])
    assert not proof and proof.measured > 10 and proof.basis.startswith("accuracy drop")
    assert render(proof)[-1].startswith("FAILED")
    same = prove(model, model, [("labelled", feeds, labels)], classifier=["logits"])
    assert same and same.probes[0].outputs[0].sqnr_db == float("inf")


def test_sqnr_matches_its_definition() -> None:
    y = np.array([3.0, 4.0])
    assert sqnr_db(y, y + np.array([0.3, 0.4])) == pytest.approx(20.0, rel=1e-12)


# --- QDQ models in ------------------------------------------------------------------------------


def _qdq_conv_bn() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    f32 = np.float32
    inits = {
        "wq": rng.integers(-100, 100, (4, 3, 3, 3)).astype(np.int8),
        "ws": np.full(4, 0.01, f32),
        "wz": np.zeros(4, np.int8),
        "g": rng.uniform(0.5, 1.5, 4).astype(f32),
        "b": rng.normal(0, 0.3, 4).astype(f32),
        "m": rng.normal(0, 0.3, 4).astype(f32),
        "v": rng.uniform(0.5, 1.5, 4).astype(f32),
    }
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0, name="dqw"),
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "qat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def test_qdq_input_leaves_the_bn_saying_the_weight_is_quantized(tmp_path: Path) -> None:
    model = _qdq_conv_bn()
    entry = _entry(fold_model(model), "bn")
    assert entry.status == "left"
    assert "weight 'w' is quantized (DequantizeLinear 'dqw')" in entry.reason
    onnx.save(model, tmp_path / "qat.onnx")
    x = np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "qat.int8.onnx"
    argv = ["quantize", str(tmp_path / "qat.onnx"), "-o", str(out), "--calibrate"]
    assert main([*argv, str(tmp_path / "x.npy"), "-q"]) == 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sqnr_db(ref.run(None, {"x": x})[0], sess.run(None, {"x": x})[0]) > 20.0


# --- the shipped digits model -------------------------------------------------------------------

DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits"


@pytest.mark.parametrize("flags", [{"avx2"}, {"avx2", "avx512_vnni"}], ids=["no-vnni", "vnni"])
def test_shipped_digits_quantized_from_its_checkpoint_keeps_accuracy(
    flags: set[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernels_module, "cpu_flags", lambda: flags)
    out, report = tmp_path / "digits.int8.onnx", tmp_path / "q.json"
    argv = ["quantize", str(DIGITS / "model.onnx"), "-o", str(out), "-q"]
    assert main([*argv, "--checkpoint", str(DIGITS / "checkpoint"), "--report", str(report)]) == 0
    proof = json.loads(report.read_text())["proof"]
    test = proof["probes"][0]
    assert test["source"].startswith("the checkpoint's test split") and test["rows"] == 270
    assert test["accuracy_float"] - test["accuracy_int8"] <= 0.005  # within 0.5 points
    assert proof["basis"] == "accuracy drop on labelled data"


def _wide_concat_bn() -> onnx.ModelProto:
    """Concat(income-like column, 3 narrow columns) -> BN (their statistics) -> Gemm."""
    rng = np.random.default_rng(5)
    f32 = np.float32
    p = {
        "s": np.ones(4, f32),
        "b": np.zeros(4, f32),
        "mu": np.array([5e4, 0, 0, 0], f32),
        "var": np.array([4e8, 0.09, 0.09, 0.09], f32),
    }
    bn, inits = _bn("in_bn", "cat", "z", p)
    nodes = [
        helper.make_node("Concat", ["wide", "narrow"], ["cat"], axis=1, name="concat"),
        bn,
        helper.make_node("Gemm", ["z", "W", "bias"], ["logits"], name="gemm"),
    ]
    inits += [
        numpy_helper.from_array(rng.normal(0, 1, (4, 3)).astype(f32), "W"),
        numpy_helper.from_array(np.zeros(3, f32), "bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "tab",
        [
            helper.make_tensor_value_info("wide", TensorProto.FLOAT, ["n", 1]),
            helper.make_tensor_value_info("narrow", TensorProto.FLOAT, ["n", 3]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def test_forward_fold_guard_keeps_a_bn_over_inputs_of_very_different_ranges(
    tmp_path: Path,
) -> None:
    model = _wide_concat_bn()
    entry = _entry(fold_model(model, max_row_range_growth=2.0), "in_bn")
    assert entry.status == "left" and "un-normalized" in entry.reason
    rng = np.random.default_rng(6)
    feeds = {
        "wide": rng.normal(5e4, 2e4, (256, 1)).astype(np.float32),
        "narrow": rng.normal(0, 0.3, (256, 3)).astype(np.float32),
    }
    onnx.save(model, tmp_path / "tab.onnx")
    np.savez(tmp_path / "x.npz", **feeds)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = ref.run(None, feeds)[0]
    sqnr = {}
    for growth in ("2", "0"):  # 0: fold every BN
        out = tmp_path / f"tab.{growth}.onnx"
        argv = ["quantize", str(tmp_path / "tab.onnx"), "-o", str(out), "-q"]
        argv += ["--calibrate", str(tmp_path / "x.npz"), "--max-row-range-growth", growth]
        assert main([*argv, "--max-accuracy-drop", "100"]) == 0
        q = onnx.load(out)
        if growth == "2":  # the Concat feeding the kept BN stays float: no per-tensor scale
            concat_out = next(n for n in q.graph.node if n.op_type == "Concat").output[0]
            assert not any(
                n.op_type == "QuantizeLinear" and n.input[0] == concat_out for n in q.graph.node
            )
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        sqnr[growth] = sqnr_db(y, sess.run(None, feeds)[0])
    assert sqnr["2"] > 25.0 and sqnr["2"] > sqnr["0"] + 10.0


def test_a_relu_right_after_a_linear_node_stays_quantized_before_a_kept_bn() -> None:
    """The BN the fold leaves runs in float, and so do the nodes computing its input, except a
    Relu right after the linear node: onnxruntime fuses it into that node's QDQ group (on the
    corpus's audio_conv1d keeping it in float cost 0.8-1.4 dB). A Relu after something else
    (here an Add) stays in float with the BN."""
    from bn_onnx.quantize.pipeline import float_nodes

    def graph(after_linear: bool) -> onnx.GraphProto:
        nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="conv")]
        if not after_linear:
            nodes.append(helper.make_node("Add", ["a", "a"], ["a2"], name="add"))
        nodes += [
            helper.make_node("Relu", ["a" if after_linear else "a2"], ["r"], name="relu"),
            helper.make_node("BatchNormalization", ["r", "s", "b", "m", "v"], ["y"], name="bn"),
        ]
        return helper.make_graph(nodes, "g", [], [])

    assert float_nodes(graph(after_linear=True)) == ["bn"]
    assert sorted(float_nodes(graph(after_linear=False))) == ["add", "bn", "relu"]
