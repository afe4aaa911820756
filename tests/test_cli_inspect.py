"""`bn-onnx inspect`: inputs, outputs, metadata, op counts and BN foldability."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
from fold_testing import mlp_with_probe

from bn_onnx.cli import main


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(mlp_with_probe(), path)
    return path


def test_inspect_text_lists_io_metadata_ops_and_bn(model_path, capsys):
    before = model_path.read_bytes()
    assert main(["inspect", str(model_path)]) == 0
    out = capsys.readouterr().out
    assert "input  float32[N, 5]" in out
    assert "logits  float32[N, 3]" in out
    assert "bn_onnx.task = classification" in out
    assert "BatchNormalization 2" in out and "Gemm 1" in out
    assert "BatchNormalization: 2, 1 foldable" in out
    assert "graph output" in out
    assert model_path.read_bytes() == before


def test_inspect_json_matches_the_fold(model_path, capsys):
    assert main(["inspect", str(model_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["opset"] == {"ai.onnx": 18}
    assert [i["name"] for i in info["inputs"]] == ["input"]
    assert info["ops"]["BatchNormalization"] == 2
    assert [b["foldable"] for b in info["batch_norm"]] == [True, False]
    assert info["batch_norm"][0]["direction"] == "preceding"
    assert "graph output" in info["batch_norm"][1]["reason"]


def test_inspect_subprocess_and_bad_file(model_path, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bn_onnx", "inspect", str(model_path), "--json"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n_nodes"] == 5
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    proc = subprocess.run(
        [sys.executable, "-m", "bn_onnx", "inspect", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("bn-onnx inspect: error:") and proc.stderr.count("\n") == 1
