"""`bn-onnx serve` against slow, idle and too many clients, and bodies that are not JSON
(issue 19, item 8).

A real uvicorn server on loopback with short limits (read timeout 1 s, keep-alive 1 s, 3
connections), driven by raw sockets so that the client controls every byte. The waits below
are generous upper bounds on when the server must have acted, not measurements.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

from serve_testing import forward, make_mlp

from bn_onnx.cli import main
from bn_onnx.errors import UsageError
from bn_onnx.runtime import Predictor
from bn_onnx.serve import MicroBatcher, bind_socket, create_app, make_server

READ_TIMEOUT_S = 1.0
KEEP_ALIVE_S = 1.0
MAX_CONNECTIONS = 3
# The server must have acted by then: the limit plus ample slack for a loaded machine.
ACT_WITHIN_S = 6.0


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("serve_clients") / "digits.onnx"
    return path, make_mlp(path, 64, 32, 10, task="classification")


@pytest.fixture(scope="module")
def server(digits) -> Iterator[tuple[int, dict]]:
    """(port, weights) of a running server with the short limits above."""
    app = create_app(Predictor(digits[0], provider="cpu", threads=1))
    srv = make_server(
        app,
        log_level="critical",
        read_timeout_s=READ_TIMEOUT_S,
        keep_alive_s=KEEP_ALIVE_S,
        max_connections=MAX_CONNECTIONS,
    )
    sock = bind_socket("127.0.0.1", 0)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started
    try:
        yield sock.getsockname()[1], digits[1]
    finally:
        srv.should_exit = True
        thread.join(timeout=15)
        sock.close()


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=ACT_WITHIN_S)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _request(body: bytes, content_type: str = "application/json") -> bytes:
    return (
        f"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes (socket.timeout if it never does)."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def _read_response(s: socket.socket) -> tuple[int, bytes]:
    """(status, body) of one Content-Length response, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += s.recv(65536)
    return int(head.split()[1]), body


def _body(rows: np.ndarray) -> bytes:
    return json.dumps({"inputs": rows.tolist()}).encode()


def test_a_client_sending_the_body_a_byte_at_a_time_gets_408_and_is_dropped(server) -> None:
    port, _ = server
    body = _body(np.ones((1, 64)))
    request = _request(body)
    head = request[: len(request) - len(body)]
    with _connect(port) as s:
        s.sendall(head)
        t0 = time.monotonic()
        sent = 0
        closed = False
        while sent < len(body) and time.monotonic() - t0 < ACT_WITHIN_S:
            try:
                s.sendall(body[sent : sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sent += 1
            time.sleep(0.1)
            s.setblocking(False)
            try:
                if s.recv(1, socket.MSG_PEEK):
                    break  # the server answered
            except BlockingIOError:
                pass
            finally:
                s.setblocking(True)
        assert sent < len(body), "the whole slow body got through"
        if not closed:
            answer = _read_all(s)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b"request not received within 1 s" in answer


def test_a_client_sending_its_head_a_byte_at_a_time_is_dropped(server) -> None:
    port, _ = server
    request = _request(_body(np.ones((1, 64))))
    with _connect(port) as s:
        t0 = time.monotonic()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for i in range(len(request)):  # 10 bytes a second: the head alone takes > 10 s
                s.sendall(request[i : i + 1])
                time.sleep(0.1)
                if time.monotonic() - t0 > ACT_WITHIN_S:
                    break
                s.setblocking(False)
                try:
                    if s.recv(1) == b"":
                        raise ConnectionResetError("closed by the server")
                except BlockingIOError:
                    pass
                finally:
                    s.setblocking(True)
        assert time.monotonic() - t0 < ACT_WITHIN_S


def test_a_connection_that_never_sends_is_closed(server) -> None:
    port, _ = server
    with _connect(port) as s:
        assert _read_all(s) == b""  # closed, without an answer


def test_an_idle_keep_alive_connection_is_closed_after_its_answer(server) -> None:
    port, w = server
    X = np.arange(64, dtype=np.float64).reshape(1, 64) % 17
    with _connect(port) as s:
        s.sendall(_request(_body(X)))
        status, body = _read_response(s)
        assert status == 200
        np.testing.assert_allclose(json.loads(body)["outputs"], forward(w, X), atol=1e-5)
        assert _read_all(s) == b""  # then closed for idleness


def test_requests_beyond_the_connection_cap_get_503_until_connections_close(server) -> None:
    port, _ = server
    X = np.ones((1, 64))
    idle = [_connect(port) for _ in range(MAX_CONNECTIONS - 1)]
    try:
        time.sleep(0.2)  # accepted
        with _connect(port) as s:
            s.sendall(_request(_body(X)))
            status, body = _read_response(s)
        assert status == 503, body
    finally:
        for c in idle:
            c.close()
    time.sleep(0.2)  # the server saw them go
    with _connect(port) as s:
        s.sendall(_request(_body(X)))
        assert _read_response(s)[0] == 200


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_a_body_declared_as_not_json_gets_415(digits, content_type: str) -> None:
    app = create_app(Predictor(digits[0], provider="cpu", threads=1))
    with TestClient(app) as c:
        r = c.post(
            "/predict", content=_body(np.ones((1, 64))), headers={"content-type": content_type}
        )
    assert r.status_code == 415
    assert r.json() == {"error": f"Content-Type {content_type} is not JSON; send application/json"}


@pytest.mark.parametrize(
    "content_type", ["application/json", "Application/JSON; charset=utf-8", "application/x+json"]
)
def test_json_content_types_are_read(digits, content_type: str) -> None:
    path, w = digits
    X = np.full((2, 64), 3.0)
    with TestClient(create_app(Predictor(path, provider="cpu", threads=1))) as c:
        r = c.post("/predict", content=_body(X), headers={"content-type": content_type})
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["outputs"], forward(w, X), atol=1e-5, rtol=1e-4)


def _counting_model(seen: list[int], delay_s: float = 0.0):
    def predict(X: np.ndarray) -> np.ndarray:
        seen.append(len(X))
        if delay_s:
            time.sleep(delay_s)
        return X * 2.0

    return predict


@pytest.mark.parametrize("delay_s, batched", [(0.0, False), (0.005, True)])
def test_a_crowd_is_batched_only_when_the_model_is_slow_enough_to_pay(delay_s, batched) -> None:
    seen: list[int] = []

    async def scenario() -> MicroBatcher:
        b = MicroBatcher(
            _counting_model(seen, delay_s),
            max_rows=64,
            wait_s=0.0,
            inline_max_s=0.01,
            batch_min_s=0.001,
        )
        b.probe_every = 4
        await b.start()
        await b.submit(np.zeros((1, 3), np.float32))  # the model's time is known from here on
        for wave in range(3):  # requests that arrived together, one task each
            xs = [np.full((1, 3), 10 * wave + k, np.float32) for k in range(12)]
            ys = await asyncio.gather(*(b.submit(x) for x in xs))
            for x, y in zip(xs, ys, strict=True):
                np.testing.assert_array_equal(y, x * 2.0)
        await b.close()
        return b

    b = asyncio.run(scenario())
    assert b.stats.requests == 37 and sum(seen) == 37
    if batched:
        assert max(seen) > 1 and b.stats.largest > 1
    else:  # 0.0 s a call: every request ran at once, one call each, on the event loop
        assert seen == [1] * 37 and b.stats.inline == 36


@pytest.mark.parametrize("cheaper", ["batched", "at once"])
def test_a_cheap_model_is_batched_only_while_batching_measures_cheaper(cheaper: str) -> None:
    """A fake CPU clock: each call costs 1, and a call in the worker thread 0 (batching is
    cheaper) or 50 more (the hand-off costs more than batches save)."""
    cpu = [0.0]
    main = threading.current_thread()
    handoff = 0.0 if cheaper == "batched" else 50.0
    seen: list[int] = []

    def predict(X: np.ndarray) -> np.ndarray:
        seen.append(len(X))
        cpu[0] += 1.0 + (handoff if threading.current_thread() is not main else 0.0)
        return X * 2.0

    async def scenario() -> tuple[MicroBatcher, list[bool]]:
        b = MicroBatcher(predict, max_rows=64, wait_s=0.0, inline_max_s=0.01, batch_min_s=0.01)
        b._clock = lambda: cpu[0]  # type: ignore[method-assign]
        b.policy_window, b.explore_every, b.probe_every = 24, 4, 4
        await b.start()
        await b.submit(np.zeros((1, 3), np.float32))  # the model's time is known from here on
        policies = []
        for wave in range(40):  # 12 requests arriving together, 40 times
            xs = [np.full((1, 3), 12 * wave + k, np.float32) for k in range(12)]
            ys = await asyncio.gather(*(b.submit(x) for x in xs))
            for x, y in zip(xs, ys, strict=True):
                np.testing.assert_array_equal(y, x * 2.0)
            policies.append(b.batching)
        await b.close()
        return b, policies

    b, policies = asyncio.run(scenario())
    assert sum(seen) == 1 + 40 * 12
    # Both policies were measured; the cheaper one ran most of the time, the other was retried.
    assert b._cost[True] is not None and b._cost[False] is not None
    share = sum(policies[8:]) / len(policies[8:])
    if cheaper == "batched":
        assert b._cost[True] < b._cost[False] and share > 0.6 and b.stats.largest > 1
    else:
        assert b._cost[False] < b._cost[True] and share < 0.4


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--read-timeout", "0", "expected a number > 0, got 0"),
        ("--keep-alive", "-1", "expected a finite number >= 0, got -1"),
        ("--max-connections", "0", "expected a number >= 1, got 0"),
        ("--backlog", "x", "expected a whole number, got 'x'"),
        ("--batch-min-ms", "nan", "expected a finite number >= 0, got nan"),
    ],
)
def test_cli_serve_refuses_bad_limits_in_one_line(option, value, message, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "m.onnx", option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_make_server_refuses_bad_limits(digits) -> None:
    app = create_app(Predictor(digits[0], provider="cpu", threads=1))
    with pytest.raises(UsageError, match="timeouts must be > 0 s"):
        make_server(app, read_timeout_s=0)
    with pytest.raises(UsageError, match="max connections must be >= 1"):
        make_server(app, max_connections=0)
