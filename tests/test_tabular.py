"""The tabular spec: fills, indicators, vocabularies and codes learned from training rows, and
its Python preprocessing (bn_onnx.tabular)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bn_onnx.columns import Column, read_columns
from bn_onnx.errors import InputDataError, UsageError
from bn_onnx.model_config import MLPConfig, expected_tensor_shapes
from bn_onnx.tabular import (
    MISSING_CODE,
    UNKNOWN_CODE,
    TabularSpec,
    embedding_size,
    fit_spec,
)

NAMES = ["age", "city", "income", "plan"]
KINDS = {"age": "continuous", "city": "categorical", "income": "continuous", "plan": "categorical"}


def _spec() -> TabularSpec:
    values = {
        "age": np.array([30.0, np.nan, 50.0, 41.0]),
        "city": np.array(["Seoul", "Busan", "", "Seoul"], dtype=object),
        "income": np.array([1.0, 2.0, 3.0, 4.0]),
        "plan": np.array(["pro", "basic", "basic", "pro"], dtype=object),
    }
    return fit_spec(NAMES, KINDS, values)


@pytest.mark.parametrize(
    ("n_codes", "width"),
    [(2, 2), (3, 3), (5, 4), (8, 5), (10, 6), (100, 21), (10_000, 278), (10**6, 600)],
)
def test_embedding_size_is_fastais_emb_sz_rule(n_codes, width):
    assert embedding_size(n_codes) == width == min(600, round(1.6 * n_codes**0.56))


def test_fit_learns_median_fill_indicator_and_sorted_vocabulary():
    spec = _spec()
    by_name = {c.name: c for c in spec.columns}
    assert [c.name for c in spec.columns] == NAMES  # the file's order
    assert by_name["age"].fill == 41.0  # median of 30, 50, 41 (NaN skipped)
    assert by_name["income"].fill == 2.5
    assert spec.indicators == ("age",)  # only the column with a missing training value
    assert by_name["city"].vocabulary == ("Busan", "Seoul")  # "" is missing, not a category
    assert by_name["plan"].vocabulary == ("basic", "pro")
    assert (by_name["age"].input, by_name["age"].index) == ("continuous", 0)
    assert (by_name["income"].input, by_name["income"].index) == ("continuous", 1)
    assert (by_name["plan"].input, by_name["plan"].index) == ("categorical", 1)
    assert spec.embedding_dims == (embedding_size(4), embedding_size(4))
    assert spec.n_numeric == 3 and spec.in_features == 3 + sum(spec.embedding_dims)


def test_fill_is_rounded_to_float32_once():
    spec = fit_spec(["x"], {"x": "continuous"}, {"x": np.array([0.1, 0.2, 0.3])})
    assert spec.columns[0].fill == float(np.float32(0.2))


def test_preprocess_fills_marks_and_codes_like_the_graph():
    spec = _spec()
    feeds = {
        "continuous": np.array([[np.nan, np.nan], [7.0, 1.5]], np.float32),
        "categorical": np.array([["Seoul", ""], ["Daegu", "basic"]], dtype=object),
    }
    numeric, codes = spec.preprocess(feeds)
    assert numeric.dtype == np.float32 and codes.dtype == np.int64
    # age filled with 41 and marked; income filled with 2.5, no indicator (none in training)
    np.testing.assert_array_equal(numeric, [[41.0, 2.5, 1.0], [7.0, 1.5, 0.0]])
    # Seoul is vocabulary[1] -> 3; "" -> missing; Daegu unseen -> unknown; basic -> 2
    np.testing.assert_array_equal(codes, [[3, MISSING_CODE], [UNKNOWN_CODE, 2]])
    numeric64, _ = spec.preprocess(feeds, dtype=np.float64)
    assert numeric64.dtype == np.float64
    np.testing.assert_array_equal(numeric64, numeric)


def test_lookup_is_an_exact_text_match():
    spec = _spec()
    np.testing.assert_array_equal(spec.encode(0, [" Seoul", "seoul", "Seoul"]), [1, 1, 3])


def test_a_column_missing_in_every_training_row_still_works():
    values = {"a": np.full(4, np.nan), "c": np.array(["", "", "", ""], dtype=object)}
    spec = fit_spec(["a", "c"], {"a": "continuous", "c": "categorical"}, values)
    assert spec.columns[0].fill == 0.0 and spec.indicators == ("a",)
    assert spec.columns[1].vocabulary == () and spec.embedding_rows == [2]
    numeric, codes = spec.preprocess(
        {"continuous": np.array([[np.nan], [3.0]]), "categorical": np.array([[""], ["x"]])}
    )
    np.testing.assert_array_equal(numeric, [[0.0, 1.0], [3.0, 0.0]])
    np.testing.assert_array_equal(codes, [[MISSING_CODE], [UNKNOWN_CODE]])


@given(
    st.lists(
        st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False, width=32)),
        min_size=1,
        max_size=30,
    )
)
def test_fill_is_the_median_of_present_values_and_indicator_iff_any_missing(cells):
    x = np.array([math.nan if v is None else v for v in cells])
    spec = fit_spec(["x"], {"x": "continuous"}, {"x": x})
    present = x[~np.isnan(x)]
    expected = float(np.float32(np.median(present))) if present.size else 0.0
    assert spec.columns[0].fill == expected
    assert spec.indicators == (("x",) if np.isnan(x).any() else ())
    numeric, _ = spec.preprocess({"continuous": x[:, None].astype(np.float32)})
    assert not np.isnan(numeric).any()


def test_spec_round_trips_through_the_model_config_json():
    spec = _spec().with_embedding_dropout(0.25)
    config = MLPConfig(in_features=spec.in_features, out_features=3, tabular=spec)
    again = MLPConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.tabular.embedding_dropout == 0.25
    shapes = expected_tensor_shapes(config)
    assert shapes["embeddings.0.weight"] == (4, spec.embedding_dims[0])
    assert shapes["input_norm.running_mean"] == (spec.in_features,)
    # the metadata schema the apps read is the same list of columns
    assert read_columns({"bn_onnx.columns": spec.columns_json()}) == list(spec.columns)


def test_plain_config_json_has_no_tabular_key():
    assert "tabular" not in MLPConfig(in_features=4, out_features=2).to_dict()


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda d: d["columns"][0].update(fill=None), "finite fill"),
        (lambda d: d["columns"][1].update(vocabulary=["a", "a"]), "repeats"),
        (lambda d: d["columns"][1].update(vocabulary=["a", ""]), "empty value"),
        (lambda d: d["columns"][2].update(index=5), "indices"),
        (lambda d: d.update(indicators=["city"]), "indicators"),
        (lambda d: d.update(embedding_dims=[3]), "embedding width"),
        (lambda d: d.update(embedding_dropout=1.0), "embedding_dropout"),
        (lambda d: d.update(extra=1), "unknown key"),
        (lambda d: d.pop("columns"), "malformed"),
    ],
)
def test_bad_spec_is_a_one_line_usage_error(change, fragment):
    data = json.loads(json.dumps(_spec().to_dict()))
    change(data)
    with pytest.raises(UsageError, match=fragment) as info:
        TabularSpec.from_dict(data)
    assert "\n" not in str(info.value)


def test_config_refuses_in_features_that_disagree_with_the_columns():
    spec = _spec()
    with pytest.raises(UsageError, match="in_features"):
        MLPConfig(in_features=spec.in_features + 1, out_features=2, tabular=spec)


@pytest.mark.parametrize(
    ("feeds", "fragment"),
    [
        ({"categorical": np.array([["a", "b"]])}, "no value given for model input 'continuous'"),
        (
            {"continuous": np.zeros((1, 3)), "categorical": np.array([["a", "b"]])},
            r"must be \[rows, 2\]",
        ),
        ({"continuous": np.zeros((1, 2)), "categorical": np.zeros((1, 2))}, "must be strings"),
        (
            {"continuous": np.zeros((2, 2)), "categorical": np.array([["a", "b"]])},
            "different numbers of rows",
        ),
    ],
)
def test_bad_feeds_are_input_data_errors(feeds, fragment):
    with pytest.raises(InputDataError, match=fragment):
        _spec().preprocess(feeds)


def test_columns_are_the_seam_dataclass():
    assert all(isinstance(c, Column) for c in _spec().columns)


def test_tabular_modules_never_import_torch():
    code = (
        "import sys, bn_onnx.tabular, bn_onnx.tabular_graph, bn_onnx.checkpoint_forward, "
        "bn_onnx.data\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
