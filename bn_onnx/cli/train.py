"""`bn-onnx train`: train an MLP with batch norm on a dataset and write a checkpoint directory."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from bn_onnx.cli._common import (
    add_command,
    int_list,
    non_negative_float,
    non_negative_int,
    positive_int,
)

DATASETS = "digits, wine, breast-cancer, iris, synthetic, or a .csv/.parquet/.npz file"


def _bounded(ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """argparse type: a finite float >= 0 for which `ok` holds ("expected EXPECTED" if not)."""

    def parse(text: str) -> float:
        value = non_negative_float(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


_fraction = _bounded(lambda v: 0 < v < 0.5, "a fraction between 0 and 0.5")
_dropout = _bounded(lambda v: v < 1, "a probability in [0, 1)")
_unit_interval = _bounded(lambda v: v <= 1, "a number in [0, 1]")
_positive_float = _bounded(lambda v: v > 0, "a number > 0")


def _test_fraction(text: str) -> float:
    value = non_negative_float(text)
    if not 0 <= value < 0.5:
        raise argparse.ArgumentTypeError(f"expected 0 (no test split) up to 0.5, got {text}")
    return value


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated column names, e.g. city,zip")
    return names


def _na_values(text: str) -> list[str]:
    """`--na-values`: comma-separated spellings; an empty cell is always missing."""
    return ["", *(v.strip() for v in text.split(",") if v.strip())]


HELP = "train an MLP with batch norm and write a checkpoint directory"
DESCRIPTION = """\
Train a multilayer perceptron with batch normalization on a bundled, synthetic
or user dataset (seeded, stratified train/validation/test split), keep the epoch
with the best validation loss, and write a checkpoint directory: config.json,
model.safetensors, metrics.json. The same --seed on CPU gives a bit-identical
model.safetensors on the same machine and build (CPU, torch build, CPU kernels
and --threads) (recorded in config.json["reproducibility"]; see docs/training.md)."""
EPILOG = """\
examples:
  bn-onnx train --dataset digits --out runs/digits
  bn-onnx train --dataset iris --hidden 32,16 --bn post --activation tanh --out runs/iris
  bn-onnx train --dataset data.csv --target label --out runs/csv
  bn-onnx train --dataset people.parquet --target label --categorical zip --out runs/people
  bn-onnx train --dataset synthetic --task regression --samples 5000 --out runs/reg
  bn-onnx train --nproc 2 --dataset digits --out runs/ddp   (DistributedDataParallel)"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `train` and its options."""
    p = add_command(subparsers, "train", HELP, DESCRIPTION, EPILOG)
    data = p.add_argument_group("data")
    data.add_argument(
        "--dataset",
        default="digits",
        metavar="NAME|PATH",
        help=f"training data: {DATASETS} (default: digits)",
    )
    data.add_argument(
        "--target",
        metavar="COLUMN",
        help="target column of a CSV or Parquet file (required for them)",
    )
    data.add_argument(
        "--categorical",
        type=_names,
        metavar="A,B",
        help="columns of a file to treat as categories (learned embeddings); others are "
        "inferred: numbers are continuous, anything else categorical",
    )
    data.add_argument(
        "--na-values",
        type=_na_values,
        metavar="A,B",
        help="text cells of a file that are missing values, compared case-insensitively; "
        "an empty cell always is (default: NA,N/A,NaN,null; '' for empty cells only). "
        "The model reads them the same way in run, serve and Predictor",
    )
    data.add_argument(
        "--max-categories",
        type=positive_int,
        metavar="N",
        help="keep at most N values per categorical column, the most frequent; the rest "
        "read as unknown (default: all)",
    )
    data.add_argument(
        "--min-frequency",
        type=positive_int,
        default=1,
        metavar="N",
        help="keep only category values seen in at least N training rows (default: 1)",
    )
    data.add_argument(
        "--dates",
        choices=("drop", "keep"),
        default="drop",
        help="a column of dates (2008-03-15, 3/15/2008) not given as --categorical: drop it "
        "(default) or keep it as a category; the graph cannot compute date parts from text, "
        "so add year, month, day of week as number columns to use them",
    )
    data.add_argument(
        "--continuous",
        type=_names,
        metavar="C,D",
        help="columns of a file to treat as numbers (a text cell is then an error); an "
        "empty cell is a missing value, filled with the training median",
    )
    data.add_argument(
        "--task",
        choices=["classification", "regression"],
        help="classification or regression (default: inferred; synthetic: classification)",
    )
    data.add_argument(
        "--samples",
        metavar="N",
        type=positive_int,
        default=2000,
        help="rows of synthetic data (default: 2000)",
    )
    data.add_argument(
        "--features",
        metavar="N",
        type=positive_int,
        default=20,
        help="features of synthetic data (default: 20)",
    )
    data.add_argument(
        "--classes",
        metavar="N",
        type=positive_int,
        default=3,
        help="classes of synthetic data (default: 3)",
    )
    data.add_argument(
        "--valid-fraction",
        "--val-fraction",
        dest="val_fraction",
        metavar="F",
        type=_fraction,
        default=0.15,
        help="share of rows for validation (best epoch, early stopping; default: 0.15)",
    )
    data.add_argument(
        "--test-fraction",
        metavar="F",
        type=_test_fraction,
        default=0.15,
        help="share of rows for the final test metrics (default: 0.15); 0 trains on "
        "everything but the validation split (a file already split off its test rows)",
    )

    model = p.add_argument_group("model")
    model.add_argument(
        "--hidden",
        type=int_list,
        default=[128, 64],
        metavar="N,N,...",
        help="hidden layer widths, comma-separated (default: 128,64)",
    )
    model.add_argument(
        "--bn",
        choices=["pre", "post", "none"],
        default="pre",
        help="batch norm in each hidden block: pre = linear->BN->activation, "
        "post = linear->activation->BN, none = no BN (default: pre)",
    )
    model.add_argument(
        "--input-norm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="normalize raw inputs inside the model with frozen training-set mean and "
        "variance, so the exported model takes raw features (default: on)",
    )
    model.add_argument(
        "--activation",
        choices=["relu", "gelu", "tanh", "sigmoid", "silu"],
        default="relu",
        help="activation of the hidden blocks (default: relu)",
    )
    model.add_argument(
        "--dropout",
        metavar="P",
        type=_dropout,
        default=0.0,
        help="dropout probability after each hidden block (default: 0)",
    )
    model.add_argument(
        "--embedding-dropout",
        metavar="P",
        type=_dropout,
        default=0.0,
        help="dropout on the categorical embeddings of a tabular model (default: 0)",
    )
    model.add_argument(
        "--bn-eps",
        metavar="EPS",
        type=_positive_float,
        default=1e-5,
        help="epsilon of every batch norm, input norm included (default: 1e-5)",
    )
    model.add_argument(
        "--bn-momentum",
        metavar="M",
        type=_unit_interval,
        default=0.1,
        help="PyTorch momentum of the BN running statistics, in [0, 1] (default: 0.1)",
    )

    opt = p.add_argument_group("optimization")
    opt.add_argument(
        "--optimizer",
        choices=["sgd", "momentum", "rmsprop", "adam"],
        default="adam",
        help="sgd, momentum (SGD with momentum 0.9), rmsprop or adam (default: adam)",
    )
    opt.add_argument(
        "--lr",
        metavar="LR",
        type=_positive_float,
        help="learning rate (default: sgd 0.1, momentum 0.02, rmsprop 0.001, adam 0.001)",
    )
    opt.add_argument(
        "--weight-decay",
        metavar="WD",
        type=non_negative_float,
        default=0.0,
        help="L2 weight decay on all parameters (default: 0)",
    )
    opt.add_argument(
        "--epochs", metavar="N", type=positive_int, default=60, help="maximum epochs (default: 60)"
    )
    opt.add_argument(
        "--batch-size",
        metavar="N",
        type=positive_int,
        default=64,
        help="rows per optimizer step; per process with --nproc (default: 64)",
    )
    opt.add_argument(
        "--patience",
        metavar="N",
        type=non_negative_int,
        default=15,
        help="stop after this many epochs without a lower validation loss; 0 never stops "
        "early (default: 15)",
    )
    opt.add_argument(
        "--seed",
        metavar="N",
        type=non_negative_int,
        default=0,
        help="seed of the split, initial weights, shuffling and dropout (default: 0)",
    )

    run_group = p.add_argument_group("execution")
    run_group.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where to train: auto uses CUDA when available (default: auto)",
    )
    run_group.add_argument(
        "--threads",
        metavar="N",
        type=positive_int,
        default=1,
        help="torch CPU threads; small MLPs are fastest on 1 (default: 1)",
    )
    run_group.add_argument(
        "--nproc",
        type=positive_int,
        default=1,
        metavar="N",
        help="train with N processes (DistributedDataParallel via torchrun; default: 1)",
    )
    run_group.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="checkpoint directory to write (created if missing; its config.json, "
        "model.safetensors and metrics.json are replaced, other files kept)",
    )
    return p


def _settings(args: argparse.Namespace) -> Any:
    from bn_onnx.train import TrainSettings

    return TrainSettings(
        dataset=args.dataset,
        target=args.target,
        task=args.task,
        samples=args.samples,
        features=args.features,
        classes=args.classes,
        hidden=tuple(args.hidden),
        bn=args.bn,
        input_norm=args.input_norm,
        activation=args.activation,
        dropout=args.dropout,
        bn_eps=args.bn_eps,
        bn_momentum=args.bn_momentum,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        epochs=args.epochs,
        batch_size=args.batch_size,
        patience=args.patience,
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        device=args.device,
        threads=args.threads,
        categorical=tuple(args.categorical) if args.categorical else None,
        continuous=tuple(args.continuous) if args.continuous else None,
        na_values=tuple(args.na_values) if args.na_values is not None else None,
        max_categories=args.max_categories,
        min_frequency=args.min_frequency,
        dates=args.dates,
        embedding_dropout=args.embedding_dropout,
    )


def _check_out(path: str) -> None:
    from bn_onnx.errors import UsageError

    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out must be a directory, but {path} is a file")
    from bn_onnx.files import probe_writable

    # before training: the checkpoint goes into `path` and its temporary beside it
    parent = os.path.dirname(os.path.abspath(path))
    for folder in dict.fromkeys([parent, path] if os.path.isdir(path) else [parent]):
        probe_writable(folder, f"checkpoint {path}")


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-run this command under torchrun with `args.nproc` processes."""
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        "-m",
        "bn_onnx",
        "train",
        *argv,
    ]
    # torchrun sets OMP_NUM_THREADS=1 for its workers where it is unset, and says so in a
    # banner; each worker uses --threads, so say that to OpenMP here and torchrun stays quiet.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(args.threads))}
    return subprocess.call(cmd, env=env)


def _child_argv(args: argparse.Namespace) -> list[str]:
    """The `train` options of `args` spelled out for the torchrun workers (without --nproc)."""
    argv = ["--input-norm" if args.input_norm else "--no-input-norm"]
    for name in (
        "dataset", "target", "task", "samples", "features", "classes", "val_fraction",
        "test_fraction", "bn", "activation", "dropout", "bn_eps", "bn_momentum", "optimizer",
        "lr", "weight_decay", "epochs", "batch_size", "patience", "seed", "device", "threads",
        "embedding_dropout", "max_categories", "min_frequency", "dates", "out",
    ):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    for name in ("categorical", "continuous"):
        if getattr(args, name):
            argv += [f"--{name}", ",".join(getattr(args, name))]
    if args.na_values is not None:
        argv += ["--na-values", ",".join(args.na_values)]
    argv += ["--hidden", ",".join(str(h) for h in args.hidden)]
    if args.quiet:
        argv.append("--quiet")
    return argv


class _Reporter:
    """Turns training progress events into a rich bar (TTY) or plain lines (otherwise)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.progress: Any = None
        self.task: Any = None

    def __call__(self, event: Any) -> None:
        for note in event.notes:  # shown even with --quiet: they say what the model lacks
            print(f"bn-onnx train: warning: {note}", file=sys.stderr)
        if self.quiet:
            return
        name = "acc" if event.metric_name == "accuracy" else "rmse"
        if event.kind == "start":
            if self.tty:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                )

                self.progress = Progress(
                    TextColumn("epoch"),
                    MofNCompleteColumn(),
                    BarColumn(),
                    TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(),
                    console=Console(stderr=True),
                    transient=False,
                )
                self.progress.start()
                self.task = self.progress.add_task("train", total=event.epochs, info="")
        elif event.kind == "epoch":
            s = event.stats
            info = (
                f"loss {s.train_loss:.4f}  {name} {s.train_metric:.4f}  "
                f"val_loss {s.val_loss:.4f}  val_{name} {s.val_metric:.4f}"
            )
            if self.progress is not None:
                self.progress.update(self.task, completed=event.epoch, info=info)
            else:
                mark = " *" if s.improved else ""
                print(f"epoch {event.epoch}/{event.epochs}  {info}{mark}", file=sys.stderr)
        elif event.kind == "done":
            self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def run(args: argparse.Namespace) -> int:
    """Train, save the checkpoint, print a one-line summary."""
    from bn_onnx.checkpoint import CHECKPOINT_FILES
    from bn_onnx.data import check_dataset_name
    from bn_onnx.files import check_input_file, check_outputs

    _check_out(args.out)
    check_dataset_name(args.dataset)  # before the slow torch import
    if args.dataset.lower().endswith((".csv", ".parquet", ".npz")):
        check_input_file(args.dataset, "dataset file")
        check_outputs(
            [(f"--out's {name}", os.path.join(args.out, name)) for name in CHECKPOINT_FILES],
            [("the dataset file", args.dataset)],
        )
    from bn_onnx import distributed

    settings = _settings(args)
    settings.validate()
    if args.nproc > 1 and not distributed.launched_by_torchrun():
        # Load the data once here so that a bad file is one line from this process, not
        # the same error from every worker wrapped in torchrun's failure report.
        settings.load_data()
        return _launch(args, _child_argv(args))

    from bn_onnx.train import train

    reporter = _Reporter(args.quiet)
    try:
        result = train(settings, args.out, progress=reporter)
        is_main = distributed.context().is_main
    finally:
        reporter.close()
        distributed.shutdown()
    if args.quiet or not is_main:
        return 0
    m = result.metrics
    split = "test" if m["n_test"] else "validation"  # --test-fraction 0: no test split
    key = "test" if m["n_test"] else "val"
    if result.dataset.task == "classification":
        score = f"{split} accuracy {m[f'{key}_accuracy']:.4f}"
    else:
        score = f"{split} rmse {m[f'{key}_rmse']:.4g}"
    stop = ", stopped early" if result.stopped_early else ""
    sizes = result.dataset.spec.get("sizes", {})
    rows = (
        f"; rows: {sizes['train']} train, {sizes['val']} validation, {sizes['test']} test"
        if sizes
        else ""
    )
    print(
        f"{result.dataset.name}: {score} (best epoch {result.best_epoch} of "
        f"{m['epochs_run']}{stop}, {result.seconds:.1f} s{rows}) -> {result.checkpoint_dir}"
    )
    return 0
