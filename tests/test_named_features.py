"""A plain model trained from a file with a header reads its features by name (issue 20,
deliver 3): the names are in its metadata; `run`, `serve` and `Predictor` match named rows by
name, ignore extra columns (the target included) and name a missing one; arrays keep position.

The model is hand-built (tests/serve_testing.py `make_mlp`) with the schema export writes;
outputs are compared with the float64 oracle of the same equations.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from serve_testing import forward, make_mlp

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

from bn_onnx.cli import main
from bn_onnx.columns import COLUMNS_KEY, columns_to_json, feature_columns, read_columns
from bn_onnx.errors import InputDataError
from bn_onnx.export import metadata_for
from bn_onnx.model_config import MLPConfig
from bn_onnx.runtime import Predictor
from bn_onnx.serve import create_app
from bn_onnx.verify import probes
from bn_onnx.verify.signature import signature

NAMES = ["sepal", "petal", "stem", "leaf"]
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def named(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, np.ndarray]:
    path = tmp_path_factory.mktemp("named") / "named.onnx"
    w = make_mlp(path, 4, 8, 3, task="classification")
    model = onnx.load(path)
    entry = model.metadata_props.add()
    entry.key, entry.value = COLUMNS_KEY, columns_to_json(feature_columns(NAMES))
    onnx.save(model, path)
    X = np.random.default_rng(1).uniform(0, 8, (10, 4)).astype(np.float32)
    return path, w, X


def _by_name(X: np.ndarray, order: list[str]) -> dict[str, list[float]]:
    return {n: X[:, NAMES.index(n)].tolist() for n in order}


def test_export_names_the_features_of_a_model_trained_from_a_csv_or_parquet():
    config = MLPConfig(in_features=4, out_features=3, hidden=(8,))
    pre = {"feature_names": NAMES}
    for source in ("csv", "parquet"):
        meta = metadata_for(
            config, {"dataset": {"source": source}, "preprocessing": pre}, folded=False
        )
        assert [c.name for c in read_columns(meta)] == NAMES
        assert {(c.input, c.kind) for c in read_columns(meta)} == {("input", "number")}
    for source in ("npz", "sklearn", "synthetic"):  # arrays keep position
        meta = metadata_for(
            config, {"dataset": {"source": source}, "preprocessing": pre}, folded=False
        )
        assert COLUMNS_KEY not in meta


def test_predictor_matches_names_ignores_extras_and_keeps_array_positions(named):
    path, w, X = named
    want = forward(w, X)
    p = Predictor(path, provider="cpu")
    assert p.array_input
    np.testing.assert_allclose(p.predict(X), want, atol=ATOL, rtol=RTOL)  # by position
    reversed_with_target = _by_name(X, NAMES[::-1]) | {"label": ["a"] * len(X)}
    np.testing.assert_allclose(p.predict(reversed_with_target), want, atol=ATOL, rtol=RTOL)
    records = [
        dict(zip(NAMES[::-1], row[::-1].tolist(), strict=True)) | {"id": i}
        for i, row in enumerate(X)
    ]
    np.testing.assert_allclose(p.predict(records), want, atol=ATOL, rtol=RTOL)
    table = pa.table(_by_name(X, NAMES[::-1]))
    np.testing.assert_allclose(p.predict(table), want, atol=ATOL, rtol=RTOL)
    with pytest.raises(InputDataError, match="missing column 'stem'"):
        p.predict({n: v for n, v in _by_name(X, NAMES).items() if n != "stem"})
    with pytest.raises(InputDataError):  # the model fills nothing: a gap is refused
        p.predict([{"sepal": 1.0, "petal": None, "stem": 2.0, "leaf": 3.0}])


def _write_csv(path: Path, header: list[str] | None, rows: list[list]) -> Path:
    lines = ([",".join(header)] if header else []) + [",".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_run_reads_a_header_by_name_and_headerless_rows_by_position(named, tmp_path, capsys):
    path, w, X = named
    want = forward(w, X)
    order = ["label", *NAMES[::-1]]
    rows = [["x", *(f"{v:.9g}" for v in r[::-1])] for r in X]
    inputs = {
        "reversed.csv": _write_csv(tmp_path / "reversed.csv", order, rows),
        "plain.csv": _write_csv(tmp_path / "plain.csv", None, [[f"{v:.9g}" for v in r] for r in X]),
        "plain.npy": tmp_path / "plain.npy",
        "reversed.parquet": tmp_path / "reversed.parquet",
    }
    np.save(inputs["plain.npy"], X)
    pq.write_table(
        pa.table(_by_name(X, NAMES[::-1]) | {"label": ["x"] * len(X)}), inputs["reversed.parquet"]
    )
    for name, src in inputs.items():
        out = tmp_path / f"{name}.npy"
        assert main(["run", str(path), "--input", str(src), "-o", str(out), "--quiet"]) == 0, name
        np.testing.assert_allclose(np.load(out), want, atol=ATOL, rtol=RTOL, err_msg=name)
    short = _write_csv(tmp_path / "short.csv", NAMES[:2], [[1, 2]])
    capsys.readouterr()
    assert main(["run", str(path), "--input", str(short), "-o", str(tmp_path / "s.npy")]) == 2
    err = capsys.readouterr().err
    assert "missing columns 'stem', 'leaf'" in err and "Traceback" not in err


def test_serve_takes_rows_by_name_or_by_position(named):
    path, w, X = named
    want = forward(w, X)
    with TestClient(create_app(Predictor(path, provider="cpu", threads=1), model_name="m")) as c:
        records = [
            dict(zip(NAMES[::-1], r[::-1].tolist(), strict=True)) | {"label": "x"} for r in X
        ]
        for body in ({"inputs": records}, {"inputs": X.tolist()}):
            r = c.post("/predict", content=json.dumps(body))
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["outputs"], want, atol=ATOL, rtol=RTOL)
        r = c.post("/predict", content=json.dumps({"inputs": [{"sepal": 1}]}))
        assert r.status_code == 400 and "missing column" in r.json()["error"]


def test_verify_probes_no_missing_values_into_a_plain_model(named):
    path = named[0]
    model = onnx.load(path)
    sig = signature(model)
    ranges = probes.input_ranges(model, sig.inputs)
    assert ranges["input"].missing == 0.0
