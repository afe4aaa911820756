"""`bn-onnx quantize`: no output lands on a file it reads, the gate for models without task
metadata, the size line with external data, the hints and errors of a fresh user's run."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_quantize import _inputs, _uneven_var, tiny_mlp

from bn_onnx.cli import main
from bn_onnx.quantize import kernels as kernels_module

DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits"


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """m.onnx (weights in m.onnx.data), cal.npy and a copy of the digits checkpoint."""
    d = tmp_path_factory.mktemp("qharm")
    model = tiny_mlp(_uneven_var())
    np.save(d / "cal.npy", _inputs(model, 256, seed=2))
    onnx.save(
        model, d / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0
    )
    shutil.copytree(DIGITS / "checkpoint", d / "ck")
    return d


def test_outputs_that_are_inputs_or_each_other_exit_2_and_change_nothing(
    tree: Path, capsys: pytest.CaptureFixture
) -> None:
    before = _digest(tree)
    m, cal, ck = tree / "m.onnx", tree / "cal.npy", tree / "ck"
    base = ["quantize", str(m), "--calibrate", str(cal), "--checkpoint", str(ck)]
    q = str(tree / "q.onnx")
    cases = [
        (["-o", q, "--report", str(ck / "config.json")], "--report", "config.json"),
        (["-o", q, "--report", str(ck / "model.safetensors")], "--report", "model.safetensors"),
        (["-o", str(ck / "metrics.json")], "output", "metrics.json"),
        (["-o", q, "--report", str(cal)], "--report", "cal.npy"),
        (["-o", str(cal)], "output", "cal.npy"),
        (["-o", str(tree / "m.onnx.data")], "output", "m.onnx.data"),
        (["-o", q, "--report", str(tree / "m.onnx.data")], "--report", "m.onnx.data"),
        (["-o", q, "--report", str(m)], "--report", "m.onnx"),
        (["-o", q, "--report", q], "--report", "q.onnx"),
    ]
    for extra, what, name in cases:
        capsys.readouterr()
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert "\n" not in err, err
        assert f"{what} " in err and name in err, (extra, err)
        if extra[-1] == q:  # the two outputs: both paths named
            assert err.count("q.onnx") == 2 and "output" in err, err
        else:
            assert err.count(name) >= 2, err
    assert _digest(tree) == before
    assert not (tree / "q.onnx").exists()


def test_size_line_counts_the_external_data_of_the_float_model(
    tree: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setattr(kernels_module, "cpu_flags", lambda: {"avx2"})
    m, out, report = tree / "m.onnx", tmp_path / "q.onnx", tmp_path / "q.json"
    argv = ["quantize", str(m), "-o", str(out), "--calibrate", str(tree / "cal.npy")]
    assert main([*argv, "--report", str(report), "--max-accuracy-drop", "100"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    total = m.stat().st_size + (tree / "m.onnx.data").stat().st_size
    assert last == f"wrote {out} ({out.stat().st_size:,} bytes; {m}: {total:,} bytes)"
    assert json.loads(report.read_text())["proof"]["passed"] is True
    onnx.checker.check_model(onnx.load(out), full_check=True)


def _foreign_classifier() -> onnx.ModelProto:
    """Gemm -> Relu -> Gemm -> y [batch, 4], no bn_onnx metadata (another tool's export)."""
    model = tiny_mlp(_uneven_var())
    del model.metadata_props[:]
    model.graph.output[0].name = "y"
    model.graph.node[-1].output[0] = "y"
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_foreign_classifier_is_gated_on_top1_with_task_classification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(kernels_module, "cpu_flags", lambda: {"avx2"})
    model = _foreign_classifier()
    onnx.save(model, tmp_path / "c.onnx")
    x = _inputs(model, 256, seed=2)
    np.save(tmp_path / "x.npy", x)
    argv = ["quantize", str(tmp_path / "c.onnx"), "--calibrate", str(tmp_path / "x.npy")]
    # Without --task: written, with a note saying the gate is SQNR and max error only.
    assert main([*argv, "-o", str(tmp_path / "a.onnx"), "--max-accuracy-drop", "0"]) == 0
    cap = capsys.readouterr()
    assert "passed: no classifier output" in cap.out
    note = [line for line in cap.err.splitlines() if "note:" in line]
    assert len(note) == 1 and "--task classification" in note[0] and "4 columns" in note[0]
    # With --task classification: the top-1 disagreement, checked by an independent run.
    sess = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    agree = sess.run(None, {"input": x})[0].argmax(1) == ref.run(None, {"input": x})[0].argmax(1)
    disagreement = 100.0 * (1.0 - agree.mean())
    out = tmp_path / "b.onnx"
    gated = [*argv, "-o", str(out), "--task", "classification"]
    assert main([*gated, "--max-accuracy-drop", "100"]) == 0
    text = capsys.readouterr().out
    assert f"passed: top-1 disagreement (no labels) {disagreement:.2f} points" in text
    if disagreement > 0:  # a budget below the measured disagreement fails, nothing written
        out.unlink()
        assert main([*gated, "--max-accuracy-drop", str(disagreement / 2)]) == 1
        assert not out.exists()
    # --task regression: no note; a task against the model's metadata is a usage error.
    capsys.readouterr()
    assert main([*argv, "-o", str(tmp_path / "r.onnx"), "--task", "regression", "-q"]) == 0
    assert "note:" not in capsys.readouterr().err
    onnx.save(tiny_mlp(_uneven_var()), tmp_path / "meta.onnx")
    bad = ["quantize", str(tmp_path / "meta.onnx"), "-o", str(tmp_path / "z.onnx")]
    assert main([*bad, "--calibrate", str(tmp_path / "x.npy"), "--task", "regression"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "classification" in err
    assert not (tmp_path / "z.onnx").exists()


def test_an_already_quantized_model_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "again.onnx"
    argv = ["quantize", str(DIGITS / "model.int8.onnx"), "-o", str(out)]
    assert main([*argv, "--checkpoint", str(DIGITS / "checkpoint")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "already quantized" in err and "SSA" not in err
    assert not out.exists()
    # A QuantizeLinear without the metadata is found too.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    inits = [
        numpy_helper.from_array(np.float32(0.1), "s"),
        numpy_helper.from_array(np.uint8(0), "z"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "qdq", [x], [y], inits),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    model.ir_version = 10
    onnx.save(model, tmp_path / "qdq.onnx")
    np.save(tmp_path / "x.npy", np.ones((8, 4), np.float32))
    argv = ["quantize", str(tmp_path / "qdq.onnx"), "-o", str(out)]
    assert main([*argv, "--calibrate", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err.strip()
    assert "already quantized (QuantizeLinear)" in err and "\n" not in err


def test_over_budget_on_a_folded_model_hints_at_the_unfolded_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from bn_onnx.quantize import proof

    real = proof.prove
    monkeypatch.setattr(proof, "prove", lambda *a, **k: real(*a, **{**k, "max_accuracy_drop": -1}))
    ck = str(DIGITS / "checkpoint")
    for name, hinted in (("model.folded.onnx", True), ("model.onnx", False)):
        out = tmp_path / name
        assert main(["quantize", str(DIGITS / name), "-o", str(out), "--checkpoint", ck]) == 1
        lines = capsys.readouterr().out.strip().splitlines()
        assert not out.exists()
        if hinted:
            assert lines[-2].startswith("not written:")
            assert lines[-1].startswith("hint:") and "unfolded model (model.onnx)" in lines[-1]
        else:
            assert lines[-1].startswith("not written:")
