"""Datasets for training: scikit-learn's bundled tables, seeded synthetic data, CSV and NPZ files.

Every loader returns a `Dataset` with float32 features split into train/validation/test by a
seeded, stratified (for classifiers) split. The recipe (`Dataset.spec`) goes into a
checkpoint's `config.json["dataset"]`, from which `load_split_from_checkpoint_meta` rebuilds
the same split.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bn_onnx.errors import CheckpointError, InputFileError, UsageError

BUNDLED = ("digits", "wine", "breast-cancer", "iris")
DATASET_NAMES = (*BUNDLED, "synthetic")
TASKS = ("classification", "regression")
# A numeric target with at most this many distinct integer values is taken as class labels.
MAX_AUTO_CLASSES = 50


@dataclass
class Dataset:
    """Features and targets split three ways.

    Attributes:
        name: Bundled name, "synthetic", or the file name.
        task: "classification" (y int64 class indices) or "regression" (y float32 [N, k]).
        x_train, y_train, x_val, y_val, x_test, y_test: The splits; X is float32 [N, features].
        class_names: Class label per output index (classification), else None.
        feature_names: Column names when known.
        spec: The recipe that rebuilds this dataset and split (JSON-able).
    """

    name: str
    task: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str] | None = None
    feature_names: list[str] | None = None
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        """Width of an input row."""
        return int(self.x_train.shape[1])

    @property
    def n_outputs(self) -> int:
        """Number of classes (classification) or targets (regression)."""
        if self.task == "classification":
            return len(self.class_names or [])
        return int(self.y_train.shape[1])


def _bundled(name: str) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    from sklearn import datasets

    loader = {
        "digits": datasets.load_digits,
        "wine": datasets.load_wine,
        "breast-cancer": datasets.load_breast_cancer,
        "iris": datasets.load_iris,
    }[name]
    bunch = loader()
    names = [str(n) for n in bunch.target_names]
    features = [str(n) for n in bunch.feature_names]
    return bunch.data, bunch.target.astype(np.int64), names, features


def _synthetic(
    task: str, n_samples: int, n_features: int, n_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    if task == "classification":
        needed = math.ceil(math.log2(2 * n_classes))
        n_informative = min(n_features, max(2, n_features // 2, needed))
        if n_informative < needed:
            raise UsageError(
                f"synthetic data: {n_classes} classes need more features than {n_features}"
            )
        x, y = datasets.make_classification(
            n_samples=n_samples,
            n_features=n_features,
            n_informative=n_informative,
            n_redundant=min(n_features - n_informative, n_features // 4),
            n_classes=n_classes,
            n_clusters_per_class=2,
            class_sep=1.5,
            random_state=seed,
        )
        return x, y.astype(np.int64)
    x, y = datasets.make_regression(
        n_samples=n_samples,
        n_features=n_features,
        n_informative=max(1, n_features // 2),
        noise=5.0,
        random_state=seed,
    )
    return x, y


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_csv(path: Path, target: str | None) -> tuple[np.ndarray, list[str], list[str], str]:
    """Features (float64), raw target strings, feature names, target column name."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError:
        raise InputFileError(f"CSV file is not UTF-8 text: {path}") from None
    except csv.Error as exc:
        raise InputFileError(f"malformed CSV file {path}: {exc}") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if len(rows) < 2:
        raise InputFileError(f"CSV file needs a header row and data rows: {path}")
    header = [h.strip() for h in rows[0]]
    if target is None:
        raise UsageError(f"a CSV dataset needs --target COLUMN (columns: {', '.join(header)})")
    if target not in header:
        raise UsageError(
            f"target column {target!r} not in {path.name} (columns: {', '.join(header)})"
        )
    t_idx = header.index(target)
    features = [h for i, h in enumerate(header) if i != t_idx]
    if not features:
        raise InputFileError(f"CSV file has no feature columns besides the target: {path}")
    x = np.empty((len(rows) - 1, len(features)), dtype=np.float64)
    labels: list[str] = []
    for r, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise InputFileError(
                f"{path.name} line {r}: {len(row)} fields, header has {len(header)}"
            )
        labels.append(row[t_idx].strip())
        j = 0
        for i, cell in enumerate(row):
            if i == t_idx:
                continue
            try:
                x[r - 2, j] = float(cell)
            except ValueError:
                raise InputFileError(
                    f"{path.name} line {r}: column {header[i]!r} is not a number: {cell!r}"
                ) from None
            j += 1
    if any(label == "" for label in labels):
        raise InputFileError(f"{path.name}: target column {target!r} has empty cells")
    return x, labels, features, target


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    try:
        # np.load leaks its own file handle on a broken zip: hand it one we close.
        with path.open("rb") as fh:
            npz = np.load(fh, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise InputFileError(f"not an NPZ archive (a single .npy array?): {path}")
            keys = set(npz.files)
            if not {"X", "y"} <= keys:
                found = ", ".join(sorted(keys)) or "none"
                raise InputFileError(f"NPZ file must hold arrays 'X' and 'y' (found: {found})")
            x, y = npz["X"], npz["y"]
            names = [str(n) for n in npz["class_names"]] if "class_names" in keys else None
    except InputFileError:
        raise
    except ValueError as exc:  # object arrays need pickle: refused
        raise InputFileError(f"unsafe or unreadable NPZ file {path} ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputFileError(f"not a readable NPZ file: {path} ({type(exc).__name__})") from None
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise InputFileError(
            f"NPZ array X must be 2-D [samples, features], got shape {list(x.shape)}"
        )
    if y.ndim not in (1, 2) or y.shape[0] != x.shape[0]:
        raise InputFileError(
            f"NPZ array y must have one row per row of X ({x.shape[0]}), got shape {list(y.shape)}"
        )
    if not (np.issubdtype(x.dtype, np.number) and not np.iscomplexobj(x)):
        raise InputFileError(f"NPZ array X must be numeric, got dtype {x.dtype}")
    return x.astype(np.float64), y, names


def _labels_to_classes(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    uniques, idx = np.unique(values, return_inverse=True)
    return idx.astype(np.int64).reshape(-1), [_label_text(u) for u in uniques]


def _label_text(value: Any) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _guess_task(values: np.ndarray) -> str:
    if values.dtype.kind in "USO" or values.dtype.kind in "biu":
        return "classification"
    if (
        values.ndim == 1
        and np.all(np.isfinite(values))
        and np.all(values == np.round(values))
        and len(np.unique(values)) <= MAX_AUTO_CLASSES
    ):
        return "classification"
    return "regression"


def split_indices(
    y: np.ndarray | None, n: int, seed: int, val_fraction: float, test_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Seeded train/val/test index arrays; stratified by `y` when every class allows it."""
    from sklearn.model_selection import train_test_split

    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * val_fraction))
    if n - n_test - n_val < 2:
        raise UsageError(
            f"dataset too small to split: {n} rows ({n_test} test, {n_val} validation)"
        )
    idx = np.arange(n)
    stratified = False
    if y is not None:
        counts = np.bincount(y)
        counts = counts[counts > 0]
        n_classes = len(counts)
        stratified = counts.min() >= 3 and n_test >= n_classes and n_val >= n_classes
    strat = y if stratified else None
    rest, test = train_test_split(idx, test_size=n_test, random_state=seed, stratify=strat)
    strat_rest = y[rest] if stratified else None
    train, val = train_test_split(rest, test_size=n_val, random_state=seed + 1, stratify=strat_rest)
    return np.sort(train), np.sort(val), np.sort(test), stratified


def check_dataset_name(name_or_path: str | os.PathLike[str]) -> None:
    """Refuse a dataset that is neither a known name nor a .csv/.npz path (cheap, no I/O)."""
    text = os.fspath(name_or_path)
    if text not in DATASET_NAMES and Path(text).suffix.lower() not in (".csv", ".npz"):
        raise UsageError(
            f"unknown dataset {text!r}: choose from {', '.join(DATASET_NAMES)}, "
            "or give a .csv or .npz file"
        )


def load_dataset(
    name_or_path: str | os.PathLike[str] = "digits",
    *,
    target: str | None = None,
    task: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    n_samples: int = 2000,
    n_features: int = 20,
    n_classes: int = 3,
) -> Dataset:
    """Load a dataset by name or path and split it.

    Args:
        name_or_path: digits, wine, breast-cancer, iris, synthetic, or a .csv / .npz path.
        target: Target column of a CSV file.
        task: classification or regression; None infers it (synthetic: classification).
        seed: Seed of the split (and of synthetic data).
        val_fraction: Share of rows held out for validation (early stopping, best epoch).
        test_fraction: Share of rows held out for the final test metrics.
        n_samples, n_features, n_classes: Size of synthetic data.

    Raises:
        UsageError: unknown dataset name or options that do not fit it.
        InputFileError: a data file that is missing or malformed.
    """
    if task is not None and task not in TASKS:
        raise UsageError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    for frac_name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < frac < 0.5:
            raise UsageError(f"{frac_name} must be between 0 and 0.5, got {frac}")
    spec: dict[str, Any] = {
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction),
    }
    text = os.fspath(name_or_path)
    class_names: list[str] | None = None
    feature_names: list[str] | None = None
    if text in BUNDLED:
        if task == "regression":
            raise UsageError(f"dataset {text!r} is a classification dataset")
        if target is not None:
            raise UsageError("--target applies to CSV files only")
        x, y_raw, class_names, feature_names = _bundled(text)
        name, task = text, "classification"
        spec.update(name=name, source="sklearn")
    elif text == "synthetic":
        if target is not None:
            raise UsageError("--target applies to CSV files only")
        task = task or "classification"
        for label, value, low in (("samples", n_samples, 20), ("features", n_features, 1)):
            if not isinstance(value, int) or value < low:
                raise UsageError(f"synthetic data needs {label} >= {low}, got {value}")
        if task == "classification" and not (isinstance(n_classes, int) and n_classes >= 2):
            raise UsageError(f"synthetic data needs classes >= 2, got {n_classes}")
        x, y_raw = _synthetic(task, n_samples, n_features, n_classes, seed)
        name = "synthetic"
        spec.update(name=name, source="synthetic", n_samples=n_samples, n_features=n_features)
        if task == "classification":
            spec["n_classes"] = n_classes
            class_names = [str(i) for i in range(n_classes)]
    else:
        check_dataset_name(text)
        path = Path(text)
        suffix = path.suffix.lower()
        if not path.is_file():
            raise InputFileError(f"dataset file not found: {path}")
        if path.stat().st_size == 0:
            raise InputFileError(f"dataset file is empty: {path}")
        if suffix == ".csv":
            x, labels, feature_names, target = _read_csv(path, target)
            y_raw = np.asarray(labels)
            with np.errstate(all="ignore"):
                try:
                    numeric = y_raw.astype(np.float64)
                except ValueError:
                    numeric = None
            if numeric is not None:
                y_raw = numeric
        else:
            if target is not None:
                raise UsageError("--target applies to CSV files only (NPZ files hold X and y)")
            x, y_raw, class_names = _read_npz(path)
        task = task or _guess_task(y_raw)
        name = path.name
        spec.update(name=name, source=suffix[1:], path=str(path.resolve()), sha256=_sha256(path))
        if target is not None:
            spec["target"] = target
        if task == "classification":
            if y_raw.ndim != 1:
                raise InputFileError("class labels must be one column")
            y_raw, found = _labels_to_classes(y_raw)
            if class_names is None or len(class_names) != len(found):
                class_names = found
        else:
            if y_raw.dtype.kind not in "fiub":
                raise InputFileError("regression targets must be numbers")
    spec["task"] = task

    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise InputFileError(f"feature values must be finite (row {bad[0]}, column {bad[1]})")
    if task == "classification":
        y = np.asarray(y_raw, dtype=np.int64).reshape(-1)
        if len(class_names or []) < 2:
            raise InputFileError("classification needs at least 2 classes in the target")
    else:
        y = np.asarray(y_raw, dtype=np.float64)
        y = y.reshape(len(y), -1)
        if not np.isfinite(y).all():
            raise InputFileError("regression targets must be finite")
    train, val, test, stratified = split_indices(
        y if task == "classification" else None, len(x), seed, val_fraction, test_fraction
    )
    spec.update(
        stratified=stratified,
        n_rows=int(len(x)),
        sizes={"train": int(len(train)), "val": int(len(val)), "test": int(len(test))},
    )
    y_dtype = np.int64 if task == "classification" else np.float32
    x32 = x.astype(np.float32)
    return Dataset(
        name=name,
        task=task,
        x_train=x32[train],
        y_train=y[train].astype(y_dtype),
        x_val=x32[val],
        y_val=y[val].astype(y_dtype),
        x_test=x32[test],
        y_test=y[test].astype(y_dtype),
        class_names=class_names if task == "classification" else None,
        feature_names=feature_names,
        spec=spec,
    )


def load_split_from_checkpoint_meta(meta: dict[str, Any]) -> Dataset:
    """Rebuild the dataset and split a checkpoint was trained on, from its `config.json`.

    Raises:
        CheckpointError: the checkpoint records no usable dataset recipe, or a data file it
            names is missing or has changed since training.
    """
    spec = meta.get("dataset") if isinstance(meta, dict) else None
    if not isinstance(spec, dict) or "name" not in spec or "seed" not in spec:
        raise CheckpointError("checkpoint does not record its dataset and split seed")
    source = spec.get("source")
    kwargs: dict[str, Any] = {
        "seed": int(spec["seed"]),
        "val_fraction": float(spec.get("val_fraction", 0.15)),
        "test_fraction": float(spec.get("test_fraction", 0.15)),
        "task": spec.get("task"),
    }
    if source == "sklearn":
        name: str = spec["name"]
    elif source == "synthetic":
        name = "synthetic"
        kwargs.update(n_samples=int(spec["n_samples"]), n_features=int(spec["n_features"]))
        if "n_classes" in spec:
            kwargs["n_classes"] = int(spec["n_classes"])
    elif source in ("csv", "npz"):
        name = str(spec.get("path", ""))
        p = Path(name)
        if not p.is_file():
            raise CheckpointError(f"the checkpoint's dataset file is gone: {name}")
        if spec.get("sha256") and _sha256(p) != spec["sha256"]:
            raise CheckpointError(f"the checkpoint's dataset file changed since training: {name}")
        if spec.get("target") is not None:
            kwargs["target"] = spec["target"]
    else:
        raise CheckpointError(f"checkpoint records an unknown dataset source {source!r}")
    try:
        data = load_dataset(name, **kwargs)
    except (UsageError, InputFileError) as exc:
        raise CheckpointError(f"cannot rebuild the checkpoint's dataset: {exc}") from None
    sizes = spec.get("sizes")
    if isinstance(sizes, dict) and sizes.get("test") not in (None, len(data.x_test)):
        raise CheckpointError("the rebuilt test split differs in size from the checkpoint's record")
    return data
