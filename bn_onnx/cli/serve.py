"""`bn-onnx serve`: an HTTP JSON service for a model (Starlette under uvicorn)."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from bn_onnx.cli._common import (
    add_command,
    non_negative_float,
    port_number,
    positive_float,
    positive_int,
)

EPILOG = """\
endpoints:
  POST /predict   {"inputs": [[f1, f2, ...], ...]} -> {"outputs": [[...], ...], "labels": [...]}
                  (labels for classifiers); a tabular model (metadata bn_onnx.columns) takes
                  rows by column name: {"inputs": [{"age": 31, "city": "Busan", ...}, ...]};
                  400 with {"error": ...} for bad JSON, shapes, types, missing columns or
                  non-finite values, 413 for a body over --max-body-bytes, 415 for a
                  Content-Type other than application/json (none: read as JSON)
  GET  /health    {"status": "ok", "model": ...}; 503 while shutting down
  GET  /metadata  inputs, outputs, features or columns, classes, folded flag, providers

Concurrent requests are batched (up to --max-batch rows, waiting at most --batch-wait-ms) when
the model's calls take longer than --batch-min-ms, or when batching measures cheaper; a request
alone runs at once.
Slow and idle clients: a request must arrive whole within --read-timeout of its first byte (else
408, or the connection is closed while its head is incomplete); a connection with no request
under way is closed after --keep-alive; with --max-connections open, new requests get 503.
Ctrl-C or SIGTERM stops taking connections, finishes the requests in flight, then exits.

example:
  bn-onnx serve models/digits/model.folded.onnx --port 8000
  curl -s localhost:8000/predict -H 'content-type: application/json' \\
      -d '{"inputs": [[0, 0, 5, 13, 9, 1, 0, 0, ...64 values...]]}'
"""


HELP = "serve a model over HTTP: POST /predict, GET /health, GET /metadata"
DESCRIPTION = """\
Serve an ONNX model as an HTTP JSON API with batching of concurrent requests."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `serve`."""
    p = add_command(subparsers, "serve", HELP, DESCRIPTION, EPILOG)
    p.add_argument("model", metavar="MODEL.onnx", help="the ONNX model to serve")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    p.add_argument(
        "--port", type=port_number, default=8000, help="TCP port (default 8000; 0 picks a free one)"
    )
    p.add_argument(
        "--provider", default="auto", help="execution provider: auto, cpu or cuda (default auto)"
    )
    p.add_argument(
        "--threads", type=positive_int, default=None, help="intra-op threads (default: ORT's)"
    )
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=64,
        help="most rows run together from concurrent requests (default 64)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=non_negative_float,
        default=1.0,
        help="longest wait for more requests to join a batch (default 1 ms)",
    )
    p.add_argument(
        "--inline-max-ms",
        type=non_negative_float,
        default=1.0,
        help=(
            "a request alone runs at once on the event loop while the model's calls take at "
            "most this long; batches run in a worker thread (default 1 ms; 0: every call in "
            "the thread)"
        ),
    )
    p.add_argument(
        "--batch-min-ms",
        type=non_negative_float,
        default=0.25,
        help=(
            "concurrent requests are batched when the model's calls take longer than this; "
            "for a cheaper model only while batching measures cheaper in CPU time per request "
            "than running each at once (default 0.25 ms; 0: always batch)"
        ),
    )
    p.add_argument(
        "--read-timeout",
        type=positive_float,
        default=5.0,
        metavar="SECONDS",
        help="a request's head and body must arrive within this of its first byte (default 5)",
    )
    p.add_argument(
        "--keep-alive",
        type=positive_float,
        default=5.0,
        metavar="SECONDS",
        help="close a connection idle this long, a new one too (default 5)",
    )
    p.add_argument(
        "--max-connections",
        type=positive_int,
        default=256,
        help="requests arriving while this many connections are open get 503 (default 256)",
    )
    p.add_argument(
        "--backlog",
        type=positive_int,
        default=128,
        help="connections the system queues before the server accepts them (default 128)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=1 << 20,
        help="larger request bodies get 413 (default 1048576)",
    )
    p.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        default="info",
        help="uvicorn's log level (default info)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    return p


def run(args: argparse.Namespace) -> int:
    """Load the model, bind the socket, print the address, serve until stopped."""
    from bn_onnx import serve

    app = serve.load_app(
        args.model,
        provider=args.provider,
        threads=args.threads,
        max_batch=args.max_batch,
        max_body_bytes=args.max_body_bytes,
        batch_wait_ms=args.batch_wait_ms,
        inline_max_ms=args.inline_max_ms,
        batch_min_ms=args.batch_min_ms,
    )
    sock = serve.bind_socket(args.host, args.port, backlog=args.backlog)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    predictor = app.state.predictor
    if not args.quiet:
        print(
            f"bn-onnx serve: {args.model} on http://{shown}:{port} "
            f"(providers: {', '.join(predictor.providers)}; max batch {args.max_batch})",
            flush=True,
        )
        if not serve.is_loopback(host):
            print(
                f"bn-onnx serve: note: {host} is reachable from other machines; the service "
                "has no authentication",
                file=sys.stderr,
                flush=True,
            )
    server = serve.make_server(
        app,
        log_level="error" if args.quiet else args.log_level,
        access_log=args.access_log,
        read_timeout_s=args.read_timeout,
        keep_alive_s=args.keep_alive,
        max_connections=args.max_connections,
    )
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it to the handler it found; this
    # one makes that a normal exit (code 0) instead of death by signal.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        signal.signal(signal.SIGTERM, previous)
    if not args.quiet:
        print("bn-onnx serve: stopped", flush=True)
    return 0
