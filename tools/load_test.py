"""Load test of `bn-onnx serve` on loopback against a bare onnxruntime loop, as JSON.

For each concurrency (default 1 and 16 clients) and each round, interleaved:
- bare: `session.run` on one row at a time from N threads of this process (the floor: no HTTP,
  no JSON, no batching);
- server: N client threads (http.client, keep-alive) POSTing one row each to `bn-onnx serve`
  running in a child process on 127.0.0.1 with an ephemeral port.
Each (mode, concurrency, round) stops after --requests requests or --seconds seconds, whichever
comes first. Reported: requests/s, p50 and p99 latency per round, then medians over rounds with
min..max spread, and the server's mean batch size from /health.

Loopback only: the server is started here on 127.0.0.1 and nothing else is contacted.

usage:
  python tools/load_test.py models/digits/model.folded.onnx --json load.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


def _summary(latencies: list[float], wall: float) -> dict[str, float]:
    lat = np.asarray(latencies) * 1000.0
    return {
        "requests": len(latencies),
        "seconds": wall,
        "rps": len(latencies) / wall if wall > 0 else 0.0,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def bare_loop(
    session: ort.InferenceSession, rows: np.ndarray, clients: int, count: int, seconds: float
) -> dict[str, float]:
    """`clients` threads calling `session.run` on one row each until `count` or `seconds`."""
    name = session.get_inputs()[0].name
    latencies: list[float] = []
    lock = threading.Lock()
    issued = 0
    deadline = time.perf_counter() + seconds

    def worker(k: int) -> None:
        nonlocal issued
        i = k
        while True:
            with lock:
                if issued >= count or time.perf_counter() > deadline:
                    return
                issued += 1
            x = rows[i % len(rows) : i % len(rows) + 1]
            t0 = time.perf_counter()
            session.run(None, {name: x})
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
            i += clients

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _summary(latencies, time.perf_counter() - start)


def http_load(
    base: str, bodies: list[bytes], clients: int, count: int, seconds: float
) -> dict[str, float]:
    """`clients` threads, each with one keep-alive connection, POSTing until `count`/`seconds`.

    The standard library's http.client: lighter per request than an async client, so on a
    small machine the client takes less of the CPU the server needs.
    """
    url = urllib.parse.urlsplit(base)
    if url.hostname != "127.0.0.1":
        raise SystemExit(f"load_test: loopback only, not {url.hostname}")
    latencies: list[float] = []
    errors = 0
    issued = 0
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    headers = {"Content-Type": "application/json"}

    def worker(k: int) -> None:
        nonlocal issued, errors
        conn = http.client.HTTPConnection("127.0.0.1", url.port, timeout=30)
        i = k
        try:
            while True:
                with lock:
                    if issued >= count or time.perf_counter() > deadline:
                        return
                    issued += 1
                t0 = time.perf_counter()
                conn.request("POST", "/predict", bodies[i % len(bodies)], headers)
                response = conn.getresponse()
                response.read()
                dt = time.perf_counter() - t0
                with lock:
                    if response.status == 200:
                        latencies.append(dt)
                    else:
                        errors += 1
                i += clients
        finally:
            conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = _summary(latencies, time.perf_counter() - start)
    out["errors"] = errors
    return out


def start_server(model: str, threads: int, max_batch: int, wait_ms: float) -> tuple[Any, str]:
    """Start `bn-onnx serve` on 127.0.0.1 with an ephemeral port; return (process, base URL)."""
    cmd = [sys.executable, "-m", "bn_onnx", "serve", model, "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--provider", "cpu", "--threads", str(threads), "--max-batch", str(max_batch)]
    cmd += ["--batch-wait-ms", str(wait_ms), "--log-level", "warning"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if " on http://127.0.0.1:" not in line:
        proc.kill()
        raise SystemExit(f"load_test: the server did not start: {line!r}")
    return proc, line.split(" on ")[1].split()[0]


def _health(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(base + "/health", timeout=10) as r:
        return json.loads(r.read())


def _median_spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    """Run the load test and print (and optionally write) the JSON results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="ONNX model (e.g. models/digits/model.folded.onnx)")
    ap.add_argument("--concurrency", default="1,16", help="client counts (default 1,16)")
    ap.add_argument("--requests", type=int, default=1000, help="most requests per run (1000)")
    ap.add_argument("--seconds", type=float, default=5.0, help="most seconds per run (5)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (1)")
    ap.add_argument("--max-batch", type=int, default=64, help="server --max-batch (64)")
    ap.add_argument("--batch-wait-ms", type=float, default=1.0, help="server wait (1 ms)")
    ap.add_argument("--warmup", type=int, default=200, help="untimed requests first (200)")
    ap.add_argument("--json", metavar="OUT.json", help="also write the results here")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]

    model = args.model
    sample = Path(model).with_name("sample_input.npy")
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
    width = session.get_inputs()[0].shape[1]
    if sample.is_file():
        rows = np.load(sample, allow_pickle=False).astype(np.float32)
    else:
        rows = np.random.default_rng(0).integers(0, 17, (64, width)).astype(np.float32)
    bodies = [json.dumps({"inputs": [r.tolist()]}).encode() for r in rows]

    proc, base = start_server(model, args.threads, args.max_batch, args.batch_wait_ms)
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        str(c): {"bare": [], "server": []} for c in levels
    }
    batching: dict[str, list[float]] = {str(c): [] for c in levels}
    try:
        # Warm-up, untimed: first runs allocate, the server's first requests import lazily.
        bare_loop(session, rows, 1, args.warmup, 2.0)
        http_load(base, bodies, 4, args.warmup, 5.0)
        for rnd in range(args.rounds):
            for c in levels:
                runs[str(c)]["bare"].append(
                    bare_loop(session, rows, c, args.requests, args.seconds)
                )
                before = _health(base)
                result = http_load(base, bodies, c, args.requests, args.seconds)
                after = _health(base)
                runs[str(c)]["server"].append(result)
                done = after["batches"] - before["batches"]
                batching[str(c)].append((after["rows"] - before["rows"]) / max(done, 1))
                print(
                    f"round {rnd + 1}/{args.rounds} clients={c:>2}: "
                    f"bare {runs[str(c)]['bare'][-1]['rps']:8.0f} req/s, "
                    f"server {result['rps']:7.0f} req/s "
                    f"(p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
                    f"mean batch {batching[str(c)][-1]:.1f})",
                    file=sys.stderr,
                )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    summary: dict[str, Any] = {}
    for c in levels:
        entry: dict[str, Any] = {}
        for mode in ("bare", "server"):
            rs = runs[str(c)][mode]
            entry[mode] = {
                key: _median_spread([r[key] for r in rs]) for key in ("rps", "p50_ms", "p99_ms")
            }
        pairs = zip(runs[str(c)]["server"], runs[str(c)]["bare"], strict=True)
        ratios = [s["rps"] / b["rps"] for s, b in pairs]
        entry["server_rps_over_bare"] = _median_spread(ratios)
        entry["server_mean_batch_rows"] = _median_spread(batching[str(c)])
        entry["server_errors"] = sum(int(r.get("errors", 0)) for r in runs[str(c)]["server"])
        summary[str(c)] = entry
    out = {
        "model": model,
        "settings": vars(args),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "note": "loopback; client, server and bare loop share the same cores",
        },
        "summary": summary,
        "runs": runs,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
