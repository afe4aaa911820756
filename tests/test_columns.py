"""The tabular column schema and rows by column name -> model input arrays (bn_onnx.columns)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bn_onnx.columns import (
    COLUMNS_KEY,
    Column,
    category_text,
    columns_to_json,
    feeds_from_columns,
    feeds_from_records,
    read_columns,
)
from bn_onnx.errors import InputDataError, UnsupportedModelError

SCHEMA = [
    Column("age", "continuous", "continuous", 0, fill=41.0),
    Column("city", "categorical", "categorical", 0, vocabulary=("Busan", "Seoul")),
    Column("income", "continuous", "continuous", 1, fill=3.5),
]


def test_schema_round_trips_through_metadata_json():
    back = read_columns({COLUMNS_KEY: columns_to_json(SCHEMA)})
    assert back == SCHEMA


def test_model_without_schema_has_none():
    assert read_columns({"bn_onnx.task": "classification"}) is None


@pytest.mark.parametrize(
    "text",
    ["[]", "{}", "not json", '[{"name": "a"}]', '[{"name":"a","kind":"x","input":"i","index":0}]'],
)
def test_invalid_schema_is_a_one_line_model_error(text):
    with pytest.raises(UnsupportedModelError, match=COLUMNS_KEY):
        read_columns({COLUMNS_KEY: text})


def test_two_columns_at_one_place_are_refused():
    bad = [SCHEMA[0], Column("x", "continuous", "continuous", 0)]
    with pytest.raises(UnsupportedModelError, match="two columns"):
        read_columns({COLUMNS_KEY: columns_to_json(bad)})


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, ""),
        (float("nan"), ""),
        (" Busan ", "Busan"),
        (3, "3"),
        (np.int64(3), "3"),
        (3.0, "3"),
        (np.float32(2.5), "2.5"),
        (True, "True"),
        (b"Seoul", "Seoul"),
    ],
)
def test_category_text_is_one_rule_for_every_source(value, text):
    assert category_text(value) == text


@given(st.integers(-(10**12), 10**12))
def test_an_integer_category_reads_the_same_from_csv_text_int_and_float(n):
    assert category_text(str(n)) == category_text(n) == category_text(float(n))


def test_feeds_from_columns_places_each_column_and_keeps_missing_values():
    feeds = feeds_from_columns(
        SCHEMA,
        {"income": [1.5, "", None], "age": ["31", 40, float("nan")], "city": ["Busan", None, 7]},
    )
    assert feeds["continuous"].dtype == np.float32
    np.testing.assert_array_equal(
        feeds["continuous"], np.array([[31, 1.5], [40, np.nan], [np.nan, np.nan]], np.float32)
    )
    assert feeds["categorical"].tolist() == [["Busan"], [""], ["7"]]


def test_numeric_arrays_are_converted_without_loss_of_nan():
    x = np.array([1.0, np.nan, 3.0])
    feeds = feeds_from_columns(SCHEMA, {"age": x, "income": np.arange(3), "city": ["a"] * 3})
    assert math.isnan(feeds["continuous"][1, 0])
    assert feeds["continuous"][:, 1].tolist() == [0.0, 1.0, 2.0]


def test_missing_column_error_names_it():
    with pytest.raises(InputDataError, match="missing column 'city'"):
        feeds_from_columns(SCHEMA, {"age": [1], "income": [2]})


def test_wrongly_typed_continuous_cell_names_column_and_row():
    with pytest.raises(InputDataError, match=r"column 'age' row 1: not a number: 'abc'"):
        feeds_from_columns(SCHEMA, {"age": [1, "abc"], "income": [2, 3], "city": ["a", "b"]})


def test_boolean_is_not_a_number():
    with pytest.raises(InputDataError, match="'age'"):
        feeds_from_records(SCHEMA, [{"age": True, "income": 1, "city": "a"}])


def test_columns_of_different_lengths_are_refused():
    with pytest.raises(InputDataError, match="rows"):
        feeds_from_columns(SCHEMA, {"age": [1, 2], "income": [2], "city": ["a", "b"]})


def test_records_with_a_key_absent_in_some_rows_are_missing_there():
    feeds = feeds_from_records(
        SCHEMA,
        [{"age": 31, "income": 2, "city": "Busan"}, {"age": 5, "income": 1, "extra": "x"}],
    )
    assert feeds["categorical"].tolist() == [["Busan"], [""]]


def test_record_that_is_not_an_object_is_refused():
    with pytest.raises(InputDataError, match="row 0"):
        feeds_from_records(SCHEMA, [[1, 2, 3]])


CELLS = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.integers(-(10**20), 10**20),
    st.booleans(),
    st.sampled_from(["", " ", "Busan", " Seoul ", "3", "2.5", "nan", "abc", "1e39"]),
)


@given(
    st.lists(
        st.fixed_dictionaries(
            {},
            optional={"age": CELLS, "city": CELLS, "income": CELLS, "note": CELLS},
        ),
        min_size=1,
        max_size=6,
    )
)
def test_record_reader_agrees_with_the_column_path_cell_for_cell(records):
    """RecordReader (row by row) and feeds_from_columns (column by column): one set of rules."""
    from bn_onnx.columns import RecordReader

    data = {
        c.name: [r.get(c.name) for r in records]
        for c in SCHEMA
        if any(c.name in r for r in records)
    }
    try:
        want = feeds_from_columns(SCHEMA, data, n_rows=len(records), row_offset=5)
    except InputDataError as exc:
        with pytest.raises(InputDataError) as err:
            RecordReader(SCHEMA).feeds(records, row_offset=5)
        if str(exc).startswith("missing column"):
            assert str(err.value) == str(exc)
        return
    got = RecordReader(SCHEMA).feeds(records, row_offset=5)
    assert set(got) == set(want)
    np.testing.assert_array_equal(got["continuous"], want["continuous"])  # NaN == NaN here
    assert got["continuous"].dtype == np.float32
    assert got["categorical"].tolist() == want["categorical"].tolist()
