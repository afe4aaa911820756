"""tools/load_test.py, run tiny: it must count what it sent, stay in its bounds and report JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from serve_testing import make_mlp, make_tabular

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_load_test_reports_bounded_interleaved_runs_as_json(tmp_path: Path) -> None:
    numeric, tabular = tmp_path / "m.onnx", tmp_path / "tab.onnx"
    make_mlp(numeric, 64, 16, 10, task="classification")
    make_tabular(tabular)
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(ROOT / "tools" / "load_test.py"), str(numeric), str(tabular)]
    cmd += ["--requests", "20", "--seconds", "5", "--rounds", "2", "--warmup", "5"]
    cmd += ["--concurrency", "1,4", "--modes", "starlette,serve", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert json.loads(run.stdout) == doc
    assert {m: r["kind"] for m, r in doc["models"].items()} == {
        str(numeric): "numeric",
        str(tabular): "tabular",
    }
    for result in doc["models"].values():
        assert set(result["summary"]) == {"1", "4"}
        for c in ("1", "4"):
            entry = result["summary"][c]
            for mode in ("starlette", "serve"):
                assert entry[mode]["errors"] == 0
                rounds = result["runs"][c][mode]
                assert len(rounds) == 2
                for r in rounds:
                    assert 0 < r["requests"] <= 20
                    assert r["rps"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
                med = entry[mode]["rps"]
                assert med["min"] <= med["median"] <= med["max"]
            ratio = entry["serve_over_starlette"]
            assert len(ratio["rounds"]) == 2 and ratio["min"] <= ratio["median"] <= ratio["max"]
            assert entry["serve_mean_batch_rows"]["min"] >= 1.0
