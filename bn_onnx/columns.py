"""Named columns of a tabular model: the schema kept in its metadata, and rows given by column
name turned into the model's input arrays.

A tabular bn-onnx model takes the raw columns, one input per column family, and does the
fill, the missing-value indicators, the category lookup, the embeddings and the normalization
inside the graph:

- `continuous`: float32 [batch, n_continuous], the raw values in schema order; NaN = missing.
- `categorical`: string [batch, n_categorical], each value's text (`category_text`);
  "" = missing. A value not in the column's vocabulary maps to the column's "unknown" code
  inside the graph.

The schema is the model's metadata `bn_onnx.columns`: a JSON list, one object per column in
the training file's order (the target excluded), e.g.
`{"name": "age", "kind": "continuous", "input": "continuous", "index": 0, "fill": 41.0}` and
`{"name": "city", "kind": "categorical", "input": "categorical", "index": 0,
"vocabulary": ["Busan", "Seoul"]}`. Apps (`bn-onnx run`, `serve`, `Predictor`) and `verify`
read it to build the input arrays from CSV, Parquet or JSON rows. What each kind does (its
input's dtype, its reader, fit and preprocessing) is its entry in `bn_onnx.column_kinds`.
numpy only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bn_onnx.cells import (  # noqa: F401 (the cell readers, re-exported)
    _DEFAULT_NA,
    _F32_INF,
    MISSING_TEXT,
    NA_VALUES,
    _column_reading,
    _float32_cell,
    _read_category,
    categorical_values,
    category_text,
    continuous_values,
    na_set,
    text_category,
)
from bn_onnx.column_kinds import (  # noqa: F401 (the kind names, re-exported)
    CATEGORICAL,
    COLUMN_KINDS,
    CONTINUOUS,
    NUMBER,
)
from bn_onnx.errors import InputDataError, UnsupportedModelError

COLUMNS_KEY = "bn_onnx.columns"
NA_KEY = "bn_onnx.na_values"


@dataclass(frozen=True)
class Column:
    """One named column of a tabular model.

    Attributes:
        name: The column's name in the user's data (CSV header, Parquet field, JSON key).
        kind: "continuous" (a number, NaN when missing), "categorical" (text), or "number"
            (a plain model's feature by name: a number, never missing).
        input: The model input that holds it ("continuous" or "categorical").
        index: Its position along axis 1 of that input.
        vocabulary: Categorical only: the categories seen in the training split, in code order.
        fill: Continuous only: the value a missing cell gets (the training split's median).
    """

    name: str
    kind: str
    input: str
    index: int
    vocabulary: tuple[str, ...] | None = None
    fill: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.vocabulary is None:
            del d["vocabulary"]
        else:
            d["vocabulary"] = list(self.vocabulary)
        if self.fill is None:
            del d["fill"]
        return d


def feature_columns(names: Sequence[str], input_name: str = "input") -> list[Column]:
    """The schema of a plain model trained from a file with a header: its features by name.

    Each name is a "number" column at its place in the model's one float input: the model
    fills nothing, so a missing value is refused as before. Apps read named rows (CSV header,
    Parquet, JSON objects) by these names; plain arrays keep position.
    """
    return [Column(str(n), NUMBER, input_name, i) for i, n in enumerate(names)]


def columns_to_json(columns: Sequence[Column]) -> str:
    """The metadata value of `bn_onnx.columns` for `columns` (compact JSON)."""
    return json.dumps([c.to_dict() for c in columns], separators=(",", ":"), ensure_ascii=False)


def read_columns(metadata: Mapping[str, str]) -> list[Column] | None:
    """The column schema in a model's metadata, or None for a model without one.

    Raises:
        UnsupportedModelError: the metadata entry is not a valid schema.
    """
    text = metadata.get(COLUMNS_KEY)
    if text is None:
        return None
    try:
        items = json.loads(text)
        if not isinstance(items, list) or not items:
            raise ValueError("not a non-empty list")
        columns = []
        for item in items:
            vocab = item.get("vocabulary")
            fill = item.get("fill")
            col = Column(
                name=str(item["name"]),
                kind=str(item["kind"]),
                input=str(item["input"]),
                index=int(item["index"]),
                vocabulary=None if vocab is None else tuple(str(v) for v in vocab),
                fill=None if fill is None else float(fill),
            )
            if col.kind not in COLUMN_KINDS or col.index < 0:
                raise ValueError(f"column {col.name!r}: kind {col.kind!r}, index {col.index}")
            columns.append(col)
    except RecursionError:
        raise UnsupportedModelError(
            f"model metadata {COLUMNS_KEY} is not valid: nested too deeply"
        ) from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UnsupportedModelError(f"model metadata {COLUMNS_KEY} is not valid: {exc}") from None
    seen: set[tuple[str, int]] = set()
    for col in columns:
        if (col.input, col.index) in seen:
            raise UnsupportedModelError(
                f"model metadata {COLUMNS_KEY}: two columns at {col.input}[{col.index}]"
            )
        seen.add((col.input, col.index))
    return columns


def read_na_values(metadata: Mapping[str, str]) -> tuple[str, ...]:
    """The missing-cell spellings a model was trained with (`NA_VALUES` when not recorded).

    Raises:
        UnsupportedModelError: the metadata entry is not a JSON list of strings.
    """
    text = metadata.get(NA_KEY)
    if text is None:
        return NA_VALUES
    try:
        values = json.loads(text)
    except ValueError:
        values = None
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise UnsupportedModelError(f"model metadata {NA_KEY} is not a JSON list of strings")
    return tuple(values)


def missing_columns_error(columns: Sequence[Column], missing: Sequence[str]) -> InputDataError:
    """The one-line error for columns the data lacks (the same for CSV, Parquet and JSON)."""
    return InputDataError(
        f"missing column{'s' if len(missing) > 1 else ''} "
        + ", ".join(repr(m) for m in missing)
        + f" (the model reads: {', '.join(c.name for c in columns)})"
    )


def feeds_from_columns(
    columns: Sequence[Column],
    data: Mapping[str, Any],
    n_rows: int | None = None,
    *,
    row_offset: int = 0,
    na_values: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """The model's input arrays from data given by column name.

    Args:
        columns: The model's schema (`read_columns`).
        data: Column name -> values (a sequence or 1-D array of n_rows cells). Extra columns
            (a target column, ids) are ignored.
        n_rows: The expected number of rows (taken from the first column when None).
        row_offset: Added to row numbers in messages, for data that is a chunk of a larger
            input (a Parquet batch, a chunk of a CSV file).
        na_values: The spellings of a missing cell (`read_na_values` of the model; default
            `NA_VALUES`), compared case-insensitively.

    Returns:
        Input name -> array: float32 [n_rows, k] for "continuous" (NaN = missing), object
        (str) [n_rows, k] for "categorical" ("" = missing).

    Raises:
        InputDataError: a column is missing, has the wrong number of rows, or a continuous cell
            is not a number (the message names the column).
    """
    missing = [c.name for c in columns if c.name not in data]
    if missing:
        raise missing_columns_error(columns, missing)
    widths: dict[str, int] = {}
    for c in columns:
        widths[c.input] = max(widths.get(c.input, 0), c.index + 1)
    feeds: dict[str, np.ndarray] = {}
    na = _DEFAULT_NA if na_values is None else na_set(na_values)
    for c in columns:
        kind = COLUMN_KINDS[c.kind]
        col = kind.read(data[c.name], c, row_offset, na)
        if n_rows is None:
            n_rows = len(col)
        if len(col) != n_rows:
            raise InputDataError(f"column {c.name!r} has {len(col)} rows, expected {n_rows}")
        if c.input not in feeds:
            feeds[c.input] = np.full((n_rows, widths[c.input]), kind.missing, kind.dtype)
        feeds[c.input][:, c.index] = col
    return feeds


def feeds_from_records(
    columns: Sequence[Column],
    records: Sequence[Mapping[str, Any]],
    *,
    row_offset: int = 0,
    na_values: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """The model's input arrays from rows given as objects (`{"age": 31, "city": "Busan"}`).

    A key that a record lacks is missing in that row only if another record has it; a column
    that no record has is an error (as in `feeds_from_columns`). `row_offset` is added to row
    numbers in messages. For many calls with one schema, `RecordReader(columns)` keeps the
    layout between calls.

    Raises:
        InputDataError: a record is not an object, a column is absent from every record, or a
            continuous value is not a number.
    """
    return RecordReader(columns, na_values).feeds(records, row_offset=row_offset)


class RecordReader:
    """Turns rows given as objects into the model's input arrays, for one schema.

    The same cell rules as `feeds_from_columns` (`category_text`, numbers or missing), row by
    row with two numpy calls per input: for the handful of rows of a service request, numpy's
    per-call cost would otherwise be most of the work.
    """

    def __init__(self, columns: Sequence[Column], na_values: Sequence[str] | None = None) -> None:
        self.columns = list(columns)
        self.na_values = NA_VALUES if na_values is None else tuple(na_values)
        self._na = na_set(self.na_values)
        places: dict[str, dict[int, Column]] = {}
        for c in self.columns:
            places.setdefault(c.input, {})[c.index] = c
        # Per input: its name, whether it is continuous, the column name at each index (None:
        # a place no column fills).
        self._layout: list[tuple[str, bool, list[str | None]]] = []
        self._names = {c.name for c in self.columns}
        self._readings = {
            c.name: _column_reading(self._na, c)
            for c in self.columns
            if not COLUMN_KINDS[c.kind].numeric
        }
        for name, at in places.items():
            slots = [at[j].name if j in at else None for j in range(max(at) + 1)]
            continuous = COLUMN_KINDS[next(iter(at.values())).kind].numeric
            self._layout.append((name, continuous, slots))

    def feeds(
        self, records: Sequence[Mapping[str, Any]], *, row_offset: int = 0
    ) -> dict[str, np.ndarray]:
        """The input arrays for `records` (see `feeds_from_records`)."""
        if set(map(type, records)) != _DICT:
            for i, r in enumerate(records):
                if not isinstance(r, Mapping):
                    raise InputDataError(f"row {i + row_offset} is not an object of column values")
        names = self._names
        if not records or not (
            names <= records[0].keys() or names <= set().union(*(r.keys() for r in records))
        ):
            # The general path names the missing columns and shapes empty inputs.
            data = {
                c.name: [r.get(c.name) for r in records]
                for c in self.columns
                if any(c.name in r for r in records)
            }
            return feeds_from_columns(
                self.columns,
                data,
                n_rows=len(records),
                row_offset=row_offset,
                na_values=self.na_values,
            )
        feeds: dict[str, np.ndarray] = {}
        na = self._na
        for name, continuous, slots in self._layout:
            if continuous:
                rows = [
                    [
                        v
                        if type(v := r.get(n)) is float and -_F32_INF < v < _F32_INF
                        else _float32_cell(v, n, i, na)
                        for n in slots
                    ]
                    for i, r in enumerate(records, row_offset)
                ]
                feeds[name] = np.array(rows, dtype=np.float32)
            else:
                readings = [self._readings.get(n, (na, {})) for n in slots]
                cells = [
                    [
                        MISSING_TEXT if n is None else _read_category(r.get(n), *reading)
                        for n, reading in zip(slots, readings, strict=True)
                    ]
                    for r in records
                ]
                feeds[name] = np.array(cells, dtype=object)
        return feeds


_DICT = {dict}
