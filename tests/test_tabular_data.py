"""Tabular files as they come: CSV, Parquet and NPZ with text columns and empty cells
(bn_onnx.data), column kinds inferred or given, learned from the training split only."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from bn_onnx.data import load_dataset, load_split_from_checkpoint_meta
from bn_onnx.errors import InputFileError, UsageError
from bn_onnx.tabular import FIRST_CATEGORY_CODE, MISSING_CODE, UNKNOWN_CODE, fit_spec

CITIES = ["Busan", "Seoul", "Daegu"]


def people(n: int = 120, seed: int = 0) -> dict[str, list]:
    """Columns of a small table: numbers with gaps, a category with gaps, a label."""
    rng = np.random.default_rng(seed)
    city = [CITIES[i % 3] if i % 10 else None for i in range(n)]
    age = [None if i % 7 == 0 else float(round(rng.normal(40, 10))) for i in range(n)]
    income = [round(float(v), 2) for v in rng.normal(3, 1, n)]
    zip_code = [int(v) for v in rng.choice([100, 200, 300], n)]
    label = ["yes" if (c == "Busan") ^ (i % 5 == 0) else "no" for i, c in enumerate(city)]
    return {"age": age, "city": city, "income": income, "zip": zip_code, "label": label}


def write_csv(path: Path, table: dict[str, list]) -> Path:
    names = list(table)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(names)
        for row in zip(*table.values(), strict=True):
            w.writerow(["" if v is None else v for v in row])
    return path


def write_parquet(path: Path, table: dict[str, list]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(table), path)
    return path


def test_csv_with_text_and_empty_cells_is_tabular(tmp_path):
    d = load_dataset(write_csv(tmp_path / "p.csv", people()), target="label")
    spec = d.tabular
    assert spec is not None and d.feature_names == ["age", "city", "income", "zip"]
    kinds = {c.name: c.kind for c in spec.columns}
    # numbers -> continuous (zip too: integer codes need --categorical), text -> categorical
    assert kinds == {
        "age": "continuous",
        "city": "categorical",
        "income": "continuous",
        "zip": "continuous",
    }
    assert spec.indicators == ("age",)
    assert d.feeds_train["continuous"].dtype == np.float32
    assert np.isnan(d.feeds_train["continuous"][:, 0]).any()
    assert "" in d.feeds_train["categorical"][:, 0].tolist()
    assert d.x_train.shape == (len(d.y_train), spec.n_numeric)
    assert not np.isnan(d.x_train).any()
    assert d.codes_train.shape == (len(d.y_train), 1) and d.codes_train.dtype == np.int64
    assert [a.shape[1] for a in d.inputs("test")] == [spec.n_numeric, 1]
    assert d.n_features == spec.in_features


def test_parquet_reads_like_the_same_csv(tmp_path):
    table = people()
    a = load_dataset(write_csv(tmp_path / "p.csv", table), target="label", categorical=["zip"])
    b = load_dataset(
        write_parquet(tmp_path / "p.parquet", table), target="label", categorical=["zip"]
    )
    assert a.tabular == b.tabular
    assert b.spec["source"] == "parquet" and b.class_names == a.class_names
    for split in ("train", "val", "test"):
        for name, arr in getattr(a, f"feeds_{split}").items():
            np.testing.assert_array_equal(getattr(b, f"feeds_{split}")[name], arr)
        np.testing.assert_array_equal(getattr(b, f"y_{split}"), getattr(a, f"y_{split}"))
    # an integer column given as categorical: "100" from the CSV cell and from the int64 cell
    zip_col = next(c for c in b.tabular.columns if c.name == "zip")
    assert zip_col.vocabulary == ("100", "200", "300")


def test_parquet_types_decide_the_kind(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 40
    t = pa.table(
        {
            "flag": pa.array([i % 3 == 0 for i in range(n)]),
            "code": pa.array([str(i % 4) for i in range(n)]).dictionary_encode(),
            "count": pa.array([i if i % 9 else None for i in range(n)], pa.int32()),
            "y": pa.array([i % 2 for i in range(n)]),
        }
    )
    pq.write_table(t, tmp_path / "t.parquet")
    d = load_dataset(tmp_path / "t.parquet", target="y")
    kinds = {c.name: c.kind for c in d.tabular.columns}
    # a text column of digits stays a category in Parquet, whose types say so
    assert kinds == {"flag": "categorical", "code": "categorical", "count": "continuous"}
    flag = next(c for c in d.tabular.columns if c.name == "flag")
    assert flag.vocabulary == ("False", "True")
    assert d.tabular.indicators == ("count",)


def test_parquet_with_an_unusable_type_or_broken_file_is_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"t": pa.array([[1], [2]] * 10), "y": [0, 1] * 10}), tmp_path / "a.parquet"
    )
    with pytest.raises(InputFileError, match="column 't' has Parquet type"):
        load_dataset(tmp_path / "a.parquet", target="y")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputFileError, match="not a readable Parquet file") as info:
        load_dataset(tmp_path / "b.parquet", target="y")
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="needs --target"):
        load_dataset(write_parquet(tmp_path / "c.parquet", people()))


def test_npz_with_nan_or_text_is_tabular(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    x[::7, 1] = np.nan
    y = np.arange(60) % 2
    np.savez(tmp_path / "n.npz", X=x, y=y, feature_names=np.array(["a", "b", "c"]))
    d = load_dataset(tmp_path / "n.npz")
    assert [c.name for c in d.tabular.columns] == ["a", "b", "c"]
    assert d.tabular.indicators == ("b",)
    text = np.array([[f"{v:.2f}", CITIES[i % 3]] for i, v in enumerate(x[:, 0])])
    np.savez(tmp_path / "t.npz", X=text, y=y)
    t = load_dataset(tmp_path / "t.npz")
    assert [(c.name, c.kind) for c in t.tabular.columns] == [
        ("x0", "continuous"),
        ("x1", "categorical"),
    ]


def test_numeric_files_without_gaps_stay_plain(tmp_path):
    rows = {"a": [float(i) for i in range(30)], "b": [i * 0.5 for i in range(30)]}
    rows["y"] = [i % 2 for i in range(30)]
    for path in (write_csv(tmp_path / "n.csv", rows), write_parquet(tmp_path / "n.parquet", rows)):
        d = load_dataset(path, target="y")
        assert d.tabular is None and d.codes_train is None
        assert d.x_train.shape[1] == 2 and d.inputs("train") == (d.x_train,)
    forced = load_dataset(tmp_path / "n.csv", target="y", continuous=["a"])
    assert forced.tabular is not None and forced.tabular.indicators == ()


def test_learned_from_the_training_split_only(tmp_path):
    table = {"id": list(range(200)), **people(200, seed=3)}
    d0 = load_dataset(write_csv(tmp_path / "base.csv", table), target="label", seed=1)
    # the split depends on the labels and the seed only: give one test row a city and an
    # age that no other row has
    ids = d0.feeds_test["continuous"][:, 0].astype(int).tolist()
    i = next(k for k in ids if table["age"][k] is not None)
    table["city"][i] = "Atlantis"
    table["age"][i] = 10_000.0
    d = load_dataset(write_csv(tmp_path / "p.csv", table), target="label", seed=1)
    city = next(c for c in d.tabular.columns if c.name == "city")
    age = next(c for c in d.tabular.columns if c.name == "age")
    assert "Atlantis" in d.feeds_test["categorical"][:, 0].tolist()
    assert "Atlantis" not in city.vocabulary
    train_ages = d.feeds_train["continuous"][:, age.index].astype(np.float64)
    assert age.fill == float(np.float32(np.nanmedian(train_ages)))
    assert age.fill == next(c.fill for c in d0.tabular.columns if c.name == "age")
    # the unseen city is coded "unknown" in the test split's codes
    row = ids.index(i)
    assert d.feeds_test["categorical"][row, 0] == "Atlantis" and d.codes_test[row, 0] == 1


def test_split_rebuilds_from_checkpoint_meta_with_the_given_kinds(tmp_path):
    path = write_csv(tmp_path / "p.csv", people())
    d = load_dataset(path, target="label", categorical=["zip"], seed=2)
    again = load_split_from_checkpoint_meta({"dataset": d.spec})
    assert again.tabular == d.tabular and d.spec["categorical"] == ["zip"]
    np.testing.assert_array_equal(again.codes_test, d.codes_test)


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        (
            {"continuous": ["city"]},
            InputFileError,
            r"line \d+: column 'city' is declared continuous",
        ),
        ({"categorical": ["nope"]}, UsageError, "no column 'nope'"),
        ({"categorical": ["label"]}, UsageError, "is the target column"),
        ({"categorical": ["age"], "continuous": ["age"]}, UsageError, "both"),
    ],
)
def test_bad_column_kinds_are_one_line_errors(tmp_path, kwargs, error, fragment):
    path = write_csv(tmp_path / "p.csv", people())
    with pytest.raises(error, match=fragment) as info:
        load_dataset(path, target="label", **kwargs)
    assert "\n" not in str(info.value)


def test_wrongly_typed_cell_names_column_line_and_value(tmp_path):
    path = tmp_path / "w.csv"
    path.write_text("a,b,y\n1,2,x\n3,oops,y\n" + "".join(f"{i},{i},x\n" for i in range(20)))
    with pytest.raises(InputFileError) as info:
        load_dataset(path, target="y", continuous=["b"])
    assert str(info.value) == (
        "w.csv line 3: column 'b' is declared continuous but is not a number: 'oops'"
    )


def test_infinite_value_in_a_continuous_column_is_refused(tmp_path):
    path = tmp_path / "i.csv"
    path.write_text("a,b,y\n1,,x\n2,inf,y\n" + "".join(f"{i},{i},x\n" for i in range(20)))
    with pytest.raises(InputFileError, match="line 3: column 'b' is not finite"):
        load_dataset(path, target="y")


def test_kinds_only_for_files():
    with pytest.raises(UsageError, match="CSV, Parquet and NPZ files"):
        load_dataset("iris", categorical=["x"])


def test_big_integer_ids_stay_exact_as_categories(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    big = 2**53 + 1  # not a float64
    ids = [big + (i % 3) for i in range(40)]
    pq.write_table(pa.table({"id": ids, "y": [i % 2 for i in range(40)]}), tmp_path / "t.parquet")
    d = load_dataset(tmp_path / "t.parquet", target="y", categorical=["id"])
    assert d.tabular.columns[0].vocabulary == tuple(str(big + k) for k in range(3))
    np.savez(tmp_path / "t.npz", X=np.array(ids, np.int64)[:, None], y=np.arange(40) % 2)
    n = load_dataset(tmp_path / "t.npz", categorical=["x0"])
    assert n.tabular.columns[0].vocabulary == d.tabular.columns[0].vocabulary


def test_numbers_with_a_stray_marker_ask_which_kind(tmp_path):
    path = tmp_path / "na.csv"
    path.write_text("a,y\n" + "".join(f"{i},{i % 2}\n" for i in range(30)) + "?,1\n")
    with pytest.raises(InputFileError) as info:
        load_dataset(path, target="y")
    assert str(info.value) == (
        "na.csv line 32: column 'a' holds numbers but also '?'; give --na-values '?' if it "
        "marks a missing value, or give --categorical a"
    )
    assert load_dataset(path, target="y", na_values=("", "?")).tabular.indicators == ("a",)
    assert load_dataset(path, target="y", categorical=["a"]).tabular.columns[0].kind == (
        "categorical"
    )


def _dated_csv(path):
    rows = "".join(
        f"2020-{1 + i % 12:02d}-{1 + i % 28:02d},{i % 7},c{i % 3},{i % 2}\n" for i in range(60)
    )
    path.write_text("when,n,kind,y\n" + rows)
    return path


def test_date_columns_are_dropped_or_kept_by_flag_and_said(tmp_path):
    path = _dated_csv(tmp_path / "d.csv")
    dropped = load_dataset(path, target="y")
    assert dropped.feature_names == ["n", "kind"]
    assert len(dropped.notes) == 1 and "'when' holds dates: dropped" in dropped.notes[0]
    kept = load_dataset(path, target="y", dates="keep")
    assert kept.feature_names == ["when", "n", "kind"] and kept.spec["dates"] == "keep"
    assert {c.name: c.kind for c in kept.tabular.columns}["when"] == "categorical"
    assert "kept as a category" in kept.notes[0]
    given = load_dataset(path, target="y", categorical=["when"])  # asked for: no guess
    assert "when" in given.feature_names and not any("dates" in n for n in given.notes)


def test_vocabularies_are_capped_and_rare_values_read_as_unknown():
    cells = np.array(["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d"] + [""], dtype=object)
    kinds = {"k": "categorical"}
    assert fit_spec(["k"], kinds, {"k": cells}).columns[0].vocabulary == ("a", "b", "c", "d")
    assert fit_spec(["k"], kinds, {"k": cells}, min_frequency=2).columns[0].vocabulary == (
        "a", "b", "c"
    )  # fmt: skip
    spec = fit_spec(["k"], kinds, {"k": cells}, max_categories=2)
    assert spec.columns[0].vocabulary == ("a", "b")
    codes = spec.encode(0, ["a", "c", "d", ""])
    assert codes.tolist() == [FIRST_CATEGORY_CODE, UNKNOWN_CODE, UNKNOWN_CODE, MISSING_CODE]


def test_an_id_like_column_is_warned_about_and_the_caps_are_recorded(tmp_path, capsys):
    path = tmp_path / "ids.csv"
    path.write_text("name,n,y\n" + "".join(f"person {i},{i % 5},{i % 2}\n" for i in range(80)))
    d = load_dataset(path, target="y")
    assert any("'name' looks like an id" in n for n in d.notes)
    capped = load_dataset(path, target="y", min_frequency=2, max_categories=10)
    assert capped.tabular.columns[0].vocabulary == ()
    assert capped.spec["min_frequency"] == 2 and capped.spec["max_categories"] == 10
    from bn_onnx.cli import main

    out = tmp_path / "run"
    argv = ["train", "--dataset", str(path), "--target", "y", "--epochs", "1", "--hidden", "4"]
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    assert "bn-onnx train: warning: column 'name' looks like an id" in capsys.readouterr().err
