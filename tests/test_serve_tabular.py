"""`bn-onnx serve` with a tabular model: rows as JSON objects by column name.

The model is hand-built (tests/serve_testing.py: LabelEncoder, Gather, Where(IsNaN), Gemm)
with a `bn_onnx.columns` schema; answers are compared with a float64 oracle of the Python
preprocessing plus the MLP, with `Predictor`, and with `bn-onnx run` on the same rows.
"""

from __future__ import annotations

import csv
import json
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_testing import make_tabular, tabular_forward, tabular_records

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

from bn_onnx.cli import main
from bn_onnx.runtime import Predictor
from bn_onnx.serve import bind_socket, create_app, make_server

ATOL, RTOL = 1e-5, 1e-4
COLUMNS = ["age", "city", "income", "grade"]


@pytest.fixture(scope="module")
def tabular(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("serve_tab") / "tab.onnx"
    return path, make_tabular(path)


@pytest.fixture(scope="module")
def client(tabular):
    app = create_app(Predictor(tabular[0], provider="cpu", threads=1), model_name="tab.onnx")
    with TestClient(app) as c:
        yield c


def test_named_rows_give_the_preprocessing_plus_model_outputs(client, tabular) -> None:
    path, w = tabular
    records = tabular_records(25, seed=7)
    r = client.post("/predict", json={"inputs": records})
    assert r.status_code == 200, r.text
    body = r.json()
    got = np.asarray(body["outputs"])
    np.testing.assert_allclose(got, tabular_forward(w, records), atol=ATOL, rtol=RTOL)
    direct = Predictor(path, provider="cpu", threads=1).predict(records)
    np.testing.assert_array_equal(got.astype(np.float32), direct)
    assert body["labels"] == [w["names"][i] for i in direct.argmax(1)]


def test_unseen_categories_and_missing_cells_are_answered(client, tabular) -> None:
    rows = [
        {"age": 30, "city": "Atlantis", "income": 1.5, "grade": 7},  # unseen city and grade
        {"age": None, "city": "", "income": None, "grade": None},  # everything missing
        {"age": "44", "city": " Busan ", "income": "2.5", "grade": "3", "note": "ignored"},
    ]
    r = client.post("/predict", json={"inputs": rows})
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["outputs"])
    np.testing.assert_allclose(got, tabular_forward(tabular[1], rows), atol=ATOL, rtol=RTOL)


def _cli_error(tmp_path: Path, model: Path, header: list[str], rows: list[list], capsys) -> str:
    src = tmp_path / "rows.csv"
    with open(src, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    rc = main(["run", str(model), "-i", str(src), "-o", str(tmp_path / "y.npy"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    return err.removeprefix("bn-onnx run: error: ").strip()


def test_missing_column_is_400_with_the_message_of_the_cli(client, tabular, tmp_path, capsys):
    rows = [{"age": 31, "income": 2.0, "grade": 1}, {"age": 40, "income": 1.0, "grade": 2}]
    r = client.post("/predict", json={"inputs": rows})
    assert r.status_code == 400
    message = r.json()["error"]
    assert message == "missing column 'city' (the model reads: age, city, income, grade)"
    cells = [[31, 2.0, 1], [40, 1.0, 2]]
    assert _cli_error(tmp_path, tabular[0], ["age", "income", "grade"], cells, capsys) == message


def test_wrongly_typed_column_is_400_with_the_message_of_the_cli(client, tabular, tmp_path, capsys):
    rows = [{"age": 31, "city": "Busan", "income": 2, "grade": 1}] * 2
    rows = [rows[0], {**rows[1], "age": "abc"}]
    r = client.post("/predict", json={"inputs": rows})
    assert r.status_code == 400
    message = r.json()["error"]
    assert message == "column 'age' row 1: not a number: 'abc'"  # rows of the request from 0
    cells = [[31, "Busan", 2, 1], ["abc", "Busan", 2, 1]]
    # the same cell, named by its file line in the CLI
    cli = "rows.csv line 3: column 'age': not a number: 'abc'"
    assert _cli_error(tmp_path, tabular[0], COLUMNS, cells, capsys) == cli


ROW = {"age": 31, "city": "Busan", "income": 2.0, "grade": 1}
BAD_BODIES = [
    ({"inputs": [[31, "Busan", 2.0, 1]]}, "row 0 is a list; this model takes rows as objects"),
    ({"inputs": ROW}, 'must be a list of rows, got dict; wrap one row as [{"age": ..., '),
    ({"inputs": [ROW, 5]}, "row 1 is a number; this model takes rows as objects"),
    ({"inputs": [{**ROW, "city": ["Busan"]}]}, "column 'city' row 0: a list, not a value"),
    ({"inputs": [{**ROW, "age": {"v": 1}}]}, "column 'age' row 0: an object, not a value"),
    ({"inputs": [{**ROW, "income": True}]}, "column 'income' row 0: not a number: True"),
    ({"inputs": [{**ROW, "age": 1e39}]}, "column 'age' row 0: not a finite number: inf"),
    ({"inputs": []}, '"inputs" is empty'),
    ({"rows": [ROW]}, 'body must be a JSON object {"inputs": [{"age": ..., "city": ...}, ...]}'),
]


@pytest.mark.parametrize(("doc", "message"), BAD_BODIES)
def test_bad_named_rows_get_400_with_a_message(client, doc, message) -> None:
    r = client.post("/predict", json=doc)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def test_nan_and_huge_numbers_in_the_body_are_refused(client) -> None:
    body = b'{"inputs": [{"age": NaN, "city": "Busan", "income": 1, "grade": 1}]}'
    r = client.post("/predict", content=body)
    assert r.status_code == 400 and "non-finite value NaN" in r.json()["error"]
    body = b'{"inputs": [{"age": 1e400, "city": "Busan", "income": 1, "grade": 1}]}'
    r = client.post("/predict", content=body)
    assert r.status_code == 400 and "column 'age' row 0: not a finite number" in r.text


def test_metadata_lists_the_columns(client) -> None:
    meta = client.get("/metadata").json()
    assert [c["name"] for c in meta["columns"]] == COLUMNS
    city = meta["columns"][1]
    assert city["kind"] == "categorical" and city["vocabulary"] == ["Busan", "Seoul", "Incheon"]
    assert meta["columns"][0] == {
        "name": "age",
        "kind": "continuous",
        "input": "continuous",
        "index": 0,
        "fill": 41.0,
    }
    assert meta["features"] is None
    assert [i["name"] for i in meta["inputs"]] == ["continuous", "categorical"]


def test_same_rows_through_run_and_serve_give_the_same_outputs(client, tabular, tmp_path):
    records = tabular_records(30, seed=9)
    src = tmp_path / "rows.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows([["" if r[c] is None else r[c] for c in COLUMNS] for r in records])
    assert main(["run", str(tabular[0]), "-i", str(src), "-o", str(tmp_path / "y.npy"), "-q"]) == 0
    served = client.post("/predict", json={"inputs": records}).json()["outputs"]
    np.testing.assert_allclose(
        np.asarray(served, np.float32), np.load(tmp_path / "y.npy"), rtol=1e-6, atol=1e-6
    )


def test_a_multi_input_model_without_a_schema_is_refused(tmp_path) -> None:
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "two",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    save(model, tmp_path / "two.onnx")
    from bn_onnx.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="one 2-D float input or a column schema"):
        create_app(Predictor(tmp_path / "two.onnx", provider="cpu"))


def test_real_uvicorn_server_batches_named_rows_from_concurrent_clients(tabular) -> None:
    path, w = tabular
    app = create_app(Predictor(path, provider="cpu", threads=1), max_batch=32, batch_wait_ms=2)
    server = make_server(app, log_level="error")
    sock = bind_socket("127.0.0.1", 0)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(250):
            if server.started:
                break
            threading.Event().wait(0.02)
        inputs = [tabular_records(k % 3 + 1, seed=100 + k) for k in range(40)]
        limits = httpx.Limits(max_connections=12)
        with httpx.Client(base_url=base, timeout=20, limits=limits) as c:

            def call(rows: list[dict]) -> list:
                r = c.post("/predict", json={"inputs": rows})
                assert r.status_code == 200, r.text
                return r.json()["outputs"]

            with ThreadPoolExecutor(12) as pool:
                results = list(pool.map(call, inputs))
            bad = c.post("/predict", json={"inputs": [{"age": 1}]})
            assert (
                bad.status_code == 400 and "missing columns 'city', 'income', 'grade'" in bad.text
            )
        for rows, got in zip(inputs, results, strict=True):
            np.testing.assert_allclose(got, tabular_forward(w, rows), atol=ATOL, rtol=RTOL)
        stats = app.state.batcher.stats
        assert stats.requests == 40 and stats.rows == sum(len(r) for r in inputs)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
    assert not thread.is_alive()


def test_json_rows_are_parsed_into_objects_only_for_the_model_columns(client) -> None:
    doc = {"inputs": [{**ROW, "extra": [1, {"deep": None}]}]}
    r = client.post("/predict", content=json.dumps(doc))
    assert r.status_code == 200, r.text
