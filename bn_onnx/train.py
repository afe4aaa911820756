"""Training loop: seeded, best-by-validation, early stopping, progress through a callback.

`train(TrainSettings(...), out_dir)` is the Python API behind `bn-onnx train`; it returns a
`TrainResult` with the per-epoch history and prints nothing. The same seed on CPU gives a
bit-identical `model.safetensors` under the same torch build, CPU kernels and thread count,
which `config.json["reproducibility"]` records (`reproducibility_record`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bn_onnx import _lazy_dynamo
from bn_onnx.checkpoint import library_versions, save_checkpoint
from bn_onnx.column_kinds import TABULAR_KINDS
from bn_onnx.data import Dataset, load_dataset
from bn_onnx.errors import UsageError
from bn_onnx.model import MLP, MLPConfig, build_network

OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adam")
# Learning rates that work for the default MLP on the bundled data, per optimizer.
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.02, "rmsprop": 1e-3, "adam": 1e-3}
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainSettings:
    """Everything a training run depends on; stored in `config.json["training"]`.

    Attributes:
        dataset: digits, wine, breast-cancer, iris, synthetic, or a .csv/.parquet/.npz path.
        target: Target column of a CSV or Parquet file.
        categorical, continuous: File columns to take as categorical / continuous (others
            are inferred; see `bn_onnx.data`); None or empty: all inferred.
        na_values: Text cells of a file that are missing values (None: the default,
            `bn_onnx.columns.NA_VALUES`).
        max_categories, min_frequency: Caps on each categorical vocabulary (rare values
            become "unknown"); dates: "drop" or "keep" a date-like text column
            (`bn_onnx.data.load_dataset`).
        embedding_dropout: Dropout on the concatenated embeddings of a tabular model.
        task: classification or regression (None: inferred from the data).
        samples, features, classes: Size of synthetic data.
        hidden, bn, input_norm, activation, dropout, bn_eps, bn_momentum: The model
            (see `MLPConfig`).
        optimizer: sgd, momentum (SGD with momentum 0.9), rmsprop or adam.
        lr: Learning rate; None picks `DEFAULT_LR[optimizer]`.
        weight_decay: L2 penalty (PyTorch's `weight_decay`) on all parameters.
        epochs: Maximum number of passes over the training split.
        batch_size: Rows per optimizer step (per process under DDP).
        patience: Stop after this many epochs without a better validation loss (0: never).
        seed: Seeds the split, the initial weights, the shuffling and dropout.
        val_fraction, test_fraction: Shares of the rows held out (test_fraction 0: none,
            the test metrics are None).
        device: auto (CUDA if available), cpu or cuda.
        threads: torch CPU threads during the run (restored afterwards); None keeps torch's
            setting. Small MLPs train fastest on one thread, and a fixed count keeps CPU runs
            bit-reproducible.
    """

    dataset: str = "digits"
    target: str | None = None
    task: str | None = None
    samples: int = 2000
    features: int = 20
    classes: int = 3
    hidden: tuple[int, ...] = (128, 64)
    bn: str = "pre"
    input_norm: bool = True
    activation: str = "relu"
    dropout: float = 0.0
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    optimizer: str = "adam"
    lr: float | None = None
    weight_decay: float = 0.0
    epochs: int = 60
    batch_size: int = 64
    patience: int = 15
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    device: str = "auto"
    threads: int | None = 1
    categorical: tuple[str, ...] | None = None
    continuous: tuple[str, ...] | None = None
    na_values: tuple[str, ...] | None = None
    max_categories: int | None = None
    min_frequency: int = 1
    dates: str = "drop"
    embedding_dropout: float = 0.0

    def __post_init__(self) -> None:
        self.hidden = tuple(self.hidden)
        self.dataset = os.fspath(self.dataset)
        if self.categorical is not None:
            self.categorical = tuple(self.categorical)
        if self.continuous is not None:
            self.continuous = tuple(self.continuous)
        if self.na_values is not None:
            self.na_values = tuple(self.na_values)

    def resolved_lr(self) -> float:
        """The learning rate in use: `lr` or the optimizer's default."""
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.optimizer]

    def load_data(self) -> Dataset:
        """The dataset and seeded split these settings name."""
        return load_dataset(
            self.dataset,
            target=self.target,
            task=self.task,
            seed=self.seed,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            n_samples=self.samples,
            n_features=self.features,
            n_classes=self.classes,
            categorical=self.categorical,
            continuous=self.continuous,
            na_values=self.na_values,
            max_categories=self.max_categories,
            min_frequency=self.min_frequency,
            dates=self.dates,
        )

    def validate(self) -> None:
        """Raise `UsageError` for values no run can use."""
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(
                f"unknown optimizer {self.optimizer!r} (choose from {', '.join(OPTIMIZERS)})"
            )
        if self.device not in DEVICES:
            raise UsageError(f"unknown device {self.device!r} (choose from {', '.join(DEVICES)})")
        lr = self.resolved_lr()
        if not (math.isfinite(lr) and lr > 0):
            raise UsageError(f"learning rate must be > 0, got {lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UsageError(f"weight decay must be >= 0, got {self.weight_decay}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(
                    f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}"
                )
        if self.patience < 0:
            raise UsageError(f"patience must be >= 0, got {self.patience}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be >= 1, got {self.threads}")
        if self.bn != "none" and self.batch_size < 2:
            raise UsageError("batch norm needs a batch size of at least 2")
        p = self.embedding_dropout
        if not (math.isfinite(p) and 0 <= p < 1):
            raise UsageError(f"embedding dropout must be in [0, 1), got {p}")


@dataclass
class EpochStats:
    """One epoch's numbers. `*_metric` is accuracy (classification) or RMSE (regression)."""

    epoch: int
    train_loss: float
    train_metric: float
    val_loss: float
    val_metric: float
    seconds: float
    improved: bool


@dataclass
class ProgressEvent:
    """What the loop reports to the `progress` callback.

    `kind` is "start" (before the first epoch), "epoch" (after each epoch, with `stats`) or
    "done" (after the test evaluation, with `metrics`).
    """

    kind: str
    epoch: int
    epochs: int
    metric_name: str
    stats: EpochStats | None = None
    metrics: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()  # "start": warnings about the data (`Dataset.notes`)


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        model: The best-by-validation model, in eval mode, on CPU.
        dataset: The data it was trained and tested on.
        history: One `EpochStats` per epoch run.
        best_epoch: Epoch whose weights were kept.
        stopped_early: Whether patience ran out before `epochs`.
        metrics: Final metrics (the contents of `metrics.json`).
        checkpoint_dir: Where the checkpoint was written (None if not saved).
        seconds: Wall time of the training loop.
    """

    model: MLP
    dataset: Dataset
    history: list[EpochStats]
    best_epoch: int
    stopped_early: bool
    metrics: dict[str, Any]
    checkpoint_dir: Path | None
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)


def input_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Per-feature mean and population variance of the training rows, in float64.

    A constant feature gets variance 1 (it is centred, not scaled), so rows that differ from
    the training set in that feature are not blown up by 1/sqrt(eps).
    """
    x64 = np.asarray(x, dtype=np.float64)
    mean = x64.mean(axis=0)
    var = x64.var(axis=0)
    constant = [int(i) for i in np.flatnonzero(var <= 1e-12)]
    var[constant] = 1.0
    return mean, var, constant


def make_optimizer(name: str, params: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The torch optimizer for one of `OPTIMIZERS`."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise UsageError(f"unknown optimizer {name!r} (choose from {', '.join(OPTIMIZERS)})")


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but this torch has no usable CUDA GPU")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _batches(n: int, batch_size: int, order: torch.Tensor, drop_single: bool) -> list[torch.Tensor]:
    out = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    # BatchNorm cannot take batch statistics of one row; that row waits for the next epoch.
    if drop_single and out and len(out[-1]) < 2:
        out.pop()
    return out


class _Objective:
    """Loss and metric of the task; regression targets are standardized while training."""

    def __init__(self, data: Dataset, device: torch.device) -> None:
        self.task = data.task
        self.metric_name = "accuracy" if data.task == "classification" else "rmse"
        if self.task == "regression":
            y = data.y_train.astype(np.float64)
            self.y_mean = y.mean(axis=0)
            std = y.std(axis=0)
            self.y_std = np.where(std > 1e-12, std, 1.0)
        self.device = device

    def targets(self, y: np.ndarray) -> torch.Tensor:
        if self.task == "classification":
            return torch.from_numpy(y).to(self.device)
        z = (y.astype(np.float64) - self.y_mean) / self.y_std
        return torch.from_numpy(z.astype(np.float32)).to(self.device)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            return nn.functional.cross_entropy(out, y)
        return nn.functional.mse_loss(out, y)

    def metric_tensor(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Correct predictions (classification) or squared error in target units (regression)."""
        if self.task == "classification":
            return (out.argmax(dim=1) == y).sum().double()
        scale = torch.as_tensor(self.y_std, dtype=torch.float64, device=out.device)
        return (((out.double() - y.double()) * scale) ** 2).sum() / out.shape[1]

    def metric_sum(self, out: torch.Tensor, y: torch.Tensor) -> float:
        """`metric_tensor` as a Python float."""
        return float(self.metric_tensor(out, y))

    def finish(self, total: float, n: int) -> float:
        return total / n if self.task == "classification" else math.sqrt(total / n)

    def unscale_head(self, model: MLP) -> None:
        """Fold the target standardization into the head so the model predicts raw units."""
        if self.task != "regression":
            return
        with torch.no_grad():
            std = torch.as_tensor(self.y_std, dtype=torch.float64)
            mean = torch.as_tensor(self.y_mean, dtype=torch.float64)
            w = model.head.weight.double() * std[:, None]
            b = model.head.bias.double() * std + mean
            model.head.weight.copy_(w.float())
            model.head.bias.copy_(b.float())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    objective: _Objective,
    x: torch.Tensor | tuple[torch.Tensor, ...],
    y: torch.Tensor,
    batch_size: int = 4096,
) -> tuple[float, float]:
    """Mean loss and metric of `model` in eval mode on (x, y).

    `x` is the model's input, or a tuple of its inputs (a tabular model's numeric and codes).
    """
    model.eval()
    xs = x if isinstance(x, tuple) else (x,)
    loss_sum = metric_sum = 0.0
    n = len(y)
    for i in range(0, n, batch_size):
        out = model(*(t[i : i + batch_size] for t in xs))
        yb = y[i : i + batch_size]
        loss_sum += float(objective.loss(out, yb)) * len(yb)
        metric_sum += objective.metric_sum(out, yb)
    return loss_sum / n, objective.finish(metric_sum, n)


def _config(settings: TrainSettings, data: Dataset, in_features: int, **extra: Any) -> MLPConfig:
    """The network config `settings` ask for on `data`, `in_features` wide; `extra` as given."""
    return MLPConfig(
        in_features=in_features,
        out_features=data.n_outputs,
        hidden=settings.hidden,
        activation=settings.activation,
        bn=settings.bn,
        bn_eps=settings.bn_eps,
        bn_momentum=settings.bn_momentum,
        input_norm=settings.input_norm,
        dropout=settings.dropout,
        task=data.task,
        **extra,
    )


def build_model(settings: TrainSettings, data: Dataset) -> tuple[MLP, dict[str, Any]]:
    """The untrained MLP for `data` (input stats set) and the preprocessing record.

    A tabular dataset gets a `TabularMLP` whose config holds the dataset's columns, fills and
    vocabularies (`data.tabular`).
    """
    if data.tabular is not None:
        return _build_tabular(settings, data)
    model = MLP(_config(settings, data, data.n_features))
    preprocessing: dict[str, Any] = {
        "input": f"raw features, float32 [batch, {data.n_features}]",
        "feature_names": data.feature_names,
        "input_norm": None,
    }
    if settings.input_norm:
        mean, var, constant = input_statistics(data.x_train)
        model.set_input_stats(mean, var)
        preprocessing["input_norm"] = {
            "in_model": True,
            "eps": settings.bn_eps,
            "mean": [float(v) for v in mean.astype(np.float32)],
            "var": [float(v) for v in var.astype(np.float32)],
            "constant_features": constant,
        }
    return model, preprocessing


def _build_tabular(settings: TrainSettings, data: Dataset) -> tuple[MLP, dict[str, Any]]:
    assert data.tabular is not None
    spec = data.tabular.with_embedding_dropout(settings.embedding_dropout)
    config = _config(settings, data, spec.in_features, tabular=spec)
    model = build_network(config)
    inputs = ", ".join(
        f"{k.name} {k.dtype.name if k.numeric else 'string'} [batch, {n}]"
        for k in TABULAR_KINDS
        if (n := spec.width(k.name))
    )
    preprocessing: dict[str, Any] = {
        "input": f"raw columns by family: {inputs}; NaN / empty string = missing",
        "feature_names": data.feature_names,
        "first_layer_inputs": spec.feature_labels(),
        "fill": "a missing continuous value gets the training split's median "
        "(tabular.columns[].fill); columns with a missing value in the training split also "
        "get a was-missing indicator (tabular.indicators)",
        "categories": "code 0 = missing, 1 = unknown (not in the training split), "
        "2 + k = vocabulary[k]; one embedding row per code",
        "input_norm": None,
    }
    if settings.input_norm:
        mean, var, constant = input_statistics(data.x_train)
        # The was-missing indicators stay 0/1: normalized by a rarely-missing column's
        # statistics, an empty cell would be an input many standard deviations out.
        flags = slice(spec.n_continuous, spec.n_numeric)
        mean[flags], var[flags] = 0.0, 1.0
        constant = [i for i in constant if i < spec.n_continuous]
        model.set_input_stats(mean, var)
        width = spec.embedding_width
        preprocessing["input_norm"] = {
            "in_model": True,
            "eps": settings.bn_eps,
            "mean": [0.0] * width + [float(v) for v in mean.astype(np.float32)],
            "var": [1.0] * width + [float(v) for v in var.astype(np.float32)],
            "constant_features": [width + i for i in constant],
            "note": "spans the first layer's input; the embedding columns and the "
            "was-missing indicators have mean 0, var 1",
        }
    return model, preprocessing


def train(
    settings: TrainSettings,
    out_dir: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
    *,
    dataset: Dataset | None = None,
) -> TrainResult:
    """Train an MLP, keep the best-by-validation weights, test them, save a checkpoint.

    Args:
        settings: The run's settings.
        out_dir: Checkpoint directory to write; None keeps the result in memory only.
        progress: Called with a `ProgressEvent` at the start, after each epoch and at the end.
        dataset: Data already loaded (skips `load_dataset`; its spec is still recorded).

    Raises:
        UsageError, InputFileError: bad settings or data.
    """
    settings.validate()
    from bn_onnx import distributed as dist_mod

    ctx = dist_mod.context(settings.device)
    device = ctx.device if ctx.active else _device(settings.device)
    data = dataset or settings.load_data()
    old_threads = torch.get_num_threads()
    try:
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            base, preprocessing = build_model(settings, data)
            if ctx.active:
                # Same initial weights on every rank, but each rank its own dropout masks.
                torch.manual_seed(settings.seed + 1000 * ctx.rank)
            with _lazy_dynamo.deferred():  # about 2 s of CPU that eager training never uses
                return _fit(settings, data, base, preprocessing, device, ctx, out_dir, progress)
    finally:
        torch.set_num_threads(old_threads)


def _fit(
    settings: TrainSettings,
    data: Dataset,
    base: MLP,
    preprocessing: dict[str, Any],
    device: torch.device,
    ctx: Any,
    out_dir: str | os.PathLike[str] | None,
    progress: ProgressCallback | None,
) -> TrainResult:
    objective = _Objective(data, device)
    base.to(device)
    model: nn.Module = ctx.wrap(base) if ctx.active else base
    optimizer = make_optimizer(
        settings.optimizer, model.parameters(), settings.resolved_lr(), settings.weight_decay
    )
    x_train = tuple(torch.from_numpy(a).to(device) for a in data.inputs("train"))
    y_train = objective.targets(data.y_train)
    x_val = tuple(torch.from_numpy(a).to(device) for a in data.inputs("val"))
    y_val = objective.targets(data.y_val)
    generator = torch.Generator().manual_seed(settings.seed)
    n = len(y_train)

    def report(event: ProgressEvent) -> None:
        if progress is not None and ctx.is_main:
            progress(event)

    report(
        ProgressEvent("start", 0, settings.epochs, objective.metric_name, notes=tuple(data.notes))
    )
    history: list[EpochStats] = []
    best_loss = math.inf
    best_epoch = 0
    best_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    bad_epochs = 0
    stopped_early = False
    t_start = time.perf_counter()
    for epoch in range(1, settings.epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        order = ctx.shard(torch.randperm(n, generator=generator))
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        metric_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        for idx in _batches(len(order), settings.batch_size, order, settings.bn != "none"):
            idx = idx.to(device)
            xb, yb = tuple(t[idx] for t in x_train), y_train[idx]
            out = model(*xb)
            loss = objective.loss(out, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # Summed on the device and read once per epoch: no host sync per step.
            loss_sum += loss.detach().double() * len(idx)
            metric_sum += objective.metric_tensor(out.detach(), yb)
            seen += len(idx)
        loss_sum, metric_sum, seen = ctx.sum_floats(
            [float(loss_sum), float(metric_sum), float(seen)]
        )
        if not math.isfinite(loss_sum):
            raise UsageError(
                f"training diverged at epoch {epoch} (loss is not finite); lower --lr "
                f"(now {settings.resolved_lr()})"
            )
        # Validation on the main process's copy decides for every process (its running
        # statistics are the ones DDP broadcasts and the checkpoint keeps).
        val_loss, val_metric = evaluate(base, objective, x_val, y_val)
        val_loss = ctx.broadcast_float(val_loss)
        val_metric = ctx.broadcast_float(val_metric)
        if not math.isfinite(val_loss):
            raise UsageError(
                f"training diverged at epoch {epoch} (validation loss is not finite); "
                f"lower --lr (now {settings.resolved_lr()})"
            )
        improved = val_loss < best_loss
        if improved:
            best_loss, best_epoch, bad_epochs = val_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
        else:
            bad_epochs += 1
        stats = EpochStats(
            epoch=epoch,
            train_loss=loss_sum / max(seen, 1),
            train_metric=objective.finish(metric_sum, max(seen, 1)),
            val_loss=val_loss,
            val_metric=val_metric,
            seconds=time.perf_counter() - t_epoch,
            improved=improved,
        )
        history.append(stats)
        report(ProgressEvent("epoch", epoch, settings.epochs, objective.metric_name, stats=stats))
        if settings.patience and bad_epochs >= settings.patience:
            stopped_early = epoch < settings.epochs
            break
    seconds = time.perf_counter() - t_start

    final = build_network(base.config)
    final.load_state_dict({k: v.cpu() for k, v in best_state.items()})
    final.eval()
    objective_cpu = _Objective(data, torch.device("cpu"))
    objective_cpu.unscale_head(final)
    metrics = _final_metrics(
        final, data, objective_cpu, history, best_epoch, stopped_early, seconds
    )
    meta = {
        "dataset": data.spec,
        "preprocessing": preprocessing,
        "class_names": data.class_names,
        "training": _training_record(settings, ctx, device),
        "versions": library_versions(),
        "reproducibility": reproducibility_record(device),
    }
    if data.task == "regression":
        preprocessing["target"] = {
            "mean": [float(v) for v in objective_cpu.y_mean],
            "std": [float(v) for v in objective_cpu.y_std],
            "note": "targets were standardized for training; the head was rescaled afterwards, "
            "so the model predicts raw target units",
        }
    saved = None
    if out_dir is not None and ctx.is_main:
        saved = save_checkpoint(final, out_dir, meta, metrics)
    ctx.barrier()
    report(
        ProgressEvent("done", len(history), settings.epochs, objective.metric_name, metrics=metrics)
    )
    return TrainResult(
        model=final,
        dataset=data,
        history=history,
        best_epoch=best_epoch,
        stopped_early=stopped_early,
        metrics=metrics,
        checkpoint_dir=saved,
        seconds=seconds,
        meta=meta,
    )


def _training_record(settings: TrainSettings, ctx: Any, device: torch.device) -> dict[str, Any]:
    record = dataclasses.asdict(settings)
    record["hidden"] = list(settings.hidden)
    # The tabular options are recorded when set, so that earlier checkpoints' config.json
    # (the shipped digits model's) stay byte for byte what this version writes.
    for name, default in (
        ("categorical", None),
        ("continuous", None),
        ("na_values", None),
        ("max_categories", None),
        ("min_frequency", 1),
        ("dates", "drop"),
        ("embedding_dropout", 0.0),
    ):
        if record[name] == default:
            del record[name]
        elif isinstance(record[name], tuple):
            record[name] = list(record[name])
    record["lr"] = settings.resolved_lr()
    record["device"] = device.type
    record["world_size"] = ctx.world_size
    if ctx.active:
        record["distributed"] = ctx.describe()
    return record


# Environment variables that steer oneMKL's kernel choice (torch's CPU BLAS), recorded when set.
_MKL_ENV = ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS")


def reproducibility_record(device: torch.device) -> dict[str, Any]:
    """What a run's bits depend on beyond its settings, for `config.json["reproducibility"]`.

    The same seed and settings give a bit-identical checkpoint only where all of these agree
    (docs/training.md): the torch build, the device, ATen's CPU kernels
    (`torch.backends.cpu.get_cpu_capability()`, lowered with `ATEN_CPU_CAPABILITY`), the
    intra-op thread count (call this while the run's count is in effect), oneMKL's kernel
    variables when set, and the CPU itself (`cpu`, its model name, and `cpu_flags`, its
    `/proc/cpuinfo` feature flags): oneMKL's branches, `MKL_CBWR=COMPATIBLE` included, give
    other bits on another vendor's CPU (measured: Intel Xeon against AMD EPYC).
    """
    return {
        "torch": torch.__version__,
        "device": device.type,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "intra_op_threads": torch.get_num_threads(),
        "mkl": {name: os.environ[name] for name in _MKL_ENV if os.environ.get(name)},
        "cpu": cpu_model_name(),
        "cpu_flags": cpu_flags(),
    }


def cpu_flags() -> str:
    """This CPU's feature flags, sorted, space-separated (Linux `/proc/cpuinfo`; "" elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(set(line.split(":", 1)[1].split())))
    except OSError:
        pass
    return ""


def cpu_model_name() -> str:
    """This CPU's model name (Linux `/proc/cpuinfo`; `platform.processor()` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _final_metrics(
    model: MLP,
    data: Dataset,
    objective: _Objective,
    history: list[EpochStats],
    best_epoch: int,
    stopped_early: bool,
    seconds: float,
) -> dict[str, Any]:
    """Test and validation metrics of the kept model plus the per-epoch history."""
    # The head now predicts raw units: compare against raw targets, without rescaling.
    raw = _RawObjective(objective)
    metrics: dict[str, Any] = {"task": data.task, "metric": objective.metric_name}
    # (the split sizes are also in config.json["dataset"]["sizes"])
    for split, y in (("val", data.y_val), ("test", data.y_test)):
        loss = metric = None  # --test-fraction 0: no test split
        if len(y):
            x = tuple(torch.from_numpy(a) for a in data.inputs(split))
            loss, metric = evaluate(model, raw, x, torch.from_numpy(y))
        metrics[f"{split}_loss"] = loss
        metrics[f"{split}_{objective.metric_name}"] = metric
        metrics[f"n_{split}"] = len(y)
    metrics.update(
        best_epoch=best_epoch,
        epochs_run=len(history),
        stopped_early=stopped_early,
        train_seconds=round(seconds, 3),
        history=[dataclasses.asdict(h) for h in history],
    )
    if data.task == "regression":
        metrics["loss_note"] = "test_loss/val_loss are MSE in raw target units"
    return metrics


class _RawObjective(_Objective):
    """The task's loss and metric on raw (unstandardized) targets."""

    def __init__(self, base: _Objective) -> None:
        self.task = base.task
        self.metric_name = base.metric_name
        self.device = base.device
        if self.task == "regression":
            self.y_mean = np.zeros_like(base.y_mean)
            self.y_std = np.ones_like(base.y_std)
