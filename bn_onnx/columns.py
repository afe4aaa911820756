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

import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bn_onnx.errors import CellError, InputDataError, UnsupportedModelError

COLUMNS_KEY = "bn_onnx.columns"
# The spellings of a missing cell (besides None and NaN), compared case-insensitively after
# stripping spaces: `bn-onnx train --na-values`' default. A model trained with other ones
# records them in its metadata under NA_KEY (a JSON list); without the key, these apply.
NA_VALUES = ("", "NA", "N/A", "NaN", "null")
NA_KEY = "bn_onnx.na_values"
# The names of the column kinds; what each does is its entry in `bn_onnx.column_kinds`.
CONTINUOUS = "continuous"
CATEGORICAL = "categorical"
# A plain model's feature, named (`feature_columns`): a number the model fills nothing for.
NUMBER = "number"
MISSING_TEXT = ""


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
    from bn_onnx.column_kinds import COLUMN_KINDS

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


def na_set(values: Sequence[str] | None = None) -> frozenset[str]:
    """The missing-cell spellings to compare a stripped, lower-cased cell with."""
    return frozenset(str(v).strip().lower() for v in (NA_VALUES if values is None else values))


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


_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")


def text_category(text: str) -> str:
    """A text cell as a category: stripped; numbers and booleans written one way.

    A number is written as `category_text` writes the value (`1`, `1.0`, `1.00`, `+1` -> "1";
    `2.50` -> "2.5"), so that a CSV cell and the same value from Parquet or JSON are one
    category; `true`, `TRUE` -> "True" and `false` -> "False" in any case. Other text is kept.
    """
    t = text.strip()
    head = t[:1]
    if head and head in "0123456789+-.":
        if _INTEGER.fullmatch(t):
            return str(int(t))
        if _NUMBER.fullmatch(t):
            v = float(t)
            if math.isfinite(v):
                return str(int(v)) if v.is_integer() else repr(v)
    elif len(t) in (4, 5):
        low = t.lower()
        if low == "true":
            return "True"
        if low == "false":
            return "False"
    return t


def category_text(value: Any) -> str:
    """The text a categorical value is looked up by; "" for a missing value.

    One rule for every source, so that training (CSV, Parquet, NPZ) and apps (CSV, Parquet,
    JSON) agree: None and NaN are missing; text goes through `text_category` (stripped;
    numeric text and booleans in any case written as below); integers and integral floats are
    written as integers ("3": Parquet and pandas turn an integer column with nulls into
    floats); other floats with `repr`; booleans as "True"/"False" (as pandas writes them).
    Missing-value spellings (`NA_VALUES`) are the caller's to apply (`categorical_values`).
    """
    if value is None:
        return MISSING_TEXT
    if isinstance(value, (str, np.str_)):
        return text_category(str(value))
    if isinstance(value, (bytes, np.bytes_)):
        return text_category(bytes(value).decode("utf-8", errors="replace"))
    if isinstance(value, (bool, np.bool_)):
        return "True" if value else "False"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return MISSING_TEXT
        if v.is_integer():
            return str(int(v))
        return repr(v)
    return str(value).strip()


def _number(value: Any, column: str, row: int, na: frozenset[str] = frozenset()) -> float:
    """A continuous cell as a float; NaN for a missing one (None, NaN, empty or `na` text)."""
    if value is None:
        return math.nan
    if isinstance(value, (bool, np.bool_)):
        raise CellError(column, row, f"not a number: {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        try:
            return float(value)
        except OverflowError:  # an int beyond float's range
            raise CellError(column, row, "number too large") from None
    if isinstance(value, (str, np.str_, bytes, np.bytes_)):
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        text = text.strip()
        if not text or text.lower() in na:
            return math.nan
        try:
            return float(text)
        except ValueError:
            raise CellError(column, row, f"not a number: {text!r}") from None
    raise CellError(column, row, f"not a number: {value!r}")


def continuous_values(
    values: Any, column: str, row_offset: int = 0, na: frozenset[str] | None = None
) -> np.ndarray:
    """One continuous column as float32 [n]; NaN where missing.

    `row_offset` is added to row numbers in messages (for a chunk of a larger input); `na`:
    the missing-cell spellings (`na_set`; default `NA_VALUES`).

    Raises:
        InputDataError: a cell that is neither a number nor missing, naming the column and row.
    """
    if isinstance(values, np.ndarray) and values.ndim == 1:
        arr = values
    else:
        # Cell by cell: np.asarray would read [1, True] as [1, 1] and nested lists as 2-D.
        cells = list(values)
        arr = np.empty(len(cells), dtype=object)
        for i, v in enumerate(cells):
            arr[i] = v
    if arr.dtype.kind in "fiu":  # numeric already: NaN stays NaN
        with np.errstate(over="ignore"):  # beyond float32: inf, for the model's user to refuse
            return arr.astype(np.float32)
    if arr.dtype.kind == "b":
        raise InputDataError(f"column {column!r}: booleans, not numbers")
    na = _DEFAULT_NA if na is None else na
    out = np.empty(len(arr), dtype=np.float32)
    for i, v in enumerate(arr):
        out[i] = _float32_cell(v, column, i + row_offset, na)
    return out


def categorical_values(
    values: Any, na: frozenset[str] | None = None, column: Column | None = None
) -> np.ndarray:
    """One categorical column as an object array of str [n] (`category_text` of each cell).

    A cell whose stripped text is a missing-value spelling (`na`, from `na_set`; default
    `NA_VALUES`) is "", unless `column`'s vocabulary holds it (a model trained when only an
    empty cell was missing); a cell that `column`'s vocabulary spells another way (`1.0` in a
    model trained before numbers were written one way) is given the vocabulary's spelling.
    """
    arr = values if isinstance(values, np.ndarray) else np.asarray(list(values), dtype=object)
    cells = arr.tolist()
    kinds = set(map(type, cells))
    # the usual integer columns at C speed
    out = list(map(str, cells)) if kinds <= _INT else [category_text(v) for v in cells]
    na, spelling = _column_reading(_DEFAULT_NA if na is None else na, column)
    if na:
        out = [MISSING_TEXT if t.lower() in na else t for t in out]
    if spelling:
        out = [spelling.get(t, t) for t in out]
    result = np.empty(len(out), dtype=object)
    result[:] = out
    return result


_DEFAULT_NA = na_set()


@functools.lru_cache(maxsize=256)
def _vocabulary_reading(
    na: frozenset[str], vocabulary: tuple[str, ...] | None
) -> tuple[frozenset[str], dict[str, str]]:
    if not vocabulary:
        return na - {MISSING_TEXT}, {}
    held = {v.lower() for v in vocabulary}
    spelling = {text_category(v): v for v in vocabulary if text_category(v) != v}
    return na - held - {MISSING_TEXT}, spelling


def _column_reading(
    na: frozenset[str], column: Column | None
) -> tuple[frozenset[str], dict[str, str]]:
    """The spellings read as missing in a column, and the vocabulary's own spellings."""
    return _vocabulary_reading(na, None if column is None else column.vocabulary)


_INT = {int}


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
    from bn_onnx.column_kinds import COLUMN_KINDS

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
        from bn_onnx.column_kinds import COLUMN_KINDS

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
# The smallest magnitude that rounds to infinity in float32 (round to nearest even).
_F32_INF = float.fromhex("0x1.ffffffp+127")


def _read_category(value: Any, na: frozenset[str], spelling: dict[str, str]) -> str:
    """One categorical cell as `categorical_values` reads it."""
    t = category_text(value)
    if t.lower() in na:
        return MISSING_TEXT
    return spelling.get(t, t) if spelling else t


def _float32_cell(
    value: Any, column: str | None, row: int, na: frozenset[str] = frozenset()
) -> float:
    """A continuous cell as a float that converts to float32 without an overflow warning."""
    if column is None:  # a place of the input that no column fills
        return math.nan
    v = _number(value, column, row, na)
    if v >= _F32_INF:
        return math.inf
    if v <= -_F32_INF:
        return -math.inf
    return v
