"""Run `bn-onnx verify` on every (original, folded) pair the fold tests make, and a tampered copy.

The fold tests build many tiny models (Conv, ConvTranspose, Gemm, MatMul, BN chains, float16,
bfloat16, subgraphs, functions ...) and fold them with `bn_onnx.fold.fold_model`. This script
runs those tests with `fold_model` wrapped to keep each pair, then for each distinct pair:

1. `verify([original, folded])` must pass (exit 0);
2. the folded model with one weight changed by +0.5 (the first float initializer of rank >= 2
   that a node reads, subgraphs included) must fail (exit 1), and `--locate` must name a node
   that reads the changed weight.

A pair verify refuses (a model onnxruntime and onnx.reference cannot run, an invalid test model)
is counted as refused, with its reason. Usage:

    python tools/verify_fold_pairs.py [--tests 'tests/test_fold_*.py'] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]


def collect(test_files: list[str]) -> list[tuple[str, onnx.ModelProto, onnx.ModelProto]]:
    """(test id, original, folded) for every fold_model call the tests make."""
    import pytest

    import bn_onnx.fold

    pairs: list[tuple[str, onnx.ModelProto, onnx.ModelProto]] = []
    real = bn_onnx.fold.fold_model
    current = {"test": "?"}

    def recording(model: onnx.ModelProto, **kwargs):  # noqa: ANN202
        original = onnx.ModelProto()
        original.CopyFrom(model)
        result = real(model, **kwargs)
        folded = onnx.ModelProto()
        folded.CopyFrom(result.model)
        pairs.append((current["test"], original, folded))
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tests", default="tests/test_fold_*.py", help="fold test files (glob)")
    p.add_argument("--rows", type=int, default=64, help="random probe rows (default 64)")
    p.add_argument("--json", help="write every pair's outcome here")
    args = p.parse_args(argv)
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
                report = verify([o, f], rows=args.rows)
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
                    report = verify([o, Path(tmp) / "bad.onnx"], rows=args.rows, locate=True)
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


if __name__ == "__main__":
    sys.exit(main())
