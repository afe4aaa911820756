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

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

# progress(done, total, what): called after each unit of work.
Reporter = Callable[[int, int, str], None]

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
    # Optimizers and BN settings keep the order they first appear in; lrs are sorted.
    groups: dict[str, dict[str, dict[float, list[float]]]] = {}
    diverged: dict[tuple[str, str, float], int] = {}
    for r in runs:
        key = (r["optimizer"], r["bn"], r["lr"])
        groups.setdefault(key[0], {}).setdefault(key[1], {}).setdefault(key[2], [])
        groups[key[0]][key[1]][key[2]].append(r["final_val_acc"])
        diverged[key] = diverged.get(key, 0) + bool(r.get("diverged"))
    curves: dict[str, dict[str, dict]] = {}
    for opt, by_bn in groups.items():
        for bn, by_lr in by_bn.items():
            lrs = sorted(by_lr)
            curves.setdefault(opt, {})[bn] = {
                "lr": lrs,
                "median": [statistics.median(by_lr[lr]) for lr in lrs],
                "min": [min(by_lr[lr]) for lr in lrs],
                "max": [max(by_lr[lr]) for lr in lrs],
                "n_diverged": [diverged[(opt, bn, lr)] for lr in lrs],
            }
    summary: dict[str, dict] = {}
    for opt, by_bn in curves.items():
        best = max(max(c["median"]) for c in by_bn.values())
        entry: dict = {"best_acc": best, "threshold": fraction * best, "fraction": fraction}
        for bn, c in by_bn.items():
            entry[bn] = asdict(lr_range_width(c["lr"], c["median"], fraction * best))
        summary[opt] = entry
    return curves, summary


@dataclass(frozen=True)
class SweepModel:
    """One network the sweep trains: hidden widths and activation."""

    hidden: tuple[int, ...]
    activation: str


# The project's default MLP, and the Ioffe & Szegedy MNIST network.
SWEEP_MODELS = {
    "relu": SweepModel(hidden=(128, 64), activation="relu"),
    "sigmoid": SweepModel(hidden=(100, 100, 100), activation="sigmoid"),
}


@dataclass(frozen=True)
class SweepSettings:
    """The learning-rate sweep's grid and training budget.

    Every run trains for exactly `epochs` epochs (no early stopping) and reports the last
    epoch's validation accuracy, so a learning rate that is too small or too large shows.
    """

    dataset: str = "digits"
    models: tuple[str, ...] = ("relu", "sigmoid")
    optimizers: tuple[str, ...] = ("sgd", "momentum", "adam")
    bn_modes: tuple[str, ...] = ("pre", "none")
    lrs: tuple[float, ...] = lr_grid(1e-4, 10**0.5, 10)
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 10
    batch_size: int = 60
    fraction: float = 0.9

    @classmethod
    def quick(cls) -> SweepSettings:
        """A tiny grid that runs in a second or two (for tests)."""
        return cls(
            models=("relu",), optimizers=("sgd", "adam"), lrs=(0.01, 0.3), seeds=(0,), epochs=1
        )


@dataclass(frozen=True)
class CurveSettings:
    """The Ioffe & Szegedy (2015) MNIST experiment, scaled to digits.

    Three hidden layers of 100 sigmoid units, mini-batches of 60, plain SGD; validation
    accuracy after every epoch, and the 15/50/85th percentiles (over the validation rows) of
    the input to the sigmoid of `unit` in the last hidden layer.
    """

    dataset: str = "digits"
    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "sigmoid"
    bn_modes: tuple[str, ...] = ("none", "pre")
    optimizer: str = "sgd"
    lr: float = 0.5
    batch_size: int = 60
    epochs: int = 80
    seeds: tuple[int, ...] = (0, 1, 2)
    unit: int = 0

    @classmethod
    def quick(cls) -> CurveSettings:
        """A tiny run that finishes in a second or two (for tests)."""
        return cls(hidden=(16, 16, 16), epochs=2, seeds=(0,))


def _settings_dict(settings: object) -> dict:
    d = asdict(settings)  # type: ignore[call-overload]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _load(dataset: str, seed: int, cache: dict):
    """The dataset split for `seed`, loaded once (train() would load the same split)."""
    from bn_onnx.data import load_dataset
    from bn_onnx.train import TrainSettings

    if (dataset, seed) not in cache:
        d = TrainSettings()
        cache[(dataset, seed)] = load_dataset(
            dataset, seed=seed, val_fraction=d.val_fraction, test_fraction=d.test_fraction
        )
    return cache[(dataset, seed)]


def _chance(y) -> float:
    """Accuracy of always predicting the commonest class: what a diverged run is scored."""
    import numpy as np

    return float(np.bincount(y).max() / len(y))


def _train_one(train_settings, data) -> dict:
    """Train one run; return its final/best validation accuracy, or mark it diverged.

    `train` raises UsageError("training diverged ...") when the loss stops being finite; such a
    run is scored at chance level (commonest class share) and flagged.
    """
    from bn_onnx.errors import UsageError
    from bn_onnx.train import train

    t0 = time.perf_counter()
    epochs: list[float] = []

    def on_event(event) -> None:
        if event.kind == "epoch":
            epochs.append(event.stats.val_metric)

    try:
        result = train(train_settings, None, progress=on_event, dataset=data)
    except UsageError as exc:
        if "diverged" not in str(exc):
            raise
        acc = _chance(data.y_val)
        return {
            "final_val_acc": acc,
            "best_val_acc": max([acc, *epochs]),
            "diverged": True,
            "diverged_epoch": len(epochs) + 1,
            "seconds": round(time.perf_counter() - t0, 3),
        }
    hist = result.history
    return {
        "final_val_acc": float(hist[-1].val_metric),
        "best_val_acc": float(max(h.val_metric for h in hist)),
        "diverged": False,
        "diverged_epoch": None,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def run_sweep(settings: SweepSettings, progress: Reporter | None = None) -> dict:
    """Train every (model, optimizer, BN, lr, seed) of the grid; return runs and summaries.

    Returns:
        {"experiment", "settings", "models": {name: {"settings", "runs", "curves",
        "summary"}}, "versions", "seconds"}; `curves`/`summary` as from `summarize_sweep`.
    """
    from bn_onnx.checkpoint import library_versions
    from bn_onnx.train import TrainSettings

    t0 = time.perf_counter()
    cache: dict = {}
    total = len(settings.models) * len(settings.optimizers) * len(settings.bn_modes)
    total *= len(settings.lrs) * len(settings.seeds)
    done = 0
    out: dict = {
        "experiment": "lr-sweep",
        "settings": _settings_dict(settings),
        "models": {},
    }
    for name in settings.models:
        model = SWEEP_MODELS[name]
        runs = []
        for opt in settings.optimizers:
            for bn in settings.bn_modes:
                for lr in settings.lrs:
                    for seed in settings.seeds:
                        ts = TrainSettings(
                            dataset=settings.dataset,
                            hidden=model.hidden,
                            activation=model.activation,
                            bn=bn,
                            optimizer=opt,
                            lr=lr,
                            epochs=settings.epochs,
                            batch_size=settings.batch_size,
                            patience=0,
                            seed=seed,
                            device="cpu",
                            threads=1,  # results and timings independent of the core count
                        )
                        data = _load(settings.dataset, seed, cache)
                        run = {"optimizer": opt, "bn": bn, "lr": lr, "seed": seed}
                        run.update(_train_one(ts, data))
                        runs.append(run)
                        done += 1
                        if progress is not None:
                            progress(
                                done,
                                total,
                                f"sweep: {name} {opt} bn={bn} lr={lr:g} seed={seed} "
                                f"acc={run['final_val_acc']:.3f}",
                            )
        curves, summary = summarize_sweep(runs, settings.fraction)
        part_settings = _settings_dict(settings)
        part_settings.update(model=name, hidden=list(model.hidden), activation=model.activation)
        out["models"][name] = {
            "settings": part_settings,
            "runs": runs,
            "curves": curves,
            "summary": summary,
        }
    out["versions"] = library_versions()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


class _UnitRecorder:
    """Record, at every validation pass, percentiles of one last-hidden-layer unit's input.

    `train` builds its model internally and reports epochs without it, so a global
    module-forward pre-hook spots the MLP on its first call and hooks the last block's
    activation; it also counts training-mode forwards, which are the optimizer steps.
    """

    def __init__(self, unit: int, n_val: int) -> None:
        from bn_onnx.model import MLP

        self.mlp_class = MLP
        self.unit, self.n_val = unit, n_val
        self.model = None
        self.steps = 0
        self.last: list[float] | None = None
        self.handles: list = []

    def __enter__(self) -> _UnitRecorder:
        from torch.nn.modules.module import register_module_forward_pre_hook

        self.handles.append(register_module_forward_pre_hook(self._any_module))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def _any_module(self, module, args) -> None:
        if not isinstance(module, self.mlp_class):
            return
        if self.model is None:
            self.model = module
            self.handles.append(module.blocks[-1].act.register_forward_pre_hook(self._act))
        if module is self.model and module.training:
            self.steps += 1

    def _act(self, module, args) -> None:
        import numpy as np

        (x,) = args
        if not module.training and x.shape[0] == self.n_val:
            col = x[:, self.unit].detach().double().numpy()
            self.last = [float(v) for v in np.percentile(col, [15, 50, 85])]


def _curve_run(
    settings: CurveSettings, bn: str, seed: int, data, tick: Callable[[int, float], None]
) -> dict:
    """One training run of the curve experiment: accuracy, steps and unit input per epoch."""
    from bn_onnx.errors import UsageError
    from bn_onnx.train import TrainSettings, train

    ts = TrainSettings(
        dataset=settings.dataset,
        hidden=settings.hidden,
        activation=settings.activation,
        bn=bn,
        optimizer=settings.optimizer,
        lr=settings.lr,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        patience=0,
        seed=seed,
        device="cpu",
        threads=1,
    )
    rec = _UnitRecorder(settings.unit, len(data.y_val))
    run: dict = {"acc": [], "step": [], "pct": [], "diverged": False}

    def on_event(event) -> None:
        if event.kind == "epoch":
            run["acc"].append(float(event.stats.val_metric))
            run["step"].append(rec.steps)
            run["pct"].append(list(rec.last or [math.nan] * 3))
            tick(event.epoch, run["acc"][-1])

    try:
        with rec:
            train(ts, None, progress=on_event, dataset=data)
    except UsageError as exc:
        if "diverged" not in str(exc):
            raise
        run["diverged"] = True
        run["acc"].extend([_chance(data.y_val)] * (settings.epochs - len(run["acc"])))
    return run


CURVE_TARGETS = (0.8, 0.9, 0.95)


def first_step_reaching(steps: Sequence[int], accs: Sequence[float], target: float) -> int | None:
    """The first recorded step whose accuracy is >= `target`, or None if none is."""
    for step, acc in zip(steps, accs, strict=False):
        if acc >= target:
            return int(step)
    return None


def run_curves(settings: CurveSettings, progress: Reporter | None = None) -> dict:
    """Train the paper's network with and without BN; record accuracy and unit input per epoch.

    Returns:
        {"experiment", "settings", "runs": {bn: {"step", "acc_median", "acc_min", "acc_max",
        "acc_per_seed", "unit_p15", "unit_p50", "unit_p85", "diverged"}}, "versions",
        "seconds"}; steps and unit percentiles are from the first seed.
    """
    from bn_onnx.checkpoint import library_versions

    t0 = time.perf_counter()
    cache: dict = {}
    total = len(settings.bn_modes) * len(settings.seeds) * settings.epochs
    done = 0
    runs: dict[str, dict] = {}
    for bn in settings.bn_modes:
        seed_runs = []
        for seed in settings.seeds:

            def tick(epoch: int, acc: float, bn: str = bn, seed: int = seed) -> None:
                nonlocal done
                done += 1
                if progress is not None:
                    what = f"curves: bn={bn} seed={seed} epoch {epoch} acc={acc:.3f}"
                    progress(done, total, what)

            data = _load(settings.dataset, seed, cache)
            seed_runs.append(_curve_run(settings, bn, seed, data, tick))
        first = seed_runs[0]
        n = len(first["step"])
        cols = list(zip(*(r["acc"][:n] for r in seed_runs), strict=True))
        runs[bn] = {
            "step": first["step"],
            "acc_median": [statistics.median(c) for c in cols],
            "acc_min": [min(c) for c in cols],
            "acc_max": [max(c) for c in cols],
            "acc_per_seed": [r["acc"] for r in seed_runs],
            "unit_p15": [p[0] for p in first["pct"]],
            "unit_p50": [p[1] for p in first["pct"]],
            "unit_p85": [p[2] for p in first["pct"]],
            "diverged": [r["diverged"] for r in seed_runs],
        }
        runs[bn]["summary"] = {
            "final_acc_median": runs[bn]["acc_median"][-1] if cols else math.nan,
            **{
                f"steps_to_{round(t * 100)}": first_step_reaching(
                    runs[bn]["step"], runs[bn]["acc_median"], t
                )
                for t in CURVE_TARGETS
            },
        }
    return {
        "experiment": "ioffe-szegedy-curves",
        "settings": _settings_dict(settings),
        "runs": runs,
        "versions": library_versions(),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def to_json(result: dict) -> str:
    """Strict JSON text of a result: non-finite floats (a diverged run's stats) become null."""

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(result), indent=1, allow_nan=False) + "\n"


def format_sweep_summary(result: dict) -> str:
    """A plain-text table of the sweep: per model and optimizer, the lr-range widths."""
    lines = []
    for name, part in result["models"].items():
        st = part["settings"]
        lines.append(
            f"{name}: hidden {tuple(st['hidden'])} {st['activation']}, {st['epochs']} epochs, "
            f"batch {st['batch_size']}, seeds {st['seeds']}; "
            f"range = lrs whose median final val acc >= {st['fraction']:.0%} of the best"
        )
        lines.append(
            f"  {'optimizer':<9} {'best':>6} {'bar':>6}  "
            + "  ".join(f"{BN_LABELS.get(bn, bn):<34}" for bn in st["bn_modes"])
        )
        for opt, s in part["summary"].items():
            cells = []
            for bn in st["bn_modes"]:
                w = s[bn]
                span = f"{w['lo']:g}..{w['hi']:g}" if w["lo"] is not None else "none"
                text = f"{w['decades']:.1f} dec ({w['n_points']} pts, {span})"
                cells.append(f"{text} best {w['best_acc']:.3f}".ljust(34))
            lines.append(
                f"  {opt:<9} {s['best_acc']:>6.3f} {s['threshold']:>6.3f}  " + "  ".join(cells)
            )
    lines.append(f"({result['seconds']:.0f} s)")
    return "\n".join(lines)


def format_curves_summary(result: dict) -> str:
    """A plain-text summary of the learning curves: final accuracy and steps to targets."""
    st = result["settings"]
    lines = [
        f"curves: hidden {tuple(st['hidden'])} {st['activation']}, {st['optimizer']} lr "
        f"{st['lr']}, batch {st['batch_size']}, {st['epochs']} epochs, seeds {st['seeds']}"
    ]
    for bn, r in result["runs"].items():
        s = r["summary"]
        reach = ", ".join(
            f"{round(t * 100)}% at step {s[f'steps_to_{round(t * 100)}']}" for t in CURVE_TARGETS
        )
        lines.append(
            f"  {BN_LABELS.get(bn, bn):<11} final median val acc {s['final_acc_median']:.3f}; "
            f"{reach}"
        )
    lines.append(f"({result['seconds']:.0f} s)")
    return "\n".join(lines)


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = {"pre": "tab:blue", "none": "tab:red", "post": "tab:green"}


def _save(plt: Any, fig: Any, title: str, path: str) -> None:
    """Title `fig`, write it to `path` as a PNG and close it."""
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


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
            label = f"{BN_LABELS.get(bn, bn)}: {w['decades']:.1f} decades ({w['n_points']} lrs)"
            ax.plot(c["lr"], c["median"], "o-", color=color, label=label)
            ax.fill_between(c["lr"], c["min"], c["max"], color=color, alpha=0.18, lw=0)
            if w["lo"] is not None:
                y = 0.03 + 0.04 * k
                # The '|' ends keep a one-point range (zero decades) visible.
                ax.plot(
                    [w["lo"], w["hi"]],
                    [y, y],
                    color=color,
                    lw=5,
                    marker="|",
                    markersize=14,
                    markeredgewidth=3,
                    solid_capstyle="butt",
                )
        ax.axhline(s["threshold"], color="gray", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_title(opt)
        ax.set_xlabel("learning rate")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="center left", fontsize=8)
    st = result["settings"]
    axes[0].set_ylabel("final validation accuracy")
    title = (
        f"{st['dataset']}: MLP {tuple(st['hidden'])} {st['activation']}, {st['epochs']} epochs, "
        f"batch {st['batch_size']}, {len(st['seeds'])} seeds (median, band = min..max); "
        f"dashed = {s['fraction']:.0%} of best"
    )
    _save(plt, fig, title, path)


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
    title = (
        f"Ioffe & Szegedy (2015) MNIST setup on {st['dataset']}: hidden {tuple(st['hidden'])} "
        f"sigmoid, {st['optimizer']} lr {st['lr']}, {len(st['seeds'])} seeds"
    )
    _save(plt, fig, title, path)
