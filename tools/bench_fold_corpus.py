"""Core fold time over the architecture corpus: `bn_onnx.fold.fold_model` against onnxscript.

Issue 12's target: the summed core fold time over the corpus is at most onnxscript's optimizer's
on the same files. "Core" is the transform of an in-memory `onnx.ModelProto` into another, the
way `tools/score_fold_tools.py` times each tool: `fold_model(proto)` (onnx-ir conversion,
validation, the fold pass, the cleanup, conversion back) against
`onnxscript.optimizer.optimize(proto)` (its conversion, constant folding, rewrite rules
including its BN fusions, dead-code removal, conversion back); reading and writing files are
left out of both. Each file is loaded once; the two run alternately on it, `--repeats` times, in
this one process. Per file the medians of CPU time (process time: what other jobs on the
shared cores take is left out) and wall time are kept; the sums of those medians are compared.

    python tools/bench_fold_corpus.py /work/corpus [--repeats 3] [--only 'tv_*,*.dynamo.onnx']
        [--json results.json]

The corpus is `tools/make_arch_corpus.py`'s folder (its manifest.json lists the files).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def _files(corpus: Path, only: str | None) -> list[Path]:
    manifest = corpus / "manifest.json"
    if manifest.is_file():
        entries = json.loads(manifest.read_text())["files"]
        names = [e["file"] for e in entries if e.get("status") == "ok" and e.get("file")]
    else:
        names = sorted(p.name for p in corpus.glob("*.onnx"))
    if only:
        patterns = [p.strip() for p in only.split(",") if p.strip()]
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    return [corpus / n for n in sorted(names)]


def _timed(fn: Any) -> tuple[float, float, Any]:
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c0, time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path, help="folder of make_arch_corpus.py (manifest.json)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", help="comma-separated file name patterns")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    import onnx
    import onnxscript.optimizer

    import bn_onnx
    from bn_onnx.fold import fold_model

    tools = {
        "bn-onnx": lambda m: fold_model(m).model,
        "onnxscript": lambda m: onnxscript.optimizer.optimize(m),
    }
    files = _files(args.corpus, args.only)
    load = [os.getloadavg()[0]]
    rows: list[dict[str, Any]] = []
    for path in files:
        model = onnx.load(str(path))
        row: dict[str, Any] = {"file": path.name, "nodes": len(model.graph.node)}
        times: dict[str, dict[str, list[float]]] = {k: {"cpu": [], "wall": []} for k in tools}
        for name, fn in tools.items():  # warm-up (lazy imports, caches)
            try:
                fn(model)
            except Exception as exc:  # noqa: BLE001 - a tool failing on a file is a result
                row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        for _ in range(args.repeats):
            for name, fn in tools.items():
                if f"{name}_error" in row:
                    continue
                cpu, wall, out = _timed(lambda fn=fn, m=model: fn(m))
                times[name]["cpu"].append(cpu)
                times[name]["wall"].append(wall)
                row[f"{name}_nodes"] = len(out.graph.node)
                del out
        for name in tools:
            for kind in ("cpu", "wall"):
                v = times[name][kind]
                row[f"{name}_{kind}_s"] = statistics.median(v) if v else None
        rows.append(row)
        bn, ox = row.get("bn-onnx_cpu_s"), row.get("onnxscript_cpu_s")
        ratio = f"{bn / ox:.2f}x" if bn and ox else "-"
        print(
            f"{path.name:45s} bn-onnx {1e3 * (bn or 0):8.1f} ms CPU, onnxscript "
            f"{1e3 * (ox or 0):8.1f} ms: {ratio}",
            file=sys.stderr,
            flush=True,
        )
        load.append(os.getloadavg()[0])
    both = [r for r in rows if r.get("bn-onnx_cpu_s") and r.get("onnxscript_cpu_s")]
    summary: dict[str, Any] = {"files": len(rows), "compared": len(both)}
    for kind in ("cpu", "wall"):
        bn = sum(r[f"bn-onnx_{kind}_s"] for r in both)
        ox = sum(r[f"onnxscript_{kind}_s"] for r in both)
        ratios = [r[f"bn-onnx_{kind}_s"] / r[f"onnxscript_{kind}_s"] for r in both]
        summary[kind] = {
            "bn-onnx_s": bn,
            "onnxscript_s": ox,
            "ratio_of_sums": bn / ox if ox else None,
            "per_file_ratio_median": statistics.median(ratios) if ratios else None,
            "per_file_ratio_min": min(ratios) if ratios else None,
            "per_file_ratio_max": max(ratios) if ratios else None,
            "files_bn_onnx_slower": sum(x > 1 for x in ratios),
        }
    summary["load_average"] = [min(load), statistics.median(load), max(load)]
    summary["bn_onnx"] = str(Path(bn_onnx.__file__).resolve().parent)
    print(
        f"{len(both)} of {len(rows)} files, {args.repeats} alternating repeats each, medians; "
        f"load average {min(load):.1f}-{max(load):.1f} (median {statistics.median(load):.1f})"
    )
    for kind in ("cpu", "wall"):
        s = summary[kind]
        print(
            f"  {kind:4s}: bn-onnx {s['bn-onnx_s']:.2f} s, onnxscript {s['onnxscript_s']:.2f} s, "
            f"sum ratio {s['ratio_of_sums']:.2f}x; per file median "
            f"{s['per_file_ratio_median']:.2f}x ({s['per_file_ratio_min']:.2f}-"
            f"{s['per_file_ratio_max']:.2f}), bn-onnx slower on {s['files_bn_onnx_slower']}"
        )
    for r in rows:
        for key in [k for k in r if k.endswith("_error")]:
            print(f"  {r['file']}: {key[: -len('_error')]} failed: {r[key]}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "files": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
