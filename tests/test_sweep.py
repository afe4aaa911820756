"""The batch-norm sweep: its summary statistic, its JSON, and a quick end-to-end run."""

from __future__ import annotations

import math

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
