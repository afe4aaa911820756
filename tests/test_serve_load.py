"""tools/load_test.py, run tiny: it must count what it sent, stay in its bounds and report JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from serve_testing import make_mlp

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_load_test_reports_bounded_runs_as_json(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    make_mlp(model, 64, 16, 10, task="classification")
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(ROOT / "tools" / "load_test.py"), str(model)]
    cmd += ["--requests", "25", "--seconds", "5", "--rounds", "2", "--warmup", "5"]
    cmd += ["--concurrency", "1,4", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert json.loads(run.stdout) == doc
    assert set(doc["summary"]) == {"1", "4"}
    for c in ("1", "4"):
        assert doc["summary"][c]["server_errors"] == 0
        for mode in ("bare", "server"):
            rounds = doc["runs"][c][mode]
            assert len(rounds) == 2
            for r in rounds:
                assert 0 < r["requests"] <= 25
                assert r["rps"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
            med = doc["summary"][c][mode]["rps"]
            assert med["min"] <= med["median"] <= med["max"]
        assert doc["summary"][c]["server_mean_batch_rows"]["min"] >= 1.0
