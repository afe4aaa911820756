"""An HTTP JSON service for a model: `POST /predict`, `GET /health`, `GET /metadata`.

Starlette under uvicorn; no torch. Requests that arrive together are batched: a micro-batcher
collects the rows of concurrent requests (up to `max_batch` rows, waiting at most
`batch_wait_ms` and only while other requests are still being read), runs one `predict` in a
worker thread so the event loop stays free, and hands each request its own rows back.
On shutdown (uvicorn does this on SIGTERM/Ctrl-C) new requests get 503 and queued ones finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bn_onnx import __version__
from bn_onnx.errors import BnOnnxError, UsageError
from bn_onnx.runtime import Predictor, short_name

DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_BATCH_WAIT_MS = 1.0


class RequestError(Exception):
    """A request the service refuses: answered with `status` and `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ShuttingDown(Exception):
    """The batcher no longer takes work because the server is stopping."""


@dataclass
class BatchStats:
    """Counters `/health` reports: requests answered, batches and rows run, largest batch."""

    batches: int = 0
    rows: int = 0
    requests: int = 0
    largest: int = 0


class MicroBatcher:
    """Runs the rows of concurrent requests as one batch in a worker thread.

    `submit(X)` queues a float32 array and waits for its outputs. A single background task
    takes the first queued request, then more while there are fewer than `max_rows` rows and
    other requests are still being read (`reading`), for at most `wait_s`; a request larger
    than `max_rows` runs alone. One batch runs at a time; requests queue meanwhile, so under
    load the next batch is fuller without any waiting.
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        max_rows: int = DEFAULT_MAX_BATCH,
        wait_s: float = DEFAULT_BATCH_WAIT_MS / 1000,
    ) -> None:
        self._predict = predict
        self.max_rows = int(max_rows)
        self.wait_s = float(wait_s)
        self.stats = BatchStats()
        self._reading = 0  # requests being read that may still submit
        self._items: deque[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False

    @property
    def closing(self) -> bool:
        """True once `close()` began: new work is refused."""
        return self._closing

    async def start(self) -> None:
        """Start the worker task on the running event loop."""
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bn-onnx-predict")
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._worker())

    async def close(self) -> None:
        """Refuse new work, finish everything queued, then stop the worker thread."""
        self._closing = True
        if self._task is not None:
            self._poke()
            await self._task
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def begin_read(self) -> None:
        """A request started arriving: a batch being collected may wait for it."""
        self._reading += 1

    def end_read(self) -> None:
        """That request was submitted or refused: stop waiting for it."""
        self._reading -= 1
        self._poke()

    def _poke(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def submit(self, X: np.ndarray) -> np.ndarray:
        """Queue the rows of `X` and return the model's outputs for them."""
        if self._closing or self._task is None:
            raise ShuttingDown("the server is shutting down")
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._items.append((X, fut))
        self._poke()
        return await fut

    async def _collect(self) -> list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]:
        """The next batch; empty only when closing with nothing left to run."""
        assert self._wakeup is not None
        items, wakeup = self._items, self._wakeup
        while not items:
            if self._closing:
                return []
            wakeup.clear()
            await wakeup.wait()
        batch = [items.popleft()]
        rows = len(batch[0][0])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while rows < self.max_rows:
            while items and rows + len(items[0][0]) <= self.max_rows:
                batch.append(items.popleft())
                rows += len(batch[-1][0])
            remaining = deadline - loop.time()
            if items or self._reading <= 0 or remaining <= 0 or rows >= self.max_rows:
                break
            wakeup.clear()
            try:
                await asyncio.wait_for(wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return batch

    async def _worker(self) -> None:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                return
            live = [(X, f) for X, f in batch if not f.done()]  # a client may have gone
            if not live:
                continue
            X = live[0][0] if len(live) == 1 else np.concatenate([x for x, _ in live])
            try:
                Y = await loop.run_in_executor(self._executor, self._predict, X)
            except Exception as exc:
                for _, f in live:
                    if not f.done():
                        f.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.rows += len(X)
            self.stats.requests += len(live)
            self.stats.largest = max(self.stats.largest, len(X))
            start = 0
            for x, f in live:
                stop = start + len(x)
                if not f.done():
                    f.set_result(Y[start:stop])
                start = stop


def _reject_constant(name: str) -> float:
    # json.loads accepts NaN and Infinity by default; the service does not.
    raise RequestError(400, f"non-finite value {name} in the body; send finite numbers only")


def parse_inputs(body: bytes, n_features: int | None) -> np.ndarray:
    """Turn a `{"inputs": [[...], ...]}` body into a float64 array, or raise `RequestError`.

    Every value must be a JSON number (not a string, boolean or null) and finite; every row
    must have the model's number of features.
    """
    try:
        doc = json.loads(body, parse_constant=_reject_constant)
    except RequestError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError(400, "body is not valid JSON: nested too deeply") from None
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise RequestError(400, 'body must be a JSON object {"inputs": [[f1, f2, ...], ...]}')
    extra = sorted(set(doc) - {"inputs"})
    if extra:
        raise RequestError(400, f"unknown field(s) in the body: {', '.join(extra)}")
    rows = doc["inputs"]
    if not isinstance(rows, list):
        raise RequestError(400, f'"inputs" must be a list of rows, got {type(rows).__name__}')
    if not rows:
        raise RequestError(400, '"inputs" is empty; send at least one row')
    width = n_features
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise RequestError(
                400,
                f'"inputs" must be a list of rows (lists of numbers); row {i} is '
                f"{type(row).__name__}" + ("; wrap one row as [[...]]" if i == 0 else ""),
            )
        if width is None:
            width = len(row)
        if len(row) != width:
            what = "the model expects" if n_features is not None else "row 0 has"
            n = len(row)
            raise RequestError(400, f"row {i} has {n} value{'s' * (n != 1)}, {what} {width}")
        for j, v in enumerate(row):
            t = type(v)
            if t is float:
                if not math.isfinite(v):
                    raise RequestError(400, f"non-finite value at row {i}, column {j}")
            elif t is not int:
                name = "null" if v is None else "boolean" if t is bool else t.__name__
                raise RequestError(400, f"value at row {i}, column {j} is a {name}, not a number")
    try:
        return np.array(rows, dtype=np.float64)
    except OverflowError:
        raise RequestError(400, "a value is too large for a float") from None


async def read_body(request: Request, limit: int) -> bytes:
    """Read the request body, refusing (413) one over `limit` bytes, declared or streamed."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(400, f"bad Content-Length header {declared!r}") from None
        if size > limit:
            raise RequestError(413, f"body of {size} bytes is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise RequestError(413, f"body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise RequestError(400, "client disconnected before the body was complete") from None
    return b"".join(chunks)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _json_safe(values: np.ndarray) -> list[Any]:
    # JSON has no NaN/Inf; a model that makes them gets null there instead of a broken body.
    if np.isfinite(values).all():
        return values.tolist()
    obj = values.astype(object)
    obj[~np.isfinite(values)] = None
    return obj.tolist()


def model_metadata(predictor: Predictor, model_name: str) -> dict[str, Any]:
    """What `/metadata` answers: the model's inputs, outputs, features, classes and providers."""
    session = predictor.session
    folded = predictor.metadata.get("bn_onnx.folded")

    def args(nodes: list[Any]) -> list[dict[str, Any]]:
        return [{"name": n.name, "type": n.type, "shape": list(n.shape)} for n in nodes]

    return {
        "model": model_name,
        "task": predictor.task,
        "inputs": args(session.get_inputs()),
        "outputs": args(session.get_outputs()),
        "features": predictor.n_features,
        "classes": predictor.class_names,
        "folded": {"true": True, "false": False}.get(folded or ""),
        "providers": [short_name(p) for p in predictor.providers],
        "producer_version": predictor.metadata.get("bn_onnx.producer_version"),
        "server_version": __version__,
    }


def create_app(
    predictor: Predictor,
    *,
    model_name: str = "model",
    max_batch: int = DEFAULT_MAX_BATCH,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
) -> Starlette:
    """Build the Starlette app serving `predictor` (thread-safe, see `runtime.Predictor`).

    Args:
        predictor: the loaded model.
        model_name: the name `/metadata` and `/health` report (usually the file name).
        max_batch: most rows one batched `predict` call runs (a bigger request runs alone).
        max_body_bytes: larger request bodies are refused with 413.
        batch_wait_ms: longest wait for more requests to join a batch.
    """
    if max_batch < 1:
        raise UsageError(f"max batch must be >= 1, got {max_batch}")
    if max_body_bytes < 1:
        raise UsageError(f"max body bytes must be >= 1, got {max_body_bytes}")
    if not batch_wait_ms >= 0:
        raise UsageError(f"batch wait must be >= 0 ms, got {batch_wait_ms}")
    is_classifier = predictor.task != "regression"
    names = predictor.class_names
    meta = model_metadata(predictor, model_name)
    meta.update(max_batch=max_batch, max_body_bytes=max_body_bytes, batch_wait_ms=batch_wait_ms)
    batcher = MicroBatcher(
        lambda X: predictor.predict(X), max_rows=max_batch, wait_s=batch_wait_ms / 1000
    )

    async def predict(request: Request) -> Response:
        batcher.begin_read()
        submitted = False
        try:
            if batcher.closing:
                return _error(503, "the server is shutting down")
            body = await read_body(request, max_body_bytes)
            X64 = parse_inputs(body, predictor.n_features)
            with np.errstate(over="ignore"):
                try:
                    X = predictor.check(X64)  # float32; overflow to inf is refused here
                except BnOnnxError as exc:
                    raise RequestError(400, str(exc)) from None
            batcher.end_read()
            submitted = True
            Y = await batcher.submit(X)
        except RequestError as exc:
            return _error(exc.status, exc.message)
        except ShuttingDown as exc:
            return _error(503, str(exc))
        except Exception as exc:  # the model failed on valid input: a server error, say so
            return _error(500, f"prediction failed: {type(exc).__name__}: {exc}"[:500])
        finally:
            if not submitted:
                batcher.end_read()
        out: dict[str, Any] = {"outputs": _json_safe(Y)}
        if is_classifier and Y.ndim == 2 and Y.shape[1] > 0:
            idx = np.argmax(Y, axis=1)
            out["labels"] = [names[i] for i in idx] if names else idx.tolist()
        return JSONResponse(out)

    async def health(request: Request) -> Response:
        if batcher.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        st = batcher.stats
        counts = {"requests": st.requests, "batches": st.batches, "rows": st.rows}
        return JSONResponse({"status": "ok", "model": model_name, **counts})

    async def metadata(request: Request) -> Response:
        return JSONResponse(meta)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, str(exc.detail))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.close()

    app = Starlette(
        routes=[
            Route("/predict", predict, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/metadata", metadata, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.predictor = predictor
    return app


def load_app(
    model_path: str | os.PathLike[str],
    *,
    provider: str = "auto",
    threads: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
) -> Starlette:
    """Load the model at `model_path` into a `Predictor` and build the app for it."""
    predictor = Predictor(model_path, provider=provider, threads=threads)
    return create_app(
        predictor,
        model_name=Path(model_path).name,
        max_batch=max_batch,
        max_body_bytes=max_body_bytes,
        batch_wait_ms=batch_wait_ms,
    )


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> Any:
    """A listening TCP socket on `host:port` (port 0: the system picks a free one)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_server(app: Starlette, *, log_level: str = "info", access_log: bool = False) -> Any:
    """A uvicorn server for `app`; run it with `server.run(sockets=[bind_socket(...)])`.

    uvicorn handles SIGTERM and Ctrl-C: it stops accepting, lets open requests finish (up to
    10 s), then the app's shutdown drains the batcher.
    """
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=10,
        lifespan="on",
    )
    return uvicorn.Server(config)
