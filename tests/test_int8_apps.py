"""The shipped INT8 digits model (models/digits/model.int8.onnx) in `run`, `verify` and `bench`.

`verify` holds it to float tolerances against a float64 reference of the float model: it
fails them (its error is quantization's), says so, labels it INT8 and keeps it out of the
"does folding add error" rows; it never crashes. The oracle for its outputs is plain
onnxruntime on the same file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bn_onnx import verify
from bn_onnx.cli import main

DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits"
INT8, FLOAT = DIGITS / "model.int8.onnx", DIGITS / "model.folded.onnx"
SAMPLES = DIGITS / "sample_input.npy"


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


@pytest.mark.cpu_sensitive
def test_run_writes_the_int8_models_logits(tmp_path: Path) -> None:
    out = tmp_path / "logits.npy"
    assert main(["run", str(INT8), "--input", str(SAMPLES), "-o", str(out)]) == 0
    x = np.load(SAMPLES)
    np.testing.assert_array_equal(np.load(out), _ort(INT8, x))


@pytest.mark.cpu_sensitive
def test_verify_int8_against_float_fails_float_tolerance_and_says_why() -> None:
    report = verify.verify([INT8, FLOAT], inputs=np.load(SAMPLES), provider="cpu")
    assert not report  # quantization error is far over float32 tolerance
    assert [m["int8"] for m in report.models] == [True, False]
    # the float64 reference is the float model's, though the INT8 one came first
    assert report.reference.startswith("model.folded.onnx cast to float64")
    assert report.folding == []  # INT8 is neither side of "does folding add error"
    text = verify.render(report)
    assert text.splitlines()[0] == "models: model.int8.onnx (INT8), model.folded.onnx (folded)"
    assert any("model.int8.onnx is INT8 (QDQ)" in w for w in report.warnings)
    failed = {(p.probe, p.actual) for p in report.pairs if p.counted and not p.passed}
    assert ("data", "model.int8.onnx [cpu]") in failed
    assert all("model.folded.onnx" not in actual for _, actual in failed)
    # with an atol over the measured error, the same comparison passes
    x = np.load(SAMPLES)
    err = float(np.max(np.abs(_ort(INT8, x) - _ort(FLOAT, x))))
    loose = verify.verify([INT8, FLOAT], inputs=x, provider="cpu", atol=2 * err, rows=0)
    assert loose, verify.render(loose)


def test_bench_times_the_int8_model_beside_the_float_one(tmp_path: Path, capsys) -> None:
    js = tmp_path / "b.json"
    args = ["bench", str(FLOAT), str(INT8), "--batch-sizes", "1,4", "--repeats", "2"]
    assert main([*args, "--warmup", "1", "--threads", "1", "--json", str(js), "-q"]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert [(r["subject"], r["batch"]) for r in rows] == [
        ("model.folded.onnx", 1),
        ("model.int8.onnx", 1),
        ("model.folded.onnx", 4),
        ("model.int8.onnx", 4),
    ]
    assert all(r["median_ms"] > 0 for r in rows)
