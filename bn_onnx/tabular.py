"""Tabular models: how raw columns (numbers with gaps, categories) enter the network. numpy only.

A tabular model reads the raw columns (`bn_onnx.columns`: input `continuous` float32 with NaN
for a missing value, input `categorical` strings with "" for a missing value) and turns them
into the first layer's input, inside the exported graph and in Python alike:

- continuous column: a missing value gets the column's fill, the median of the training
  split (0 when the training split has no value at all); a column that has a missing value
  in the training split also gets a was-missing indicator (1.0 / 0.0) after the continuous
  columns. This is fastai's `FillMissing(FillStrategy.median, add_col=True)`, except that the
  indicator is a number here, not another categorical column.
- categorical column: code 0 for a missing value, 1 for a value the training split does not
  hold ("unknown"), 2 + k for `vocabulary[k]`; the vocabulary is the training split's values,
  sorted. Each code has a learned embedding row, of the width given by fastai's
  `emb_sz_rule` (`embedding_size`).

The network's first layer reads `[embeddings..., continuous..., indicators...]`. Everything is
learned from the training split only (`fit_spec`). `TabularSpec.preprocess` is the Python side
of the graph's preprocessing: training, torch eval and the float64 reference all use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from bn_onnx.column_kinds import (  # noqa: F401 (the codes and inputs, re-exported)
    CODES_INPUT,
    COLUMN_KINDS,
    FIRST_CATEGORY_CODE,
    MAX_EMBEDDING_SIZE,
    MISSING_CODE,
    NUMERIC_INPUT,
    TABULAR_KINDS,
    UNKNOWN_CODE,
    embedding_size,
)
from bn_onnx.columns import CATEGORICAL, CONTINUOUS, MISSING_TEXT, Column, columns_to_json
from bn_onnx.errors import InputDataError, UsageError


@dataclass(frozen=True)
class TabularSpec:
    """The raw columns of a tabular model and what the network makes of them.

    Stored as `config.json["model"]["tabular"]` (`to_dict`).

    Attributes:
        columns: Every feature column in the training file's order, with its kind, input,
            index, vocabulary (categorical) or fill (continuous; a float32 value).
        indicators: Names of the continuous columns that get a was-missing indicator, in
            their input order.
        embedding_dims: Embedding width of each categorical column, in input order.
        embedding_dropout: Dropout probability on the concatenated embeddings while training.
    """

    columns: tuple[Column, ...]
    indicators: tuple[str, ...] = ()
    embedding_dims: tuple[int, ...] = ()
    embedding_dropout: float = 0.0
    _lookups: list[dict[str, int]] = field(
        default_factory=list, init=False, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", tuple(self.columns))
        object.__setattr__(self, "indicators", tuple(self.indicators))
        object.__setattr__(self, "embedding_dims", tuple(self.embedding_dims))
        self.validate()
        lookups = []
        for col in self.categorical:
            table = {text: FIRST_CATEGORY_CODE + k for k, text in enumerate(col.vocabulary or ())}
            table[MISSING_TEXT] = MISSING_CODE
            lookups.append(table)
        object.__setattr__(self, "_lookups", lookups)

    # --- structure
    def of_kind(self, kind: str) -> list[Column]:
        """The columns of `kind` (a name in `COLUMN_KINDS`) in input order."""
        return sorted((c for c in self.columns if c.kind == kind), key=lambda c: c.index)

    def width(self, kind: str) -> int:
        """The number of columns of `kind`: the width of its raw input."""
        return sum(c.kind == kind for c in self.columns)

    @property
    def continuous(self) -> list[Column]:
        """The continuous columns in input order."""
        return self.of_kind(CONTINUOUS)

    @property
    def categorical(self) -> list[Column]:
        """The categorical columns in input order."""
        return self.of_kind(CATEGORICAL)

    @property
    def n_continuous(self) -> int:
        return self.width(CONTINUOUS)

    @property
    def n_categorical(self) -> int:
        return self.width(CATEGORICAL)

    @property
    def n_numeric(self) -> int:
        """Width of the torch part's `numeric` input: continuous columns plus indicators."""
        return self.n_continuous + len(self.indicators)

    @property
    def indicator_indices(self) -> list[int]:
        """For each indicator, the index of its column in the `continuous` input."""
        index = {c.name: c.index for c in self.continuous}
        return [index[name] for name in self.indicators]

    @property
    def embedding_rows(self) -> list[int]:
        """Rows of each embedding table: missing, unknown, then the vocabulary."""
        return [FIRST_CATEGORY_CODE + len(c.vocabulary or ()) for c in self.categorical]

    @property
    def embedding_width(self) -> int:
        return sum(self.embedding_dims)

    @property
    def in_features(self) -> int:
        """Width of the first layer's input: embeddings, continuous columns, indicators."""
        return self.embedding_width + self.n_numeric

    @property
    def model_input_names(self) -> list[str]:
        """The torch part's inputs, in its forward order (`numeric` first when present)."""
        names = []
        if self.n_numeric:
            names.append(NUMERIC_INPUT)
        if self.n_categorical:
            names.append(CODES_INPUT)
        return names

    def feature_labels(self) -> list[str]:
        """A label per first-layer input: `city[0]`.., continuous names, `age_na` indicators."""
        labels = []
        for col, dim in zip(self.categorical, self.embedding_dims, strict=True):
            labels += [f"{col.name}[{i}]" for i in range(dim)]
        labels += [c.name for c in self.continuous]
        labels += [f"{name}_na" for name in self.indicators]
        return labels

    def columns_json(self) -> str:
        """The `bn_onnx.columns` metadata value (`bn_onnx.columns.columns_to_json`)."""
        return columns_to_json(self.columns)

    # --- checks and (de)serialization
    def validate(self) -> None:
        """Raise `UsageError` (one line) for a spec no model can be built from."""
        if not self.columns:
            raise UsageError("tabular spec: no columns")
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names):
            raise UsageError("tabular spec: two columns have the same name")
        for kind in TABULAR_KINDS:
            got = sorted(c.index for c in self.columns if c.kind == kind.name)
            if got != list(range(len(got))):
                raise UsageError(f"tabular spec: {kind.name} indices are not 0..{len(got) - 1}")
        for c in self.columns:
            kind = COLUMN_KINDS.get(c.kind)
            if kind is None or not kind.tabular or c.input != c.kind:
                raise UsageError(f"tabular spec: column {c.name!r} has kind {c.kind!r}")
            problem = kind.check(c)
            if problem:
                raise UsageError(problem)
        continuous = {c.name for c in self.columns if c.kind == CONTINUOUS}
        if any(n not in continuous for n in self.indicators) or len(set(self.indicators)) != len(
            self.indicators
        ):
            raise UsageError("tabular spec: indicators must name distinct continuous columns")
        if len(self.embedding_dims) != self.n_categorical or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.embedding_dims
        ):
            raise UsageError("tabular spec: one embedding width >= 1 per categorical column")
        p = self.embedding_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise UsageError(f"tabular spec: embedding_dropout must be in [0, 1), got {p!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form stored in `config.json["model"]["tabular"]`."""
        return {
            "columns": [c.to_dict() for c in self.columns],
            "indicators": list(self.indicators),
            "embedding_dims": list(self.embedding_dims),
            "embedding_dropout": self.embedding_dropout,
        }

    @classmethod
    def from_dict(cls, data: Any) -> TabularSpec:
        """Build a spec from `to_dict`'s output; anything malformed is a `UsageError`."""
        if not isinstance(data, dict):
            raise UsageError("tabular spec must be a JSON object")
        unknown = sorted(
            set(data) - {"columns", "indicators", "embedding_dims", "embedding_dropout"}
        )
        if unknown:
            raise UsageError(f"tabular spec: unknown key(s) {', '.join(unknown)}")
        try:
            columns = []
            for item in data["columns"]:
                vocab = item.get("vocabulary")
                fill = item.get("fill")
                if vocab is not None and not all(isinstance(v, str) for v in vocab):
                    raise UsageError("tabular spec: vocabulary values must be strings")
                columns.append(
                    Column(
                        name=str(item["name"]),
                        kind=str(item["kind"]),
                        input=str(item["input"]),
                        index=int(item["index"]),
                        vocabulary=None if vocab is None else tuple(vocab),
                        fill=None if fill is None else float(fill),
                    )
                )
            return cls(
                columns=tuple(columns),
                indicators=tuple(str(n) for n in data.get("indicators", ())),
                embedding_dims=tuple(data.get("embedding_dims", ())),
                embedding_dropout=data.get("embedding_dropout", 0.0),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UsageError(f"tabular spec is malformed: {type(exc).__name__}: {exc}") from None

    def with_embedding_dropout(self, p: float) -> TabularSpec:
        """A copy with another embedding dropout probability."""
        return replace(self, embedding_dropout=p)

    # --- the preprocessing, in Python
    def check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The raw inputs as arrays: `continuous` float32 [n, k], `categorical` str [n, m].

        Raises:
            InputDataError: an input is missing, has the wrong shape, or the two disagree in
                their number of rows.
        """
        out: dict[str, np.ndarray] = {}
        for kind in TABULAR_KINDS:
            name, width = kind.name, self.width(kind.name)
            if not width:
                continue
            if name not in feeds:
                raise InputDataError(f"no value given for model input {name!r}")
            arr = np.asarray(feeds[name])
            if kind.numeric:
                if arr.dtype.kind not in "fiu":
                    raise InputDataError(f"input {name!r} must be numbers, got dtype {arr.dtype}")
                arr = arr.astype(kind.dtype, copy=False)
            elif arr.dtype.kind not in "OUS":
                raise InputDataError(f"input {name!r} must be strings, got dtype {arr.dtype}")
            if arr.ndim != 2 or arr.shape[1] != width:
                raise InputDataError(
                    f"input {name!r} must be [rows, {width}], got shape {list(arr.shape)}"
                )
            out[name] = arr
        rows = {a.shape[0] for a in out.values()}
        if len(rows) > 1:
            raise InputDataError(f"inputs have different numbers of rows: {sorted(rows)}")
        return out

    def encode(self, index: int, values: Any) -> np.ndarray:
        """Codes (int64 [n]) of categorical column `index` for its text values.

        An exact match of the text: "" is missing (0), anything not in the vocabulary is
        unknown (1), as the exported graph's LabelEncoder does.
        """
        table = self._lookups[index]
        cells = np.asarray(values).ravel().tolist()
        texts = (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in cells)
        return np.fromiter((table.get(t, UNKNOWN_CODE) for t in texts), dtype=np.int64)

    def preprocess(
        self, feeds: Mapping[str, Any], dtype: Any = np.float32
    ) -> tuple[np.ndarray, np.ndarray]:
        """The torch part's inputs from the raw ones: what the exported graph computes.

        Args:
            feeds: `continuous` float [n, k] (NaN = missing) and `categorical` text [n, m]
                ("" = missing); an input is needed only when the model has such columns.
            dtype: Float type of `numeric` (float32 for torch, float64 for the reference).

        Returns:
            `numeric` [n, k + indicators] (filled values, then 1.0/0.0 indicators) of `dtype`,
            and `codes` int64 [n, m]; either may have width 0.

        Raises:
            InputDataError: see `check_feeds`.
        """
        arrays = self.check_feeds(feeds)
        n = next(iter(arrays.values())).shape[0]
        parts = {
            kind.model_input: kind.preprocess(self, arrays[kind.name], dtype)
            for kind in TABULAR_KINDS
            if kind.name in arrays
        }
        numeric = parts.get(NUMERIC_INPUT, np.zeros((n, 0), dtype=dtype))
        codes = parts.get(CODES_INPUT, np.zeros((n, 0), dtype=np.int64))
        return numeric, codes

    def model_inputs(self, numeric: np.ndarray, codes: np.ndarray) -> list[np.ndarray]:
        """`numeric` and `codes` in the torch part's forward order (absent ones left out)."""
        arrays = {NUMERIC_INPUT: numeric, CODES_INPUT: codes}
        return [arrays[name] for name in self.model_input_names]


def fit_spec(
    names: Sequence[str],
    kinds: Mapping[str, str],
    values: Mapping[str, np.ndarray],
    *,
    embedding_dropout: float = 0.0,
    max_categories: int | None = None,
    min_frequency: int = 1,
) -> TabularSpec:
    """Learn fills, indicators and vocabularies from the training rows.

    Args:
        names: The feature columns in file order.
        kinds: Column name -> "continuous" or "categorical".
        values: Column name -> the training split's cells: float64 [n] with NaN for a missing
            value (continuous), or str [n] `category_text` values with "" for a missing value
            (categorical).
        embedding_dropout: Stored in the spec.
        max_categories: Keep at most this many values per categorical column, the most
            frequent (ties: the first in sorted order); None keeps all.
        min_frequency: Keep only values seen in at least this many training rows.
            Values left out are "unknown" (code 1), as a value the training split lacks is.

    Returns:
        The spec: fill = median of the present values, rounded to float32 (0.0 when none is
        present); an indicator for each continuous column with a missing value; vocabulary =
        the kept distinct present values, sorted; embedding widths by `embedding_size`.
    """
    columns: list[Column] = []
    indicators: list[str] = []
    dims: list[int] = []
    counts = {kind.name: 0 for kind in TABULAR_KINDS}
    for name in names:
        kind = kinds[name]
        index = counts[kind]
        counts[kind] += 1
        fitted = COLUMN_KINDS[kind].fit(values[name], max_categories, min_frequency)
        columns.append(Column(name, kind, kind, index, **fitted.fields))
        if fitted.indicator:
            indicators.append(name)
        if fitted.embedding_dim is not None:
            dims.append(fitted.embedding_dim)
    return TabularSpec(
        columns=tuple(columns),
        indicators=tuple(indicators),
        embedding_dims=tuple(dims),
        embedding_dropout=embedding_dropout,
    )
