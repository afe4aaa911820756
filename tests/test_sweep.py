"""The batch-norm sweep: its summary statistic, its JSON, and a quick end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bn_onnx.sweep import lr_grid, lr_range_width, summarize_sweep


def test_lr_grid_is_log_spaced_and_hits_both_ends():
    grid = lr_grid(1e-4, 1.0, 5)
    assert grid == (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    ratios = [b / a for a, b in zip(grid, grid[1:], strict=False)]
    assert all(r == pytest.approx(10.0, rel=1e-2) for r in ratios)


def test_lr_grid_refuses_bad_bounds():
    with pytest.raises(ValueError):
        lr_grid(0.0, 1.0, 3)
    with pytest.raises(ValueError):
        lr_grid(1.0, 0.1, 3)


def test_range_width_on_a_hand_made_table():
    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
    accs = [0.10, 0.60, 0.92, 0.97, 0.90, 0.10]
    w = lr_range_width(lrs, accs, threshold=0.9 * 0.97)  # 0.873
    assert (w.lo, w.hi, w.n_points) == (1e-2, 1.0, 3)
    assert w.decades == pytest.approx(2.0)
    assert (w.best_lr, w.best_acc) == (1e-1, 0.97)


def test_range_width_ignores_a_good_point_cut_off_from_the_best():
    lrs = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    accs = [0.95, 0.20, 0.96, 0.95, 0.30]
    w = lr_range_width(lrs, accs, threshold=0.9)
    assert (w.lo, w.hi, w.n_points) == (1e-1, 1.0, 2)
    assert w.decades == pytest.approx(1.0)


def test_range_width_is_empty_when_the_best_misses_the_threshold():
    w = lr_range_width([0.1, 1.0], [0.3, 0.5], threshold=0.8)
    assert (w.n_points, w.lo, w.hi, w.decades) == (0, None, None, 0.0)


def test_range_width_single_point_is_zero_decades():
    w = lr_range_width([0.1, 1.0, 10.0], [0.2, 0.9, 0.2], threshold=0.5)
    assert (w.n_points, w.lo, w.hi, w.decades) == (1, 1.0, 1.0, 0.0)


def _brute_force_width(lrs, accs, threshold):
    """Oracle: the longest interval of grid points all >= threshold that contains a best point."""
    best_acc = max(accs)
    best = accs.index(best_acc)
    if best_acc < threshold:
        return 0, None, None
    n = len(lrs)
    candidates = [
        (j - i + 1, i, j)
        for i in range(n)
        for j in range(i, n)
        if i <= best <= j and all(a >= threshold for a in accs[i : j + 1])
    ]
    size, i, j = max(candidates)
    return size, lrs[i], lrs[j]


@given(
    accs=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12),
    fraction=st.floats(0.0, 1.0),
)
def test_range_width_matches_brute_force(accs, fraction):
    lrs = [10.0 ** (k / 2 - 4) for k in range(len(accs))]
    threshold = fraction * max(accs)
    w = lr_range_width(lrs, accs, threshold)
    size, lo, hi = _brute_force_width(lrs, accs, threshold)
    assert (w.n_points, w.lo, w.hi) == (size, lo, hi)
    assert w.best_acc == max(accs)
    if size:
        assert w.decades == pytest.approx(math.log10(hi / lo))
        assert lo <= w.best_lr <= hi


def _run(opt, bn, lr, seed, acc, diverged=False):
    return {
        "optimizer": opt,
        "bn": bn,
        "lr": lr,
        "seed": seed,
        "final_val_acc": acc,
        "diverged": diverged,
    }


def test_summarize_sweep_uses_median_over_seeds_and_a_shared_threshold():
    runs = []
    # with BN: good over two decades; without BN: good at one lr only, poor elsewhere.
    table = {
        "pre": {0.01: (0.90, 0.95, 0.97), 0.1: (0.96, 0.97, 0.98), 1.0: (0.94, 0.95, 0.10)},
        "none": {0.01: (0.50, 0.55, 0.60), 0.1: (0.93, 0.94, 0.95), 1.0: (0.10, 0.10, 0.10)},
    }
    for bn, by_lr in table.items():
        for lr, accs in by_lr.items():
            for seed, acc in enumerate(accs):
                runs.append(_run("sgd", bn, lr, seed, acc, diverged=acc == 0.10))
    curves, summary = summarize_sweep(runs, fraction=0.9)
    c = curves["sgd"]["pre"]
    assert c["lr"] == [0.01, 0.1, 1.0]
    assert c["median"] == [0.95, 0.97, 0.94]
    assert c["min"] == [0.90, 0.96, 0.10]
    assert c["n_diverged"] == [0, 0, 1]
    s = summary["sgd"]
    assert s["best_acc"] == 0.97
    assert s["threshold"] == pytest.approx(0.873)
    assert s["pre"]["decades"] == pytest.approx(2.0)
    assert s["none"]["decades"] == 0.0 and s["none"]["n_points"] == 1
    assert curves["sgd"]["none"]["n_diverged"] == [0, 0, 3]


def _load_tool():
    path = Path(__file__).resolve().parent.parent / "tools" / "bn_sweep.py"
    spec = importlib.util.spec_from_file_location("bn_sweep_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _strict_json(path):
    def no_nan(name):
        raise AssertionError(f"{path.name} holds {name}")

    return json.loads(path.read_text(), parse_constant=no_nan)


@pytest.mark.slow  # imports torch's optimizer machinery and matplotlib: ~10 s on a busy machine
def test_quick_run_writes_json_and_plots(tmp_path, capsys):
    from bn_onnx.data import load_dataset

    rc = _load_tool().main(["--quick", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert " dec (" in out and "final median val acc" in out
    for png in ("sweep_relu.png", "curves.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind

    sweep = _strict_json(tmp_path / "sweep_relu.json")
    st = sweep["settings"]
    part = sweep["models"]["relu"]
    assert len(part["runs"]) == (
        len(st["optimizers"]) * len(st["bn_modes"]) * len(st["lrs"]) * len(st["seeds"])
    )
    for run in part["runs"]:
        assert 0.0 <= run["final_val_acc"] <= 1.0
        assert run["final_val_acc"] <= run["best_val_acc"] <= 1.0
    for opt in st["optimizers"]:
        s = part["summary"][opt]
        assert s["threshold"] == pytest.approx(st["fraction"] * s["best_acc"])
        for bn in st["bn_modes"]:
            c = part["curves"][opt][bn]
            assert c["lr"] == sorted(st["lrs"])
            assert all(
                lo <= m <= hi for lo, m, hi in zip(c["min"], c["median"], c["max"], strict=True)
            )
            assert s[bn]["decades"] >= 0.0
            assert 0 <= s[bn]["n_points"] <= len(st["lrs"])

    curves = _strict_json(tmp_path / "curves.json")
    cst = curves["settings"]
    data = load_dataset(cst["dataset"], seed=cst["seeds"][0])
    steps_per_epoch = math.ceil(len(data.y_train) / cst["batch_size"])
    for bn in cst["bn_modes"]:
        r = curves["runs"][bn]
        # Steps are counted from the model's training-mode forwards: one per mini-batch.
        assert r["step"] == [steps_per_epoch * (e + 1) for e in range(cst["epochs"])]
        assert len(r["acc_median"]) == cst["epochs"]
        assert all(0.0 <= a <= 1.0 for a in r["acc_median"])
        for p15, p50, p85 in zip(r["unit_p15"], r["unit_p50"], r["unit_p85"], strict=True):
            assert math.isfinite(p15) and p15 <= p50 <= p85


def test_epochs_option_names_its_files_and_sets_the_budget(tmp_path):
    rc = _load_tool().main(
        [
            "--quick",
            "--only",
            "sweep",
            "--epochs",
            "2",
            "--no-plots",
            "--quiet",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep_relu_2ep.json"]
    result = _strict_json(tmp_path / "sweep_relu_2ep.json")
    assert result["models"]["relu"]["settings"]["epochs"] == 2


def test_an_output_path_that_is_a_file_is_a_one_line_error(tmp_path):
    # (a missing folder is made: docs/batchnorm.md's `--quick --out runs/bn`, in test_docs)
    tool = Path(__file__).resolve().parent.parent / "tools" / "bn_sweep.py"
    (tmp_path / "file").write_text("x")
    proc = subprocess.run(
        [sys.executable, str(tool), "--quick", "--out", str(tmp_path / "file")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "--out must be a folder, but" in proc.stderr


@pytest.mark.parametrize("bn", ["none", "pre"])
def test_unit_recorder_sees_the_last_sigmoid_input(bn):
    import numpy as np
    import torch

    from bn_onnx.model import MLP, MLPConfig
    from bn_onnx.sweep import _UnitRecorder

    torch.manual_seed(0)
    model = MLP(MLPConfig(5, 3, hidden=(4, 6), activation="sigmoid", bn=bn, input_norm=False))
    with torch.no_grad():  # give the BN non-trivial statistics and affine parameters
        for block in model.blocks:
            if bn != "none":
                block.bn.running_mean.uniform_(-1, 1)
                block.bn.running_var.uniform_(0.5, 2)
                block.bn.weight.uniform_(0.5, 2)
                block.bn.bias.uniform_(-1, 1)
    x = torch.randn(37, 5)
    with _UnitRecorder(unit=2, n_val=37) as rec:
        model.train()
        model(x)
        model(x)
        model.eval()
        with torch.no_grad():
            model(x)
    assert rec.steps == 2

    # Oracle: the same forward in float64 numpy, up to the last sigmoid's input.
    sd = {k: v.double().numpy() for k, v in model.state_dict().items()}
    h = x.double().numpy()
    for i in range(2):
        z = h @ sd[f"blocks.{i}.linear.weight"].T + sd[f"blocks.{i}.linear.bias"]
        if bn == "pre":
            mean, var = sd[f"blocks.{i}.bn.running_mean"], sd[f"blocks.{i}.bn.running_var"]
            z = (z - mean) / np.sqrt(var + 1e-5) * sd[f"blocks.{i}.bn.weight"]
            z = z + sd[f"blocks.{i}.bn.bias"]
        h = 1 / (1 + np.exp(-z))
    expected = np.percentile(z[:, 2], [15, 50, 85])
    np.testing.assert_allclose(rec.last, expected, rtol=1e-5, atol=1e-5)
