"""Fold a model above 2 GB (external data) and compare time and peak memory with load+save.

Issue 5, item 2 and issue 12, item 4. Builds an MLP of about `--size-gb` GB with
`bn_onnx.graphs.write_mlp_external` (tensor by tensor, so the builder holds about one layer),
then runs in separate processes, interleaved over `--repeats` rounds:

  load+save        onnx.load (external data read in) + onnx.save with external data
  bn_onnx.fold     bn_onnx.fold.fold_file(in, out) (load, fold, cleanup, save with external data)
  bn-onnx fold     the command, as a whole process (when cli/fold.py exists)
  bn_onnx.fold (other)  fold_file of another checkout (`--other`, e.g. /work/main)
  import only      the imports of the above, the memory floor

The summary gives, per tool, medians (min-max) over the rounds of the wall time, of its ratio to
load+save in the same round, and of the peak RSS over the weight bytes (with and without the
import floor).

Each process's peak RSS comes from wait4 (started from a small launcher, see
`bn_onnx.bench.measure_process`), split into anonymous and file-backed parts by polling /proc.
A last child runs fold_file's steps one by one and records the peak RSS of each
(`/proc/self/clear_refs` resets the high-water mark between steps), to show where copies of
the weights are held. The output is checked (no BN left, first folded weight equal to the
hand-folded one). The big files are deleted at the end.

    python tools/bench_large_fold.py                 # ~2.5 GB, writes tools/bench_results/
    python tools/bench_large_fold.py --size-gb 0.2   # a quick try
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bn_onnx import bench

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "tools" / "bench_results"

LOAD_SAVE = r"""
import json, sys, time
import onnx
src, dst = sys.argv[1:3]
t0 = time.perf_counter()
m = onnx.load(src)
onnx.save_model(m, dst, save_as_external_data=True, all_tensors_to_one_file=True,
                location=dst.rsplit("/", 1)[-1] + ".data", size_threshold=1024)
print(json.dumps({"inner_s": time.perf_counter() - t0}))
"""

FOLD = r"""
import json, sys, time
from bn_onnx.fold import fold_file
src, dst = sys.argv[1:3]
t0 = time.perf_counter()
fold_file(src, dst)
print(json.dumps({"inner_s": time.perf_counter() - t0}))
"""

IMPORTS = r"""
import json
import onnx, numpy
import bn_onnx.fold
print(json.dumps({"inner_s": 0.0}))
"""

STEPS = r"""
import json, sys, time
import bn_onnx.fold.cleanup

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

src, dst = sys.argv[1:3]
import numpy, onnx_ir
from bn_onnx.fold import FoldBatchNormPass
from bn_onnx.fold.cleanup import cleanup
from bn_onnx.fold.model_io import load_model, save_model
steps = []
base = status("VmRSS")
can_reset = reset_peak()

def mark(name, t0):
    steps.append({"step": name, "s": time.perf_counter() - t0,
                  "rss_after": status("VmRSS"), "peak": status("VmHWM")})
    reset_peak()

t0 = time.perf_counter()
model = load_model(src)
mark("fold.model_io.load_model (onnx_ir.load: external data memory-mapped)", t0)
# The same steps as bn_onnx.fold.fold_file: fold in place, clean, save tensor by tensor.
t0 = time.perf_counter()
FoldBatchNormPass()(model)
mark("FoldBatchNormPass()(model): weights checked, rewritten ones lazy", t0)
t0 = time.perf_counter()
cleanup(model)
mark("cleanup(model)", t0)
t0 = time.perf_counter()
save_model(model, dst, external_data=True)
mark("fold.model_io.save_model (onnx_ir.save, external data)", t0)
print(json.dumps({"base_rss": base, "peak_reset_works": can_reset, "steps": steps}))
"""

CHECK = r"""
import json, sys
import numpy as np
import onnx
from onnx import numpy_helper
from bn_onnx import graphs
out, widths = sys.argv[1], json.loads(sys.argv[2])
m = onnx.load(out, load_external_data=False)
n_bn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
ext = sum(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
gemm0 = next(n for n in m.graph.node if n.op_type == "Gemm")
w_name = gemm0.input[1]
t = next(t for t in m.graph.initializer if t.name == w_name)
if t.data_location == onnx.TensorProto.EXTERNAL:
    onnx.external_data_helper.load_external_data_for_tensor(t, out.rsplit("/", 1)[0])
w = numpy_helper.to_array(t)
if dict((a.name, a.i) for a in gemm0.attribute).get("transB", 0) == 0:
    w = w.T
ref = next(graphs.gemm_params(widths, "folded")).weight
print(json.dumps({"bn_left": n_bn, "external_initializers": ext,
                  "first_weight_max_abs_err": float(np.abs(w - ref).max())}))
"""


def py(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def widths_for(size_gb: float, width: int) -> list[int]:
    """Square hidden layers of `width` until the float32 weights reach about `size_gb` GB."""
    per_layer = 4 * width * width
    n = max(1, math.ceil(size_gb * 1e9 / per_layer))
    return [width] * (n + 1) + [10]


def last_json(run: bench.ProcessRun, required: bool = True) -> dict[str, Any]:
    for line in reversed(run.stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    if not required:
        return {}
    raise RuntimeError(f"no JSON from child: {run.stderr[-2000:]}")


def checked(run: bench.ProcessRun, what: str) -> bench.ProcessRun:
    if run.returncode != 0:
        raise RuntimeError(f"{what} failed ({run.returncode}): {run.stderr.strip()[-2000:]}")
    return run


def _spread(values: list[float]) -> dict[str, float]:
    """Median, min and max."""
    return {
        "median": float(np.median(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.5)
    ap.add_argument("--width", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--other", help="another checkout whose fold_file also runs (PYTHONPATH)")
    ap.add_argument("--scratch", default=None, help="folder for the big files")
    ap.add_argument("--out", type=Path, default=RESULTS / "large_fold.json")
    ap.add_argument("--keep", action="store_true", help="keep the big files")
    args = ap.parse_args(argv)

    widths = widths_for(args.size_gb, args.width)
    work = Path(tempfile.mkdtemp(prefix="bn-onnx-large-", dir=args.scratch))
    src = work / "big.onnx"
    out: dict[str, Any] = {
        "schema": "bn-onnx-large-fold",
        "machine": bench.machine_info(),
        "widths": f"{args.width} x {len(widths) - 2} hidden + head 10",
        "n_bn": len(widths) - 2,
    }
    t_all = time.perf_counter()
    try:
        build = checked(
            bench.measure_process(
                py(
                    "import sys, json; from bn_onnx import graphs; "
                    "graphs.write_mlp_external(sys.argv[1], json.loads(sys.argv[2]))",
                    str(src),
                    json.dumps(widths),
                ),
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                cwd=work,
                sample_rss=True,
            ),
            "build",
        )
        size = sum(p.stat().st_size for p in work.iterdir())
        out["model_bytes"] = size
        out["build"] = build.to_dict()
        print(f"built {size / 1e9:.2f} GB in {build.wall_s:.1f} s", file=sys.stderr)

        here = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmds: dict[str, tuple[list[str], dict[str, str]]] = {
            "load+save": (py(LOAD_SAVE, str(src), str(work / "ls.onnx")), here),
            "bn_onnx.fold": (py(FOLD, str(src), str(work / "fold.onnx")), here),
            "import only": (py(IMPORTS), here),
        }
        exe = shutil.which("bn-onnx")
        if exe and (Path(bench.__file__).parent / "cli" / "fold.py").is_file():
            cmds["bn-onnx fold"] = ([exe, "fold", str(src), "-o", str(work / "cli.onnx")], here)
        if args.other:
            other = {**os.environ, "PYTHONPATH": str(Path(args.other).resolve())}
            cmds["bn_onnx.fold (other)"] = (py(FOLD, str(src), str(work / "other.onnx")), other)
        runs: dict[str, list[bench.ProcessRun]] = {k: [] for k in cmds}
        out["load_average"] = [os.getloadavg()[0]]
        for r in range(args.repeats):
            for name, (cmd, env) in cmds.items():
                print(f"round {r + 1}: {name}", file=sys.stderr)
                # cwd: the scratch folder, so `python -c` imports bn_onnx from PYTHONPATH
                run = bench.measure_process(cmd, env=env, cwd=work, sample_rss=True)
                runs[name].append(checked(run, name))
                for p in work.iterdir():  # drop outputs between runs: disk, page cache
                    if p.name.startswith(("ls.", "fold.", "cli.", "other.")):
                        p.unlink()
            out["load_average"].append(os.getloadavg()[0])
        procs: dict[str, Any] = {}
        for name, rs in runs.items():
            inner = [last_json(r, required=False).get("inner_s") for r in rs]
            procs[name] = {
                "wall_s": [r.wall_s for r in rs],
                "inner_s": inner,
                "maxrss_mb": [r.maxrss_bytes / 2**20 for r in rs],
                "peak_anon_mb": [(r.peak_anon_bytes or 0) / 2**20 for r in rs],
                "peak_file_mb": [(r.peak_file_bytes or 0) / 2**20 for r in rs],
            }
        out["processes"] = procs

        print("step profile of fold_file", file=sys.stderr)
        steps = checked(
            bench.measure_process(
                py(STEPS, str(src), str(work / "fold.onnx")), env=here, cwd=work, sample_rss=True
            ),
            "steps",
        )
        out["fold_steps"] = last_json(steps)
        check = checked(
            bench.measure_process(py(CHECK, str(work / "fold.onnx"), json.dumps(widths)), env=here),
            "check",
        )
        out["fold_output_check"] = last_json(check)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    out["elapsed_s"] = time.perf_counter() - t_all

    mb = out["model_bytes"] / 2**20
    procs = out["processes"]
    base = float(np.median(procs["import only"]["maxrss_mb"]))
    summary: dict[str, Any] = {
        "model_mb": mb,
        "import_floor_mb": base,
        "load_average": out["load_average"],
    }
    ls_wall = procs["load+save"]["wall_s"]
    for name in ("load+save", "bn_onnx.fold", "bn-onnx fold", "bn_onnx.fold (other)"):
        if name not in procs:
            continue
        p = procs[name]
        ratios = [w / b for w, b in zip(p["wall_s"], ls_wall, strict=True)]
        summary[name] = {
            "wall_s": _spread(p["wall_s"]),
            "inner_s": _spread([t for t in p["inner_s"] if t is not None] or [np.nan]),
            "over_load_save_time": _spread(ratios),
            "peak_mb": _spread(p["maxrss_mb"]),
            "peak_over_weights": _spread([m / mb for m in p["maxrss_mb"]]),
            "peak_over_weights_above_floor": _spread([(m - base) / mb for m in p["maxrss_mb"]]),
            "peak_anon_mb": _spread(p["peak_anon_mb"]),
            "peak_file_mb": _spread(p["peak_file_mb"]),
        }
    out["summary"] = summary
    args.out.parent.mkdir(parents=True, exist_ok=True)
    bench.save_json(out, args.out)
    print(
        f"model {mb:.0f} MB of weights, import floor {base:.0f} MB, {args.repeats} rounds, "
        f"load average {', '.join(f'{x:.1f}' for x in out['load_average'])}"
    )
    for name, row in summary.items():
        if not isinstance(row, dict):
            continue
        t, r, m = row["wall_s"], row["over_load_save_time"], row["peak_over_weights"]
        print(
            f"  {name:21s} wall {t['median']:6.1f} s ({t['min']:.1f}-{t['max']:.1f}), "
            f"x load+save {r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}); peak "
            f"{row['peak_mb']['median']:.0f} MB = {m['median']:.2f}x weights "
            f"({m['min']:.2f}-{m['max']:.2f}; above floor "
            f"{row['peak_over_weights_above_floor']['median']:.2f}x); anon "
            f"{row['peak_anon_mb']['median']:.0f} MB, file {row['peak_file_mb']['median']:.0f} MB"
        )
    for s in out["fold_steps"]["steps"]:
        print(
            f"  {s['step']}: {s['s']:.1f} s, peak {s['peak'] / 2**20:.0f} MB, "
            f"after {s['rss_after'] / 2**20:.0f} MB",
        )
    print(f"check: {out['fold_output_check']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
