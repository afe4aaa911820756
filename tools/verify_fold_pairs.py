"""Verify (original, folded) pairs with bn-onnx verify, and folded copies with one weight changed.

Two sources of pairs:

- **the fold tests** (default): they build many tiny models (Conv, ConvTranspose, Gemm, MatMul,
  BN chains, float16, bfloat16, subgraphs, functions ...) and fold them with
  `bn_onnx.fold.fold_model`. The tests run with `fold_model` wrapped to keep each pair; for each
  distinct pair, verify must pass, and the folded model with one weight changed by +0.5 (the
  first float initializer of rank >= 2 that a node reads, subgraphs included) must fail, with
  `--locate` naming a node that reads the changed weight. A pair verify refuses (a model
  onnxruntime and onnx.reference cannot run, an invalid test model) is counted as refused.
- **a folder of models** (`--dir`, e.g. the architecture corpus of `tools/make_arch_corpus.py`):
  each model is folded by `bn-onnx fold` and checked by `bn-onnx verify`, each step a process
  of its own with a time limit (`--timeout`), so that a crash or a hang is recorded, not fatal:
  1. `bn-onnx verify ORIGINAL FOLDED --report R.json` must exit 0, with a float64 reference
     row (the report says whether onnxruntime or onnx.reference ran it);
  2. *rewritten weight*: one element of the weight of a node the fold rewrote (the first
     `target` in the fold report) changed by +0.5: verify must exit 1, and `--locate` must
     name a node that reads that weight, the node itself or one that reads its output;
  3. *constant input*: `--input` data whose first input channel (axis 1; an MLP's first
     column) is 0 in every row, and one element of the first Conv, ConvTranspose, Gemm or
     MatMul reading the graph input changed by +0.5 on input channel 0 only. The data probe
     cannot see the change; verify must still exit 1 through its random probe, and `--locate`
     must name the node. Models whose input feeds no such node are marked n/a.
  Progress goes to stderr; a table per model and totals to stdout; `--json` keeps everything.

Usage:

    python tools/verify_fold_pairs.py [--tests 'tests/test_fold_*.py'] [--json OUT.json]
    python tools/verify_fold_pairs.py --dir /work/corpus [--only 'tv_*,*.dynamo'] \
        [--json OUT.json] [--timeout 900] [--work DIR]
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]


def collect(test_files: list[str]) -> list[tuple[str, onnx.ModelProto, onnx.ModelProto]]:
    """(test id, original, folded) for every fold_model call the tests make."""
    import onnx_ir
    import pytest

    import bn_onnx.fold

    pairs: list[tuple[str, onnx.ModelProto, onnx.ModelProto]] = []
    real = bn_onnx.fold.fold_model
    current = {"test": "?"}

    def copy(model: Any) -> onnx.ModelProto:  # fold_model takes an onnx-ir Model too
        if not isinstance(model, onnx.ModelProto):
            return onnx_ir.serde.serialize_model(model)
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        return proto

    def recording(model: Any, **kwargs):  # noqa: ANN202
        original = copy(model)
        result = real(model, **kwargs)
        pairs.append((current["test"], original, copy(result.model)))
        return result

    class Plugin:
        def pytest_configure(self, config):  # noqa: ANN001, ANN201
            bn_onnx.fold.fold_model = recording

        def pytest_runtest_setup(self, item):  # noqa: ANN001, ANN201
            current["test"] = item.nodeid

    sys.path.insert(0, str(ROOT / "tests"))
    pytest.main(
        ["-q", "-p", "no:cacheprovider", "-x", "--no-header", *test_files], plugins=[Plugin()]
    )
    bn_onnx.fold.fold_model = real
    return pairs


def _weights(model: onnx.ModelProto) -> list[str]:
    used: list[str] = []

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            used.extend(node.input)
            for a in node.attribute:
                for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                    walk(g)

    walk(model.graph)
    for f in model.functions:
        for node in f.node:
            used.extend(node.input)
    floats = (1, 10, 11, 16)
    return [
        t.name
        for t in model.graph.initializer
        if t.data_type in floats and len(t.dims) >= 2 and t.name in set(used)
    ]


def tampered(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str] | None:
    """A copy with one element of the first weight changed by +0.5 (None: no weight)."""
    names = _weights(model)
    if not names:
        return None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name == names[0]:
            a = numpy_helper.to_array(t).copy()
            a.flat[a.size // 2] = a.flat[a.size // 2] + a.dtype.type(0.5)
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    return out, names[0]


def main_tests(args: argparse.Namespace) -> int:
    """The fold-tests mode: verify every pair the fold tests make, and a tampered copy."""
    from bn_onnx.errors import BnOnnxError
    from bn_onnx.verify import verify

    files = sorted(glob.glob(str(ROOT / args.tests)))
    pairs = collect(files)
    seen: set[str] = set()
    results = []
    tally: Counter[str] = Counter()
    times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (test, original, folded) in enumerate(pairs):
            key = hashlib.sha256(
                original.SerializeToString() + folded.SerializeToString()
            ).hexdigest()
            if key in seen:
                continue
            seen.add(key)
            o, f = Path(tmp) / f"{i}.onnx", Path(tmp) / f"{i}.folded.onnx"
            onnx.save(original, o)
            onnx.save(folded, f)
            row: dict = {"test": test}
            t0 = time.perf_counter()
            try:
                report = verify([o, f], rows=args.rows or 64)
                row["pair"] = "pass" if report else "FAIL"
                row["reference"] = report.reference
            except BnOnnxError as exc:
                row["pair"] = "refused"
                row["reason"] = str(exc)
            times.append(time.perf_counter() - t0)
            if row["pair"] == "pass":
                bad = tampered(folded)
                if bad is None:
                    row["tampered"] = "no weight"
                else:
                    onnx.save(bad[0], Path(tmp) / "bad.onnx")
                    report = verify([o, Path(tmp) / "bad.onnx"], rows=args.rows or 64, locate=True)
                    located = bool(report.locations) and any(
                        bad[1] in loc.reads for loc in report.locations
                    )
                    row["tampered"] = (
                        "pass (NOT caught)"
                        if report
                        else ("caught, located" if located else "caught, not located")
                    )
                    row["weight"] = bad[1]
                    tally[f"tampered {row['tampered']}"] += 1
            tally[f"pair {row['pair']}"] += 1
            results.append(row)
    print(f"\n{len(pairs)} fold_model calls, {len(results)} distinct pairs")
    for k, v in sorted(tally.items()):
        print(f"  {k}: {v}")
    for r in results:
        if r["pair"] != "pass" or r.get("tampered", "caught, located") != "caught, located":
            print(f"  {r['pair']:8} {r.get('tampered', '-'):22} {r['test']}: {r.get('reason', '')}")
    if times:
        t = np.array(times)
        print(
            f"verify per pair: median {np.median(t):.3f} s (min {t.min():.3f}, max {t.max():.3f})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["pair"] != "FAIL" for r in results) else 1


# ---------------------------------------------------------------------------------------------
# A folder of models (--dir)

DELTA = 0.5  # added to the one weight element that is changed
F64 = "float64 reference"
LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def count_bn(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes in the graph, its subgraphs and its functions."""

    def walk(nodes: Iterable[onnx.NodeProto]) -> int:
        n = 0
        for node in nodes:
            n += node.op_type == "BatchNormalization"
            for a in node.attribute:
                for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                    n += walk(g.node)
        return n

    return walk(model.graph.node) + sum(walk(f.node) for f in model.functions)


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _weight_of(model: onnx.ModelProto, node: onnx.NodeProto) -> str | None:
    """The float initializer of rank >= 2 that a linear node reads (its weight), if any."""
    init = _initializers(model)
    for name in node.input:
        t = init.get(name)
        if t is not None and t.data_type in (1, 10, 11, 16) and len(t.dims) >= 2:
            return name
    return None


def change_weight(
    model: onnx.ModelProto, weight: str, index: tuple[int, ...] | None = None
) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """A copy of `model` with one element of initializer `weight` changed by +DELTA.

    `index` picks the element (default: the middle one of the flattened tensor). Returns the
    copy and the index changed. An initializer shared with another node changes for it too.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name == weight:
            a = numpy_helper.to_array(t).copy()
            if index is None:
                index = tuple(int(i) for i in np.unravel_index(a.size // 2, a.shape))
            a[index] = a[index] + a.dtype.type(DELTA)
            t.CopyFrom(numpy_helper.from_array(a, t.name))
            return out, index
    raise KeyError(weight)


def rewritten_target(
    model: onnx.ModelProto, fold_report: dict[str, Any]
) -> tuple[onnx.NodeProto, str, str] | None:
    """(node, weight, why) of the first node the fold rewrote that reads a weight.

    Falls back to the first Conv/ConvTranspose/Gemm/MatMul with a weight where the fold rewrote
    none (nothing folded, or its targets were renamed by cleanup).
    """
    by_name = {n.name: n for n in model.graph.node if n.name}
    for entry in fold_report.get("bn", []):
        node = by_name.get(entry.get("target") or "")
        if entry.get("status") == "folded" and node is not None:
            weight = _weight_of(model, node)
            if weight is not None:
                return node, weight, f"{entry.get('direction')} fold of {entry.get('node')}"
    for node in model.graph.node:
        if node.op_type in LINEAR:
            weight = _weight_of(model, node)
            if weight is not None:
                return node, weight, "no rewritten node found: the first linear node"
    return None


def input_target(model: onnx.ModelProto) -> tuple[onnx.NodeProto, str, tuple[int, ...]] | None:
    """(node, weight, element index) of the weight on input channel 0 of the first linear node
    that reads the (single float) graph input: Conv w[M/2, 0, centre], ConvTranspose
    w[0, M/2, centre], Gemm B[0, N/2] (B[N/2, 0] with transB), MatMul B[0, N/2]."""
    init = _initializers(model)
    inputs = [i for i in model.graph.input if i.name not in init]
    if len(inputs) != 1 or inputs[0].type.tensor_type.elem_type not in (1, 10, 11, 16):
        return None
    x = inputs[0].name
    for node in model.graph.node:
        if node.op_type not in LINEAR or not node.input or node.input[0] != x:
            continue
        weight = node.input[1] if len(node.input) > 1 else ""
        if weight not in init or len(init[weight].dims) < 2:
            return None
        dims = list(init[weight].dims)
        centre = [d // 2 for d in dims[2:]]
        if node.op_type == "Conv":
            index = (dims[0] // 2, 0, *centre)
        elif node.op_type == "ConvTranspose":
            index = (0, dims[1] // 2, *centre)
        elif node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            index = (dims[0] // 2, 0)
        elif len(dims) == 2:
            index = (0, dims[1] // 2)
        else:
            return None
        return node, weight, index
    return None


def constant_channel_data(model: onnx.ModelProto, rows: int = 4, seed: int = 0) -> dict:
    """`--input` arrays for the single graph input: N(0, 1), input channel 0 (axis 1) all 0.

    A fixed first dim is kept (the probe then runs `rows` runs of it); a symbolic one gets
    `rows`; other symbolic dims 16.
    """
    init = _initializers(model)
    (vi,) = [i for i in model.graph.input if i.name not in init]
    dims = [
        d.dim_value if d.HasField("dim_value") else (rows if i == 0 else 16)
        for i, d in enumerate(vi.type.tensor_type.shape.dim)
    ]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    rng = np.random.default_rng(seed)
    batch = dims[0]
    total = max(rows, batch)
    x = rng.standard_normal((total, *dims[1:]))
    x[:, 0] = 0.0
    return {vi.name: x.astype(dtype)}


def _consumers(model: onnx.ModelProto, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    outs = {o for o in node.output if o}
    return [n for n in model.graph.node if outs & set(n.input)]


def _label_names(label: str | None, node: onnx.NodeProto) -> bool:
    """Whether a report's node label (`name (Op)` or `Op -> outputs`) is this node."""
    if not label:
        return False
    if node.name and label.startswith(f"{node.name} ("):
        return True
    return label.startswith(f"{node.op_type} -> ") and any(
        o and o in label.split(" -> ", 1)[1].split(", ") for o in node.output
    )


def located(
    report: dict[str, Any],
    run_label: str,
    model: onnx.ModelProto,
    node: onnx.NodeProto,
    weight: str,
) -> tuple[str, str]:
    """(verdict, what --locate named) for a changed `weight` read by `node`.

    Verdicts: `reads weight` (a located node reads it), `the node` (the first divergence is
    computed by `node`), `next node` (by a node that reads its output), `NO` otherwise.
    """
    locs = [x for x in report.get("locations", []) if x.get("actual") == run_label]
    if not locs:
        return "NO", "no location"
    loc = locs[0]
    named = loc.get("node") or "-"
    weighted = (loc.get("weighted") or {}).get("node")
    if weight in loc.get("reads", []):
        return "reads weight", named
    labels = [named, weighted]
    if any(_label_names(lab, node) for lab in labels):
        return "the node", named
    if any(_label_names(lab, c) for lab in labels for c in _consumers(model, node)):
        return "next node", named
    return "NO", f"{named}{'; ' + loc['note'] if loc.get('note') else ''}"


def run_step(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run one bn-onnx command in a process of its own: exit code, seconds, output tail."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bn_onnx", *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"rc": "timeout", "s": round(time.perf_counter() - t0, 2), "tail": ""}
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    return {"rc": proc.returncode, "s": round(time.perf_counter() - t0, 2), "tail": tail}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def reference_row(report: dict[str, Any]) -> dict[str, Any]:
    """The float64 reference: engine, and the errors of every counted run against it."""
    ref = next((r for r in report.get("runs", []) if r["label"] == F64), None)
    engine = None
    if ref is not None:
        engine = "onnx.reference" if "(onnx.reference)" in ref["detail"] else "onnxruntime"
    errors = []
    for pair in report.get("pairs", []):
        if pair["expected"] != F64 or not pair["counted"]:
            continue
        for o in pair["outputs"]:
            errors.append(
                {
                    "probe": pair["probe"],
                    "run": pair["actual"],
                    "output": o["name"],
                    "passed": o["passed"],
                    "max_abs": o["max_abs"],
                    "max_rel": o["max_rel"],
                    "bad": f"{o['n_mismatched']}/{o['n_total']}",
                    "worst_expected": o.get("worst_expected"),
                    "atol": o["atol"],
                    "rtol": o["rtol"],
                }
            )
    return {"engine": engine, "line": report.get("float64_reference"), "errors": errors}


def _max_abs(errors: list[dict[str, Any]], run: str) -> float | None:
    values = [e["max_abs"] for e in errors if e["run"] == run]
    values = [v for v in values if isinstance(v, (int, float))]
    return max(values) if values else None


def check_model(path: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Fold one model, verify the pair, then the two tampered copies (see the module doc)."""
    stem = path.name.removesuffix(".onnx")
    row: dict[str, Any] = {"model": stem}
    t_all = time.perf_counter()
    folded = work / f"{stem}.folded.onnx"
    fold_json = work / f"{stem}.fold.json"
    extra = ["--rows", str(args.rows)] if args.rows else []
    step = run_step(
        ["fold", str(path), "-o", str(folded), "--report", str(fold_json), "-q"], args.timeout
    )
    row["fold"] = step
    original = onnx.load(path)
    row["bn_before"] = count_bn(original)
    if step["rc"] != 0 or not folded.exists():
        row["status"] = "fold failed"
        row["wall_s"] = round(time.perf_counter() - t_all, 2)
        return row
    fold_report = _read_json(fold_json)
    folded_model = onnx.load(folded)
    row["bn_after"] = count_bn(folded_model)
    row["folded_sites"] = fold_report.get("n_folded")

    # 1. the pair
    vjson = work / f"{stem}.verify.json"
    step = run_step(
        ["verify", str(path), str(folded), "--report", str(vjson), "-q", *extra], args.timeout
    )
    row["verify"] = step
    report = _read_json(vjson)
    ref = reference_row(report)
    row["reference"] = ref
    row["max_abs_folded"] = _max_abs(ref["errors"], f"{folded.name} [cpu]")
    row["max_abs_unfolded"] = _max_abs(ref["errors"], f"{path.name} [cpu]")

    # 2. a weight of a node the fold rewrote
    target = rewritten_target(folded_model, fold_report)
    if target is None:
        row["rewritten"] = {"status": "n/a: no weight"}
    else:
        node, weight, why = target
        bad, index = change_weight(folded_model, weight)
        bad_path = work / f"{stem}.rewritten.onnx"
        onnx.save(bad, bad_path)
        tjson = work / f"{stem}.rewritten.json"
        step = run_step(
            ["verify", str(path), str(bad_path), "--locate", "--report", str(tjson), "-q", *extra],
            args.timeout,
        )
        treport = _read_json(tjson)
        verdict, named = located(treport, f"{bad_path.name} [cpu]", bad, node, weight)
        row["rewritten"] = {
            **step,
            "node": node.name,
            "op": node.op_type,
            "why": why,
            "weight": weight,
            "index": list(index),
            "located": verdict,
            "located_node": named,
        }
        bad_path.unlink()

    # 3. a weight on an input channel that is constant in the given data
    target_in = input_target(folded_model)
    if target_in is None:
        row["constant_input"] = {"status": "n/a: no linear node reads the input"}
    else:
        node, weight, index = target_in
        bad, _ = change_weight(folded_model, weight, index)
        bad_path = work / f"{stem}.channel0.onnx"
        onnx.save(bad, bad_path)
        data = work / f"{stem}.channel0.npz"
        np.savez(data, **constant_channel_data(folded_model))
        cjson = work / f"{stem}.channel0.json"
        step = run_step(
            [
                "verify",
                str(path),
                str(bad_path),
                "--input",
                str(data),
                "--locate",
                "--report",
                str(cjson),
                "-q",
                *extra,
            ],
            args.timeout,
        )
        creport = _read_json(cjson)
        label = f"{bad_path.name} [cpu]"
        by_probe = {
            p["probe"]: p["passed"]
            for p in creport.get("pairs", [])
            if p["actual"] == label and p["expected"] == F64
        }
        verdict, named = located(creport, label, bad, node, weight)
        row["constant_input"] = {
            **step,
            "node": node.name,
            "op": node.op_type,
            "weight": weight,
            "index": list(index),
            "data_probe_passed": by_probe.get("data"),
            "random_probe_passed": by_probe.get("random"),
            "located": verdict,
            "located_node": named,
        }
        bad_path.unlink()
    row["wall_s"] = round(time.perf_counter() - t_all, 2)
    row["status"] = "ok"
    return row


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2g}"
    return str(v)


def _tamper_cell(t: dict[str, Any] | None) -> str:
    if not t:
        return "-"
    if "rc" not in t:
        return t.get("status", "-")
    cell = f"rc {t['rc']}, {t['located']}"
    if "data_probe_passed" in t:
        data = {True: "data ok", False: "data FAILS", None: "no data row"}[t["data_probe_passed"]]
        cell += f", {data}"
    return cell


def summary(rows: list[dict[str, Any]]) -> str:
    """The per-model table and the totals, as Markdown."""
    head = [
        "model",
        "BN",
        "verify",
        "reference",
        "max abs folded (unfolded)",
        "rewritten weight",
        "constant-input weight",
        "fold s",
        "verify s",
        "wall s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        v = r.get("verify", {})
        ref = r.get("reference", {})
        has_row = any(True for _ in ref.get("errors", []))
        verify_s = sum(
            x.get("s", 0) for x in (v, r.get("rewritten", {}), r.get("constant_input", {}))
        )
        lines.append(
            "| "
            + " | ".join(
                [
                    r["model"],
                    f"{r.get('bn_before', '-')} -> {r.get('bn_after', '-')}",
                    f"rc {v.get('rc', '-')}" if v else r.get("status", "-"),
                    (ref.get("engine") or "NONE") + ("" if has_row else " (no row)"),
                    f"{_fmt(r.get('max_abs_folded'))} ({_fmt(r.get('max_abs_unfolded'))})",
                    _tamper_cell(r.get("rewritten")),
                    _tamper_cell(r.get("constant_input")),
                    _fmt(r.get("fold", {}).get("s")),
                    f"{verify_s:.1f}",
                    _fmt(r.get("wall_s")),
                ]
            )
            + " |"
        )
    n = len(rows)
    ok = [r for r in rows if r.get("verify", {}).get("rc") == 0]
    with_row = [r for r in rows if r.get("reference", {}).get("errors")]
    engines = Counter(r.get("reference", {}).get("engine") or "none" for r in rows)
    rw = [r["rewritten"] for r in rows if "rc" in r.get("rewritten", {})]
    ci = [r["constant_input"] for r in rows if "rc" in r.get("constant_input", {})]
    vt = [r["verify"]["s"] for r in rows if "verify" in r]
    lines += [
        "",
        f"models: {n}; folded: {sum(r.get('status') == 'ok' for r in rows)}; "
        f"BN {sum(r.get('bn_before', 0) for r in rows)} -> "
        f"{sum(r.get('bn_after', 0) or 0 for r in rows)}",
        f"verify ORIGINAL FOLDED exit 0: {len(ok)} / {n}; with a float64 reference row: "
        f"{len(with_row)} / {n} ({', '.join(f'{k} {v}' for k, v in sorted(engines.items()))})",
        f"rewritten weight: exit 1 on {sum(t['rc'] == 1 for t in rw)} / {len(rw)}, located "
        f"{sum(t['located'] != 'NO' for t in rw)} / {len(rw)}",
        f"constant-input weight: exit 1 on {sum(t['rc'] == 1 for t in ci)} / {len(ci)}, "
        f"data probe blind to it {sum(t['data_probe_passed'] is True for t in ci)} / {len(ci)}, "
        f"located {sum(t['located'] != 'NO' for t in ci)} / {len(ci)}",
    ]
    if vt:
        t = np.array(vt)
        lines.append(
            f"verify ORIGINAL FOLDED: median {np.median(t):.1f} s (min {t.min():.1f}, max "
            f"{t.max():.1f}); all steps {sum(r.get('wall_s', 0) for r in rows):.0f} s"
        )
    return "\n".join(lines)


def main_dir(args: argparse.Namespace) -> int:
    """The folder mode: every model in `args.dir` folded, verified and tampered with."""
    files = sorted(p for p in args.dir.glob("*.onnx") if ".folded" not in p.name)
    if args.only:
        globs = [g.strip() for g in args.only.split(",") if g.strip()]
        files = [
            p for p in files if any(fnmatch.fnmatch(p.name.removesuffix(".onnx"), g) for g in globs)
        ]
    if not files:
        print(f"no .onnx files in {args.dir} match", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="verify_pairs_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(files, 1):
            try:
                row = check_model(path, work, args)
            except Exception as exc:  # one broken file is a row, not the end of the run
                row = {"model": path.name, "status": f"error: {type(exc).__name__}: {exc}"}
            rows.append(row)
            v = row.get("verify", {})
            print(
                f"[{i}/{len(files)}] {row['model']}: BN {row.get('bn_before', '-')} -> "
                f"{row.get('bn_after', '-')}, fold {row.get('fold', {}).get('s', '-')} s; "
                f"verify rc {v.get('rc', '-')} {v.get('s', '-')} s, max abs "
                f"{_fmt(row.get('max_abs_folded'))}; rewritten "
                f"{_tamper_cell(row.get('rewritten'))}; constant input "
                f"{_tamper_cell(row.get('constant_input'))}; {row.get('wall_s', '-')} s "
                f"(load {os.getloadavg()[0]:.1f})",
                file=sys.stderr,
                flush=True,
            )
            if args.json:
                _write_json(args.json, rows, time.perf_counter() - t0)
    print(summary(rows))
    bad = [
        r
        for r in rows
        if r.get("verify", {}).get("rc") != 0
        or r.get("rewritten", {}).get("rc", 1) != 1
        or r.get("constant_input", {}).get("rc", 1) != 1
    ]
    return 1 if bad else 0


def _write_json(path: str, rows: list[dict[str, Any]], seconds: float) -> None:
    import onnxruntime

    meta = {
        "root": str(ROOT),
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "seconds": round(seconds, 1),
        "loadavg": os.getloadavg(),
    }
    Path(path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tests", default="tests/test_fold_*.py", help="fold test files (glob)")
    p.add_argument("--dir", type=Path, help="verify every model in this folder instead")
    p.add_argument(
        "--only", help="with --dir: comma-separated globs of file stems, e.g. 'tv_*,*.dynamo'"
    )
    p.add_argument(
        "--timeout", type=float, default=900.0, help="with --dir: seconds per step (900)"
    )
    p.add_argument("--work", type=Path, help="with --dir: keep the folded and tampered files here")
    p.add_argument(
        "--rows",
        type=int,
        help="random probe rows (fold tests: 64; --dir: verify's default)",
    )
    p.add_argument("--json", help="write every outcome here")
    args = p.parse_args(argv)
    return main_dir(args) if args.dir else main_tests(args)


if __name__ == "__main__":
    sys.exit(main())
