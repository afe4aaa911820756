"""Score bn-onnx's fold beside peer tools on the architecture corpus of tools/make_arch_corpus.py.

Tools (`--tools`, default all):

    bn-onnx              bn_onnx.fold.fold_model (one column per `--bn-onnx LABEL=PATH`)
    onnxscript           onnxscript.optimizer.optimize (constant folding + its rewrite rules)
    ort-basic            onnxruntime offline optimizer, ORT_ENABLE_BASIC, optimized_model_filepath
    ort-extended         the same at ORT_ENABLE_EXTENDED (writes com.microsoft fused ops)
    onnxoptimizer-bn     onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])
    onnxoptimizer        onnxoptimizer.optimize(model): its default fuse + elimination passes
    onnxslim             onnxslim.slim(model)
    onnxsim              onnxsim.simplify(model)[0]

Each tool runs on each corpus file in a subprocess of its own (this script with `--worker`),
with a timeout, so that a crash or a hang is recorded, not fatal. The worker loads the model
with onnx.load, times the tool's transform alone (`core_s`: ModelProto in, ModelProto out; for
onnxruntime the session creation that optimizes and writes), saves it, and then counts nodes
and BatchNormalization nodes (subgraphs included) and runs
`onnx.checker.check_model(full_check=True)` on the file written.

This process then scores each output against the original:

- error: the original and the output both run in onnxruntime with graph optimizations off
  (ORT_DISABLE_ALL, CPU, one thread) on `--samples` seeded N(0, 1) inputs; `wrong` when any
  element differs by more than atol + rtol * |original| (1e-4, 1e-3), or a shape differs;
- interface: the graph inputs and outputs keep their names, dtypes and shapes, in order;
- latency: the original and every output in onnxruntime as a user runs it (default
  ORT_ENABLE_ALL, CPU, one intra-op thread), interleaved in shuffled rounds
  (bn_onnx.bench.time_interleaved); medians of wall time, with the IQR, and per-round ratios to
  the original and between tools.

Writes JSON (every figure) and markdown (tables for the README, totals per tool). A tool that
crashed, timed out or wrote a file onnxruntime cannot load counts as leaving the original's BN
(the user keeps the input file).

    python tools/score_fold_tools.py /work/corpus                      # all files, all tools
    python tools/score_fold_tools.py /work/corpus --only 'tv_resnet18*' --tools bn-onnx,onnxscript
    python tools/score_fold_tools.py /work/corpus --bn-onnx main=/work/main \
        --bn-onnx new=/work/wt-fold --tools bn-onnx,onnxscript

`--bn-onnx LABEL=PATH` puts PATH first on PYTHONPATH of that column's workers (a checkout's
root); without it, the column `bn-onnx` uses whatever `import bn_onnx` finds.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "tools" / "bench_results"
PEER_TOOLS = (
    "onnxscript",
    "ort-basic",
    "ort-extended",
    "onnxoptimizer-bn",
    "onnxoptimizer",
    "onnxslim",
    "onnxsim",
)
ATOL, RTOL = 1e-4, 1e-3
SEED = 20260412


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Worker: one tool on one file, in its own process


def _count(graph: Any, counts: dict[str, int]) -> None:
    for node in graph.node:
        counts["nodes"] += 1
        counts["bn"] += node.op_type == "BatchNormalization"
        if node.domain not in ("", "ai.onnx"):
            counts.setdefault("custom", 0)
            counts["custom"] += 1
        for a in node.attribute:
            if a.HasField("g"):
                _count(a.g, counts)
            for g in a.graphs:
                _count(g, counts)


LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def scale_after_linear(graph: Any) -> int:
    """Mul/Div nodes that scale a Conv/ConvTranspose/Gemm/MatMul output by a constant.

    A constant is an initializer, a Constant, or a value computed from constants alone (as
    torch's dynamo export computes FrozenBatchNorm2d's scale from its four buffers). These are
    the BN-in-all-but-name left in the main graph: one per FrozenBatchNorm2d or Caffe2 Scale.
    """
    const = {t.name for t in graph.initializer}
    producer: dict[str, str] = {}
    for node in graph.node:
        ins = [i for i in node.input if i]
        if node.op_type == "Constant" or (ins and all(i in const for i in ins)):
            const.update(o for o in node.output if o)
        for o in node.output:
            producer[o] = node.op_type
    n = 0
    for node in graph.node:
        if node.op_type not in ("Mul", "Div") or len(node.input) != 2:
            continue
        a, b = node.input
        pairs = [(a, b), (b, a)] if node.op_type == "Mul" else [(a, b)]
        n += any(k in const and producer.get(x) in LINEAR_OPS for x, k in pairs)
    return n


def model_counts(model: Any) -> dict[str, int]:
    """Nodes, BatchNormalization nodes and custom-domain nodes (graph, subgraphs, functions),
    and constant scales after a linear node in the main graph (`scale_after_linear`)."""
    counts = {"nodes": 0, "bn": 0, "custom": 0}
    _count(model.graph, counts)
    for f in model.functions:
        _count(f, counts)
    counts["scale_after_linear"] = scale_after_linear(model.graph)
    return counts


def interface(model: Any) -> dict[str, list]:
    """Graph inputs (initializers excluded) and outputs as [name, elem_type, dims]."""
    inits = {t.name for t in model.graph.initializer}

    def info(v: Any) -> list:
        t = v.type.tensor_type
        dims = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
        ]
        return [v.name, t.elem_type, dims if t.HasField("shape") else None]

    return {
        "inputs": [info(v) for v in model.graph.input if v.name not in inits],
        "outputs": [info(v) for v in model.graph.output],
    }


def _run_tool(tool: str, src: Path, dst: Path, result: dict[str, Any]) -> None:
    """Apply `tool` to `src`, write `dst`, fill timings and versions into `result`."""
    import importlib.metadata as md

    import onnx

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    t0 = time.perf_counter()
    if tool.startswith("ort-"):
        import onnxruntime as ort

        result["version"] = ort.__version__
        result["import_s"] = time.perf_counter() - t0
        so = ort.SessionOptions()
        level = {"ort-basic": "ORT_ENABLE_BASIC", "ort-extended": "ORT_ENABLE_EXTENDED"}[tool]
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        so.optimized_model_filepath = str(dst)
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        t0 = time.perf_counter()
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        result["core_s"] = time.perf_counter() - t0  # load + optimize + write, not separable
        result["load_s"] = result["save_s"] = 0.0
        return
    if tool == "bn-onnx":
        import bn_onnx
        from bn_onnx.fold import fold_model

        result["version"] = getattr(bn_onnx, "__version__", None)
        result["module"] = str(Path(bn_onnx.__file__).resolve().parent)

        def transform(m: Any) -> Any:
            folded = fold_model(m)
            report = getattr(folded, "report", None)
            if report is not None and hasattr(report, "to_dict"):
                rep = report.to_dict()
                reasons: dict[str, int] = {}
                for e in rep.get("bn", []):
                    if e.get("status") == "left":
                        key = str(e.get("reason"))
                        reasons[key] = reasons.get(key, 0) + 1
                result["report"] = {
                    k: rep.get(k) for k in ("n_bn", "n_folded", "n_left") if k in rep
                }
                result["report"]["reasons"] = reasons
            return folded.model
    elif tool == "onnxscript":
        import onnxscript.optimizer

        result["version"] = version("onnxscript")

        def transform(m: Any) -> Any:
            return onnxscript.optimizer.optimize(m)
    elif tool in ("onnxoptimizer", "onnxoptimizer-bn"):
        import onnxoptimizer

        result["version"] = version("onnxoptimizer")
        passes = ["fuse_bn_into_conv"] if tool == "onnxoptimizer-bn" else None

        def transform(m: Any) -> Any:
            return onnxoptimizer.optimize(m, passes)
    elif tool == "onnxslim":
        import onnxslim

        result["version"] = version("onnxslim")

        def transform(m: Any) -> Any:
            return onnxslim.slim(m)
    elif tool == "onnxsim":
        import onnxsim

        result["version"] = version("onnxsim")

        def transform(m: Any) -> Any:
            return onnxsim.simplify(m)[0]
    else:
        raise ValueError(f"unknown tool {tool!r}")
    result["import_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = onnx.load(str(src))
    result["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = transform(model)
    result["core_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    onnx.save(out, str(dst))
    result["save_s"] = time.perf_counter() - t0


def worker(tool: str, src: Path, dst: Path, result_path: Path) -> int:
    """Run one tool on one file; write what happened to `result_path` (JSON) as it goes."""
    import traceback

    result: dict[str, Any] = {"tool": tool, "status": "error"}

    def dump() -> None:
        result_path.write_text(json.dumps(result), encoding="utf-8")

    try:
        _run_tool(tool, src, dst, result)
    except ImportError as exc:
        result.update(status="unavailable", error=f"{type(exc).__name__}: {exc}")
        dump()
        return 0
    except Exception as exc:
        tb = traceback.format_exc().strip().splitlines()
        result.update(error=f"{type(exc).__name__}: {str(exc)[:400]}", traceback=tb[-6:])
        dump()
        return 0
    import onnx

    result["status"] = "ok"
    result["file_bytes"] = dst.stat().st_size
    dump()  # before the checks: a checker that crashes the process still leaves this
    model = onnx.load(str(dst))
    result["counts"] = model_counts(model)
    result["interface"] = interface(model)
    result["opsets"] = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    del model
    dump()
    t0 = time.perf_counter()
    try:
        onnx.checker.check_model(str(dst), full_check=True)
        result["checker"] = "ok"
    except Exception as exc:
        result["checker"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    result["checker_s"] = time.perf_counter() - t0
    dump()
    return 0


# --------------------------------------------------------------------------------------------
# Parent: run the workers, score their outputs


@dataclass
class Column:
    """One tool column: a tool and, for bn-onnx, the checkout put first on PYTHONPATH."""

    label: str
    tool: str
    pythonpath: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def parse_columns(tools: str, bn_onnx: list[str]) -> list[Column]:
    names = [t.strip() for t in tools.split(",") if t.strip()]
    unknown = [t for t in names if t != "bn-onnx" and t not in PEER_TOOLS]
    if unknown:
        raise SystemExit(
            f"unknown tool {unknown[0]!r}; choose from bn-onnx, {', '.join(PEER_TOOLS)}"
        )
    cols: list[Column] = []
    for name in names:
        if name != "bn-onnx":
            cols.append(Column(name, name))
            continue
        if not bn_onnx:
            cols.append(Column("bn-onnx", "bn-onnx"))
        for spec in bn_onnx:
            label, _, path = spec.rpartition("=")
            root = Path(path).resolve()
            if not (root / "bn_onnx" / "__init__.py").is_file():
                raise SystemExit(f"--bn-onnx {spec}: {root} holds no bn_onnx package")
            cols.append(Column(f"bn-onnx[{label or root.name}]", "bn-onnx", str(root)))
    return cols


def _git_head(path: Path) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(path), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if out.returncode == 0:
            return out.stdout.strip()[:120]
    return None


def run_worker(col: Column, src: Path, dst: Path, timeout: float) -> dict[str, Any]:
    """Run `col`'s tool on `src` in a subprocess; its result dict, or a crash/timeout record."""
    env = dict(os.environ)
    if col.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(
            [col.pythonpath, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
        )
    result_path = dst.with_suffix(".result.json")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", col.tool, str(src), str(dst)]
    cmd += ["--worker-result", str(result_path)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        status = None
    except subprocess.TimeoutExpired:
        rc, tail, status = None, [], "timeout"
    wall = time.perf_counter() - t0
    result: dict[str, Any] = {}
    if result_path.exists():
        with contextlib.suppress(ValueError):
            result = json.loads(result_path.read_text(encoding="utf-8"))
        result_path.unlink()
    if status == "timeout":
        result.update(status="timeout", error=f"no result within {timeout:.0f} s")
    elif rc != 0 and result.get("status") == "ok" and "counts" in result:
        # The tool's output was written and counted; the process died in the checker.
        result.setdefault("checker", f"crashed (exit {rc})")
    elif rc != 0 or result.get("status") == "ok" and "counts" not in result:
        result.update(status="crash", error=f"worker exited with {rc}: {' | '.join(tail)[:400]}")
    result["process_s"] = wall
    result.setdefault("status", "crash")
    return result


def _ort_session(path: Path, level: str) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


_NP_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def make_feeds(sess: Any, name: str, samples: int) -> list[dict[str, np.ndarray]]:
    """`samples` seeded N(0, 1) feeds for `sess`'s inputs (symbolic dims become 1)."""
    rng = np.random.default_rng(SEED + zlib.crc32(name.encode()))
    feeds = []
    for _ in range(samples):
        feed = {}
        for i in sess.get_inputs():
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
            dtype = _NP_DTYPES.get(i.type, np.float32)
            feed[i.name] = rng.standard_normal(shape).astype(dtype)
        feeds.append(feed)
    return feeds


def compare(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> dict[str, Any]:
    """Max abs error and whether any element is beyond atol + rtol * |ref| (outputs by position)."""
    max_err, wrong, why = 0.0, False, None
    for r_outs, g_outs in zip(ref, got, strict=True):
        if len(r_outs) != len(g_outs):
            return {"max_abs_err": None, "wrong": True, "why": "number of outputs differs"}
        for r, g in zip(r_outs, g_outs, strict=True):
            r = np.asarray(r, dtype=np.float64)
            g = np.asarray(g, dtype=np.float64)
            if r.shape != g.shape:
                return {"max_abs_err": None, "wrong": True, "why": f"shape {g.shape} != {r.shape}"}
            if not np.array_equal(np.isfinite(r), np.isfinite(g)):
                wrong, why = True, "non-finite values differ"
            fin = np.isfinite(r) & np.isfinite(g)
            d = np.abs(r - g)[fin]
            if d.size:
                max_err = max(max_err, float(d.max()))
                if np.any(d > ATOL + RTOL * np.abs(r[fin])):
                    wrong, why = True, why or "beyond atol + rtol * |ref|"
    return {"max_abs_err": max_err, "wrong": wrong, "why": why}


def measure_latency(
    paths: dict[str, Path], feed: dict[str, np.ndarray], budget_s: float, max_rounds: int
) -> dict[str, Any]:
    """Interleaved latency of each model (ORT_ENABLE_ALL, 1 thread): medians, IQR, ratios."""
    from bn_onnx import bench

    names, calls = [], []
    for name, path in paths.items():
        try:
            sess = _ort_session(path, "ORT_ENABLE_ALL")
        except Exception:
            continue
        names.append(name)
        calls.append(lambda s=sess: s.run(None, feed))
    for call in calls:  # warm-up (first runs allocate)
        for _ in range(3):
            call()
    t0 = time.perf_counter()
    for call in calls:
        call()
    round_s = max(time.perf_counter() - t0, 1e-6)
    rounds = int(min(max_rounds, max(15, budget_s // round_s)))
    cpu = np.empty((len(calls), rounds))
    times = bench.time_interleaved(
        calls, rounds, order="shuffle", cpu_clock=time.thread_time, cpu_out=cpu, seed=SEED
    )
    out: dict[str, Any] = {"rounds": rounds, "models": {}}
    for k, name in enumerate(names):
        st = bench.Stats.of(times[k])
        out["models"][name] = {
            "median_ms": st.median_s * 1e3,
            "q1_ms": st.q1_s * 1e3,
            "q3_ms": st.q3_s * 1e3,
            "cpu_median_ms": float(np.median(cpu[k])) * 1e3,
            "times_ms": [round(float(t) * 1e3, 4) for t in times[k]],
            "cpu_times_ms": [round(float(t) * 1e3, 4) for t in cpu[k]],
        }
    return out


def paired_ratio(lat: dict[str, Any], a: str, b: str) -> dict[str, float] | None:
    """Median and IQR over rounds of latency(a) / latency(b), both timed in the same rounds;
    `cpu`: the median ratio of the calling thread's CPU time (steadier on a busy machine)."""
    models = lat.get("models", {})
    if a not in models or b not in models:
        return None
    r = np.asarray(models[a]["times_ms"]) / np.asarray(models[b]["times_ms"])
    c = np.asarray(models[a]["cpu_times_ms"]) / np.maximum(models[b]["cpu_times_ms"], 1e-9)
    q1, med, q3 = np.percentile(r, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "cpu": float(np.median(c))}


def score_file(
    entry: dict[str, Any],
    corpus: Path,
    cols: list[Column],
    work: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Run every column on one corpus file and score the outputs."""
    import onnx

    src = corpus / entry["file"]
    orig = onnx.load(str(src), load_external_data=False)
    row: dict[str, Any] = {
        "file": entry["file"],
        "name": entry.get("name"),
        "exporter": entry.get("exporter"),
        "source": entry.get("source"),
        "original": {**model_counts(orig), "file_bytes": src.stat().st_size},
        "tools": {},
    }
    orig_iface = interface(orig)
    del orig
    ref_sess = _ort_session(src, "ORT_DISABLE_ALL")
    feeds = make_feeds(ref_sess, entry["file"], args.samples)
    ref = [ref_sess.run(None, f) for f in feeds]
    del ref_sess
    outputs: dict[str, Path] = {"original": src}
    for col in cols:
        dst = work / f"{col.label}.onnx"
        res = run_worker(col, src, dst, args.timeout)
        if res["status"] == "ok":
            res["interface_kept"] = res.get("interface") == orig_iface
            if not res["interface_kept"]:
                res["interface_diff"] = {"original": orig_iface, "output": res.get("interface")}
            try:
                sess = _ort_session(dst, "ORT_DISABLE_ALL")
                got = [sess.run(None, f) for f in feeds]
                del sess
                res.update(compare(ref, got))
                outputs[col.label] = dst
            except Exception as exc:
                # Not a wrong result but an unusable file: counted with the crashes.
                res.update(
                    status="ort-failed", why=f"onnxruntime: {type(exc).__name__}: {exc}"[:400]
                )
        res.pop("interface", None)
        row["tools"][col.label] = res
    if not args.no_latency:
        lat = measure_latency(outputs, feeds[0], args.latency_budget, args.max_rounds)
        row["latency"] = lat
        for label in row["tools"]:
            r = paired_ratio(lat, label, "original")
            if r:
                row["tools"][label]["latency_ratio"] = r
    for label in list(outputs):
        if label != "original":
            with contextlib.suppress(OSError):
                outputs[label].unlink()
    return row


# --------------------------------------------------------------------------------------------
# Summaries


def bn_left(row: dict[str, Any], label: str) -> int:
    """BN left by a tool; the original's when it gave no usable output."""
    res = row["tools"][label]
    if res.get("status") == "ok" and "counts" in res:
        return int(res["counts"]["bn"])
    return int(row["original"]["bn"])


def scales_left(row: dict[str, Any], label: str) -> int:
    """Constant scales after a linear node left by a tool (the original's without an output)."""
    res = row["tools"][label]
    if res.get("status") == "ok" and "counts" in res:
        return int(res["counts"].get("scale_after_linear", 0))
    return int(row["original"].get("scale_after_linear", 0))


def _geomean(values: list[float]) -> float | None:
    return math.exp(sum(math.log(x) for x in values) / len(values)) if values else None


def totals(rows: list[dict[str, Any]], labels: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for label in labels:
        rs = [r for r in rows if label in r["tools"]]
        st = [r["tools"][label].get("status") for r in rs]
        ratios = [r["tools"][label].get("latency_ratio") for r in rs]
        ratios = [x for x in ratios if x]
        with_bn = [r for r in rs if r["original"]["bn"] or r["original"]["scale_after_linear"]]
        out[label] = {
            "files": len(rs),
            "files_with_bn": len(with_bn),
            "unavailable": sum(s == "unavailable" for s in st),
            "fully_folded": sum(
                bn_left(r, label) == 0
                and scales_left(r, label) == 0
                and r["tools"][label].get("status") == "ok"
                and not r["tools"][label].get("wrong")
                for r in with_bn
            ),
            "bn_left": sum(bn_left(r, label) for r in rs),
            "scales_left": sum(scales_left(r, label) for r in rs),
            "wrong": sum(
                r["tools"][label].get("status") == "ok" and bool(r["tools"][label].get("wrong"))
                for r in rs
            ),
            "crashes": sum(s in ("crash", "timeout", "error", "ort-failed") for s in st),
            "interface_changed": sum(r["tools"][label].get("interface_kept") is False for r in rs),
            "checker_failed": sum(r["tools"][label].get("checker", "ok") != "ok" for r in rs),
            "core_s": sum(r["tools"][label].get("core_s") or 0.0 for r in rs),
            "nodes": sum(
                r["tools"][label]["counts"]["nodes"] for r in rs if r["tools"][label].get("counts")
            ),
            "latency_ratio_geomean": _geomean([x["median"] for x in ratios]),
            "cpu_ratio_geomean": _geomean([x["cpu"] for x in ratios if "cpu" in x]),
        }
    return out


def _cell(row: dict[str, Any], label: str) -> str:
    res = row["tools"].get(label)
    if res is None:
        return "-"
    status = res.get("status")
    if status == "unavailable":
        return "n/a"
    if status != "ok":
        return status or "?"
    c = res["counts"]
    scales = f" +{c['scale_after_linear']}s" if c.get("scale_after_linear") else ""
    text = f"{c['bn']}{scales} / {c['nodes']}"
    marks = []
    if res.get("wrong"):
        marks.append("**WRONG**")
    if res.get("interface_kept") is False:
        marks.append("iface")
    if res.get("checker") != "ok":
        marks.append("chk")
    if res["counts"].get("custom"):
        marks.append("ms")
    return text + (" " + " ".join(marks) if marks else "")


def markdown(result: dict[str, Any]) -> str:
    rows, labels = result["rows"], result["labels"]
    tot = result["totals"]
    m = result["machine"]
    lines = [
        "# Batch-norm folding: bn-onnx beside the peer tools",
        "",
        f"{len(rows)} files of the architecture corpus (tools/make_arch_corpus.py: batch 1, "
        "opset 18, random weights and BN statistics, ~5% negative BN scales), "
        f"scored by tools/score_fold_tools.py on {m.get('cpu', '?')}, "
        f"load average {m.get('loadavg_start', '?')} at the start, "
        f"{m.get('loadavg_end', '?')} at the end; {result['elapsed_s']:.0f} s in all.",
        "",
        "Versions: "
        + ", ".join(f"{c['label']} {c.get('version') or ''}".strip() for c in result["columns"]),
        "",
        "## Totals",
        "",
        "| tool | fully folded | BN left | scales left | wrong | crash/error | interface changed "
        "| checker failed | nodes | core time s | latency vs original: CPU time (wall) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label in labels:
        t = tot[label]
        if t["unavailable"] == t["files"]:
            lines.append(f"| {label} | not installed | | | | | | | | | |")
            continue
        g, c = t["latency_ratio_geomean"], t.get("cpu_ratio_geomean")
        lat = "-" if g is None else f"{c:.3f}x ({g:.3f}x)" if c is not None else f"({g:.3f}x)"
        lines.append(
            f"| {label} | {t['fully_folded']} / {t['files_with_bn']} | {t['bn_left']} "
            f"| {t['scales_left']} | {t['wrong']} "
            f"| {t['crashes']} | {t['interface_changed']} | {t['checker_failed']} | {t['nodes']} "
            f"| {t['core_s']:.1f} | {lat} |"
        )
    orig_bn = sum(r["original"]["bn"] for r in rows)
    orig_scales = sum(r["original"]["scale_after_linear"] for r in rows)
    lines += [
        "",
        f"The originals hold {orig_bn} BatchNormalization nodes, {orig_scales} constant scales "
        f"right after a Conv/Gemm/MatMul (FrozenBatchNorm2d) and "
        f"{sum(r['original']['nodes'] for r in rows)} nodes. Fully folded: no BN and no such "
        "scale left, outputs right, out of the files that have either. A tool that failed "
        "counts as leaving the original's.",
        "",
        "## BN left / nodes after, per file",
        "",
        "Cells: BN left / nodes; +Ns: N constant scales (Mul/Div) right after a linear node, "
        "FrozenBatchNorm2d left unfolded. **WRONG**: an output beyond atol 1e-4 + rtol 1e-3 of the "
        "original (both in onnxruntime, optimizations off); iface: input or output names, dtypes "
        "or shapes changed; chk: `onnx.checker.check_model(full_check=True)` failed; ms: "
        "com.microsoft nodes in the output.",
        "",
        "| file | original | " + " | ".join(labels) + " |",
        "| --- | --- | " + " | ".join("---" for _ in labels) + " |",
    ]
    for r in rows:
        o = r["original"]
        cells = " | ".join(_cell(r, label) for label in labels)
        sc = f" +{o['scale_after_linear']}s" if o.get("scale_after_linear") else ""
        lines.append(
            f"| {r['file'].removesuffix('.onnx')} | {o['bn']}{sc} / {o['nodes']} | {cells} |"
        )
    if any("latency" in r for r in rows):
        lines += [
            "",
            "## onnxruntime latency",
            "",
            "The original's median wall time (ms; CPU execution provider, one intra-op thread, "
            "ORT_ENABLE_ALL), and for each output the median over interleaved rounds of its "
            "per-round ratio to the original, by the calling thread's CPU time: on a shared "
            "machine that is much steadier than wall time, and with one intra-op thread it is "
            "all the work (wall-time ratios are in the JSON). Geometric means in the totals.",
            "",
            "| file | original ms | " + " | ".join(labels) + " |",
            "| --- | ---: | " + " | ".join("---:" for _ in labels) + " |",
        ]
        for r in rows:
            lat = r.get("latency", {}).get("models", {})
            if "original" not in lat:
                continue
            cells = []
            for label in labels:
                ratio = r["tools"][label].get("latency_ratio")
                cells.append(f"{ratio.get('cpu', ratio['median']):.3f}" if ratio else "-")
            lines.append(
                f"| {r['file'].removesuffix('.onnx')} | {lat['original']['median_ms']:.3f} | "
                + " | ".join(cells)
                + " |"
            )
    versus = result.get("versus_onnxscript")
    if versus:
        lines += [
            "",
            "## bn-onnx against onnxscript's optimizer, dynamo exports",
            "",
            "Nodes after each, and the latency ratio bn-onnx / onnxscript (median over rounds "
            "of the per-round ratio of wall times, IQR in brackets; and of the calling thread's "
            "CPU times).",
            "",
        ]
        for label in sorted({v["label"] for v in versus}):
            vs = [v for v in versus if v["label"] == label]
            fewer = sum(v["nodes"] <= v["onnxscript_nodes"] for v in vs)
            fast = sum(bool(v["latency_ratio"]) and v["latency_ratio"]["cpu"] <= 1.02 for v in vs)
            lines.append(
                f"{label}: no more nodes than onnxscript on {fewer} of {len(vs)} dynamo files; "
                f"latency (CPU time) at most 1.02x onnxscript's on {fast} of {len(vs)}."
            )
        lines.append("")
        lines += [
            "| file | tool | nodes | onnxscript nodes | latency ratio | CPU-time ratio |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for v in versus:
            lr = v["latency_ratio"]
            lat = f"{lr['median']:.3f} [{lr['q1']:.3f}-{lr['q3']:.3f}]" if lr else "-"
            cpu = f"{lr['cpu']:.3f}" if lr else "-"
            lines.append(
                f"| {v['file'].removesuffix('.onnx')} | {v['label']} | {v['nodes']} "
                f"| {v['onnxscript_nodes']} | {lat} | {cpu} |"
            )
    unavailable = [c for c in result["columns"] if c.get("unavailable")]
    if unavailable:
        lines += [
            "",
            "Not scored: " + "; ".join(f"{c['label']} ({c['unavailable']})" for c in unavailable),
        ]
    return "\n".join(lines) + "\n"


def versus_onnxscript(rows: list[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r.get("exporter") != "dynamo" or "onnxscript" not in r["tools"]:
            continue
        os_res = r["tools"]["onnxscript"]
        if os_res.get("status") != "ok":
            continue
        for label in labels:
            res = r["tools"][label]
            if not label.startswith("bn-onnx") or res.get("status") != "ok":
                continue
            out.append(
                {
                    "file": r["file"],
                    "label": label,
                    "nodes": res["counts"]["nodes"],
                    "onnxscript_nodes": os_res["counts"]["nodes"],
                    "latency_ratio": paired_ratio(r.get("latency", {}), label, "onnxscript"),
                }
            )
    return out


def _loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    return "?"


def _cpu() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    return f"{os.cpu_count()} cores"


def select_files(manifest: dict[str, Any], only: str | None, exporters: str | None) -> list[dict]:
    files = [e for e in manifest.get("files", []) if e.get("status") in ("ok", "kept")]
    if only:
        pats = [p.strip() for p in only.split(",") if p.strip()]
        files = [
            e
            for e in files
            if any(
                fnmatch.fnmatchcase(k, p)
                for p in pats
                for k in (e["file"], e.get("name", ""), e.get("source", ""), *e.get("tags", []))
            )
        ]
    if exporters:
        keep = {x.strip() for x in exporters.split(",")}
        files = [e for e in files if e.get("exporter") in keep]
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", nargs="?", type=Path, help="folder with manifest.json")
    p.add_argument("--tools", default="bn-onnx," + ",".join(PEER_TOOLS))
    p.add_argument(
        "--bn-onnx",
        action="append",
        default=[],
        metavar="[LABEL=]PATH",
        help="a bn-onnx checkout to score (repeatable); PATH goes first on PYTHONPATH",
    )
    p.add_argument("--only", help="comma-separated file/net names, patterns or tags")
    p.add_argument("--exporters", help="dynamo,torchscript (default both)")
    p.add_argument("--samples", type=int, default=2, help="random inputs per file")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per tool run")
    p.add_argument("--latency-budget", type=float, default=3.0, help="seconds of timing per file")
    p.add_argument("--max-rounds", type=int, default=200)
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "fold_tools", help="JSON/MD path stem")
    p.add_argument(
        "--from-json", type=Path, help="re-render the totals and STEM.md from a STEM.json"
    )
    p.add_argument("--worker", nargs=3, metavar=("TOOL", "IN", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--worker-result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        tool, src, dst = args.worker
        return worker(tool, Path(src), Path(dst), args.worker_result)
    if args.from_json:
        result = json.loads(args.from_json.read_text(encoding="utf-8"))
        result["totals"] = totals(result["rows"], result["labels"])
        result["versus_onnxscript"] = versus_onnxscript(result["rows"], result["labels"])
        stem = args.from_json.with_suffix("")
        stem.with_name(stem.name + ".json").write_text(json.dumps(result, indent=1) + "\n")
        stem.with_name(stem.name + ".md").write_text(markdown(result), encoding="utf-8")
        log(f"wrote {stem}.json and {stem}.md")
        return 0
    if args.corpus is None:
        p.error("the corpus folder is required")
    manifest = json.loads((args.corpus / "manifest.json").read_text(encoding="utf-8"))
    files = select_files(manifest, args.only, args.exporters)
    if not files:
        p.error("no corpus file matches")
    cols = parse_columns(args.tools, args.bn_onnx)
    labels = [c.label for c in cols]
    for c in cols:
        if c.pythonpath:
            c.info["git"] = _git_head(Path(c.pythonpath))
    start = time.perf_counter()
    machine = {"cpu": _cpu(), "loadavg_start": _loadavg()}
    rows: list[dict[str, Any]] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="score_fold_tools.") as tmp:
        work = Path(tmp)
        for i, entry in enumerate(files, 1):
            t0 = time.perf_counter()
            row = score_file(entry, args.corpus, cols, work, args)
            rows.append(row)
            parts = []
            for label in labels:
                res = row["tools"][label]
                if res.get("status") == "ok":
                    w = " WRONG" if res.get("wrong") else ""
                    parts.append(f"{label} {res['counts']['bn']}/{res['counts']['nodes']}{w}")
                else:
                    parts.append(f"{label} {res.get('status')}")
            log(
                f"[{i}/{len(files)}] {entry['file']} ({row['original']['bn']} BN): "
                + ", ".join(parts)
                + f" ({time.perf_counter() - t0:.0f} s)"
            )
            _write(args.out, rows, cols, labels, machine, start, manifest, partial=True)
    machine["loadavg_end"] = _loadavg()
    result = _write(args.out, rows, cols, labels, machine, start, manifest, partial=False)
    for label in labels:
        t = result["totals"][label]
        log(
            f"{label}: {t['fully_folded']}/{t['files_with_bn']} fully folded, "
            f"{t['bn_left']} BN + {t['scales_left']} scales left, "
            f"{t['wrong']} wrong, {t['crashes']} crashes, core {t['core_s']:.1f} s"
        )
    log(f"wrote {args.out}.json and {args.out}.md ({time.perf_counter() - start:.0f} s)")
    return 0


def _write(
    out: Path,
    rows: list[dict[str, Any]],
    cols: list[Column],
    labels: list[str],
    machine: dict[str, Any],
    start: float,
    manifest: dict[str, Any],
    *,
    partial: bool,
) -> dict[str, Any]:
    columns = []
    for c in cols:
        info: dict[str, Any] = {"label": c.label, "tool": c.tool, "pythonpath": c.pythonpath}
        info.update(c.info)
        for r in rows:
            res = r["tools"].get(c.label, {})
            if res.get("version") and "version" not in info:
                info["version"] = res["version"]
            if res.get("module") and "module" not in info:
                info["module"] = res["module"]
        if rows and all(r["tools"][c.label].get("status") == "unavailable" for r in rows):
            info["unavailable"] = rows[0]["tools"][c.label].get("error")
        columns.append(info)
    result = {
        "schema": "bn-onnx-fold-tools",
        "schema_version": 1,
        "partial": partial,
        "machine": machine,
        "settings": {"atol": ATOL, "rtol": RTOL, "seed": SEED},
        "corpus_versions": manifest.get("versions"),
        "elapsed_s": time.perf_counter() - start,
        "columns": columns,
        "labels": labels,
        "totals": totals(rows, labels),
        "versus_onnxscript": versus_onnxscript(rows, labels),
        "rows": rows,
    }
    tmp = out.with_name(out.name + ".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out.with_name(out.name + ".json"))
    md = out.with_name(out.name + ".md.tmp")
    md.write_text(markdown(result), encoding="utf-8")
    os.replace(md, out.with_name(out.name + ".md"))
    return result


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
