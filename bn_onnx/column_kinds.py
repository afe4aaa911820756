"""The column kinds as one table: `COLUMN_KINDS`, one `ColumnKind` per kind. numpy only.

Each kind says, in one entry, everything the code does differently for it:

- the model input that holds its columns and that input's element type (`dtype`, `onnx_type`),
  and the value a missing cell has there (`missing`: NaN or "");
- how a column of cells from CSV text, Parquet or JSON values is read (`read`: the readers of
  `bn_onnx.cells`, with the missing-cell spellings);
- for the kinds of a tabular model (`tabular`): what is learned from the training split
  (`fit`: the fill and indicator, or the vocabulary and embedding width), the check of a
  fitted column (`check`), the numpy preprocessing of its input into the torch part's input
  (`preprocess`, for training, torch eval and the float64 reference) and the same as ONNX
  nodes (`graph`, used by `bn_onnx.tabular_graph`);
- what verify's random probe draws (`fills_nan`: NaN cells are missing values the model fills;
  `has_vocabulary`: values are drawn from the vocabulary, "" and an unseen value).

Adding a kind is one entry here. Import order: `cells` <- `column_kinds` <- `columns`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from bn_onnx.cells import MISSING_TEXT, categorical_values, continuous_values
from bn_onnx.errors import UsageError

# The names of the column kinds (`Column.kind`; re-exported by `bn_onnx.columns`).
CONTINUOUS = "continuous"
CATEGORICAL = "categorical"
# A plain model's feature, named (`feature_columns`): a number the model fills nothing for.
NUMBER = "number"

MISSING_CODE = 0
UNKNOWN_CODE = 1
FIRST_CATEGORY_CODE = 2
# Names of the inputs of the torch part of a tabular model (the exported graph computes them
# from `continuous` and `categorical`): filled continuous columns then indicators, and codes.
NUMERIC_INPUT = "numeric"
CODES_INPUT = "codes"
MAX_EMBEDDING_SIZE = 600
# ONNX TensorProto element types (onnx.TensorProto.FLOAT, .STRING), without importing onnx.
_ONNX_FLOAT, _ONNX_STRING = 1, 8
# ai.onnx.ml: LabelEncoder with keys_strings / values_int64s / default_int64 is version 2;
# opset 3 still resolves to it, and onnxruntime runs it.
ML_DOMAIN = "ai.onnx.ml"
ML_OPSET = 3


def embedding_size(n_codes: int) -> int:
    """Embedding width for a categorical column with `n_codes` codes (missing, unknown, values).

    fastai's `emb_sz_rule` (fastai/tabular/model.py): `min(600, round(1.6 * n ** 0.56))`.
    """
    if n_codes < 1:
        raise UsageError(f"a categorical column needs at least one code, got {n_codes}")
    return min(MAX_EMBEDDING_SIZE, round(1.6 * n_codes**0.56))


class Fitted(NamedTuple):
    """What `ColumnKind.fit` learns of one column from the training split."""

    fields: dict[str, Any]  # the `Column` fields learned: fill or vocabulary
    indicator: bool = False  # a was-missing indicator follows the continuous columns
    embedding_dim: int | None = None  # the width of its embedding (categorical)


@dataclass(frozen=True)
class ColumnKind:
    """The behaviour of one column kind (see the module docstring).

    Attributes:
        name: The kind's name in the schema (`Column.kind`); for a tabular kind also the name
            of the model input holding its columns.
        dtype: The numpy element type of that input (float32, or object for str).
        onnx_type: Its ONNX element type (a `TensorProto` data type number).
        missing: A missing cell in the input array (NaN or "").
        numeric: Whether cells are numbers (`bn_onnx.columns.continuous_values`).
        read: `read(values, column, row_offset, na)`: a column of cells as a 1-D array of
            `dtype`; raises `InputDataError` for a cell that is not of the kind.
        fills_nan: NaN cells are missing values the model fills (verify draws some).
        has_vocabulary: Values come from the column's vocabulary (verify draws from it).
        tabular: A column kind of a tabular model (the fields below are set).
        model_input: The torch part's input it feeds (`numeric` or `codes`).
        fit: `fit(cells, max_categories, min_frequency) -> Fitted`.
        check: `check(column)`: a one-line problem of a fitted `Column`, or None.
        preprocess: `preprocess(spec, x, dtype)`: the torch part's input from this kind's raw
            input `x` [n, k] (`TabularSpec.preprocess`).
        graph: `graph(tape, ir, value, spec)`: the same as ONNX nodes on an onnx-ir tape.
        opsets: The (domain, version) pairs the graph's nodes need besides ai.onnx.
    """

    name: str
    dtype: np.dtype
    onnx_type: int
    missing: Any
    numeric: bool
    read: Callable[..., np.ndarray]
    fills_nan: bool = False
    has_vocabulary: bool = False
    tabular: bool = False
    model_input: str | None = None
    fit: Callable[..., Fitted] | None = None
    check: Callable[[Any], str | None] | None = None
    preprocess: Callable[..., np.ndarray] | None = None
    graph: Callable[..., Any] | None = None
    opsets: tuple[tuple[str, int], ...] = ()


# --- reading
def _read_number(values: Any, column: Any, row_offset: int, na: frozenset[str]) -> np.ndarray:
    return continuous_values(values, column.name, row_offset, na)


def _read_category(values: Any, column: Any, row_offset: int, na: frozenset[str]) -> np.ndarray:
    return categorical_values(values, na, column)


# --- continuous: median fill, was-missing indicator
def _fit_continuous(cells: Any, *_: Any) -> Fitted:
    x = np.asarray(cells, dtype=np.float64)
    missing = np.isnan(x)
    present = x[~missing]
    fill = float(np.float32(np.median(present))) if present.size else 0.0
    return Fitted({"fill": fill}, bool(missing.any()))


def _check_continuous(c: Any) -> str | None:
    if c.fill is None or not math.isfinite(c.fill) or c.vocabulary is not None:
        return f"tabular spec: column {c.name!r} needs a finite fill"
    return None


def _preprocess_continuous(spec: Any, x: np.ndarray, dtype: Any) -> np.ndarray:
    """`numeric` [n, k + indicators]: filled values, then 1.0/0.0 indicators."""
    x = x.astype(dtype)
    numeric = np.zeros((x.shape[0], spec.n_numeric), dtype=dtype)
    missing = np.isnan(x)
    fills = np.array([c.fill for c in spec.continuous], dtype=np.float32).astype(dtype)
    numeric[:, : spec.n_continuous] = np.where(missing, fills, x)
    numeric[:, spec.n_continuous :] = missing[:, spec.indicator_indices]
    return numeric


def _graph_continuous(tape: Any, ir: Any, cont: Any, spec: Any) -> Any:
    """IsNaN -> Where(missing, fill, x), Gather(indicator columns) -> Cast, Concat."""
    fills = np.array([c.fill for c in spec.continuous], dtype=np.float32)
    fill = tape.initializer(ir.tensor(fills, name="tabular_fill_values"))
    missing = tape.op("IsNaN", [cont], name="tabular_missing")
    missing.name = "continuous_missing"
    filled = tape.op("Where", [missing, fill, cont], name="tabular_fill")
    filled.name = "continuous_filled"
    parts = [filled]
    if spec.indicators:
        indices = spec.indicator_indices
        chosen = missing
        if indices != list(range(spec.n_continuous)):
            cols = tape.initializer(
                ir.tensor(np.array(indices, dtype=np.int64), name="tabular_indicator_columns")
            )
            chosen = tape.op("Gather", [missing, cols], {"axis": 1}, name="tabular_indicators")
            chosen.name = "indicator_missing"
        indicators = tape.op("Cast", [chosen], {"to": ir.DataType.FLOAT}, name="tabular_cast")
        indicators.name = "indicators"
        parts.append(indicators)
    if len(parts) == 1:
        return filled
    return tape.op("Concat", parts, {"axis": 1}, name="tabular_numeric")


# --- categorical: vocabulary codes, embeddings
def _vocabulary(cells: Any, max_categories: int | None, min_frequency: int) -> tuple[str, ...]:
    """The sorted values of a categorical column kept by the caps (see `fit_spec`)."""
    counts: dict[str, int] = {}
    for v in cells:
        t = str(v)
        counts[t] = counts.get(t, 0) + 1
    counts.pop(MISSING_TEXT, None)
    kept = sorted(t for t, n in counts.items() if n >= min_frequency)
    if max_categories is not None and len(kept) > max_categories:
        kept = sorted(sorted(kept, key=lambda t: -counts[t])[:max_categories])
    return tuple(kept)


def _fit_categorical(cells: Any, max_categories: int | None, min_frequency: int) -> Fitted:
    vocab = _vocabulary(cells, max_categories, min_frequency)
    return Fitted(
        {"vocabulary": vocab}, embedding_dim=embedding_size(FIRST_CATEGORY_CODE + len(vocab))
    )


def _check_categorical(c: Any) -> str | None:
    vocab = c.vocabulary
    if vocab is None or c.fill is not None:
        return f"tabular spec: column {c.name!r} needs a vocabulary"
    if MISSING_TEXT in vocab or len(set(vocab)) != len(vocab):
        return f"tabular spec: column {c.name!r} vocabulary has repeats or an empty value"
    return None


def _preprocess_categorical(spec: Any, x: np.ndarray, dtype: Any) -> np.ndarray:
    """`codes` int64 [n, m] (`TabularSpec.encode` of each column)."""
    codes = np.zeros((x.shape[0], spec.n_categorical), dtype=np.int64)
    for j in range(spec.n_categorical):
        codes[:, j] = spec.encode(j, x[:, j])
    return codes


def _graph_categorical(tape: Any, ir: Any, cat: Any, spec: Any) -> Any:
    """Split, one ai.onnx.ml LabelEncoder per column, Concat."""
    columns = spec.categorical
    if len(columns) > 1:
        split = tape.op_multi_out(
            "Split",
            [cat],
            {"axis": 1, "num_outputs": len(columns)},
            num_outputs=len(columns),
            name="tabular_split",
        )
        for col, value in zip(columns, split, strict=True):
            value.name = f"categorical_{col.index}"
    else:
        split = [cat]
    codes = []
    for col, text in zip(columns, split, strict=True):
        vocab = list(col.vocabulary or ())
        codes.append(
            tape.op(
                "LabelEncoder",
                [text],
                {
                    "keys_strings": [*vocab, MISSING_TEXT],
                    "values_int64s": [FIRST_CATEGORY_CODE + k for k in range(len(vocab))]
                    + [MISSING_CODE],
                    "default_int64": UNKNOWN_CODE,
                },
                domain=ML_DOMAIN,
                name=f"tabular_codes_{col.index}",
            )
        )
        codes[-1].name = f"codes_{col.index}"
    if len(codes) == 1:
        return codes[0]
    return tape.op("Concat", codes, {"axis": 1}, name="tabular_codes")


# The registry, in input order: a tabular model's continuous input comes first.
COLUMN_KINDS: dict[str, ColumnKind] = {
    CONTINUOUS: ColumnKind(
        CONTINUOUS,
        np.dtype(np.float32),
        _ONNX_FLOAT,
        math.nan,
        numeric=True,
        read=_read_number,
        fills_nan=True,
        tabular=True,
        model_input=NUMERIC_INPUT,
        fit=_fit_continuous,
        check=_check_continuous,
        preprocess=_preprocess_continuous,
        graph=_graph_continuous,
    ),
    CATEGORICAL: ColumnKind(
        CATEGORICAL,
        np.dtype(object),
        _ONNX_STRING,
        MISSING_TEXT,
        numeric=False,
        read=_read_category,
        has_vocabulary=True,
        tabular=True,
        model_input=CODES_INPUT,
        fit=_fit_categorical,
        check=_check_categorical,
        preprocess=_preprocess_categorical,
        graph=_graph_categorical,
        opsets=((ML_DOMAIN, ML_OPSET),),
    ),
    # A plain model's feature, named (`feature_columns`): a number the model fills nothing for.
    NUMBER: ColumnKind(
        NUMBER, np.dtype(np.float32), _ONNX_FLOAT, math.nan, numeric=True, read=_read_number
    ),
}
TABULAR_KINDS = tuple(k for k in COLUMN_KINDS.values() if k.tabular)
NUMERIC_KINDS = frozenset(n for n, k in COLUMN_KINDS.items() if k.numeric)
# The kinds whose NaN cells are missing values the model fills (verify draws some NaN).
NAN_KINDS = frozenset(n for n, k in COLUMN_KINDS.items() if k.fills_nan)
VOCABULARY_KINDS = frozenset(n for n, k in COLUMN_KINDS.items() if k.has_vocabulary)
