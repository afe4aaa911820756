"""What batch norm buys, measured: a learning-rate sweep and the Ioffe & Szegedy learning curves.

Two experiments on the bundled digits data, both trained with `bn_onnx.train.train`:

- `run_sweep`: final validation accuracy against learning rate on a log grid, with and without
  BN, per optimizer and seed. `lr_range_width` turns each curve into one number: how many
  decades of learning rate reach at least `fraction` of the best accuracy.
- `run_curves`: the paper's MNIST setup scaled to digits (three hidden layers of 100 sigmoid
  units, mini-batches of 60): validation accuracy against training step with and without BN,
  and the 15/50/85th percentiles of one last-hidden-layer unit's sigmoid input.

Results are plain JSON-able dicts; `plot_sweep` / `plot_curves` draw them with matplotlib (Agg).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

Progress = Callable[[str], None]

BN_LABELS = {"pre": "with BN", "none": "without BN", "post": "BN after activation"}


def lr_grid(lo: float, hi: float, n: int) -> tuple[float, ...]:
    """`n` learning rates evenly spaced in log10 from `lo` to `hi`, rounded to 3 digits."""
    if n < 1 or not 0 < lo <= hi:
        raise ValueError(f"bad learning-rate grid: lo={lo}, hi={hi}, n={n}")
    if n == 1:
        return (float(lo),)
    step = (math.log10(hi) - math.log10(lo)) / (n - 1)
    return tuple(float(f"{10 ** (math.log10(lo) + i * step):.3g}") for i in range(n))


@dataclass(frozen=True)
class RangeWidth:
    """The learning-rate range around a curve's best point that stays above a threshold.

    `lo`/`hi` are the smallest and largest grid learning rates of the contiguous run of grid
    points, containing the curve's best point, whose accuracy is >= `threshold`; `decades` is
    log10(hi / lo) (0 for a single point); `n_points` counts the grid points in the run. A curve
    whose best point is below the threshold has n_points 0 and lo = hi = None.
    """

    threshold: float
    n_points: int
    lo: float | None
    hi: float | None
    decades: float
    best_lr: float
    best_acc: float


def lr_range_width(lrs: Sequence[float], accs: Sequence[float], threshold: float) -> RangeWidth:
    """Measure how wide a range of learning rates reaches `threshold` accuracy.

    Only the run of neighbouring grid points that contains the best point counts: a lucky
    isolated point far away does not widen the range. Ties for the best take the smallest lr.

    Args:
        lrs: the learning-rate grid, strictly increasing.
        accs: one accuracy per learning rate (e.g. the median over seeds).
        threshold: the accuracy a point needs to count as good.
    """
    if len(lrs) != len(accs) or not lrs:
        raise ValueError("lrs and accs must be non-empty and of the same length")
    if any(b <= a for a, b in zip(lrs, lrs[1:], strict=False)):
        raise ValueError("lrs must be strictly increasing")
    best = max(range(len(accs)), key=lambda i: (accs[i], -i))
    base = {"threshold": threshold, "best_lr": lrs[best], "best_acc": accs[best]}
    if not accs[best] >= threshold:
        return RangeWidth(n_points=0, lo=None, hi=None, decades=0.0, **base)
    i = j = best
    while i > 0 and accs[i - 1] >= threshold:
        i -= 1
    while j < len(accs) - 1 and accs[j + 1] >= threshold:
        j += 1
    decades = math.log10(lrs[j] / lrs[i])
    return RangeWidth(n_points=j - i + 1, lo=lrs[i], hi=lrs[j], decades=decades, **base)


def summarize_sweep(
    runs: Sequence[dict], fraction: float = 0.9
) -> tuple[dict[str, dict[str, dict]], dict[str, dict]]:
    """Median/min/max accuracy per (optimizer, bn, lr) and the lr-range width per curve.

    The threshold for an optimizer is `fraction` times the best median accuracy that either BN
    setting reaches with it, so both curves are held to the same bar (a curve that is bad
    everywhere does not get a wide range by being compared with its own poor best).

    Returns:
        (curves, summary): curves[opt][bn] = {"lr", "median", "min", "max", "n_diverged"} lists
        over the grid; summary[opt] = {"best_acc", "threshold", bn: asdict(RangeWidth), ...}.
    """
    curves: dict[str, dict[str, dict]] = {}
    groups: dict[tuple[str, str, float], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["optimizer"], r["bn"], r["lr"]), []).append(r)
    for (opt, bn, lr), rs in sorted(groups.items()):
        accs = [r["final_val_acc"] for r in rs]
        c = curves.setdefault(opt, {}).setdefault(
            bn, {"lr": [], "median": [], "min": [], "max": [], "n_diverged": []}
        )
        c["lr"].append(lr)
        c["median"].append(statistics.median(accs))
        c["min"].append(min(accs))
        c["max"].append(max(accs))
        c["n_diverged"].append(sum(bool(r.get("diverged")) for r in rs))
    summary: dict[str, dict] = {}
    for opt, by_bn in curves.items():
        best = max(max(c["median"]) for c in by_bn.values())
        entry: dict = {"best_acc": best, "threshold": fraction * best, "fraction": fraction}
        for bn, c in by_bn.items():
            entry[bn] = asdict(lr_range_width(c["lr"], c["median"], fraction * best))
        summary[opt] = entry
    return curves, summary


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = {"pre": "tab:blue", "none": "tab:red", "post": "tab:green"}


def plot_sweep(result: dict, path: str) -> None:
    """Draw final validation accuracy against learning rate, one panel per optimizer.

    Each line is the median over seeds, the band spans min..max; the dashed line is the
    threshold (a fraction of the best) and the thick bars under the curves mark the lr range
    that stays above it.
    """
    plt = _pyplot()
    curves, summary = result["curves"], result["summary"]
    opts = list(curves)
    fig, axes = plt.subplots(1, len(opts), figsize=(4.6 * len(opts), 4.0), sharey=True)
    axes = [axes] if len(opts) == 1 else list(axes)
    for ax, opt in zip(axes, opts, strict=True):
        s = summary[opt]
        for k, (bn, c) in enumerate(curves[opt].items()):
            color = COLORS.get(bn, "black")
            w = s[bn]
            label = f"{BN_LABELS.get(bn, bn)}: {w['decades']:.1f} decades"
            ax.plot(c["lr"], c["median"], "o-", color=color, label=label)
            ax.fill_between(c["lr"], c["min"], c["max"], color=color, alpha=0.18, lw=0)
            if w["lo"] is not None:
                y = 0.03 + 0.04 * k
                ax.plot([w["lo"], w["hi"]], [y, y], color=color, lw=5, solid_capstyle="butt")
        ax.axhline(s["threshold"], color="gray", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_title(opt)
        ax.set_xlabel("learning rate")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="center left", fontsize=8)
    st = result["settings"]
    axes[0].set_ylabel("final validation accuracy")
    fig.suptitle(
        f"{st['dataset']}: MLP {tuple(st['hidden'])} {st['activation']}, {st['epochs']} epochs, "
        f"batch {st['batch_size']}, {len(st['seeds'])} seeds (median, band = min..max); "
        f"dashed = {s['fraction']:.0%} of best",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(result: dict, path: str) -> None:
    """Draw the Ioffe & Szegedy figure 1 on digits: accuracy vs step, and one unit's input.

    Left: validation accuracy against training step (median over seeds, band min..max). Then one
    panel per BN setting with the 15/50/85th percentiles of the chosen last-hidden-layer unit's
    sigmoid input over training (first seed).
    """
    plt = _pyplot()
    runs = result["runs"]
    bns = list(runs)
    fig, axes = plt.subplots(1, 1 + len(bns), figsize=(4.6 * (1 + len(bns)), 4.0))
    ax = axes[0]
    for bn in bns:
        r = runs[bn]
        color = COLORS.get(bn, "black")
        ax.plot(r["step"], r["acc_median"], color=color, label=BN_LABELS.get(bn, bn))
        ax.fill_between(r["step"], r["acc_min"], r["acc_max"], color=color, alpha=0.18, lw=0)
    ax.set_xlabel(f"training step (mini-batches of {result['settings']['batch_size']})")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("(a) accuracy during training")
    lims = [
        min(min(runs[bn]["unit_p15"]) for bn in bns),
        max(max(runs[bn]["unit_p85"]) for bn in bns),
    ]
    pad = 0.05 * (lims[1] - lims[0] or 1.0)
    for k, bn in enumerate(bns):
        ax = axes[1 + k]
        r = runs[bn]
        color = COLORS.get(bn, "black")
        for key, ls in (("unit_p15", "--"), ("unit_p50", "-"), ("unit_p85", "--")):
            ax.plot(r["step"], r[key], color=color, ls=ls, label=key[-3:].replace("p", "") + "%")
        ax.set_ylim(lims[0] - pad, lims[1] + pad)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"input to sigmoid, unit {result['settings']['unit']} of last hidden layer")
        ax.set_title(f"({'bcd'[k]}) {BN_LABELS.get(bn, bn)}: 15/50/85th percentiles")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    st = result["settings"]
    fig.suptitle(
        f"Ioffe & Szegedy (2015) MNIST setup on {st['dataset']}: hidden {tuple(st['hidden'])} "
        f"sigmoid, {st['optimizer']} lr {st['lr']}, {len(st['seeds'])} seeds",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
