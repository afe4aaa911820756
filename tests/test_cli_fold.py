"""`bn-onnx fold`: summary, report, external data, and the bad-input contract (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from fold_testing import mlp_with_probe, op_count, run_ort

from bn_onnx.cli import main
from bn_onnx.fold import fold_file

HEAD = '<ir_version: 8, opset_import: ["" : 18]>'


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(mlp_with_probe(), path)
    return path


def test_fold_cli_prints_summary_and_writes_report(model_path, tmp_path, capsys):
    out, rep = tmp_path / "f.onnx", tmp_path / "r.json"
    before = model_path.read_bytes()
    rc = main(["fold", str(model_path), "-o", str(out), "--report", str(rep)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "folded 1 of 2 BatchNormalization" in text
    assert "left" in text and "graph output" in text  # probe is an output: that BN stays
    assert "nodes 5 -> 4" in text
    report = json.loads(rep.read_text())
    assert report["n_bn"] == 2 and report["n_folded"] == 1
    assert [b["status"] for b in report["bn"]] == ["folded", "left"]
    assert model_path.read_bytes() == before
    folded = onnx.load(out)
    onnx.checker.check_model(folded, full_check=True)
    assert {p.key: p.value for p in folded.metadata_props} == {
        "bn_onnx.task": "classification",
        "bn_onnx.folded": "false",  # the probe's BN is left
    }
    x = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    for w, g in zip(
        run_ort(mlp_with_probe(), {"input": x}), run_ort(folded, {"input": x}), strict=True
    ):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


def test_fold_cli_subprocess(model_path, tmp_path):
    out = tmp_path / "f.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "bn_onnx", "fold", str(model_path), "-o", str(out), "-q"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert op_count(onnx.load(out), "BatchNormalization") == 1


def _bad(tmp_path, kind):
    p = tmp_path / "bad.onnx"
    if kind == "missing":
        return p
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "not onnx":
        p.write_text("hello, I am a CSV file\n1,2,3\n")
    elif kind == "truncated":
        data = mlp_with_probe().SerializeToString()
        p.write_bytes(data[: len(data) // 2])
    return p


@pytest.mark.parametrize("kind", ["missing", "empty", "not onnx", "truncated"])
def test_fold_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, kind):
    out = tmp_path / "out.onnx"
    rc = main(["fold", str(_bad(tmp_path, kind)), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("bn-onnx fold: error:") and err.count("\n") == 1
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_fold_cli_refuses_missing_output_folder_and_same_path(model_path, tmp_path, capsys):
    assert main(["fold", str(model_path), "-o", str(tmp_path / "nope" / "f.onnx")]) == 2
    assert "output folder does not exist" in capsys.readouterr().err
    before = model_path.read_bytes()
    assert main(["fold", str(model_path), "-o", str(model_path)]) == 2
    assert "--in-place" in capsys.readouterr().err
    assert model_path.read_bytes() == before
    assert main(["fold", str(model_path), "-o", str(model_path), "--in-place", "-q"]) == 0
    assert op_count(onnx.load(model_path), "BatchNormalization") == 1


def test_fold_cli_invalid_graph_is_a_user_error(tmp_path, capsys):
    model = mlp_with_probe()
    del model.graph.initializer[0]  # W1 missing: Gemm reads an undefined value
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert main(["fold", str(path), "-o", str(tmp_path / "f.onnx")]) == 2
    assert "invalid ONNX model" in capsys.readouterr().err


def test_fold_file_external_data_in_and_out(tmp_path):
    model = mlp_with_probe(k=300)  # W1 is 4.8 kB: big enough to go to the data file
    src = tmp_path / "ext.onnx"
    onnx.save_model(
        mlp_with_probe(k=300),  # a second copy: saving with external data changes the proto
        str(src),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    assert (tmp_path / "ext.onnx.data").exists()
    one = tmp_path / "one.onnx"
    report = fold_file(src, one)
    assert report.n_folded == 1
    assert not (tmp_path / "one.onnx.data").exists()  # under 2 GB: one file
    split = tmp_path / "split.onnx"
    fold_file(src, split, external_data=True)
    assert (tmp_path / "split.onnx.data").exists()
    x = np.random.default_rng(1).normal(size=(2, 300)).astype(np.float32)
    want = run_ort(model, {"input": x})[0]
    for p in (one, split):
        folded = onnx.load(str(p))
        np.testing.assert_allclose(run_ort(folded, {"input": x})[0], want, atol=1e-5, rtol=1e-4)


def test_fold_file_refuses_external_data_outside_the_model_folder(tmp_path):
    model = mlp_with_probe()
    inner = tmp_path / "inner"
    inner.mkdir()
    onnx.save_model(
        model,
        str(tmp_path / "outside.onnx"),
        save_as_external_data=True,
        location="w.data",
        size_threshold=0,
    )
    evil = onnx.load(str(tmp_path / "outside.onnx"), load_external_data=False)
    for t in evil.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = os.path.join("..", "w.data")
    onnx.save(evil, str(inner / "evil.onnx"))
    assert main(["fold", str(inner / "evil.onnx"), "-o", str(inner / "f.onnx")]) == 2
    assert not (inner / "f.onnx").exists()


def test_fold_cli_missing_external_data_exits_2(tmp_path, capsys):
    src = tmp_path / "ext.onnx"
    onnx.save_model(
        mlp_with_probe(k=300),
        str(src),
        save_as_external_data=True,
        location="w.data",
        size_threshold=0,
    )
    (tmp_path / "w.data").unlink()
    assert main(["fold", str(src), "-o", str(tmp_path / "f.onnx")]) == 2
    err = capsys.readouterr().err
    assert "external data file missing" in err and err.count("\n") == 1
    assert not (tmp_path / "f.onnx").exists()


def test_fold_file_reports_progress_stages(model_path, tmp_path):
    stages = []
    fold_file(model_path, tmp_path / "f.onnx", progress=stages.append)
    assert stages == ["loading", "folding", "writing"]


def test_fold_cli_truncated_external_data_exits_2(tmp_path, capsys):
    src = tmp_path / "ext.onnx"
    onnx.save_model(
        mlp_with_probe(k=300),
        str(src),
        save_as_external_data=True,
        location="w.data",
        size_threshold=0,
    )
    data = tmp_path / "w.data"
    data.write_bytes(data.read_bytes()[:-100])
    assert main(["fold", str(src), "-o", str(tmp_path / "f.onnx")]) == 2
    err = capsys.readouterr().err
    assert "is truncated" in err and err.count("\n") == 1
    assert not (tmp_path / "f.onnx").exists()


def test_fold_file_in_place_with_external_data_keeps_a_valid_model(tmp_path):
    """In place, the new data file replaces the one the input's tensors are mapped from."""
    src = tmp_path / "ext.onnx"
    onnx.save_model(
        mlp_with_probe(k=300),
        str(src),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    report = fold_file(src, src, in_place=True, external_data=True)
    assert report.n_folded == 1
    folded = onnx.load(str(src))
    onnx.checker.check_model(folded, full_check=True)
    x = np.random.default_rng(2).normal(size=(2, 300)).astype(np.float32)
    want = run_ort(mlp_with_probe(k=300), {"input": x})[0]
    np.testing.assert_allclose(run_ort(folded, {"input": x})[0], want, atol=1e-5, rtol=1e-4)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_fold_verify_takes_verify_options(model_path, tmp_path, capsys, monkeypatch):
    """`fold --verify` reads verify's own options (one function adds them to both parsers) and
    passes them to the verify engine; without --verify they are a usage error; a bad value is
    exit 2."""
    import dataclasses

    import bn_onnx.verify

    x = np.random.default_rng(0).standard_normal((5, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    seen = {}
    real = bn_onnx.verify.verify_models

    def spy(models, options):
        seen.update({f.name: getattr(options, f.name) for f in dataclasses.fields(options)})
        return real(models, options)

    monkeypatch.setattr(bn_onnx.verify, "verify_models", spy)
    out = tmp_path / "f.onnx"
    extra = ["--provider", "reference", "--atol", "1e-3", "--rtol", "logits=1e-2", "--rows", "8"]
    args = ["fold", str(model_path), "-o", str(out), "--verify", "--input", str(tmp_path / "x.npy")]
    assert main([*args, *extra, "--seed", "3", "--no-locate"]) == 0
    assert "verified: PASS" in capsys.readouterr().out and out.exists()
    assert seen["provider"] == "reference" and seen["atol"] == {"*": 1e-3}
    assert seen["rtol"] == {"logits": 1e-2} and (seen["rows"], seen["seed"]) == (8, 3)
    assert seen["locate"] is False and np.array_equal(seen["inputs"], x)
    out.unlink()
    assert main(["fold", str(model_path), "-o", str(out), "--provider", "cpu"]) == 2
    assert "need --verify" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as exc:
        main([*args, "--atol", "x"])
    assert exc.value.code == 2 and not out.exists()
