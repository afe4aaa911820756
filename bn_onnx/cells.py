"""How one cell of a table is read: text from CSV, values from Parquet or JSON, as a number or
a category, with the missing-value spellings. numpy only; `bn_onnx.columns` re-exports these.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from bn_onnx.errors import CellError, InputDataError

# The spellings of a missing cell (besides None and NaN), compared case-insensitively after
# stripping spaces: `bn-onnx train --na-values`' default. A model trained with other ones
# records them in its metadata (`bn_onnx.columns.NA_KEY`, a JSON list); without it, these apply.
NA_VALUES = ("", "NA", "N/A", "NaN", "null")
MISSING_TEXT = ""


def na_set(values: Sequence[str] | None = None) -> frozenset[str]:
    """The missing-cell spellings to compare a stripped, lower-cased cell with."""
    return frozenset(str(v).strip().lower() for v in (NA_VALUES if values is None else values))


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
    values: Any, na: frozenset[str] | None = None, column: Any = None
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


def _column_reading(na: frozenset[str], column: Any) -> tuple[frozenset[str], dict[str, str]]:
    """The spellings read as missing in a column, and the vocabulary's own spellings."""
    return _vocabulary_reading(na, None if column is None else column.vocabulary)


_INT = {int}

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
