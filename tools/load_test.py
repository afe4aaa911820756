"""Load test of `bn-onnx serve` against a minimal Starlette endpoint, side by side, as JSON.

Two servers per model, each a child process on 127.0.0.1 (ephemeral port), same uvicorn
settings, one onnxruntime intra-op thread:
- starlette: the least an app can do: `await request.json()`, the rows as numpy arrays,
  `session.run` per request, `{"outputs": ..., "labels": ...}` back (the same body as serve);
- serve: `bn-onnx serve MODEL` (input checks, the micro-batcher, the same answer).
Optionally (`--modes ...`): `ort`, a bare `session.run` loop in this process, the floor without
HTTP or JSON; `serve-thread`, serve with `--inline-max-ms 0` (every batch in the worker thread,
as before requests alone ran on the event loop); `serve-batch`, serve with `--batch-min-ms 0`
(every crowd batched, whatever the model's call costs: serve before issue 19); `serve-base`,
`bn-onnx serve` from another checkout (`--base DIR`, e.g. a worktree of main), to compare two
versions in one run.

For each round, each concurrency (default 1 and 8 clients) and each model, the modes run one
after the other, their order alternating between rounds. N client threads (http.client,
keep-alive, one row per request) POST until --requests requests or --seconds seconds. Reported:
req/s, p50 and p99 latency per run, and the server process's CPU time per request (all its
threads, from /proc/PID/task/*/schedstat on Linux: steadier than req/s on a shared machine);
per configuration the median with min..max over rounds; serve / starlette ratios per round
(throughput and CPU per request) and their medians; serve's mean batch (from /health); each
server's resident memory after each run (/proc/PID/status); the load average before and after.

A tabular model (metadata `bn_onnx.columns`) gets rows as objects by column name, made from its
schema: numbers, categories from the vocabulary, one unseen in ten, one missing cell in ten.

Loopback only: the servers are started here on 127.0.0.1 and nothing else is contacted.

usage:
  python tools/load_test.py models/digits/model.folded.onnx [TABULAR.onnx] --json load.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
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

MODES = ("ort", "starlette", "serve", "serve-thread", "serve-batch", "serve-base")
COLUMNS_KEY = "bn_onnx.columns"


def _summary(latencies: list[float], wall: float) -> dict[str, float]:
    lat = np.asarray(latencies) * 1000.0 if latencies else np.zeros(1)
    return {
        "requests": len(latencies),
        "seconds": wall,
        "rps": len(latencies) / wall if wall > 0 else 0.0,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


# --- the workload -----------------------------------------------------------------------------


def _schema(session: ort.InferenceSession) -> list[dict[str, Any]] | None:
    text = session.get_modelmeta().custom_metadata_map.get(COLUMNS_KEY)
    return None if text is None else json.loads(text)


def make_rows(model: str, session: ort.InferenceSession, n: int = 64) -> list[Any]:
    """Request rows: lists of numbers, or objects by column name for a tabular model."""
    rng = np.random.default_rng(0)
    schema = _schema(session)
    if schema is None:
        sample = Path(model).with_name("sample_input.npy")
        if sample.is_file():
            return np.load(sample, allow_pickle=False).astype(np.float32).tolist()
        width = session.get_inputs()[0].shape[1]
        return rng.integers(0, 17, (n, width)).astype(np.float32).tolist()
    rows = []
    for _ in range(n):
        row: dict[str, Any] = {}
        for c in schema:
            if rng.random() < 0.1:
                row[c["name"]] = None
            elif c["kind"] == "continuous":
                row[c["name"]] = round(float(rng.normal(c.get("fill") or 0.0, 10.0)), 3)
            elif rng.random() < 0.1:
                row[c["name"]] = "never seen"
            else:
                vocab = c["vocabulary"]
                row[c["name"]] = vocab[int(rng.integers(len(vocab)))]
        rows.append(row)
    return rows


def make_feeder(session: ort.InferenceSession) -> Any:
    """What the minimal endpoint does with rows: the plainest conversion to arrays."""
    schema = _schema(session)
    if schema is None:
        name = session.get_inputs()[0].name
        return lambda rows: {name: np.asarray(rows, dtype=np.float32)}
    plan = []
    for inp in session.get_inputs():
        cols = sorted((c for c in schema if c["input"] == inp.name), key=lambda c: c["index"])
        plan.append((inp.name, inp.type == "tensor(string)", [c["name"] for c in cols]))

    def feeds(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        out = {}
        for name, text, cols in plan:
            if text:
                cells = [["" if r.get(c) is None else str(r[c]) for c in cols] for r in rows]
                out[name] = np.array(cells, dtype=object)
            else:
                values = [[math.nan if r.get(c) is None else r[c] for c in cols] for r in rows]
                out[name] = np.array(values, dtype=np.float32)
        return out

    return feeds


# --- the minimal Starlette endpoint (run in a child process with --starlette-server) ---------


def starlette_app(model: str, threads: int) -> Any:
    """A minimal Starlette app: parse, `session.run` per request, answer outputs and labels."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    names = json.loads(meta.get("bn_onnx.class_names") or "null")
    feeds = make_feeder(session)

    async def predict(request: Any) -> JSONResponse:
        doc = await request.json()
        y = session.run(None, feeds(doc["inputs"]))[0]
        idx = y.argmax(axis=1)
        labels = [names[i] for i in idx] if names else idx.tolist()
        return JSONResponse({"outputs": y.tolist(), "labels": labels})

    async def health(request: Any) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/predict", predict, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ]
    )


def run_starlette_server(model: str, threads: int) -> int:
    """Serve `starlette_app` on 127.0.0.1 (ephemeral port) with serve's uvicorn settings."""
    import socket

    import uvicorn

    app = starlette_app(model, threads)
    # IPPROTO_TCP as getaddrinfo gives it (and `uvicorn.run(host=...)` gets): asyncio turns
    # Nagle's algorithm off only on sockets whose proto says TCP, else every answer waits for
    # the client's delayed ACK (40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    print(f"starlette: {model} on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


# --- clients ----------------------------------------------------------------------------------


def bare_loop(
    session: ort.InferenceSession, rows: list[Any], clients: int, count: int, seconds: float
) -> dict[str, float]:
    """`clients` threads calling `session.run` on one row each until `count` or `seconds`."""
    feeder = make_feeder(session)
    feeds = [feeder([r]) for r in rows]
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
            t0 = time.perf_counter()
            session.run(None, feeds[i % len(feeds)])
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
    out = _summary(latencies, time.perf_counter() - start)
    out["errors"] = 0
    return out


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


# --- servers ----------------------------------------------------------------------------------


def start_server(cmd: list[str], pythonpath: str | None = None) -> tuple[Any, str]:
    """Start a server child process; return (process, base URL from its first line)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if " on http://127.0.0.1:" not in line:
        proc.kill()
        proc.wait()
        raise SystemExit(f"load_test: the server did not start: {cmd} said {line!r}")
    return proc, line.split(" on ")[1].split()[0]


def serve_command(
    model: str, threads: int, max_batch: int, wait_ms: float, mode: str = "serve"
) -> list[str]:
    cmd = [sys.executable, "-m", "bn_onnx", "serve", model, "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--provider", "cpu", "--threads", str(threads), "--max-batch", str(max_batch)]
    cmd += {"serve-thread": ["--inline-max-ms", "0"], "serve-batch": ["--batch-min-ms", "0"]}.get(
        mode, []
    )
    return cmd + ["--batch-wait-ms", str(wait_ms), "--log-level", "warning"]


def starlette_command(model: str, threads: int) -> list[str]:
    return [sys.executable, __file__, model, "--starlette-server", "--threads", str(threads)]


def stop(proc: Any) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def rss_mb(pid: int) -> float | None:
    """Resident memory of process `pid` now, in MB (Linux /proc; else None)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_ns(pid: int) -> int | None:
    """CPU time of every thread of process `pid` so far, in ns (Linux schedstat; else None)."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total


def _health(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(base + "/health", timeout=10) as r:
        return json.loads(r.read())


def _median_spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    """Run the load test and print (and optionally write) the JSON results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="ONNX models (numeric or tabular)")
    ap.add_argument("--concurrency", default="1,8", help="client counts (default 1,8)")
    ap.add_argument("--modes", default="starlette,serve", help="of ort,starlette,serve")
    ap.add_argument("--requests", type=int, default=2000, help="most requests per run (2000)")
    ap.add_argument("--seconds", type=float, default=4.0, help="most seconds per run (4)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (1)")
    ap.add_argument("--max-batch", type=int, default=64, help="serve --max-batch (64)")
    ap.add_argument("--batch-wait-ms", type=float, default=1.0, help="serve wait (1 ms)")
    ap.add_argument("--warmup", type=int, default=300, help="untimed requests first (300)")
    ap.add_argument("--base", metavar="DIR", help="checkout whose serve is mode serve-base")
    ap.add_argument("--json", metavar="OUT.json", help="also write the results here")
    ap.add_argument("--starlette-server", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.starlette_server:
        return run_starlette_server(args.models[0], args.threads)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(modes) <= set(MODES) or not modes:
        raise SystemExit(f"load_test: --modes takes some of {', '.join(MODES)}")
    if ("serve-base" in modes) != (args.base is not None):
        raise SystemExit("load_test: mode serve-base and --base DIR go together")

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    sessions, rows, bodies = {}, {}, {}
    for m in args.models:
        sessions[m] = ort.InferenceSession(m, sess_options=so, providers=["CPUExecutionProvider"])
        rows[m] = make_rows(m, sessions[m])
        bodies[m] = [json.dumps({"inputs": [r]}).encode() for r in rows[m]]

    servers: dict[tuple[str, str], tuple[Any, str]] = {}
    runs: dict[str, dict[str, dict[str, list[dict[str, float]]]]] = {
        m: {str(c): {mode: [] for mode in modes} for c in levels} for m in args.models
    }
    serves = [mode for mode in modes if mode.startswith("serve")]
    batching: dict[str, dict[str, dict[str, list[float]]]] = {
        m: {str(c): {mode: [] for mode in serves} for c in levels} for m in args.models
    }
    load_before = _loadavg()
    try:
        for m in args.models:
            for mode in ("serve", "serve-thread", "serve-batch"):
                if mode in modes:
                    cmd = serve_command(m, args.threads, args.max_batch, args.batch_wait_ms, mode)
                    servers[(m, mode)] = start_server(cmd)
            if "serve-base" in modes:
                cmd = serve_command(m, args.threads, args.max_batch, args.batch_wait_ms)
                servers[(m, "serve-base")] = start_server(cmd, str(Path(args.base).resolve()))
            if "starlette" in modes:
                servers[(m, "starlette")] = start_server(starlette_command(m, args.threads))
        # Warm-up, untimed: first runs allocate, the servers' first requests import lazily.
        for (m, _), (_, base) in servers.items():
            http_load(base, bodies[m], 4, args.warmup, 10.0)
        for rnd in range(args.rounds):
            order = modes if rnd % 2 == 0 else modes[::-1]
            for c in levels:
                for m in args.models:
                    line = []
                    for mode in order:
                        if mode == "ort":
                            result = bare_loop(sessions[m], rows[m], c, args.requests, args.seconds)
                        else:
                            proc, base = servers[(m, mode)]
                            before = _health(base) if mode.startswith("serve") else None
                            cpu0 = cpu_ns(proc.pid)
                            result = http_load(base, bodies[m], c, args.requests, args.seconds)
                            cpu1 = cpu_ns(proc.pid)
                            if cpu0 is not None and cpu1 is not None and result["requests"]:
                                result["server_cpu_us"] = (cpu1 - cpu0) / 1e3 / result["requests"]
                            rss = rss_mb(proc.pid)
                            if rss is not None:
                                result["server_rss_mb"] = rss
                            if before is not None:
                                after = _health(base)
                                done = after["batches"] - before["batches"]
                                mean = (after["rows"] - before["rows"]) / max(done, 1)
                                batching[m][str(c)][mode].append(mean)
                        runs[m][str(c)][mode].append(result)
                        cpu = result.get("server_cpu_us")
                        line.append(
                            f"{mode} {result['rps']:5.0f} req/s p50 {result['p50_ms']:.3f} "
                            f"p99 {result['p99_ms']:.2f} ms"
                            + ("" if cpu is None else f" cpu {cpu:.0f} us/req")
                        )
                    print(
                        f"round {rnd + 1}/{args.rounds} clients={c:>2} {Path(m).name}: "
                        + "; ".join(line),
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        for proc, _ in servers.values():
            stop(proc)
    load_after = _loadavg()

    results: dict[str, Any] = {}
    for m in args.models:
        summary: dict[str, Any] = {}
        for c in levels:
            entry: dict[str, Any] = {}
            for mode in modes:
                rs = runs[m][str(c)][mode]
                entry[mode] = {
                    key: _median_spread([r[key] for r in rs])
                    for key in ("rps", "p50_ms", "p99_ms", "server_cpu_us", "server_rss_mb")
                    if all(key in r for r in rs)
                }
                entry[mode]["errors"] = sum(int(r.get("errors", 0)) for r in rs)
            for mode in serves if "starlette" in modes else []:
                rs, bs = runs[m][str(c)][mode], runs[m][str(c)]["starlette"]
                ratios = [
                    s["rps"] / b["rps"] if b["rps"] else 0.0 for s, b in zip(rs, bs, strict=True)
                ]
                entry[f"{mode}_over_starlette"] = _median_spread(ratios) | {"rounds": ratios}
                if "server_cpu_us" in entry[mode] and "server_cpu_us" in entry["starlette"]:
                    cpu = [
                        s["server_cpu_us"] / b["server_cpu_us"] for s, b in zip(rs, bs, strict=True)
                    ]
                    entry[f"{mode}_cpu_over_starlette"] = _median_spread(cpu) | {"rounds": cpu}
            for mode in serves:
                entry[f"{mode}_mean_batch_rows"] = _median_spread(batching[m][str(c)][mode])
            summary[str(c)] = entry
        kind = "tabular" if _schema(sessions[m]) is not None else "numeric"
        results[m] = {"kind": kind, "summary": summary, "runs": runs[m]}
    out = {
        "settings": {k: v for k, v in vars(args).items() if k != "starlette_server"},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "note": "loopback; clients and servers share the same cores",
        },
        "models": results,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
