"""Datasets for training: scikit-learn's bundled tables, seeded synthetic data, CSV, Parquet and
NPZ files.

Every loader returns a `Dataset` split into train/validation/test by a seeded, stratified (for
classifiers) split. The recipe (`Dataset.spec`) goes into a checkpoint's
`config.json["dataset"]`, from which `load_split_from_checkpoint_meta` rebuilds the same split.

A file whose feature columns are all numbers without a missing value gives a plain dataset
(float32 features, the MLP's single input). A file with a text column, an empty cell, or
column kinds given with `categorical=` / `continuous=` gives a tabular dataset
(`bn_onnx.tabular`): the raw columns, and the fills, indicators and vocabularies learned from
the training split. Column kinds are inferred by one rule: a column of numbers (every present
cell parses as a number; a Parquet or NPZ numeric type) is continuous, any other column is
categorical. Integer codes that stand for categories (zip codes, product ids) need
`categorical=`: fastai's `cont_cat_split` guesses them from a small number of distinct
integers, which would also turn counts (digits' pixel values 0-16) into categories.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import math
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bn_onnx.column_kinds import COLUMN_KINDS, TABULAR_KINDS
from bn_onnx.columns import (
    CATEGORICAL,
    CONTINUOUS,
    MISSING_TEXT,
    NA_VALUES,
    categorical_values,
    category_text,
    na_set,
)
from bn_onnx.errors import CheckpointError, InputFileError, UsageError
from bn_onnx.tabular import TabularSpec, fit_spec

BUNDLED = ("digits", "wine", "breast-cancer", "iris")
FILE_SUFFIXES = (".csv", ".parquet", ".npz")
SPLITS = ("train", "val", "test")
# A text column with at least this share of number cells is taken for a column of numbers
# with a stray marker ("?"): an error asks which it is, rather than guessing categorical.
MOSTLY_NUMBERS = 0.9
DATASET_NAMES = (*BUNDLED, "synthetic")
TASKS = ("classification", "regression")
# A numeric target with at most this many distinct integer values is taken as class labels.
MAX_AUTO_CLASSES = 50
# A text column is date-like when at least this share of its present cells looks like a date
# or a date and time (ISO 8601 `2008-03-15`, `2008-03-15 10:30`, or `3/15/2008`).
MOSTLY_DATES = 0.9
_DATE = re.compile(
    r"\d{4}-\d{1,2}-\d{1,2}(?:[ T]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?"
    r"|\d{1,2}/\d{1,2}/\d{2,4}"
)
DATE_MODES = ("drop", "keep")
# A categorical column is id-like when its training split holds more than ID_MIN distinct
# values and at least ID_SHARE of its present cells are distinct (names, ids, free text).
ID_MIN, ID_SHARE = 20, 0.5


@dataclass
class Dataset:
    """Features and targets split three ways.

    Attributes:
        name: Bundled name, "synthetic", or the file name.
        task: "classification" (y int64 class indices) or "regression" (y float32 [N, k]).
        x_train, y_train, x_val, y_val, x_test, y_test: The splits; X is float32 [N, features]
            (tabular: the `numeric` model input, filled continuous columns and indicators).
        class_names: Class label per output index (classification), else None.
        feature_names: Column names when known (tabular: every feature column, file order).
        spec: The recipe that rebuilds this dataset and split (JSON-able).
        tabular: The columns, fills and vocabularies learned from the training split (tabular
            datasets only).
        codes_train, codes_val, codes_test: Category codes, int64 [N, categorical] (tabular).
        feeds_train, feeds_val, feeds_test: The raw model inputs (tabular): `continuous`
            float32 [N, k] with NaN for a missing value, `categorical` str [N, m] with "" for
            a missing value, as `bn_onnx.columns.feeds_from_columns` builds them.
        notes: Warnings about the columns (dates dropped or kept, id-like columns), one line
            each, for the user to see.
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
    tabular: TabularSpec | None = None
    codes_train: np.ndarray | None = None
    codes_val: np.ndarray | None = None
    codes_test: np.ndarray | None = None
    feeds_train: dict[str, np.ndarray] | None = None
    feeds_val: dict[str, np.ndarray] | None = None
    feeds_test: dict[str, np.ndarray] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def n_features(self) -> int:
        """Width of an input row (tabular: of the first layer's input, embeddings included)."""
        if self.tabular is not None:
            return self.tabular.in_features
        return int(self.x_train.shape[1])

    def inputs(self, split: str) -> tuple[np.ndarray, ...]:
        """The model's inputs for a split ("train", "val", "test"), in its forward order.

        `(x,)` for a plain dataset; `(numeric, codes)` for a tabular one, either left out when
        the model has no such columns.
        """
        if split not in SPLITS:
            raise UsageError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
        x = getattr(self, f"x_{split}")
        if self.tabular is None:
            return (x,)
        return tuple(self.tabular.model_inputs(x, getattr(self, f"codes_{split}")))

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


@dataclass
class _RawColumn:
    """One feature column as a file holds it, before its kind is decided.

    `source` says what the file knows of it: "number" (a numeric type: float64 cells, NaN
    for a missing value), "category" (a text or boolean type: Python values, None for a
    missing value) or "text" (untyped text cells, CSV and NPZ strings: "" for a missing
    value). `where(i)` names data row i in an error message.
    """

    name: str
    source: str
    cells: Any
    where: Callable[[int], str]
    # "number" columns: the cells in their own type (int64 ids stay exact as categories)
    originals: Any = None
    # the missing-cell spellings (`bn_onnx.columns.na_set`), for text cells
    na: frozenset[str] = field(default_factory=na_set)
    _parsed: tuple[np.ndarray | None, int] | None = field(default=None, repr=False)

    def _missing(self, text: str) -> bool:
        return not text or text.lower() in self.na

    def _parse(self) -> tuple[np.ndarray | None, int]:
        """float64 values (NaN where missing), or None and the index of the first non-number."""
        if self.source == "number":
            return np.asarray(self.cells, dtype=np.float64), -1
        if self._parsed is None:  # inference and conversion both ask: parse the text once
            self._parsed = self._parse_text()
        return self._parsed

    def _parse_text(self) -> tuple[np.ndarray | None, int]:
        out = np.empty(len(self.cells), dtype=np.float64)
        for i, cell in enumerate(self.cells):
            if cell is None:
                out[i] = math.nan
                continue
            if isinstance(cell, (bool, np.bool_)):
                return None, i
            text = cell.strip() if isinstance(cell, str) else cell
            if isinstance(text, str) and self._missing(text):
                out[i] = math.nan
                continue
            try:
                out[i] = float(text)
            except (TypeError, ValueError):
                return None, i
        return out, -1

    def inferred_kind(self) -> str:
        """continuous for numbers (every present cell a number), else categorical."""
        if self.source == "category":
            return CATEGORICAL
        return CONTINUOUS if self._parse()[0] is not None else CATEGORICAL

    def mostly_numbers(self) -> bool:
        """Whether at least `MOSTLY_NUMBERS` of the present text cells are numbers."""
        present = numbers = 0
        for cell in self.cells:
            text = cell.strip() if isinstance(cell, str) else ""
            if not self._missing(text):
                present += 1
                try:
                    float(text)
                    numbers += 1
                except ValueError:
                    pass
        return present > 0 and numbers >= MOSTLY_NUMBERS * present

    def looks_like_dates(self) -> bool:
        """Whether at least `MOSTLY_DATES` of the present text cells are dates (or times)."""
        if self.source == "number":
            return False
        present = dated = 0
        for cell in self.cells:
            text = cell.strip() if isinstance(cell, str) else ""
            if not self._missing(text):
                present += 1
                dated += _DATE.fullmatch(text) is not None
        return present > 0 and dated >= MOSTLY_DATES * present

    def continuous(self, file: str) -> np.ndarray:
        """float64 [n], NaN for a missing value.

        Raises:
            InputFileError: a present cell is not a finite number (names the column and row).
        """
        values, bad = self._parse()
        if values is None:
            raise InputFileError(
                f"{file} {self.where(bad)}: column {self.name!r} is declared continuous but "
                f"is not a number: {self.cells[bad]!r}"
            )
        inf = np.flatnonzero(np.isinf(values))
        if inf.size:
            raise InputFileError(
                f"{file} {self.where(int(inf[0]))}: column {self.name!r} is not finite: "
                f"{values[inf[0]]}"
            )
        return values

    def categorical(self) -> np.ndarray:
        """`category_text` of every cell, object [n] of str ("" for a missing value)."""
        cells = self.cells if self.originals is None else self.originals
        cells = cells.tolist() if isinstance(cells, np.ndarray) else cells
        return categorical_values(cells, self.na)


def _date_note(name: str, mode: str) -> str:
    what = (
        "dropped"
        if mode == "drop"
        else "kept as a category (a date not seen in training is unknown)"
    )
    return (
        f"column {name!r} holds dates: {what}; the exported graph cannot compute date parts "
        f"(year, month, day of week) from text, so add them as columns of numbers yourself"
        + ("" if mode == "keep" else ", or give --dates keep")
    )


def _check_target(target: str | None, names: list[str], path: Path, kind: str) -> str:
    if target is None:
        raise UsageError(f"a {kind} dataset needs --target COLUMN (columns: {', '.join(names)})")
    if target not in names:
        raise UsageError(
            f"target column {target!r} not in {path.name} (columns: {', '.join(names)})"
        )
    if len(names) < 2:
        raise InputFileError(f"{kind} file has no feature columns besides the target: {path}")
    return target


def _read_csv(path: Path, target: str | None) -> tuple[list[_RawColumn], np.ndarray]:
    """The feature columns (text cells) and the target values of a CSV file with a header."""
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
    target = _check_target(target, header, path, "CSV")
    if len(set(header)) != len(header):
        raise InputFileError(f"CSV file {path.name} has two columns of the same name")
    for r, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise InputFileError(
                f"{path.name} line {r}: {len(row)} fields, header has {len(header)}"
            )
    data = rows[1:]
    t_idx = header.index(target)
    labels = [row[t_idx].strip() for row in data]
    if any(label == "" for label in labels):
        raise InputFileError(f"{path.name}: target column {target!r} has empty cells")
    columns = [
        _RawColumn(name, "text", [row[i] for row in data], lambda k: f"line {k + 2}")
        for i, name in enumerate(header)
        if i != t_idx
    ]
    y = np.asarray(labels)
    with np.errstate(all="ignore"), contextlib.suppress(ValueError):
        y = y.astype(np.float64)  # numbers when every label is one
    return columns, y


def _read_parquet(path: Path, target: str | None) -> tuple[list[_RawColumn], np.ndarray]:
    """The feature columns and target values of a Parquet file (pyarrow)."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(
            "reading Parquet needs pyarrow (pip install -c constraints.txt 'bn-onnx[train]')"
        ) from None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputFileError(f"not a readable Parquet file: {path} ({msg})") from None
    names = [str(n) for n in table.column_names]
    target = _check_target(target, names, path, "Parquet")
    if len(set(names)) != len(names):
        raise InputFileError(f"Parquet file {path.name} has two columns of the same name")
    if table.num_rows < 1:
        raise InputFileError(f"Parquet file has no rows: {path}")

    def numeric(t: Any) -> bool:
        return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)

    def textual(t: Any) -> bool:
        if pa.types.is_dictionary(t):
            return textual(t.value_type) or numeric(t.value_type)
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t)

    columns = []
    y: np.ndarray | None = None
    for name in names:
        col = table.column(name)
        kind = col.type
        originals = None
        if numeric(kind):
            values = pc.fill_null(col.cast(pa.float64(), safe=False), math.nan).to_numpy()
            source, cells = "number", np.asarray(values, dtype=np.float64)
            originals = col.to_pylist() if pa.types.is_integer(kind) else None
        elif textual(kind):
            source, cells = "category", col.to_pylist()
        elif pa.types.is_temporal(kind):  # dates and times: their text (see `dates=`)
            source, cells = "text", [None if v is None else str(v) for v in col.to_pylist()]
        else:
            raise InputFileError(
                f"{path.name}: column {name!r} has Parquet type {kind}, neither numbers nor text"
            )
        if name == target:
            if col.null_count:
                raise InputFileError(f"{path.name}: target column {target!r} has empty cells")
            y = cells if source == "number" else np.asarray([category_text(v) for v in cells])
            continue
        columns.append(_RawColumn(name, source, cells, lambda k: f"row {k}", originals))
    assert y is not None
    return columns, y


def _read_npz(path: Path) -> tuple[list[_RawColumn], np.ndarray, list[str] | None]:
    """The columns of array X (numbers, NaN for a missing value, or text), y, class names.

    Optional arrays: `class_names`, `feature_names` (column names; default x0, x1, ...).
    """
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
            features = [str(n) for n in npz["feature_names"]] if "feature_names" in keys else None
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
    text = x.dtype.kind in "US"
    if not text and not (np.issubdtype(x.dtype, np.number) and not np.iscomplexobj(x)):
        raise InputFileError(f"NPZ array X must be numbers or text, got dtype {x.dtype}")
    if features is None:
        features = [f"x{i}" for i in range(x.shape[1])]
    elif len(features) != x.shape[1] or len(set(features)) != len(features):
        raise InputFileError(
            f"NPZ array feature_names must hold {x.shape[1]} distinct names, one per column of X"
        )
    if text:
        cells = np.char.decode(x, "utf-8", "replace") if x.dtype.kind == "S" else x
        columns = [
            _RawColumn(n, "text", cells[:, i].tolist(), lambda k: f"row {k}")
            for i, n in enumerate(features)
        ]
    else:
        x64 = x.astype(np.float64)
        ints = x.dtype.kind in "iu"
        columns = [
            _RawColumn(n, "number", x64[:, i], lambda k: f"row {k}", x[:, i] if ints else None)
            for i, n in enumerate(features)
        ]
    return columns, y, names


def _column_kinds(
    columns: list[_RawColumn],
    categorical: tuple[str, ...],
    continuous: tuple[str, ...],
    path: Path,
    target: str | None,
) -> dict[str, str]:
    """Each feature column's kind: as given, else inferred (numbers -> continuous)."""
    names = [c.name for c in columns]
    for option, given in (("--categorical", categorical), ("--continuous", continuous)):
        for name in given:
            if target is not None and name == target:
                raise UsageError(f"{option}: {name!r} is the target column")
            if name not in names:
                raise UsageError(
                    f"{option}: no column {name!r} in {path.name} (columns: {', '.join(names)})"
                )
    both = sorted(set(categorical) & set(continuous))
    if both:
        raise UsageError(f"column {both[0]!r} is given as both categorical and continuous")
    kinds = {}
    for col in columns:
        if col.name in categorical:
            kinds[col.name] = CATEGORICAL
        elif col.name in continuous:
            kinds[col.name] = CONTINUOUS
        else:
            kinds[col.name] = col.inferred_kind()
            if kinds[col.name] == CATEGORICAL and col.source == "text" and col.mostly_numbers():
                # numbers with a stray "NA" or "n/a": as categories every number would be
                # its own code, which nobody wants without saying so
                _, bad = col._parse()
                raise InputFileError(
                    f"{path.name} {col.where(bad)}: column {col.name!r} holds numbers but also "
                    f"{col.cells[bad]!r}; give --na-values {col.cells[bad].strip()!r} if it "
                    f"marks a missing value, or give --categorical {col.name}"
                )
    return kinds


def _raw_feeds(
    names: list[str], kinds: dict[str, str], values: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The raw model inputs of all rows: `continuous` float32 [n, k], `categorical` str [n, m]."""
    n = len(values[names[0]])
    feeds: dict[str, np.ndarray] = {}
    for kind in TABULAR_KINDS:
        of_kind = [name for name in names if kinds[name] == kind.name]
        if of_kind:
            arr = np.empty((n, len(of_kind)), dtype=kind.dtype)
            for j, name in enumerate(of_kind):
                arr[:, j] = values[name]
            feeds[kind.name] = arr
    return feeds


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
    """Seeded train/val/test index arrays; stratified by `y` when every class allows it.

    `test_fraction` 0 holds out no test rows (the test array is empty).
    """

    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
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
        stratified = (
            counts.min() >= 3 and n_test in (0, *range(n_classes, n)) and n_val >= n_classes
        )
    strat = y if stratified else None
    if n_test:
        rest, test = train_test_split(idx, n_test, seed, strat)
    else:
        rest, test = idx, idx[:0]
    strat_rest = y[rest] if stratified else None
    train, val = train_test_split(rest, n_val, seed + 1, strat_rest)
    return np.sort(train), np.sort(val), np.sort(test), stratified


def train_test_split(
    idx: np.ndarray, n_test: int, seed: int, stratify: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """`sklearn.model_selection.train_test_split(idx, test_size=n_test, random_state=seed,
    stratify=stratify)`, the same indices in the same order, without importing scikit-learn
    (about 1.8 s of CPU at start-up). Its `ShuffleSplit` and `StratifiedShuffleSplit` with
    `_approximate_mode`, scikit-learn 1.x (BSD-3-Clause); tests compare the two."""
    n = len(idx)
    rng = np.random.RandomState(seed)
    if stratify is None:
        perm = rng.permutation(n)
        return idx[perm[n_test:]], idx[perm[:n_test]]
    _, y_indices, counts = np.unique(stratify, return_inverse=True, return_counts=True)
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(counts)[:-1])
    n_i = _approximate_mode(counts, n - n_test, rng)
    t_i = _approximate_mode(counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i in range(len(counts)):
        perm = class_indices[i].take(rng.permutation(counts[i]), mode="clip")
        train.extend(perm[: n_i[i]])
        test.extend(perm[n_i[i] : n_i[i] + t_i[i]])
    return idx[rng.permutation(train)], idx[rng.permutation(test)]


def _approximate_mode(counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """scikit-learn's approximate mode of the multivariate hypergeometric (ties drawn by rng)."""
    continuous = counts / counts.sum() * n_draws
    floored = np.floor(continuous)
    need = int(n_draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add = min(len(inds), need)
            floored[rng.choice(inds, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return floored.astype(int)


def check_dataset_name(name_or_path: str | os.PathLike[str]) -> None:
    """Refuse a dataset that is neither a known name nor a .csv/.parquet/.npz path (no I/O)."""
    text = os.fspath(name_or_path)
    if text not in DATASET_NAMES and Path(text).suffix.lower() not in FILE_SUFFIXES:
        raise UsageError(
            f"unknown dataset {text!r}: choose from {', '.join(DATASET_NAMES)}, "
            "or give a .csv, .parquet or .npz file"
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
    categorical: tuple[str, ...] | list[str] | None = None,
    continuous: tuple[str, ...] | list[str] | None = None,
    na_values: tuple[str, ...] | list[str] | None = None,
    max_categories: int | None = None,
    min_frequency: int = 1,
    dates: str = "drop",
) -> Dataset:
    """Load a dataset by name or path and split it.

    Args:
        name_or_path: digits, wine, breast-cancer, iris, synthetic, or a .csv / .parquet /
            .npz path.
        target: Target column of a CSV or Parquet file.
        task: classification or regression; None infers it (synthetic: classification).
        seed: Seed of the split (and of synthetic data).
        val_fraction: Share of rows held out for validation (early stopping, best epoch).
        test_fraction: Share of rows held out for the final test metrics; 0 holds out none
            (train on everything but the validation split; the test metrics are then None).
        n_samples, n_features, n_classes: Size of synthetic data.
        categorical, continuous: Columns of a file to take as categorical / continuous
            (the others are inferred: numbers are continuous, anything else categorical).
            Either makes the dataset tabular.
        na_values: The text cells of a file that are missing values, compared
            case-insensitively after stripping spaces (default `NA_VALUES`: empty, NA, N/A,
            NaN, null). Recorded in the recipe when not the default.
        max_categories, min_frequency: Caps on each categorical column's vocabulary
            (`bn_onnx.tabular.fit_spec`): rare values become "unknown". Recorded when set.
        dates: What to do with a date-like text column not given as `categorical`: "drop"
            it (the default) or "keep" it as a category (a later date is then "unknown").
            The exported graph cannot compute date parts from text, so neither mode expands
            them; `Dataset.notes` says which columns and what was done.

    Raises:
        UsageError: unknown dataset name or options that do not fit it.
        InputFileError: a data file that is missing or malformed, or a column declared
            continuous that holds text (the message names the column and row).
    """
    categorical = tuple(categorical or ())
    continuous = tuple(continuous or ())
    if task is not None and task not in TASKS:
        raise UsageError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    if not 0 < val_fraction < 0.5:
        raise UsageError(f"val_fraction must be between 0 and 0.5, got {val_fraction}")
    if not 0 <= test_fraction < 0.5:
        raise UsageError(
            f"test_fraction must be from 0 (no test split) to 0.5, got {test_fraction}"
        )
    spec: dict[str, Any] = {
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction),
    }
    text = os.fspath(name_or_path)
    notes: list[str] = []
    if max_categories is not None and (isinstance(max_categories, bool) or max_categories < 1):
        raise UsageError(f"max_categories must be >= 1, got {max_categories}")
    if isinstance(min_frequency, bool) or min_frequency < 1:
        raise UsageError(f"min_frequency must be >= 1, got {min_frequency}")
    class_names: list[str] | None = None
    feature_names: list[str] | None = None
    table: tuple[list[str], dict[str, str], dict[str, np.ndarray]] | None = None
    if (categorical or continuous) and text in DATASET_NAMES:
        raise UsageError("--categorical and --continuous apply to CSV, Parquet and NPZ files")
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
        if suffix == ".npz":
            if target is not None:
                raise UsageError(
                    "--target applies to CSV and Parquet files only (NPZ files hold X and y)"
                )
            columns, y_raw, class_names = _read_npz(path)
        elif suffix == ".parquet":
            columns, y_raw = _read_parquet(path, target)
        else:
            columns, y_raw = _read_csv(path, target)
        na = na_set(na_values)
        for col in columns:
            col.na = na
        if dates not in DATE_MODES:
            raise UsageError(f"unknown dates mode {dates!r} (choose from {', '.join(DATE_MODES)})")
        for col in [c for c in columns if c.name not in (*categorical, *continuous)]:
            if col.looks_like_dates():
                notes.append(_date_note(col.name, dates))
                if dates == "drop":
                    columns.remove(col)
        if not columns:
            raise InputFileError(f"{path.name}: no feature columns left after dropping dates")
        feature_names = [c.name for c in columns]
        kinds = _column_kinds(columns, categorical, continuous, path, target)
        values = {
            c.name: c.continuous(path.name)
            if COLUMN_KINDS[kinds[c.name]].numeric
            else c.categorical()
            for c in columns
        }
        if (
            categorical
            or continuous
            or not all(COLUMN_KINDS[k].numeric for k in kinds.values())
            or any(np.isnan(v).any() for n, v in values.items() if COLUMN_KINDS[kinds[n]].numeric)
        ):
            table = (feature_names, kinds, values)
            x = np.zeros((len(y_raw), 0))
        else:
            x = np.column_stack([values[n] for n in feature_names])
        task = task or _guess_task(y_raw)
        name = path.name
        spec.update(name=name, source=suffix[1:], path=str(path.resolve()), sha256=_sha256(path))
        if target is not None:
            spec["target"] = target
        if categorical:
            spec["categorical"] = list(categorical)
        if continuous:
            spec["continuous"] = list(continuous)
        if na_values is not None and tuple(na_values) != NA_VALUES:
            spec["na_values"] = list(na_values)
        if max_categories is not None:
            spec["max_categories"] = int(max_categories)
        if min_frequency != 1:
            spec["min_frequency"] = int(min_frequency)
        if dates != "drop":
            spec["dates"] = dates
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
    data = Dataset(
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
        notes=notes,
    )
    if table is not None:
        caps = {"max_categories": max_categories, "min_frequency": min_frequency}
        _add_tabular(data, *table, {"train": train, "val": val, "test": test}, caps)
    return data


def _add_tabular(
    data: Dataset,
    names: list[str],
    kinds: dict[str, str],
    values: dict[str, np.ndarray],
    splits: dict[str, np.ndarray],
    caps: dict[str, Any],
) -> None:
    """Learn the tabular spec from the training rows and fill in every split's inputs."""
    train = splits["train"]
    spec = fit_spec(names, kinds, {n: v[train] for n, v in values.items()}, **caps)
    for col in spec.categorical:
        cells = values[col.name][train]
        present = int(np.sum(cells != MISSING_TEXT))
        distinct = len(set(cells.tolist()) - {MISSING_TEXT})
        if distinct > ID_MIN and distinct >= ID_SHARE * present:
            data.notes.append(
                f"column {col.name!r} looks like an id ({distinct} distinct values in {present} "
                f"training rows, {len(col.vocabulary or ())} kept): rows it has not seen read as "
                "unknown; drop it from the file, or cap it with --max-categories / "
                "--min-frequency"
            )
    feeds = _raw_feeds(names, kinds, values)
    data.tabular = spec
    for split, rows in splits.items():
        part = {k: v[rows] for k, v in feeds.items()}
        numeric, codes = spec.preprocess(part)
        setattr(data, f"x_{split}", numeric)
        setattr(data, f"codes_{split}", codes)
        setattr(data, f"feeds_{split}", part)


def resolve_dataset_path(name: str, checkpoint_dir: str | os.PathLike[str]) -> str:
    """Where a checkpoint's recorded dataset file is: an absolute `name` as it is; a relative
    one (the shipped checkpoints record `models/tabular/people.csv`, relative to the repository)
    tried in the working folder, then in the checkpoint folder and each of its ancestors. The
    first existing file wins; `name` unchanged when none exists (the caller says it is gone)."""
    p = Path(name)
    if not name or p.is_absolute() or p.is_file():
        return name
    here = Path(os.path.abspath(checkpoint_dir))
    for folder in (here, *here.parents):
        if (folder / p).is_file():
            return str(folder / p)
    return name


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
    elif source in ("csv", "parquet", "npz"):
        name = str(spec.get("path", ""))
        p = Path(name)
        if not p.is_file():
            raise CheckpointError(f"the checkpoint's dataset file is gone: {name}")
        if spec.get("sha256") and _sha256(p) != spec["sha256"]:
            raise CheckpointError(f"the checkpoint's dataset file changed since training: {name}")
        if spec.get("target") is not None:
            kwargs["target"] = spec["target"]
        for kind in ("categorical", "continuous"):
            if spec.get(kind):
                kwargs[kind] = tuple(str(n) for n in spec[kind])
        for key in ("max_categories", "min_frequency"):
            if spec.get(key) is not None:
                kwargs[key] = int(spec[key])
        if spec.get("dates") in DATE_MODES:
            kwargs["dates"] = spec["dates"]
        if isinstance(spec.get("na_values"), list):
            kwargs["na_values"] = tuple(str(v) for v in spec["na_values"])
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
