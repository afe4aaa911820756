"""Dataset loaders, the seeded stratified split, and rebuilding the split from a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bn_onnx.data import (
    BUNDLED,
    load_dataset,
    load_split_from_checkpoint_meta,
    split_indices,
)
from bn_onnx.errors import CheckpointError, InputFileError, UsageError

SIZES = {
    "digits": (1797, 64, 10),
    "wine": (178, 13, 3),
    "breast-cancer": (569, 30, 2),
    "iris": (150, 4, 3),
}


def all_rows(d):
    return np.concatenate([d.x_train, d.x_val, d.x_test])


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_dataset_shapes_and_disjoint_complete_split(name):
    rows, features, classes = SIZES[name]
    d = load_dataset(name, seed=1)
    assert d.task == "classification"
    assert d.n_features == features and d.n_outputs == classes
    assert len(d.class_names) == classes
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert len(d.x_train) + len(d.x_val) + len(d.x_test) == rows
    assert d.spec["sizes"] == {"train": len(d.x_train), "val": len(d.x_val), "test": len(d.x_test)}
    # every original row appears exactly once across the three splits
    from sklearn import datasets

    loader = {
        "digits": datasets.load_digits,
        "wine": datasets.load_wine,
        "breast-cancer": datasets.load_breast_cancer,
        "iris": datasets.load_iris,
    }[name]
    original = loader().data.astype(np.float32)
    got = all_rows(d)
    order_a = np.lexsort(original.T)
    order_b = np.lexsort(got.T)
    np.testing.assert_array_equal(original[order_a], got[order_b])


@pytest.mark.parametrize("name", ["digits", "iris", "breast-cancer"])
def test_split_is_stratified(name):
    d = load_dataset(name, seed=3)
    assert d.spec["stratified"] is True
    full = np.bincount(np.concatenate([d.y_train, d.y_val, d.y_test])) / (
        len(d.y_train) + len(d.y_val) + len(d.y_test)
    )
    for y in (d.y_train, d.y_val, d.y_test):
        share = np.bincount(y, minlength=len(full)) / len(y)
        # stratification keeps each class share within one row of the overall share
        assert np.all(np.abs(share - full) <= 1.0 / len(y) + 1e-9)


def test_same_seed_same_split_other_seed_other_split():
    a, b, c = (
        load_dataset("wine", seed=5),
        load_dataset("wine", seed=5),
        load_dataset("wine", seed=6),
    )
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.x_test, c.x_test)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(20, 300),
    n_classes=st.integers(2, 5),
    seed=st.integers(0, 1000),
    val=st.floats(0.05, 0.3),
    test=st.floats(0.05, 0.3),
)
def test_split_indices_partition_the_rows(n, n_classes, seed, val, test):
    y = np.random.default_rng(seed).integers(0, n_classes, n)
    tr, va, te, stratified = split_indices(y, n, seed, val, test)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(n))
    assert len(te) == max(1, round(n * test)) and len(va) == max(1, round(n * val))
    if stratified:
        for part in (tr, va, te):
            counts = np.bincount(y[part], minlength=n_classes) / len(part)
            overall = np.bincount(y, minlength=n_classes) / n
            assert np.all(np.abs(counts - overall) <= 2.0 / len(part) + 1e-9)


def test_synthetic_classification_and_regression_are_seeded_and_sized():
    a = load_dataset("synthetic", n_samples=300, n_features=7, n_classes=4, seed=2)
    b = load_dataset("synthetic", n_samples=300, n_features=7, n_classes=4, seed=2)
    assert a.task == "classification" and a.n_outputs == 4 and a.n_features == 7
    assert len(all_rows(a)) == 300
    np.testing.assert_array_equal(all_rows(a), all_rows(b))
    r = load_dataset("synthetic", task="regression", n_samples=120, n_features=3, seed=2)
    assert r.task == "regression" and r.class_names is None
    assert r.y_train.dtype == np.float32 and r.y_train.shape == (len(r.x_train), 1)
    assert r.n_outputs == 1


def test_csv_with_string_target(tmp_path):
    path = tmp_path / "d.csv"
    rng = np.random.default_rng(0)
    lines = ["a,b,label,c"]
    for i in range(60):
        lines.append(f"{rng.normal():.4f},{i},{['cat', 'dog', 'emu'][i % 3]},{rng.normal():.3f}")
    path.write_text("\n".join(lines) + "\n")
    d = load_dataset(path, target="label")
    assert d.task == "classification"
    assert d.class_names == ["cat", "dog", "emu"]
    assert d.feature_names == ["a", "b", "c"]
    assert d.n_features == 3
    assert sorted(all_rows(d)[:, 1].tolist()) == list(range(60))
    assert d.spec["source"] == "csv" and d.spec["target"] == "label" and len(d.spec["sha256"]) == 64


def test_csv_numeric_target_regression_and_task_override(tmp_path):
    path = tmp_path / "r.csv"
    rows = ["x1,x2,y"] + [f"{i},{i * 2},{i * 0.37 + 0.01}" for i in range(40)]
    path.write_text("\n".join(rows))
    d = load_dataset(path, target="y")
    assert d.task == "regression" and d.n_outputs == 1
    np.testing.assert_allclose(
        np.sort(np.concatenate([d.y_train, d.y_val, d.y_test])[:, 0]),
        np.sort([i * 0.37 + 0.01 for i in range(40)]),
        rtol=1e-6,
    )
    ints = tmp_path / "i.csv"
    ints.write_text("\n".join(["x,y"] + [f"{i},{i % 2}" for i in range(30)]))
    assert load_dataset(ints, target="y").task == "classification"
    assert load_dataset(ints, target="y", task="regression").task == "regression"


@pytest.mark.parametrize(
    ("content", "target", "error", "fragment"),
    [
        ("a,b\n1,2\n", None, UsageError, "needs --target"),
        ("a,b\n1,2\n3,4\n", "zzz", UsageError, "target column 'zzz' not in"),
        ("a,b\n1,2\n3\n", "a", InputFileError, "line 3: 1 fields"),
        ("a,b\n", "a", InputFileError, "header row and data rows"),
        ("a\n1\n2\n", "a", InputFileError, "no feature columns"),
        ("a,b\n1,inf\n2,3\n", "a", InputFileError, "finite"),
    ],
)
def test_bad_csv_is_one_line_error(tmp_path, content, target, error, fragment):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(error, match=fragment) as info:
        load_dataset(path, target=target)
    assert "\n" not in str(info.value)


def test_npz_dataset_and_class_names(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(90, 5))
    y = np.repeat([3, 7, 9], 30)
    np.savez(tmp_path / "d.npz", X=x, y=y, class_names=np.array(["three", "seven", "nine"]))
    d = load_dataset(tmp_path / "d.npz")
    assert d.task == "classification" and d.class_names == ["three", "seven", "nine"]
    assert sorted(set(np.concatenate([d.y_train, d.y_val, d.y_test]).tolist())) == [0, 1, 2]
    np.savez(tmp_path / "r.npz", X=x, y=rng.normal(size=(90, 2)))
    r = load_dataset(tmp_path / "r.npz")
    assert r.task == "regression" and r.n_outputs == 2


def test_npz_with_object_array_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, X=np.zeros((10, 2)), y=np.array([object()] * 10, dtype=object))
    with pytest.raises(InputFileError, match="unsafe or unreadable"):
        load_dataset(path)


def _npy_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 2)))
    return buf.getvalue()


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: np.savez(p, X=np.zeros((5, 2))), "must hold arrays 'X' and 'y'"),
        (lambda p: np.savez(p, X=np.zeros(5), y=np.zeros(5)), "must be 2-D"),
        (lambda p: np.savez(p, X=np.zeros((5, 2)), y=np.zeros(4)), "one row per row"),
        (lambda p: p.write_bytes(b"PK\x03\x04broken"), "not a readable NPZ"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(_npy_bytes()), "not an NPZ archive"),
        (lambda p: p.write_bytes(b"just text, not a zip"), "unsafe or unreadable"),
    ],
)
def test_bad_npz_is_one_line_error(tmp_path, make, fragment):
    path = tmp_path / "bad.npz"
    make(path)
    with pytest.raises(InputFileError, match=fragment):
        load_dataset(path)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UsageError) as info:
        load_dataset("mnist")
    msg = str(info.value)
    for name in ("digits", "wine", "breast-cancer", "iris", "synthetic", ".csv", ".npz"):
        assert name in msg
    with pytest.raises(InputFileError, match="not found"):
        load_dataset("missing.csv", target="y")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name_or_path": "iris", "task": "regression"}, "classification dataset"),
        ({"name_or_path": "iris", "target": "x"}, "CSV files only"),
        ({"name_or_path": "iris", "val_fraction": 0.7}, "val_fraction"),
        ({"name_or_path": "synthetic", "n_samples": 5}, "samples"),
        ({"name_or_path": "synthetic", "n_classes": 1}, "classes"),
        ({"name_or_path": "synthetic", "n_features": 2, "n_classes": 9}, "more features"),
        ({"name_or_path": "iris", "task": "ranking"}, "unknown task"),
    ],
)
def test_bad_dataset_options(kwargs, fragment):
    with pytest.raises(UsageError, match=fragment):
        load_dataset(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name_or_path": "breast-cancer", "seed": 4},
        {"name_or_path": "synthetic", "n_samples": 150, "n_features": 4, "seed": 9},
        {"name_or_path": "synthetic", "task": "regression", "n_samples": 80, "n_features": 3},
    ],
)
def test_split_rebuilt_from_checkpoint_meta(kwargs):
    d = load_dataset(**kwargs)
    again = load_split_from_checkpoint_meta({"dataset": d.spec})
    np.testing.assert_array_equal(again.x_test, d.x_test)
    np.testing.assert_array_equal(again.y_test, d.y_test)
    assert again.class_names == d.class_names


def test_split_rebuilt_from_file_and_refused_when_file_changed(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("\n".join(["a,y"] + [f"{i},{i % 2}" for i in range(40)]))
    d = load_dataset(path, target="y", seed=2)
    again = load_split_from_checkpoint_meta({"dataset": d.spec})
    np.testing.assert_array_equal(again.x_test, d.x_test)
    path.write_text(path.read_text() + "99,1\n")
    with pytest.raises(CheckpointError, match="changed since training"):
        load_split_from_checkpoint_meta({"dataset": d.spec})
    path.unlink()
    with pytest.raises(CheckpointError, match="gone"):
        load_split_from_checkpoint_meta({"dataset": d.spec})
    with pytest.raises(CheckpointError, match="does not record"):
        load_split_from_checkpoint_meta({"model": {}})


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(3, 40), min_size=2, max_size=6),
    frac=st.floats(0.05, 0.45),
    seed=st.integers(0, 2**31 - 1),
    stratified=st.booleans(),
)
def test_split_is_scikit_learns_train_test_split_index_for_index(counts, frac, seed, stratified):
    """bn_onnx.data.train_test_split reproduces scikit-learn's, so old checkpoints' splits
    rebuild unchanged without importing it (issue 20, start-up)."""
    from sklearn.model_selection import train_test_split as sk_split

    from bn_onnx.data import train_test_split

    y = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))
    idx = np.arange(len(y)) * 3 + 1
    n_test = max(len(counts), round(len(y) * frac))
    strat = y if stratified else None
    want = sk_split(idx, test_size=n_test, random_state=seed, stratify=strat)
    got = train_test_split(idx, n_test, seed, strat)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
