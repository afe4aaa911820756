"""Benchmark the fold pass against onnx.load + onnx.save and onnxscript's optimizer.

Builds a chain of BLOCKS x (Gemm -> BatchNormalization -> Relu), WIDTH wide, writes it to a
temporary folder, then times, interleaved over REPEATS rounds:
  baseline   onnx.load + onnx.save of the file
  fold_file  bn_onnx.fold.fold_file (load, fold, check, save)
  fold_model bn_onnx.fold.fold_model on an already loaded model (in memory)
  onnxscript onnxscript.optimizer.optimize on an already loaded model (in memory)
and prints medians with the spread (min..max), the process CPU time of each (robust when other
jobs share the cores) and the ratios of medians. `--widths 2048,2048,2048,2048,2048,10` times
`bn_onnx.graphs.build_mlp` of those widths instead (the suite's "wide 4x2048" model).
It also reports how many BN each tool removed, and the peak RSS of one fold_file run in a child
process against one load+save run (Linux, VmHWM from /proc).

    python tools/bench_fold.py [--blocks 200] [--width 64] [--repeats 7]
    python tools/bench_fold.py --widths 2048,2048,2048,2048,2048,10 --repeats 7
    python tools/bench_fold.py --large --blocks 40 --width 4096 --repeats 3   # 2.7 GB
    python tools/bench_fold.py --other /work/main --rounds 3   # this checkout vs another

`--other CHECKOUT` runs the whole benchmark ROUNDS times for each checkout alternately, each in
a fresh process with that checkout on PYTHONPATH, and prints the ratios of each round (every
round has its own baseline) as medians with min-max.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


def build_chain(blocks: int, width: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    cur = "input"
    for i in range(blocks):
        w = rng.standard_normal((width, width), dtype=np.float32)
        w *= np.float32(1 / np.sqrt(width))
        b = rng.normal(0, 0.1, width).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        for name, value in (
            ("s", rng.normal(1, 0.1, width)),
            ("b", rng.normal(0, 0.1, width)),
            ("m", rng.normal(0, 0.1, width)),
            ("v", rng.uniform(0.5, 2, width)),
        ):
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"{name}{i}"))
        nodes += [
            helper.make_node("Gemm", [cur, f"W{i}", f"B{i}"], [f"z{i}"], name=f"gemm{i}"),
            helper.make_node(
                "BatchNormalization",
                [f"z{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"],
                [f"n{i}"],
                name=f"bn{i}",
            ),
            helper.make_node("Relu", [f"n{i}"], [f"a{i}"], name=f"relu{i}"),
        ]
        cur = f"a{i}"
    nodes.append(helper.make_node("Identity", [cur], ["logits"], name="out"))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def _peak_rss_mb(code: str) -> float:
    """Peak resident memory of a fresh Python running `code` (VmHWM: reset by exec, Linux)."""
    probe = (
        "\nfor line in open('/proc/self/status'):\n"
        "    if line.startswith('VmHWM:'):\n"
        "        print(int(line.split()[1]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code + probe], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def _child(code: str) -> tuple[float, float]:
    """Run `code` in a fresh Python; return (wall seconds of the code, peak RSS in MB)."""
    timed = (
        "import time\n_t0 = time.perf_counter()\n" + code + "\n"
        "print(time.perf_counter() - _t0)\n"
        "for line in open('/proc/self/status'):\n"
        "    if line.startswith('VmHWM:'):\n"
        "        print(int(line.split()[1]))"
    )
    out = subprocess.run([sys.executable, "-c", timed], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    seconds, kb = out.stdout.strip().splitlines()[-2:]
    return float(seconds), int(kb) / 1024


def large(args: argparse.Namespace) -> None:
    """Above 2 GB: external data in and out, each run in a fresh process (time + peak RSS)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_fold_large."))
    src = tmp / "chain.onnx"
    model = build_chain(args.blocks, args.width)
    onnx.save_model(
        model,
        str(src),
        save_as_external_data=True,
        location="chain.onnx.data",
        all_tensors_to_one_file=True,
        size_threshold=1024,
    )
    del model
    size_gb = (src.stat().st_size + (tmp / "chain.onnx.data").stat().st_size) / 1e9
    base = (
        f"import onnx; m = onnx.load({str(src)!r}); "
        f"onnx.save_model(m, {str(tmp / 'copy.onnx')!r}, save_as_external_data=True, "
        "location='copy.onnx.data', all_tensors_to_one_file=True)"
    )
    fold = (
        "from bn_onnx.fold import fold_file; "
        f"r = fold_file({str(src)!r}, {str(tmp / 'folded.onnx')!r}); assert r.n_folded == r.n_bn"
    )
    rows: dict[str, list[tuple[float, float]]] = {"baseline": [], "fold_file": []}
    for _ in range(args.repeats):
        rows["baseline"].append(_child(base))
        rows["fold_file"].append(_child(fold))
    print(
        f"chain: {args.blocks} blocks x {args.width} wide, {size_gb:.2f} GB with external "
        f"data, {args.repeats} interleaved runs in fresh processes"
    )
    for k, v in rows.items():
        t = [x[0] for x in v]
        m = [x[1] for x in v]
        print(
            f"  {k:9s} median {statistics.median(t):7.1f} s (min {min(t):.1f}, max "
            f"{max(t):.1f}); peak RSS median {statistics.median(m):.0f} MB"
        )
    tb = statistics.median(x[0] for x in rows["baseline"])
    tf = statistics.median(x[0] for x in rows["fold_file"])
    mb = statistics.median(x[1] for x in rows["baseline"])
    mf = statistics.median(x[1] for x in rows["fold_file"])
    print(
        f"  fold_file / baseline: time {tf / tb:.2f}x, peak memory {mf / mb:.2f}x "
        f"(model {size_gb * 1e3:.0f} MB: fold peak = {mf / (size_gb * 1e3):.2f}x the model)"
    )
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()


ROOT = Path(__file__).resolve().parent.parent
RATIOS = (
    ("fold_file", "baseline"),
    ("fold_model", "baseline"),
    ("fold_model", "onnxscript"),
)


def compare(args: argparse.Namespace, argv: list[str]) -> None:
    """Run this benchmark for this checkout and `--other`, alternately, in fresh processes."""
    rest = [a for i, a in enumerate(argv) if a not in ("--other", "--rounds")]
    rest = [a for a in rest if a not in (args.other, str(args.rounds))]
    trees = {"this": str(ROOT), "other": str(Path(args.other).resolve())}
    tmp = Path(tempfile.mkdtemp(prefix="bench_fold_compare."))
    rows: dict[str, list[dict]] = {k: [] for k in trees}
    loads = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for name, tree in trees.items():
            out = tmp / f"{name}{r}.json"
            env = {**os.environ, "PYTHONPATH": tree}
            subprocess.run(
                [sys.executable, __file__, *rest, "--json", str(out)],
                env=env,
                cwd=tmp,
                check=True,
                capture_output=True,
            )
            rows[name].append(json.loads(out.read_text()))
        loads.append(os.getloadavg()[0])
    print(
        f"{args.rounds} rounds, each checkout in its own process, alternating; load average "
        + ", ".join(f"{x:.1f}" for x in loads)
    )
    for name, tree in trees.items():
        print(f"  {name} ({tree}):")
        for key in ("median_s", "median_cpu_s"):
            unit = "wall" if key == "median_s" else "CPU"
            for k in rows[name][0][key]:
                v = [row[key][k] * 1e3 for row in rows[name]]
                print(
                    f"    {unit:4s} {k:11s} {statistics.median(v):8.1f} ms "
                    f"({min(v):.1f}-{max(v):.1f})"
                )
            for a, b in RATIOS:
                if b not in rows[name][0][key]:
                    continue
                v = [row[key][a] / row[key][b] for row in rows[name]]
                print(
                    f"    {unit:4s} {a} / {b}: {statistics.median(v):.2f}x "
                    f"({min(v):.2f}-{max(v):.2f})"
                )
        peaks = [row["peak_rss_mb"] for row in rows[name]]
        print(
            "    peak RSS (MB, median): "
            + ", ".join(f"{k} {statistics.median(p[k] for p in peaks):.0f}" for k in peaks[0])
        )
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=200)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument(
        "--widths",
        help="comma-separated widths: time bn_onnx.graphs.build_mlp(widths) instead of the chain",
    )
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument(
        "--large",
        action="store_true",
        help="external data, fresh process per run, only load+save vs fold_file (for > 2 GB)",
    )
    ap.add_argument("--other", help="another checkout: compare this one with it, alternating")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per checkout with --other")
    args = ap.parse_args()
    if args.other:
        compare(args, sys.argv[1:])
        return
    if args.large:
        large(args)
        return

    from bn_onnx.fold import fold_file, fold_model

    try:
        from onnxscript import optimizer as ox_optimizer
    except ImportError:  # optional peer
        ox_optimizer = None

    tmp = Path(tempfile.mkdtemp(prefix="bench_fold."))
    atexit.register(shutil.rmtree, tmp, True)  # the models written here go with the process
    src = tmp / "chain.onnx"
    if args.widths:
        from bn_onnx.graphs import build_mlp

        widths = [int(w) for w in args.widths.split(",")]
        onnx.save(build_mlp(widths, "unfolded"), src)
        title = f"mlp {args.widths} ({len(widths) - 2} BN)"
        n_bn = len(widths) - 2
    else:
        onnx.save(build_chain(args.blocks, args.width), src)
        title = f"chain: {args.blocks} blocks x {args.width} wide"
        n_bn = args.blocks
    loaded = onnx.load(src)
    size_mb = src.stat().st_size / 1e6

    def baseline() -> None:
        onnx.save(onnx.load(src), tmp / "copy.onnx")

    def fold_f() -> None:
        fold_file(src, tmp / "folded.onnx")

    def fold_m() -> None:
        fold_model(loaded)

    def onnxscript_opt() -> None:
        m = onnx.ModelProto()
        m.CopyFrom(loaded)  # optimize works in place: give it its own copy (counted)
        ox_optimizer.optimize(m)

    cases = {"baseline": baseline, "fold_file": fold_f, "fold_model": fold_m}
    if ox_optimizer is not None:
        cases["onnxscript"] = onnxscript_opt
    for fn in cases.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)

    removed = {"bn_onnx": fold_model(loaded).n_folded}
    if ox_optimizer is not None:
        m = onnx.ModelProto()
        m.CopyFrom(loaded)
        opt = ox_optimizer.optimize(m)
        left = sum(n.op_type == "BatchNormalization" for n in opt.graph.node)
        removed["onnxscript"] = n_bn - left

    rss_fold = _peak_rss_mb(
        f"from bn_onnx.fold import fold_file; fold_file({str(src)!r}, {str(tmp / 'r.onnx')!r})"
    )
    rss_base = _peak_rss_mb(
        f"import onnx; onnx.save(onnx.load({str(src)!r}), {str(tmp / 'r2.onnx')!r})"
    )
    rss_python = _peak_rss_mb("import onnx, numpy, bn_onnx.fold")

    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"{title}, {size_mb:.2f} MB, {args.repeats} interleaved repeats")
    for k, v in times.items():
        print(
            f"  {k:11s} median {med[k] * 1e3:8.1f} ms  (min {min(v) * 1e3:.1f}, "
            f"max {max(v) * 1e3:.1f}); CPU median {med_cpu[k] * 1e3:.1f} ms"
        )
    for k, base in (("fold_file", "baseline"), ("fold_model", "baseline")):
        print(
            f"  {k} / {base}   = {med[k] / med[base]:.2f}x "
            f"(CPU time {med_cpu[k] / med_cpu[base]:.2f}x)"
        )
    if "onnxscript" in med:
        print(
            f"  fold_model / onnxscript = {med['fold_model'] / med['onnxscript']:.2f}x "
            f"(CPU time {med_cpu['fold_model'] / med_cpu['onnxscript']:.2f}x)"
        )
    print(f"  BN removed: {removed} of {n_bn}")
    print(
        f"  peak RSS: fold_file {rss_fold:.0f} MB, load+save {rss_base:.0f} MB, "
        f"imports only {rss_python:.0f} MB"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "times_s": times,
                    "median_s": med,
                    "cpu_s": cpu,
                    "median_cpu_s": med_cpu,
                    "removed": removed,
                    "peak_rss_mb": {
                        "fold_file": rss_fold,
                        "load_save": rss_base,
                        "imports": rss_python,
                    },
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
