"""One reading of a cell, whatever the file format (issue 20, deliver 4): numeric-looking
categories written one way, booleans in any case, the missing-value spellings of `--na-values`
(default: empty, NA, N/A, NaN, null), in training and in run, serve and Predictor alike."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from serve_testing import make_tabular, tabular_forward

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

from bn_onnx.cli import main
from bn_onnx.columns import (
    NA_VALUES,
    Column,
    categorical_values,
    category_text,
    feeds_from_columns,
    feeds_from_records,
    text_category,
)
from bn_onnx.data import load_dataset
from bn_onnx.errors import InputFileError
from bn_onnx.runtime import Predictor
from bn_onnx.serve import create_app

ATOL, RTOL = 1e-5, 1e-4


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("1", "1"),
        ("1.0", "1"),
        (" 1.00 ", "1"),
        ("+1", "1"),
        ("007", "7"),
        ("2.50", "2.5"),
        ("1e3", "1000"),
        ("-0.25", "-0.25"),
        ("12345678901234567890", "12345678901234567890"),  # exact, not through a float
        ("true", "True"),
        ("TRUE", "True"),
        ("False", "False"),
        ("nan", "nan"),  # not a number here: a missing-value spelling, applied by the caller
        ("1.0.0", "1.0.0"),
        ("Seoul", "Seoul"),
    ],
)
def test_text_cells_are_written_as_the_same_value_from_parquet_or_json(text, want):
    assert text_category(text) == want


@pytest.mark.parametrize(
    ("value", "text"), [(1, "1"), (1.0, "1"), (np.int64(1), "1"), (2.5, "2.5"), (True, "True")]
)
def test_typed_values_read_as_their_text_cell(value, text):
    assert category_text(value) == category_text(text) == text_category(text)


def test_missing_value_spellings_are_case_insensitive_and_configurable():
    cells = ["NA", "n/a", " null ", "NaN", "", None, "x"]
    assert categorical_values(cells).tolist() == ["", "", "", "", "", "", "x"]
    assert categorical_values(cells, frozenset({"", "?"})).tolist() == [
        "NA", "n/a", "null", "NaN", "", "", "x"
    ]  # fmt: skip
    col = [Column("age", "continuous", "continuous", 0, fill=1.0)]
    feeds = feeds_from_columns(col, {"age": ["NA", "null", "3", ""]})
    assert np.isnan(feeds["continuous"][:3:1, 0][:2]).all() and feeds["continuous"][2, 0] == 3
    assert set(NA_VALUES) == {"", "NA", "N/A", "NaN", "null"}


def test_a_vocabulary_spelled_the_old_way_keeps_its_values():
    """A model trained before: its vocabulary holds `1.0` and `NA` as the CSV spelt them."""
    col = Column("grade", "categorical", "categorical", 0, vocabulary=("1.0", "NA", "x"))
    got = feeds_from_columns([col], {"grade": ["1", "1.00", 1, "NA", "null", ""]})
    assert got["categorical"][:, 0].tolist() == ["1.0", "1.0", "1.0", "NA", "", ""]
    records = [{"grade": v} for v in ["1", 1.0, "NA", None]]
    assert feeds_from_records([col], records)["categorical"][:, 0].tolist() == [
        "1.0", "1.0", "NA", ""
    ]  # fmt: skip


def test_booleans_read_alike_from_csv_text_parquet_and_json():
    col = [Column("member", "categorical", "categorical", 0, vocabulary=("False", "True"))]
    text = feeds_from_columns(col, {"member": ["true", "FALSE", "True", "NA"]})
    table = pa.table({"member": pa.array([True, False, True, None])})
    arrow = feeds_from_columns(
        col, {"member": table.column("member").to_numpy(zero_copy_only=False)}
    )
    records = feeds_from_records(col, [{"member": v} for v in (True, False, True, None)])
    for other in (arrow, records):
        assert other["categorical"].tolist() == text["categorical"].tolist()


def test_the_same_rows_give_the_same_outputs_from_csv_parquet_and_json(tmp_path, capsys):
    model = tmp_path / "tab.onnx"
    w = make_tabular(model)
    # the same rows three ways: CSV text, typed Parquet columns (nulls), JSON values
    csv_rows = [
        ("31.5", "Busan", "NA", "1.0"),
        ("NA", " Seoul", "2.25", "2"),
        ("", "Incheon", "4", "3.00"),
        ("50", "null", "null", "N/A"),
        ("44", "Daegu", "1.5", "4"),
    ]
    canonical = [
        {"age": 31.5, "city": "Busan", "income": None, "grade": 1},
        {"age": None, "city": "Seoul", "income": 2.25, "grade": 2},
        {"age": None, "city": "Incheon", "income": 4.0, "grade": 3},
        {"age": 50.0, "city": None, "income": None, "grade": None},
        {"age": 44.0, "city": "Daegu", "income": 1.5, "grade": 4},
    ]
    want = tabular_forward(w, canonical)
    names = ["age", "city", "income", "grade"]
    csv_path = tmp_path / "rows.csv"
    csv_path.write_text(
        "label," + ",".join(names) + "\n" + "".join(f"x,{','.join(r)}\n" for r in csv_rows)
    )
    pq_path = tmp_path / "rows.parquet"
    pq.write_table(
        pa.table(
            {
                "age": pa.array([r["age"] for r in canonical], pa.float64()),
                "city": pa.array([r["city"] for r in canonical], pa.string()),
                "income": pa.array([r["income"] for r in canonical], pa.float64()),
                "grade": pa.array([r["grade"] for r in canonical], pa.int64()),
            }
        ),
        pq_path,
    )
    outs = {}
    for name, src in (("csv", csv_path), ("parquet", pq_path)):
        out = tmp_path / f"{name}.npy"
        assert main(["run", str(model), "--input", str(src), "-o", str(out), "--quiet"]) == 0
        outs[name] = np.load(out)
    json_rows = [
        dict(r, grade=None if r["grade"] is None else float(r["grade"])) for r in canonical
    ]
    with TestClient(create_app(Predictor(model, provider="cpu"), model_name="t")) as c:
        r = c.post("/predict", content=json.dumps({"inputs": json_rows}))
        assert r.status_code == 200, r.text
        outs["json"] = np.asarray(r.json()["outputs"], np.float32)
    for name, got in outs.items():
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=name)
    np.testing.assert_array_equal(outs["csv"], outs["parquet"])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_training_reads_na_cells_as_missing_and_numbers_one_way(tmp_path):
    codes = ["1", "1.0", "2", "2.00"]
    rows = "".join(
        f"{'NA' if i % 15 == 0 else i},{codes[i % 4]},{'TRUE' if i % 2 else 'false'},{i % 2}\n"
        for i in range(60)
    )
    path = _write(tmp_path / "t.csv", "n,code,flag,y\n" + rows)
    d = load_dataset(path, target="y", categorical=["code"])
    by_name = {c.name: c for c in d.tabular.columns}
    assert by_name["n"].kind == "continuous" and d.tabular.indicators == ("n",)
    assert by_name["code"].vocabulary == ("1", "2")
    assert by_name["flag"].vocabulary == ("False", "True")
    with pytest.raises(InputFileError, match="holds numbers but also 'NA'"):
        load_dataset(path, target="y", categorical=["code"], na_values=("",))
    other = load_dataset(path, target="y", categorical=["code"], na_values=("", "NA"))
    assert other.spec["na_values"] == ["", "NA"] and "na_values" not in d.spec
