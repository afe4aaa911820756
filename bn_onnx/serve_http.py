"""uvicorn's h11 protocol with the two timeouts uvicorn 0.54 lacks: idle new connections and
slow requests.

uvicorn closes a keep-alive connection idle `timeout_keep_alive` seconds after a response, but
never one that was opened and sent nothing, and any byte received stops that timer: a client
sending one byte a second keeps its connection (and a task slot) for as long as it likes.
`GuardedH11Protocol` adds, using uvicorn's own timer and h11 state:

1. a new connection is idle too: closed after `timeout_keep_alive` if no request begins;
2. a request's head and body must arrive within `read_timeout` seconds of its first byte. If
   the head is still incomplete then, the connection is closed; if the body is, the server
   answers 408 (the app sees a disconnect and its answer is dropped) and closes.

Everything else - parsing, flow control, `limit_concurrency`'s 503 - is uvicorn's.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol


class GuardedH11Protocol(H11Protocol):
    """`H11Protocol` with an idle timer from the connection's start and a per-request read
    deadline (the class attribute `read_timeout`, seconds; see `protocol_class`)."""

    read_timeout: float = 5.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_deadline: asyncio.TimerHandle | None = None
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def data_received(self, data: bytes) -> None:
        if self._read_deadline is None and (self.cycle is None or self.cycle.response_complete):
            # The first byte of a request: all of it must be here within read_timeout.
            self._read_deadline = self.loop.call_later(self.read_timeout, self._read_timed_out)
        super().data_received(data)
        if self.cycle is not None and not self.cycle.more_body:
            self._cancel_read_deadline()  # the whole request is in

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_deadline()
        super().connection_lost(exc)

    def _cancel_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.response_started:
            # The head is in, the body is not: answer 408 in the app's place, then close.
            cycle.disconnected = True
            cycle.message_event.set()
            message = f"request not received within {self.read_timeout:g} s"
            body = json.dumps({"error": message}).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            try:
                for event in (
                    h11.Response(status_code=408, headers=headers, reason=STATUS_PHRASES[408]),
                    h11.Data(data=body),
                    h11.EndOfMessage(),
                ):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:
                pass
        self.transport.close()


def protocol_class(read_timeout: float) -> Any:
    """A `GuardedH11Protocol` subclass with `read_timeout`, for `uvicorn.Config(http=...)`."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"read_timeout": float(read_timeout)})
