"""An HTTP JSON service for a model: `POST /predict`, `GET /health`, `GET /metadata`.

Starlette under uvicorn; no torch. Rows of numbers, or rows as objects by column name for a
tabular model (`bn_onnx.columns`). Requests that arrive together are batched: a micro-batcher
collects the rows of concurrent requests (up to `max_batch` rows, waiting at most
`batch_wait_ms` and only while other requests are still being read), runs one call for them
in a worker thread so the event loop stays free, and hands each request its own rows back; a
request alone runs at once on the event loop. On shutdown (uvicorn does this on SIGTERM/Ctrl-C)
new requests get 503 and queued ones finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import math
import os
import re
import time
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
from bn_onnx.columns import Column
from bn_onnx.errors import BnOnnxError, UnsupportedModelError, UsageError
from bn_onnx.runtime import Predictor, short_name

DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_BATCH_WAIT_MS = 1.0
# A request alone runs on the event loop while the model's calls take at most this long.
DEFAULT_INLINE_MAX_MS = 1.0
# Concurrent requests are batched only when the model's calls take longer than this: below,
# the hand-off to the worker thread costs more than a batch saves (measured: 0.7x a plain
# endpoint at 8 clients on a 2-core EPYC with the digits MLP, ~30 us a call).
DEFAULT_BATCH_MIN_MS = 0.25
# Slow and idle clients: seconds a request's head and body may take from its first
# byte, seconds an idle connection stays open, most connections served at once (then 503).
DEFAULT_READ_TIMEOUT_S = 5.0
DEFAULT_KEEP_ALIVE_S = 5.0
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_BACKLOG = 128


class RequestError(Exception):
    """A request the service refuses: answered with `status` and `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ShuttingDown(Exception):
    """The batcher no longer takes work because the server is stopping."""


# What the batcher runs: an array of rows, or feeds (input name -> array, rows first).
Batch = np.ndarray | dict[str, np.ndarray]


def batch_rows(X: Batch) -> int:
    """The number of rows of an array or of feeds."""
    if isinstance(X, dict):
        return len(next(iter(X.values())))
    return len(X)


def concat(parts: list[Batch]) -> Batch:
    """The rows of `parts` one after the other (arrays, or feeds with the same inputs)."""
    if isinstance(parts[0], dict):
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}  # type: ignore[index]
    return np.concatenate(parts)  # type: ignore[arg-type]


@dataclass
class BatchStats:
    """Counters `/health` reports: requests answered, batches and rows run, largest batch.

    `inline` counts the requests run at once on the event loop (see `MicroBatcher`).
    """

    batches: int = 0
    rows: int = 0
    requests: int = 0
    largest: int = 0
    inline: int = 0


class MicroBatcher:
    """Runs the rows of concurrent requests as one batch in a worker thread.

    `submit(X)` takes an array or feeds and waits for the model's outputs.

    A request that is alone - nothing queued, no batch being collected or run, no other request
    being read - runs at once, on the event loop, when the model's recent calls took at most
    `inline_max_s` (a moving average; the first call, whose time is unknown, goes to the
    thread): handing a call to a thread and back (a future, a wake-up, the GIL) costs more than
    a small model's call, and nothing else waits meanwhile. A single client thus pays what a
    plain endpoint calling `session.run` pays.

    Otherwise the request is queued: a single background task takes the first queued request,
    then more while there are fewer than `max_rows` rows and other requests are still being
    read (`reading`), for at most `wait_s`, and runs them as one batch in a worker thread, so
    that the event loop keeps reading the next requests while the model runs; a request larger
    than `max_rows` runs alone. One batch runs at a time; requests queue meanwhile, so under
    load the next batch is fuller without any waiting, and while batches keep coming no request
    is alone.

    Requests that reached the server together are scheduled on the event loop one after the
    other, and each would find itself alone and run inline, one by one: no batching under
    load. So a request alone first yields to the event loop once - letting any such request
    reach `submit` - and runs inline only if none did, while one of the last `crowd_window`
    requests found a crowd (was not alone); otherwise only every `probe_every`-th does, to
    notice a crowd coming. One client thus seldom pays for the extra turn of the event loop.

    Batching pays only when a batch saves more than the hand-off to the thread costs. A model
    whose calls take more than `batch_min_s` (a moving average) is batched as above. For a
    cheaper one it depends on the machine and the crowd (measured: 0.69-0.79x a plain endpoint
    at 8 clients on one 2-core EPYC, 1.0-1.4x at 8-16 on another), so the batcher measures: the
    process's CPU time per request (`time.process_time`, all threads) over windows of
    `policy_window` requests, for each policy, and uses the cheaper; one window in
    `explore_every` tries the other again. While `batching` is off, a request runs at once on
    the event loop even in a crowd, unless a batch is queued or running. `batch_min_s` = 0:
    crowds are always batched.
    """

    probe_every = 16
    crowd_window = 64
    policy_window = 1024
    explore_every = 16
    _clock = staticmethod(time.process_time)

    def __init__(
        self,
        predict: Callable[[Batch], np.ndarray],
        max_rows: int = DEFAULT_MAX_BATCH,
        wait_s: float = DEFAULT_BATCH_WAIT_MS / 1000,
        inline_max_s: float = DEFAULT_INLINE_MAX_MS / 1000,
        batch_min_s: float = DEFAULT_BATCH_MIN_MS / 1000,
    ) -> None:
        self._predict = predict
        self.max_rows = int(max_rows)
        self.wait_s = float(wait_s)
        self.inline_max_s = float(inline_max_s)
        self.batch_min_s = min(float(batch_min_s), self.inline_max_s)
        self.batching = False  # for a model under batch_min_s: crowds batched, or run at once
        self._cost: dict[bool, float | None] = {False: None, True: None}  # CPU s a request
        self._window_n = 0
        self._window_t0 = self._clock()
        self._windows = 0  # measured since the last exploration
        self.stats = BatchStats()
        self._reading = 0  # requests being read that may still submit
        self._busy = False  # a batch is being collected or run
        self._awaiting_readers = False  # the batch being collected waits for requests read
        self._run_s: float | None = None  # smoothed seconds of one predict call
        self._arrivals = 0  # requests submitted so far
        self._crowd_until = 0  # up to this arrival a request alone looks around first
        self._items: deque[tuple[Batch, int, asyncio.Future[np.ndarray]]] = deque()
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
        if self._awaiting_readers:
            self._poke()

    def _poke(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _alone(self, rows: int) -> bool:
        run_s = self._run_s
        return (
            not self._items
            and not self._busy
            and self._reading <= 0
            and rows <= self.max_rows
            and run_s is not None
            and run_s <= self.inline_max_s
        )

    async def submit(self, X: Batch) -> np.ndarray:
        """Run the rows of `X` (at once or batched) and return the model's outputs for them."""
        if self._closing or self._task is None:
            raise ShuttingDown("the server is shutting down")
        rows = batch_rows(X)
        self._window_n += 1
        if self._window_n >= self.policy_window:
            self._choose_policy()
        run_s = self._run_s
        if (
            not self.batching
            and run_s is not None
            and run_s <= self.batch_min_s
            and rows <= self.max_rows
            and not self._items
            and not self._busy
        ):
            return self._run_inline(X, rows)  # batching this model costs more than it saves
        self._arrivals = arrivals = self._arrivals + 1
        if self._alone(rows):
            if arrivals > self._crowd_until and arrivals % self.probe_every:
                return self._run_inline(X, rows)
            await asyncio.sleep(0)  # others scheduled in this turn reach submit now
            if self._arrivals == arrivals and self._alone(rows):
                return self._run_inline(X, rows)
            if self._task is None or self._task.done():  # closed during that turn
                raise ShuttingDown("the server is shutting down")
        if self._items or self._busy or self._reading > 0 or self._arrivals != arrivals:
            self._crowd_until = arrivals + self.crowd_window  # others were there
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._items.append((X, rows, fut))
        self._poke()
        return await fut

    def _choose_policy(self) -> None:
        """End a measuring window: note its CPU time per request, pick the next policy."""
        now = self._clock()
        cost = (now - self._window_t0) / self._window_n
        self._window_n, self._window_t0 = 0, now
        old = self._cost[self.batching]
        self._cost[self.batching] = cost if old is None else 0.5 * (old + cost)
        self._windows += 1
        other = not self.batching
        if self._cost[other] is None or self._windows >= self.explore_every:
            self.batching, self._windows = other, 0
        else:
            self.batching = self._cost[True] < self._cost[False]  # type: ignore[operator]

    def _run_inline(self, X: Batch, rows: int) -> np.ndarray:
        t0 = time.perf_counter()
        Y = self._predict(X)
        self._note(time.perf_counter() - t0, rows, 1)
        self.stats.inline += 1
        return Y

    def _timed(self, X: Batch) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        Y = self._predict(X)
        return Y, time.perf_counter() - t0

    def _note(self, seconds: float, rows: int, requests: int) -> None:
        # An exponential moving average: one slow call (a page fault, a busy core) does not
        # switch the inline path off for long, a model that is slow for real does.
        self._run_s = seconds if self._run_s is None else 0.8 * self._run_s + 0.2 * seconds
        st = self.stats
        st.batches += 1
        st.rows += rows
        st.requests += requests
        st.largest = max(st.largest, rows)

    async def _collect(self) -> list[tuple[Batch, int, asyncio.Future[np.ndarray]]]:
        """The next batch; empty only when closing with nothing left to run."""
        assert self._wakeup is not None
        items, wakeup = self._items, self._wakeup
        while not items:
            if self._closing:
                return []
            wakeup.clear()
            await wakeup.wait()
        batch = [items.popleft()]
        self._busy = True
        rows = batch[0][1]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while rows < self.max_rows:
            while items and rows + items[0][1] <= self.max_rows:
                batch.append(items.popleft())
                rows += batch[-1][1]
            remaining = deadline - loop.time()
            if items or self._reading <= 0 or remaining <= 0 or rows >= self.max_rows:
                break
            wakeup.clear()
            self._awaiting_readers = True
            try:
                await asyncio.wait_for(wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
            finally:
                self._awaiting_readers = False
        return batch

    async def _worker(self) -> None:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                return
            try:
                await self._run_batch(loop, batch)
            finally:
                self._busy = False

    async def _run_batch(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[Batch, int, asyncio.Future[np.ndarray]]],
    ) -> None:
        live = [item for item in batch if not item[2].done()]  # a client may have gone
        if not live:
            return
        try:
            X = live[0][0] if len(live) == 1 else concat([x for x, _, _ in live])
            Y, seconds = await loop.run_in_executor(self._executor, self._timed, X)
        except Exception as exc:
            for _, _, f in live:
                if not f.done():
                    f.set_exception(exc)
            return
        self._note(seconds, sum(n for _, n, _ in live), len(live))
        start = 0
        for _, n, f in live:
            if not f.done():
                f.set_result(Y[start : start + n])
            start += n


def _reject_constant(name: str) -> float:
    # json.loads accepts NaN and Infinity by default; the service does not.
    raise RequestError(400, f"non-finite value {name} in the body; send finite numbers only")


# One decoder for every request: json.loads with parse_constant builds a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _rows_of(body: bytes, columns: list[Column] | None) -> list[Any]:
    """The non-empty list of rows under "inputs" in a JSON body, or a `RequestError`.

    `columns`: the model's schema (rows are objects), None for rows of numbers.
    """
    try:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:  # json.loads also reads UTF-16 and UTF-32
            doc = json.loads(body, parse_constant=_reject_constant)
        else:
            doc = _DECODER.decode(text)
    except RequestError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError(400, "body is not valid JSON: nested too deeply") from None
    if not isinstance(doc, dict) or "inputs" not in doc:
        example = _example(columns)
        raise RequestError(400, f'body must be a JSON object {{"inputs": [{example}, ...]}}')
    if len(doc) > 1:
        extra = sorted(set(doc) - {"inputs"})
        raise RequestError(400, f"unknown field(s) in the body: {', '.join(extra)}")
    rows = doc["inputs"]
    if not isinstance(rows, list):
        hint = f"; wrap one row as [{_example(columns)}]" if isinstance(rows, dict) else ""
        raise RequestError(400, f'"inputs" must be a list of rows, got {type(rows).__name__}{hint}')
    if not rows:
        raise RequestError(400, '"inputs" is empty; send at least one row')
    return rows


def parse_records(body: bytes, columns: list[Column]) -> list[dict[str, Any]]:
    """Turn a `{"inputs": [{"age": 31, "city": "Busan"}, ...]}` body into row objects.

    Each row must be a JSON object; the model's columns in it must hold a number, a string,
    a boolean or null (null or "" is a missing value), not a list or an object. Keys that are
    not columns of the model are ignored. The cells are converted, and missing or wrongly
    typed columns reported, by `bn_onnx.columns.feeds_from_records` (as for the CLI).

    Raises:
        RequestError: 400 with a one-line message naming the row and column.
    """
    rows = _rows_of(body, columns)
    if set(map(type, rows)) == _DICT and not any(
        type(v) is list or type(v) is dict for row in rows for v in row.values()
    ):
        return rows  # the usual body: objects of plain values
    example = _example(columns)
    for i, row in enumerate(rows):
        if type(row) is not dict:
            raise RequestError(
                400,
                f"row {i} is a {_json_type(row)}; this model takes rows as objects by column "
                f'name: {{"inputs": [{example}]}}',
            )
        for c in columns:
            v = row.get(c.name)
            if type(v) is list or type(v) is dict:
                what = "a list" if type(v) is list else "an object"
                raise RequestError(400, f"column {c.name!r} row {i}: {what}, not a value")
    return rows


_DICT = {dict}


def _example(columns: list[Column] | None) -> str:
    """A row as the body holds it, for messages."""
    if columns is None:
        return "[f1, f2, ...]"
    return "{" + ", ".join(f'"{c.name}": ...' for c in columns[:2]) + "}"


def _json_type(v: Any) -> str:
    return {list: "list", dict: "object", str: "string", bool: "boolean"}.get(
        type(v), "null" if v is None else "number"
    )


def parse_inputs(
    body: bytes, n_features: int | None, dtype: np.dtype | type = np.float64
) -> np.ndarray:
    """Turn a `{"inputs": [[...], ...]}` body into a 2-D array of `dtype`, or raise `RequestError`.

    Every value must be a JSON number (not a string, boolean or null) and finite, in `dtype`
    too (1e39 overflows float32); every row must have the model's number of features. The
    array is C-contiguous: what the model's input takes as is.
    """
    rows = _rows_of(body, None)
    width = n_features
    if width is None and type(rows[0]) is list:
        width = len(rows[0])
    # The usual body, checked at C speed: rows that are lists of `width` values, no true or
    # false in the body (abs(True) would pass), and abs() of every value below dtype's largest
    # (abs() of a string, null or list fails; JSON's 1e400 is inf): numbers that convert
    # without overflow.
    if (
        set(map(type, rows)) == _LIST
        and set(map(len, rows)) == {width}
        and b"true" not in body
        and b"false" not in body
    ):
        try:
            largest = max(map(abs, itertools.chain.from_iterable(rows)))
        except (TypeError, ValueError):  # a string, null or list in a row; an empty row
            largest = math.inf
        if largest < _largest(dtype):
            return np.array(rows, dtype=dtype)
    # Otherwise find the first bad value and say where it is.
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise RequestError(
                400,
                f'"inputs" must be a list of rows (lists of numbers); row {i} is '
                f"{type(row).__name__}" + ("; wrap one row as [[...]]" if i == 0 else ""),
            )
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
    X = _array(rows, dtype)
    bad = np.argwhere(~np.isfinite(X))
    if len(bad):
        i, j = (int(k) for k in bad[0])
        raise RequestError(
            400,
            f"non-finite value at row {i}, column {j}: {rows[i][j]!r} is too large for {X.dtype}",
        )
    return X


_LIST = {list}
# A body whose rows are lists of numbers: a plain model with named features takes both.
_LIST_ROWS = re.compile(rb'^\s*\{\s*"inputs"\s*:\s*\[\s*\[')


@functools.cache
def _largest(dtype: np.dtype | type) -> float:
    return float(np.finfo(dtype).max)


def _array(rows: list[list[int | float]], dtype: np.dtype | type) -> np.ndarray:
    try:
        with np.errstate(over="ignore"):  # beyond float32: inf, refused by the caller
            return np.array(rows, dtype=dtype)
    except OverflowError:  # an integer beyond float64's range
        raise RequestError(400, "a value is too large for a float") from None


def check_content_type(request: Request) -> None:
    """Refuse (415) a body declared as something other than JSON: the Content-Type must be
    `application/json` or `application/...+json` (parameters such as charset allowed); a
    request without one is read as JSON."""
    for key, value in request.scope["headers"]:
        if key == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            if media == b"application/json" or (
                media.startswith(b"application/") and media.endswith(b"+json")
            ):
                return
            shown = media.decode("latin-1")[:80] or "(empty)"
            raise RequestError(415, f"Content-Type {shown} is not JSON; send application/json")


async def read_body(request: Request, limit: int) -> bytes:
    """Read the request body, refusing (413) one over `limit` bytes, declared or streamed."""
    declared = None
    for key, value in request.scope["headers"]:  # cheaper than building request.headers
        if key == b"content-length":
            declared = value.decode("latin-1")
            break
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(400, f"bad Content-Length header {declared!r}") from None
        if size > limit:
            raise RequestError(413, f"body of {size} bytes is over the limit of {limit} bytes")
        # The server holds the body to its declared length, so it is within the limit.
        try:
            return await request.body()
        except ClientDisconnect:
            raise RequestError(400, "client disconnected before the body was complete") from None
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


# Starlette's JSONResponse builds an encoder per response; this one is built once, same output.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _json_response(out: dict[str, Any], Y: np.ndarray) -> Response:
    """`out` as a JSON response; NaN/Inf in the outputs `Y` are sent as null (JSON has none)."""
    try:
        body = _ENCODER.encode(out)
    except ValueError:  # a non-finite output
        out["outputs"] = _json_safe(Y)
        body = _ENCODER.encode(out)
    return Response(body.encode("utf-8"), media_type="application/json")


def _json_safe(values: np.ndarray) -> list[Any]:
    # JSON has no NaN/Inf; a model that makes them gets null there instead of a broken body.
    out = values.tolist()
    # NaN and Inf propagate through a sum of Python floats (float64: float32 outputs cannot
    # overflow it; a float64 overflow only sends us to the exact test).
    if values.ndim == 2 and math.isfinite(sum(itertools.chain.from_iterable(out))):
        return out
    if np.isfinite(values).all():
        return out
    obj = values.astype(object)
    obj[~np.isfinite(values)] = None
    return obj.tolist()


def model_metadata(predictor: Predictor, model_name: str) -> dict[str, Any]:
    """What `/metadata` answers: the model's inputs, outputs, features or columns, classes and
    providers. `columns` is the tabular schema (name, kind, input, index, and the vocabulary or
    fill of each column; see `bn_onnx.columns`), None for a model that takes rows of numbers
    only; a numeric model trained from a named file lists its features (kind "number").
    """
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
        "columns": None if predictor.columns is None else [c.to_dict() for c in predictor.columns],
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
    inline_max_ms: float = DEFAULT_INLINE_MAX_MS,
    batch_min_ms: float = DEFAULT_BATCH_MIN_MS,
) -> Starlette:
    """Build the Starlette app serving `predictor` (thread-safe, see `runtime.Predictor`).

    Args:
        predictor: the loaded model: one 2-D float input (rows of numbers), or a tabular model
            with a column schema (rows as objects by column name).
        model_name: the name `/metadata` and `/health` report (usually the file name).
        max_batch: most rows one batched `predict` call runs (a bigger request runs alone).
        max_body_bytes: larger request bodies are refused with 413.
        batch_wait_ms: longest wait for more requests to join a batch.
        inline_max_ms: a request alone runs at once on the event loop while the model's calls
            take at most this long (a moving average); batches and slower models run in the
            worker thread (0: every call in the thread).
        batch_min_ms: concurrent requests to a model whose calls take longer than this (at
            most `inline_max_ms`) are batched; for a cheaper model, only while batching
            measures cheaper in CPU time per request than running each at once (see
            `MicroBatcher`; 0: every crowd is batched).

    Raises:
        UsageError: a setting out of range.
        UnsupportedModelError: a model with several inputs and no column schema.
    """
    if max_batch < 1:
        raise UsageError(f"max batch must be >= 1, got {max_batch}")
    if max_body_bytes < 1:
        raise UsageError(f"max body bytes must be >= 1, got {max_body_bytes}")
    if not batch_wait_ms >= 0:
        raise UsageError(f"batch wait must be >= 0 ms, got {batch_wait_ms}")
    if not inline_max_ms >= 0:
        raise UsageError(f"inline limit must be >= 0 ms, got {inline_max_ms}")
    if not batch_min_ms >= 0:
        raise UsageError(f"batch minimum must be >= 0 ms, got {batch_min_ms}")
    is_classifier = predictor.task != "regression"
    names = predictor.class_names
    meta = model_metadata(predictor, model_name)
    meta.update(
        max_batch=max_batch,
        max_body_bytes=max_body_bytes,
        batch_wait_ms=batch_wait_ms,
        inline_max_ms=inline_max_ms,
        batch_min_ms=batch_min_ms,
    )
    columns = predictor.columns
    if columns is None and not predictor.array_input:
        raise UnsupportedModelError(
            "bn-onnx serve needs a model with one 2-D float input or a column schema "
            f"(metadata bn_onnx.columns); {predictor.describe_inputs()}"
        )

    input_name, input_dtype = predictor.input_name, predictor.input_dtype

    def to_feeds(body: bytes) -> dict[str, np.ndarray]:
        """The checked model inputs for a request body; `RequestError` 400 otherwise."""
        try:
            if columns is None or (predictor.array_input and _LIST_ROWS.search(body)):
                # 2-D, the model's width and dtype, finite, C-contiguous: what check() ensures
                return {input_name: parse_inputs(body, predictor.n_features, input_dtype)}
            return predictor.feeds(parse_records(body, columns))
        except BnOnnxError as exc:
            raise RequestError(400, str(exc)) from None

    batcher = MicroBatcher(
        lambda feeds: predictor.run_feeds(feeds),
        max_rows=max_batch,
        wait_s=batch_wait_ms / 1000,
        inline_max_s=inline_max_ms / 1000,
        batch_min_s=batch_min_ms / 1000,
    )

    async def predict(request: Request) -> Response:
        batcher.begin_read()
        submitted = False
        try:
            if batcher.closing:
                return _error(503, "the server is shutting down")
            check_content_type(request)
            body = await read_body(request, max_body_bytes)
            X = to_feeds(body)
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
        out: dict[str, Any] = {"outputs": Y.tolist()}
        if is_classifier and Y.ndim == 2 and Y.shape[1] > 0:
            idx = Y.argmax(axis=1)
            out["labels"] = [names[i] for i in idx] if names else idx.tolist()
        return _json_response(out, Y)

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
    inline_max_ms: float = DEFAULT_INLINE_MAX_MS,
    batch_min_ms: float = DEFAULT_BATCH_MIN_MS,
) -> Starlette:
    """Load the model at `model_path` into a `Predictor` and build the app for it."""
    predictor = Predictor(model_path, provider=provider, threads=threads)
    return create_app(
        predictor,
        model_name=Path(model_path).name,
        max_batch=max_batch,
        max_body_bytes=max_body_bytes,
        batch_wait_ms=batch_wait_ms,
        inline_max_ms=inline_max_ms,
        batch_min_ms=batch_min_ms,
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


def bind_socket(host: str, port: int, backlog: int = DEFAULT_BACKLOG) -> Any:
    """A listening TCP socket on `host:port` (port 0: the system picks a free one) that queues
    at most `backlog` connections not yet accepted."""
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
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def make_server(
    app: Starlette,
    *,
    log_level: str = "info",
    access_log: bool = False,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S,
    max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
) -> Any:
    """A uvicorn server for `app`; run it with `server.run(sockets=[bind_socket(...)])`.

    Slow and idle clients are dropped (`bn_onnx.serve_http`): a request's head and body must
    arrive within `read_timeout_s` of its first byte (else 408, or a close while the head is
    incomplete); a connection with no request under way is closed after `keep_alive_s`, a new
    one too. With `max_connections` connections open (uvicorn's `limit_concurrency`), further
    requests get 503.

    uvicorn handles SIGTERM and Ctrl-C: it stops accepting, lets open requests finish (up to
    10 s), then the app's shutdown drains the batcher.

    Raises:
        UsageError: a timeout that is not positive, or `max_connections` below 1.
    """
    import uvicorn

    from bn_onnx.serve_http import protocol_class

    if not read_timeout_s > 0 or not keep_alive_s > 0:
        raise UsageError(
            f"timeouts must be > 0 s, got read {read_timeout_s}, keep-alive {keep_alive_s}"
        )
    if max_connections is not None and max_connections < 1:
        raise UsageError(f"max connections must be >= 1, got {max_connections}")
    config = uvicorn.Config(
        app,
        http=protocol_class(read_timeout_s),
        log_level=log_level,
        access_log=access_log,
        timeout_keep_alive=keep_alive_s,  # type: ignore[arg-type]  # a float works
        limit_concurrency=max_connections,
        timeout_graceful_shutdown=10,
        lifespan="on",
    )
    return uvicorn.Server(config)
