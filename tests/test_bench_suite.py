"""Pieces of tools/bench_suite.py that decide what the suite reports (no timing asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from bn_onnx import bench, graphs

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("bench_suite", ROOT / "tools" / "bench_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_suite"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_suite", None)


def test_variants_fold_to_the_no_bn_graph_shape(suite):
    models, facts = suite.make_variants([6, 8, 8, 3])
    assert facts["fold_source"] == "bn_onnx.fold"
    assert facts["ops"]["unfolded"]["BatchNormalization"] == 2
    assert "BatchNormalization" not in facts["ops"]["folded"]
    assert facts["folded_like_no_bn"]
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    sess = ort.InferenceSession(models["folded"], providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        sess.run(None, {"input": x})[0],
        graphs.mlp_reference([6, 8, 8, 3], x),
        rtol=1e-4,
        atol=1e-5,
    )


def test_torch_mlp_computes_the_unfolded_network(suite):
    torch = pytest.importorskip("torch")
    widths = [5, 7, 4, 2]
    x = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    with torch.inference_mode():
        got = suite.torch_mlp(widths)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, graphs.mlp_reference(widths, x), rtol=1e-4, atol=1e-5)


def _result(times: dict[str, list[float]], cpu: dict[str, list[float]]) -> bench.BenchResult:
    rows = []
    for name, t in times.items():
        stats = bench.Stats.of(t)
        rows.append(
            bench.Row(name, 1, stats, 1 / stats.median_s, 1.0, 1.0, 1.0, t, cpu_times_s=cpu[name])
        )
    return bench.BenchResult([], rows, {}, {})


def test_paired_ratio_uses_rounds_and_medians(suite):
    r = _result({"a": [2.0, 4.0, 6.0], "b": [1.0, 2.0, 2.0]}, {"a": [1.0] * 3, "b": [0.5] * 3})
    p = suite.paired(r, "a", "b", 1)
    assert p["ratio"] == pytest.approx(4.0 / 2.0)
    assert p["q1"] == pytest.approx(np.percentile([2.0, 2.0, 3.0], 25))
    assert p["q3"] == pytest.approx(np.percentile([2.0, 2.0, 3.0], 75))
    assert p["cpu_ratio"] == pytest.approx(2.0)


def test_targets_say_met_or_not_from_the_figures(suite):
    cell = {"ratio": 1.03, "q1": 1.0, "q3": 1.05, "n": 9, "cpu_ratio": 1.01}
    aa = {"ratio": 0.99, "q1": 0.98, "q3": 1.0, "n": 9, "cpu_ratio": 1.0}
    out = {
        "networks": {"n": {"folded_like_no_bn": True}},
        "groups": [
            {
                "section": "variants",
                "network": "n",
                "threads": 1,
                "opt": "all",
                "pairs": {"1": {"folded/no_bn": cell, "A/A no_bn copy/no_bn": aa}},
            },
            {
                "section": "predictor",
                "network": "digits",
                "pairs": {
                    "1": {"Predictor/bare": {"ratio": 1.2}},
                    "1024": {"Predictor/bare": {"ratio": 1.05}},
                },
            },
        ],
    }
    targets = {t["id"]: t for t in suite.evaluate_targets(out)}
    fold = targets["folded/no_bn <= 1.02"]
    assert not fold["met"] and fold["cells_over"] == 1
    assert fold["one_thread_cells_over_by_cpu_time"] == 0
    assert targets["Predictor/bare <= 1.25 at batch 1 (digits)"]["met"]
    assert not targets["Predictor/bare <= 1.02 at batch 1024 (digits)"]["met"]
    lines = suite.summary_lines({"groups": [], "targets": list(targets.values()), "skipped": {}})
    assert any(line.startswith("- NOT MET: folded/no_bn") for line in lines)
