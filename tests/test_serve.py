"""The HTTP service: endpoints, validation, batching, shutdown, a real uvicorn server and the CLI.

Models are built here with onnx.helper (a digits-shaped classifier and a small regressor) and
the service's answers are compared with a numpy float64 forward of the same weights.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

with warnings.catch_warnings():
    # starlette 1.x warns that its TestClient moves from httpx to httpx2; httpx is what we pin.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

from serve_testing import forward, make_mlp

from bn_onnx.cli import main
from bn_onnx.runtime import Predictor
from bn_onnx.serve import MicroBatcher, ShuttingDown, bind_socket, create_app, make_server

ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("serve") / "digits.onnx"
    return path, make_mlp(path, 64, 32, 10, task="classification")


@pytest.fixture(scope="module")
def regressor(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("serve") / "reg.onnx"
    return path, make_mlp(path, 5, 8, 2, task="regression", seed=1)


@pytest.fixture(scope="module")
def client(digits: tuple[Path, dict]):
    app = create_app(Predictor(digits[0], provider="cpu", threads=1), model_name="digits.onnx")
    with TestClient(app) as c:
        yield c


def _rows(n: int, seed: int = 0, width: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 17, (n, width)).astype(np.float32)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    X=st.integers(1, 9).flatmap(
        lambda n: arrays(np.float32, (n, 64), elements=st.floats(-50, 50, width=32))
    )
)
def test_predict_matches_float64_reference(client: TestClient, digits, X: np.ndarray) -> None:
    r = client.post("/predict", json={"inputs": X.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    got = np.asarray(body["outputs"], dtype=np.float64)
    want = forward(digits[1], X)
    # float32 error grows with the values summed: inputs up to +-50 give logits up to ~170,
    # and a logit near 0 among them keeps its large terms' rounding error (2.1e-5 was seen)
    np.testing.assert_allclose(
        got, want, atol=ATOL * max(1.0, float(np.abs(want).max())), rtol=RTOL
    )
    # Labels are the classes' names at the argmax of the outputs the service returned.
    names = digits[1]["names"]
    assert body["labels"] == [names[i] for i in np.argmax(got, axis=1)]


def test_predict_outputs_round_trip_float32_exactly(client: TestClient, digits) -> None:
    X = _rows(7, seed=3)
    got = np.asarray(client.post("/predict", json={"inputs": X.tolist()}).json()["outputs"])
    direct = Predictor(digits[0], provider="cpu", threads=1).predict(X)
    np.testing.assert_allclose(got.astype(np.float32), direct, rtol=1e-6, atol=1e-6)


def test_predict_accepts_integers_and_a_plain_content_type(client: TestClient, digits) -> None:
    X = _rows(2, seed=4).astype(int)
    r = client.post("/predict", content=json.dumps({"inputs": X.tolist()}))
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["outputs"], forward(digits[1], X), atol=ATOL, rtol=RTOL)


def test_health_reports_status_and_counts(digits) -> None:
    with TestClient(create_app(Predictor(digits[0], provider="cpu"), model_name="d.onnx")) as c:
        assert c.get("/health").json() == {
            "status": "ok",
            "model": "d.onnx",
            "requests": 0,
            "batches": 0,
            "rows": 0,
        }
        c.post("/predict", json={"inputs": _rows(3).tolist()})
        c.post("/predict", json={"inputs": [[1] * 63]})  # refused: not counted
        r = c.get("/health")
        assert r.status_code == 200
        assert r.json() == {
            "status": "ok",
            "model": "d.onnx",
            "requests": 1,
            "batches": 1,
            "rows": 3,
        }


def test_metadata_describes_the_model(client: TestClient, digits) -> None:
    meta = client.get("/metadata").json()
    assert meta["features"] == 64
    assert meta["classes"] == digits[1]["names"]
    assert meta["folded"] is True
    assert meta["task"] == "classification"
    assert meta["providers"] == ["cpu"]
    assert meta["inputs"] == [{"name": "input", "type": "tensor(float)", "shape": ["batch", 64]}]
    assert meta["outputs"][0]["name"] == "logits"
    assert meta["max_batch"] == 64


def _body(rows) -> bytes:
    return json.dumps({"inputs": rows}).encode()


ROW = [1.0] * 64
BAD_BODIES = [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"rows": [[1]]}', "JSON object"),
    (json.dumps({"inputs": [ROW], "extra": 1}).encode(), "unknown field"),
    (_body(ROW), "row 0 is float"),
    (_body("abc"), "must be a list of rows"),
    (_body([]), "empty"),
    (_body([[1.0] * 63]), "63 values, the model expects 64"),
    (_body([ROW, [1.0] * 65]), "row 1 has 65 values"),
    (_body([ROW[:-1] + ["1"]]), "column 63 is a str"),
    (_body([[True] + ROW[1:]]), "is a boolean"),
    (_body([[None] + ROW[1:]]), "is a null"),
    (_body([[[1.0]] + ROW[1:]]), "is a list"),
    (b'{"inputs": [[NaN' + b", 1" * 63 + b"]]}", "non-finite value NaN"),
    (b'{"inputs": [[-Infinity' + b", 1" * 63 + b"]]}", "non-finite value -Infinity"),
    (b'{"inputs": [[1e400' + b", 1" * 63 + b"]]}", "non-finite value at row 0, column 0"),
    (b'{"inputs": [[1e39' + b", 1" * 63 + b"]]}", "non-finite"),  # overflows float32
    (b'{"inputs": [[1' + b"0" * 400 + b", 1" * 63 + b"]]}", "too large"),
]


@pytest.mark.parametrize(("body", "message"), BAD_BODIES)
def test_bad_requests_get_400_with_a_message(client: TestClient, body: bytes, message: str) -> None:
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def test_body_over_the_limit_by_content_length_gets_413(digits) -> None:
    app = create_app(Predictor(digits[0], provider="cpu", threads=1), max_body_bytes=1000)
    with TestClient(app) as c:
        ok = c.post("/predict", content=_body([[1] * 64]))
        assert ok.status_code == 200
        r = c.post("/predict", content=_body([[1.5] * 64] * 10))
        assert r.status_code == 413
        assert "over the limit of 1000 bytes" in r.json()["error"]


def test_streamed_body_over_the_limit_gets_413(digits) -> None:
    app = create_app(Predictor(digits[0], provider="cpu", threads=1), max_body_bytes=1000)

    def chunks():  # no Content-Length: chunked transfer, so only the streamed size can tell
        yield b'{"inputs": ['
        for _ in range(20):
            yield json.dumps([1.5] * 64).encode() + b","
        yield b"[0]]}"

    with TestClient(app) as c:
        r = c.post("/predict", content=chunks())
        assert "content-length" not in r.request.headers
        assert r.status_code == 413
        assert "over the limit" in r.json()["error"]


def test_unknown_path_and_wrong_method_answer_json(client: TestClient) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    r = client.get("/predict")
    assert r.status_code == 405 and "error" in r.json()


def test_regression_model_answers_without_labels(regressor) -> None:
    path, w = regressor
    X = _rows(4, seed=5, width=5)
    with TestClient(create_app(Predictor(path, provider="cpu", threads=1))) as c:
        body = c.post("/predict", json={"inputs": X.tolist()}).json()
        assert set(body) == {"outputs"}
        np.testing.assert_allclose(body["outputs"], forward(w, X), atol=ATOL, rtol=RTOL)
        meta = c.get("/metadata").json()
        assert meta["task"] == "regression" and meta["classes"] is None


def test_a_failing_model_gives_500_with_json(digits, monkeypatch: pytest.MonkeyPatch) -> None:
    predictor = Predictor(digits[0], provider="cpu", threads=1)

    def broken(feeds):
        raise RuntimeError("device lost")

    monkeypatch.setattr(predictor, "run_feeds", broken)
    with TestClient(create_app(predictor)) as c:
        r = c.post("/predict", json={"inputs": [[0] * 64]})
        assert r.status_code == 500
        assert r.json() == {"error": "prediction failed: RuntimeError: device lost"}


def test_create_app_refuses_bad_settings(digits) -> None:
    from bn_onnx.errors import UsageError

    predictor = Predictor(digits[0], provider="cpu", threads=1)
    for kwargs in ({"max_batch": 0}, {"max_body_bytes": 0}, {"batch_wait_ms": -1.0}):
        with pytest.raises(UsageError):
            create_app(predictor, **kwargs)


# --- the micro-batcher ---------------------------------------------------------------------


def _matmul_model(seen: list[int]):
    W = np.random.default_rng(9).normal(size=(3, 2)).astype(np.float32)

    def predict(X: np.ndarray) -> np.ndarray:
        seen.append(len(X))
        return (X[:, :, None] * W[None]).sum(axis=1)  # row by row: no batch-size effects

    return predict, W


def test_batcher_joins_concurrent_requests_and_splits_results() -> None:
    seen: list[int] = []
    predict, W = _matmul_model(seen)
    inputs = [np.full((k % 3 + 1, 3), k, np.float32) for k in range(12)]

    async def scenario() -> list[np.ndarray]:
        b = MicroBatcher(predict, max_rows=8, wait_s=0.05)
        await b.start()
        for _ in inputs:  # as if 12 requests were being read at once
            b.begin_read()

        async def one(X: np.ndarray) -> np.ndarray:
            await asyncio.sleep(0)
            b.end_read()
            return await b.submit(X)

        out = await asyncio.gather(*(one(X) for X in inputs))
        await b.close()
        assert b.stats.requests == len(inputs)
        return out

    results = asyncio.run(scenario())
    for X, Y in zip(inputs, results, strict=True):
        np.testing.assert_allclose(Y, X @ W, rtol=1e-6)
    assert sum(seen) == sum(len(X) for X in inputs)
    assert len(seen) < len(inputs)  # some requests shared a batch
    assert max(seen) <= 8


def test_batcher_runs_an_oversized_request_alone() -> None:
    seen: list[int] = []
    predict, W = _matmul_model(seen)
    small, big = np.ones((2, 3), np.float32), np.ones((20, 3), np.float32)

    async def scenario() -> None:
        b = MicroBatcher(predict, max_rows=8, wait_s=0.0)
        await b.start()
        got = await asyncio.gather(b.submit(small), b.submit(big), b.submit(small))
        await b.close()
        np.testing.assert_allclose(got[1], big @ W, rtol=1e-6)
        np.testing.assert_allclose(got[2], small @ W, rtol=1e-6)

    asyncio.run(scenario())
    assert 20 in seen and sum(seen) == 24


def test_batcher_close_drains_queued_work_then_refuses_more() -> None:
    seen: list[int] = []
    predict, W = _matmul_model(seen)

    async def scenario() -> None:
        b = MicroBatcher(predict, max_rows=4, wait_s=0.0)
        await b.start()
        X = np.arange(6, dtype=np.float32).reshape(2, 3)
        tasks = [asyncio.ensure_future(b.submit(X + k)) for k in range(10)]
        await asyncio.sleep(0)  # all ten are queued
        await b.close()
        assert all(t.done() for t in tasks)
        for k, t in enumerate(tasks):
            np.testing.assert_allclose(t.result(), (X + k) @ W, rtol=1e-6)
        with pytest.raises(ShuttingDown):
            await b.submit(X)

    asyncio.run(scenario())
    assert sum(seen) == 20


def test_batcher_passes_a_model_error_to_every_request_in_the_batch() -> None:
    def predict(X: np.ndarray) -> np.ndarray:
        raise ValueError("bad batch")

    async def scenario() -> list[BaseException | np.ndarray]:
        b = MicroBatcher(predict, max_rows=8, wait_s=0.0)
        await b.start()
        X = np.ones((1, 3), np.float32)
        out = await asyncio.gather(b.submit(X), b.submit(X), return_exceptions=True)
        await b.close()
        return out

    out = asyncio.run(scenario())
    assert all(isinstance(e, ValueError) and str(e) == "bad batch" for e in out)


def test_batcher_runs_a_lone_request_inline_once_the_model_is_known_to_be_fast() -> None:
    seen: list[int] = []
    predict, W = _matmul_model(seen)

    async def scenario() -> MicroBatcher:
        b = MicroBatcher(predict, max_rows=8, wait_s=0.05, inline_max_s=1.0)
        await b.start()
        for k in range(20):  # one client: each request after the previous one's answer
            X = np.full((1, 3), k, np.float32)
            np.testing.assert_allclose(await b.submit(X), X @ W, rtol=1e-6)
        await b.close()
        return b

    b = asyncio.run(scenario())
    # The first call is timed in the worker thread; every later one runs on the event loop.
    assert b.stats.requests == 20 and b.stats.inline == 19 and seen == [1] * 20


@pytest.mark.parametrize("inline_max_s, slow", [(0.0, 0.0), (0.002, 0.01)])
def test_batcher_keeps_slow_or_any_model_off_the_event_loop_when_told(inline_max_s, slow) -> None:
    def predict(X: np.ndarray) -> np.ndarray:
        threading.Event().wait(slow)
        return X * 2

    async def scenario() -> MicroBatcher:
        b = MicroBatcher(predict, max_rows=8, wait_s=0.0, inline_max_s=inline_max_s)
        await b.start()
        for k in range(5):
            await b.submit(np.full((1, 3), k, np.float32))
        await b.close()
        return b

    assert asyncio.run(scenario()).stats.inline == 0


def test_batcher_notices_requests_arriving_together_and_batches_them() -> None:
    seen: list[int] = []
    predict, W = _matmul_model(seen)
    waves = [[np.full((1, 3), 10 * w + k, np.float32) for k in range(12)] for w in range(3)]

    calls_per_wave: list[int] = []

    async def scenario() -> list[list[np.ndarray]]:
        b = MicroBatcher(predict, max_rows=64, wait_s=0.0, inline_max_s=1.0, batch_min_s=0.0)
        b.probe_every = 8
        await b.start()
        await b.submit(waves[0][0])  # the model's time is known from here on
        out = []
        for wave in waves:  # as uvicorn runs requests that arrived together: one task each
            before = len(seen)
            out.append(await asyncio.gather(*(b.submit(X) for X in wave)))
            calls_per_wave.append(len(seen) - before)
        await b.close()
        return out

    results = asyncio.run(scenario())
    for wave, got in zip(waves, results, strict=True):
        for X, Y in zip(wave, got, strict=True):
            np.testing.assert_allclose(Y, X @ W, rtol=1e-6)
    # The probe (the 8th arrival) sees the first wave's crowd; the later waves are batched.
    assert calls_per_wave[0] > 6 and calls_per_wave[1] <= 2 and calls_per_wave[2] <= 2


# --- a real server on loopback ---------------------------------------------------------------


def test_real_uvicorn_server_batches_concurrent_clients(digits) -> None:
    path, w = digits
    app = create_app(Predictor(path, provider="cpu", threads=1), max_batch=32, batch_wait_ms=2)
    server = make_server(app, log_level="error")
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=10) as c:
            for _ in range(200):  # until startup finished (a few ms)
                if server.started:
                    break
                threading.Event().wait(0.02)
            assert c.get("/health").json()["status"] == "ok"
        inputs = [_rows(k % 4 + 1, seed=k) for k in range(48)]

        limits = httpx.Limits(max_connections=16)
        with httpx.Client(base_url=base, timeout=10, limits=limits) as shared:

            def call(X: np.ndarray) -> list:
                r = shared.post("/predict", json={"inputs": X.tolist()})
                assert r.status_code == 200, r.text
                return r.json()["outputs"]

            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(call, inputs))
        for X, Y in zip(inputs, results, strict=True):
            np.testing.assert_allclose(Y, forward(w, X), atol=ATOL, rtol=RTOL)
        stats = app.state.batcher.stats
        assert stats.requests == 48 and stats.rows == sum(len(X) for X in inputs)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
    assert not thread.is_alive()
    assert app.state.batcher.closing


# --- the command line ------------------------------------------------------------------------


def test_cli_serve_subprocess_answers_then_stops_on_sigterm(digits) -> None:
    path, w = digits
    cmd = [sys.executable, "-m", "bn_onnx", "serve", str(path), "--port", "0"]
    cmd += ["--provider", "cpu", "--threads", "1", "--log-level", "warning"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("bn-onnx serve: ") and "http://127.0.0.1:" in line, line
        url = line.split(" on ")[1].split()[0]
        X = _rows(3, seed=11)
        with httpx.Client(base_url=url, timeout=20) as c:
            r = c.post("/predict", json={"inputs": X.tolist()})
            assert r.status_code == 200
            np.testing.assert_allclose(r.json()["outputs"], forward(w, X), atol=ATOL, rtol=RTOL)
            assert c.get("/metadata").json()["features"] == 64
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "bn-onnx serve: stopped" in out
    assert "Traceback" not in err


def test_cli_serve_missing_model_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    rc = main(["serve", str(tmp_path / "missing.onnx"), "--port", "0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("bn-onnx serve: error: ") and "not found" in err
    assert len(err.strip().splitlines()) == 1


def test_cli_serve_rejects_a_bad_port(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "m.onnx", "--port", "70000"])
    assert exc.value.code == 2
    assert "expected a port in 0..65535" in capsys.readouterr().err


def test_real_server_finishes_requests_in_flight_when_told_to_stop(digits) -> None:
    path, w = digits
    predictor = Predictor(path, provider="cpu", threads=1)
    real_run = predictor.run_feeds
    inputs = [_rows(1, seed=k) for k in range(8)]
    all_in = threading.Event()  # every request has reached the batcher

    def slow_run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        all_in.wait(10)
        threading.Event().wait(0.2)  # the stop arrives while this batch runs
        return real_run(feeds)

    predictor.run_feeds = slow_run  # type: ignore[method-assign]
    app = create_app(predictor, max_batch=4, batch_wait_ms=0)
    batcher = app.state.batcher
    submit, arrived = batcher.submit, []

    async def counting_submit(X: np.ndarray) -> np.ndarray:
        arrived.append(len(X))
        if len(arrived) == len(inputs):
            all_in.set()
        return await submit(X)

    batcher.submit = counting_submit
    server = make_server(app, log_level="error")
    sock = bind_socket("127.0.0.1", 0)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        limits = httpx.Limits(max_connections=8)
        with (
            httpx.Client(base_url=base, timeout=20, limits=limits) as c,
            ThreadPoolExecutor(8) as pool,
        ):
            futures = [pool.submit(c.post, "/predict", json={"inputs": X.tolist()}) for X in inputs]
            assert all_in.wait(15)
            server.should_exit = True  # what uvicorn's SIGTERM handler does
            responses = [f.result() for f in futures]
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
    assert not thread.is_alive()
    assert [r.status_code for r in responses] == [200] * len(inputs)
    for X, r in zip(inputs, responses, strict=True):
        np.testing.assert_allclose(r.json()["outputs"], forward(w, X), atol=ATOL, rtol=RTOL)
    assert batcher.stats.requests == len(inputs) and batcher.closing


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(doc=JSON_VALUES | st.fixed_dictionaries({"inputs": JSON_VALUES}))
def test_any_json_document_gets_200_or_a_400_message_never_a_crash(client: TestClient, doc) -> None:
    body = json.dumps(doc, allow_nan=True).encode()
    r = client.post("/predict", content=body)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert isinstance(r.json()["error"], str) and r.json()["error"]
    else:  # only a list of rows of 64 numbers can pass
        rows = doc["inputs"]
        assert all(len(row) == 64 for row in rows)


def test_cli_serve_port_in_use_and_unknown_provider_are_one_line_errors(digits, capsys) -> None:
    taken = bind_socket("127.0.0.1", 0)
    try:
        port = str(taken.getsockname()[1])
        assert main(["serve", str(digits[0]), "--port", port, "--provider", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"bn-onnx serve: error: cannot listen on 127.0.0.1:{port}")
    finally:
        taken.close()
    assert main(["serve", str(digits[0]), "--port", "0", "--provider", "tpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bn-onnx serve: error: ") and "'tpu'" in err
    assert len(err.strip().splitlines()) == 1
