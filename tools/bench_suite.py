"""The standard benchmark suite the README reports (issue 8), and its targets.

Networks: digits-size 64-128-64-10; 784-512-512-512-10; 1024-4096-4096-1024; 32 blocks of
64-wide Linear+BN+ReLU. Each as unfolded, folded (by `bn_onnx.fold`) and with BN removed (the
physical bound for folding), plus a second copy of the no-BN model: an A/A control that shows
the measurement noise of this run.

Sections (`--only` picks some):
  variants   ORT CPU, 1 and 2 threads x graph optimization ALL and DISABLE
  frameworks torch eager eval against ORT (unfolded and folded)
  predictor  Predictor.predict against a bare session.run
  run        `bn-onnx run` over N x 784 float32 rows (.npy) against a bare chunked loop
  fold       fold pass against onnx.load+save and onnxscript.optimizer.optimize; peak memory
  startup    `bn-onnx --help` and `bn-onnx fold` of a small model as whole processes
  train      `bn_onnx.train` samples/s against a minimal hand-written torch loop

Every latency is a median over interleaved rounds in one process (each round in a fresh
seeded order, never one model twice in a row, so that none finds its weights still in the
CPU caches); every ratio compares subjects timed in the same rounds. Writes
tools/bench_results/suite.json (every figure), suite.md and suite.png, and prints a summary.
`--quick` is a smoke run of about a minute.

    python tools/bench_suite.py            # the full suite, a few minutes on 2 cores
    python tools/bench_suite.py --quick    # smoke run
    python tools/bench_suite.py --provider cuda   # ORT rows on CUDA with IOBinding
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bn_onnx import bench, graphs, onnx_io

RESULTS = Path(__file__).resolve().parent / "bench_results"
NETWORKS = {
    "digits 64-128-64-10": [64, 128, 64, 10],
    "mnist 784-512x3-10": [784, 512, 512, 512, 10],
    "wide 1024-4096-4096-1024": [1024, 4096, 4096, 1024],
    "deep 32x64": [64] * 33 + [10],
}
RUN_NETWORK = [784, 256, 10]
CONFIGS = [(1, "all"), (2, "all"), (1, "disable"), (2, "disable")]
SECTIONS = ["variants", "frameworks", "predictor", "run", "fold", "startup", "train"]
AA = "no_bn (copy)"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- models -------------------------------------------------------------------------------


def fold_with_project(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """The project's fold pass if it is there, else the hand-folded reference graph."""
    try:
        from bn_onnx.fold import fold_model
    except ImportError:
        return model, "missing"
    return fold_model(model).model, "bn_onnx.fold"


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def make_variants(widths: list[int], seed: int = 0) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Serialized unfolded, folded and no-BN models and facts about them (cached)."""
    return _make_variants(tuple(widths), seed)


@functools.lru_cache(maxsize=8)
def _make_variants(widths_t: tuple[int, ...], seed: int) -> tuple[dict[str, bytes], dict[str, Any]]:
    widths = list(widths_t)
    unfolded = graphs.build_mlp(widths, "unfolded", seed=seed)
    folded, source = fold_with_project(unfolded)
    if source == "missing":
        folded, source = graphs.build_mlp(widths, "folded", seed=seed), "bn_onnx.graphs (by hand)"
    no_bn = graphs.build_mlp(widths, "no_bn", seed=seed)
    models = {
        "unfolded": unfolded.SerializeToString(),
        "folded": folded.SerializeToString(),
        "no_bn": no_bn.SerializeToString(),
    }
    facts = {
        "widths": widths,
        "params_mb": graphs.model_nbytes(widths, "no_bn") / 2**20,
        "fold_source": source,
        "ops": {k: op_counts(m) for k, m in zip(models, (unfolded, folded, no_bn), strict=True)},
        "initializers": {
            k: len(m.graph.initializer)
            for k, m in zip(models, (unfolded, folded, no_bn), strict=True)
        },
    }
    facts["folded_like_no_bn"] = (
        facts["ops"]["folded"] == facts["ops"]["no_bn"]
        and facts["initializers"]["folded"] == facts["initializers"]["no_bn"]
    )
    return models, facts


def torch_mlp(widths: list[int], seed: int = 0, eps: float = 1e-5) -> Any:
    """The unfolded network as torch Linear/BatchNorm1d/ReLU modules in eval mode."""
    import torch

    layers: list[Any] = []
    for p in graphs.gemm_params(widths, "unfolded", seed=seed, eps=eps):
        lin = torch.nn.Linear(p.weight.shape[1], p.weight.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(p.weight))
            lin.bias.copy_(torch.from_numpy(p.bias))
        layers.append(lin)
        if p.bn_scale is not None:
            bn = torch.nn.BatchNorm1d(p.weight.shape[0], eps=eps)
            with torch.no_grad():
                bn.weight.copy_(torch.from_numpy(p.bn_scale))
                bn.bias.copy_(torch.from_numpy(p.bn_bias))
                bn.running_mean.copy_(torch.from_numpy(p.bn_mean))
                bn.running_var.copy_(torch.from_numpy(p.bn_var))
            layers += [bn, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).eval()


def batch_sizes(widths: list[int], quick: bool) -> list[int]:
    big = max(widths) >= 4096
    if quick:
        return [1, 32]
    return [1, 32, 256] if big else [1, 32, 1024]


# --- timing sections ----------------------------------------------------------------------


def paired(result: bench.BenchResult, a: str, b: str, batch: int) -> dict[str, float]:
    """median(a)/median(b) and the quartiles of the per-round ratios a/b."""
    ra, rb = result.row(a, batch), result.row(b, batch)
    per_round = np.asarray(ra.times_s) / np.asarray(rb.times_s)
    q1, q3 = np.percentile(per_round, [25, 75])
    d = {
        "ratio": ra.stats.median_s / rb.stats.median_s,
        "q1": float(q1),
        "q3": float(q3),
        "n": len(per_round),
    }
    if ra.cpu_times_s is not None and rb.cpu_times_s is not None:
        ca, cb = np.asarray(ra.cpu_times_s), np.asarray(rb.cpu_times_s)
        with np.errstate(divide="ignore", invalid="ignore"):
            c1, c3 = np.nanpercentile(ca / cb, [25, 75])
        d.update(cpu_ratio=float(np.median(ca) / np.median(cb)), cpu_q1=float(c1), cpu_q3=float(c3))
    return d


def section_variants(args: argparse.Namespace, out: dict[str, Any]) -> None:
    configs = CONFIGS[:1] if args.quick else CONFIGS
    for net, widths in NETWORKS.items():
        models, facts = make_variants(widths)
        out["networks"][net] = facts
        for threads, opt in configs:
            label = f"{net} | {threads}t {opt}"
            log(f"variants: {label}")
            subjects = [
                bench.ort_subject(
                    models[v],
                    v,
                    provider=args.provider,
                    threads=threads,
                    graph_optimization_level=opt,
                )
                for v in ("unfolded", "folded", "no_bn")
            ]
            subjects.append(
                bench.ort_subject(
                    models["no_bn"],
                    AA,
                    provider=args.provider,
                    threads=threads,
                    graph_optimization_level=opt,
                )
            )
            result = bench.run_benchmark(
                subjects,
                batch_sizes(widths, args.quick),
                repeats=args.max_repeats,
                warmup=2,
                budget_s=args.budget,
                min_repeats=3 if max(widths) >= 4096 else 5,
                order="shuffle",
                cpu_clock=time.thread_time,
            )
            pairs = {
                str(b): {
                    "folded/no_bn": paired(result, "folded", "no_bn", b),
                    "unfolded/no_bn": paired(result, "unfolded", "no_bn", b),
                    "unfolded/folded": paired(result, "unfolded", "folded", b),
                    "A/A no_bn copy/no_bn": paired(result, AA, "no_bn", b),
                }
                for b in result.settings["batch_sizes"]
            }
            out["groups"].append(
                {
                    "section": "variants",
                    "network": net,
                    "threads": threads,
                    "opt": opt,
                    "provider": args.provider,
                    "result": result.to_dict(),
                    "pairs": pairs,
                }
            )
            del subjects


def section_frameworks(args: argparse.Namespace, out: dict[str, Any]) -> None:
    try:
        import torch
    except ImportError:
        out["skipped"]["frameworks"] = "torch is not installed"
        return
    device = "cuda" if args.provider == "cuda" else "cpu"
    for threads in (1,) if args.quick else (1, 2):
        torch.set_num_threads(threads)
        for net, widths in NETWORKS.items():
            log(f"frameworks: {net} | {threads}t")
            models, _ = make_variants(widths)
            module = torch_mlp(widths)
            x = np.random.default_rng(1).standard_normal((4, widths[0])).astype(np.float32)
            with torch.inference_mode():
                got = module(torch.from_numpy(x)).numpy()
            np.testing.assert_allclose(got, graphs.mlp_reference(widths, x), rtol=1e-3, atol=1e-3)
            subjects = [
                bench.ort_subject(
                    models["folded"], "ort folded", provider=args.provider, threads=threads
                ),
                bench.ort_subject(
                    models["unfolded"], "ort unfolded", provider=args.provider, threads=threads
                ),
                bench.torch_subject(
                    module, "torch eager (BN)", widths[0], device=device, threads=threads
                ),
            ]
            result = bench.run_benchmark(
                subjects,
                batch_sizes(widths, args.quick),
                repeats=args.max_repeats,
                warmup=2,
                budget_s=args.budget,
                min_repeats=5,
                order="shuffle",
                cpu_clock=time.thread_time,
            )
            out["groups"].append(
                {
                    "section": "frameworks",
                    "network": net,
                    "threads": threads,
                    "opt": "all",
                    "provider": args.provider,
                    "result": result.to_dict(),
                }
            )


def digits_model() -> tuple[bytes, str]:
    shipped = Path(__file__).resolve().parent.parent / "models" / "digits" / "model.folded.onnx"
    if shipped.is_file():
        return shipped.read_bytes(), str(shipped.relative_to(shipped.parents[2]))
    models, _ = make_variants(NETWORKS["digits 64-128-64-10"])
    return models["folded"], "synthetic 64-128-64-10 (models/digits not built yet)"


def section_predictor(args: argparse.Namespace, out: dict[str, Any]) -> None:
    cases = [("digits", *digits_model())]
    models, _ = make_variants(NETWORKS["mnist 784-512x3-10"])
    cases.append(("mnist 784-512x3-10", models["folded"], "synthetic"))
    for name, model, source in cases:
        log(f"predictor: {name}")
        subjects = [
            bench.ort_subject(model, "bare session.run", provider=args.provider, threads=1),
            bench.predictor_subject(model, "Predictor.predict", provider=args.provider, threads=1),
        ]
        result = bench.run_benchmark(
            subjects,
            [1, 32, 1024],
            repeats=args.max_repeats * 2,
            warmup=5,
            budget_s=args.budget,
            min_repeats=10,
            order="shuffle",
            cpu_clock=time.thread_time,
        )
        out["groups"].append(
            {
                "section": "predictor",
                "network": name,
                "model": source,
                "threads": 1,
                "opt": "all",
                "provider": args.provider,
                "result": result.to_dict(),
                "pairs": {
                    str(b): {
                        "Predictor/bare": paired(result, "Predictor.predict", "bare session.run", b)
                    }
                    for b in (1, 32, 1024)
                },
            }
        )


# --- whole-process sections -----------------------------------------------------------------


def python_cmd(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def inner_time(run: bench.ProcessRun) -> float | None:
    """The `inner_s` a child script printed as its last JSON line, if any."""
    for line in reversed(run.stdout.strip().splitlines()):
        with contextlib.suppress(ValueError):
            return float(json.loads(line)["inner_s"])
    return None


def interleaved_processes(
    cmds: dict[str, list[str]], repeats: int, sample_rss: bool = False
) -> dict[str, list[bench.ProcessRun]]:
    runs: dict[str, list[bench.ProcessRun]] = {k: [] for k in cmds}
    for _ in range(repeats):
        for name, cmd in cmds.items():
            r = bench.measure_process(cmd, sample_rss=sample_rss)
            if r.returncode != 0:
                raise RuntimeError(f"{name} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
            runs[name].append(r)
    return runs


def summarize_runs(runs: list[bench.ProcessRun]) -> dict[str, Any]:
    walls = [r.wall_s for r in runs]
    inner = [t for t in (inner_time(r) for r in runs) if t is not None]
    d: dict[str, Any] = {
        "n": len(runs),
        "wall_median_s": float(np.median(walls)),
        "wall_min_s": float(np.min(walls)),
        "wall_max_s": float(np.max(walls)),
        "maxrss_mb_median": float(np.median([r.maxrss_bytes for r in runs])) / 2**20,
        "runs": [r.to_dict() for r in runs],
    }
    if inner:
        d.update(
            inner_median_s=float(np.median(inner)),
            inner_min_s=float(np.min(inner)),
            inner_max_s=float(np.max(inner)),
        )
    anon = [r.peak_anon_bytes for r in runs if r.peak_anon_bytes is not None]
    if anon:
        d["peak_rss_anon_mb_median"] = float(np.median(anon)) / 2**20
        d["peak_rss_file_mb_median"] = (
            float(np.median([r.peak_file_bytes or 0 for r in runs])) / 2**20
        )
    return d


@contextlib.contextmanager
def scratch_dir(args: argparse.Namespace) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="bn-onnx-bench-", dir=args.scratch))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def write_big_npy(path: Path, rows: int, width: int, chunk: int = 65536) -> None:
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, width))
    rng = np.random.default_rng(0)
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        x[start:stop] = rng.standard_normal((stop - start, width), dtype=np.float32)
    x.flush()
    del x
    # Write the pages back now: writeback during the timed runs would slow whichever runs first.
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


BARE_LOOP = """
import json, sys, time
import numpy as np
import onnxruntime as ort
model, x_path, y_path, bs, threads = sys.argv[1:6]
so = ort.SessionOptions()
so.intra_op_num_threads = int(threads)
so.inter_op_num_threads = 1
t0 = time.perf_counter()
sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
name = sess.get_inputs()[0].name
X = np.load(x_path, mmap_mode="r")
bs = int(bs)
Y = None
for i in range(0, X.shape[0], bs):
    y = sess.run(None, {name: np.ascontiguousarray(X[i:i + bs])})[0]
    if Y is None:
        shape = (X.shape[0],) + y.shape[1:]
        Y = np.lib.format.open_memmap(y_path, mode="w+", dtype=y.dtype, shape=shape)
    Y[i:i + len(y)] = y
Y.flush()
print(json.dumps({"inner_s": time.perf_counter() - t0}))
"""


def section_run(args: argparse.Namespace, out: dict[str, Any]) -> None:
    rows = args.run_rows
    # A light network, so that reading the input and writing the output weigh as much as they
    # can against the model: the overhead of `bn-onnx run` shows, and the section stays short.
    widths = RUN_NETWORK
    bn_onnx_exe = shutil.which("bn-onnx")
    if bn_onnx_exe is None:
        out["skipped"]["run"] = "the bn-onnx command is not on PATH"
        return
    with scratch_dir(args) as d:
        model = d / "run.folded.onnx"
        onnx_io.save_model(onnx.load_from_string(make_variants(widths)[0]["folded"]), model)
        x = d / "x.npy"
        log(f"run: writing {rows} x {widths[0]} float32 to {x}")
        write_big_npy(x, rows, widths[0])
        size = x.stat().st_size
        threads = "2"
        cmds = {
            "bn-onnx run": [
                bn_onnx_exe,
                "run",
                str(model),
                "--input",
                str(x),
                "-o",
                str(d / "y_cli.npy"),
                "--provider",
                "cpu",
                "--threads",
                threads,
                "--batch-size",
                "8192",
                "--quiet",
            ],
            "bare chunked session.run": python_cmd(BARE_LOOP)
            + [str(model), str(x), str(d / "y_bare.npy"), "8192", threads],
        }
        log(f"run: {args.run_repeats} interleaved rounds of {list(cmds)}")
        runs = interleaved_processes(cmds, args.run_repeats, sample_rss=True)
        same = np.array_equal(np.load(d / "y_cli.npy"), np.load(d / "y_bare.npy"))
    res = {k: summarize_runs(v) for k, v in runs.items()}
    walls = {k: np.array([r.wall_s for r in v]) for k, v in runs.items()}
    per_round = walls["bare chunked session.run"] / walls["bn-onnx run"]
    out["run"] = {
        "rows": rows,
        "width": widths[0],
        "model": f"{'-'.join(map(str, widths))} folded (synthetic)",
        "input_bytes": size,
        "threads": int(threads),
        "batch_size": 8192,
        "outputs_identical": bool(same),
        "processes": res,
        "throughput_ratio": float(
            np.median(walls["bare chunked session.run"]) / np.median(walls["bn-onnx run"])
        ),
        "throughput_ratio_min": float(per_round.min()),
        "throughput_ratio_max": float(per_round.max()),
    }


FOLD_CHILD = """
import json, sys, time
t0 = time.perf_counter()
what, src, dst = sys.argv[1:4]
if what == "load+save":
    import onnx
    t0 = time.perf_counter()
    m = onnx.load(src)
    onnx.save(m, dst)
elif what == "bn_onnx.fold":
    from bn_onnx.fold import fold_file
    t0 = time.perf_counter()
    fold_file(src, dst)
elif what == "onnxscript.optimizer":
    import onnx, onnxscript.optimizer
    t0 = time.perf_counter()
    m = onnx.load(src)
    m = onnxscript.optimizer.optimize(m)
    onnx.save(m, dst)
    n_bn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
    print(json.dumps({"bn_left": n_bn}))
elif what == "import only":
    import onnx, numpy
    import bn_onnx.fold
print(json.dumps({"inner_s": time.perf_counter() - t0}))
"""


def section_fold(args: argparse.Namespace, out: dict[str, Any]) -> None:
    try:
        import bn_onnx.fold  # noqa: F401
    except ImportError:
        out["skipped"]["fold"] = "bn_onnx.fold is not there yet"
        return
    cases = {"chain 200x64": [64] * 201 + [10], "wide 4x2048": [2048] * 5 + [10]}
    have_onnxscript = importlib.util.find_spec("onnxscript") is not None
    if not have_onnxscript:
        out["skipped"]["fold vs onnxscript"] = "onnxscript is not installed"
    out["fold"] = {}
    with scratch_dir(args) as d:
        for name, widths in cases.items():
            src = d / "in.onnx"
            onnx_io.save_model(graphs.build_mlp(widths, "unfolded"), src)
            size = src.stat().st_size
            whats = ["load+save", "bn_onnx.fold", "onnxscript.optimizer", "import only"]
            if not have_onnxscript:
                whats.remove("onnxscript.optimizer")
            cmds = {
                what: python_cmd(FOLD_CHILD) + [what, str(src), str(d / f"out_{what}.onnx")]
                for what in whats
            }
            log(f"fold: {name} ({size / 2**20:.1f} MB), {args.fold_repeats} rounds")
            runs = interleaved_processes(cmds, args.fold_repeats, sample_rss=True)
            res = {k: summarize_runs(v) for k, v in runs.items()}
            bn_left = None
            for line in runs.get("onnxscript.optimizer", [bench.ProcessRun(0, 0, 0, "", "")])[
                0
            ].stdout.splitlines():
                with contextlib.suppress(ValueError, KeyError):
                    bn_left = json.loads(line)["bn_left"]
            folded = onnx.load(str(d / "out_bn_onnx.fold.onnx"))
            inner = {k: np.array([inner_time(r) for r in v]) for k, v in runs.items()}
            base_rss = res["import only"]["maxrss_mb_median"]
            out["fold"][name] = {
                "widths_summary": f"{len(widths) - 2} blocks, width {max(widths)}",
                "model_mb": size / 2**20,
                "processes": res,
                "fold_over_load_save": float(
                    np.median(inner["bn_onnx.fold"]) / np.median(inner["load+save"])
                ),
                "fold_over_onnxscript": float(
                    np.median(inner["bn_onnx.fold"]) / np.median(inner["onnxscript.optimizer"])
                )
                if have_onnxscript
                else None,
                "fold_peak_over_model": (res["bn_onnx.fold"]["maxrss_mb_median"] - base_rss)
                / (size / 2**20),
                "load_save_peak_over_model": (res["load+save"]["maxrss_mb_median"] - base_rss)
                / (size / 2**20),
                "onnxscript_bn_left": bn_left,
                "bn_left_by_fold": sum(
                    n.op_type == "BatchNormalization" for n in folded.graph.node
                ),
            }


def console_script() -> tuple[str | None, str | None]:
    """(the installed `bn-onnx` script beside this Python, the one on PATH if different)."""
    direct = Path(sys.executable).parent / "bn-onnx"
    on_path = shutil.which("bn-onnx")
    d = str(direct) if direct.is_file() else None
    return d or on_path, on_path if on_path and on_path != d else None


def import_profile(argv: list[str], top: int = 12) -> list[dict[str, Any]]:
    """The slowest imports (cumulative) of `bn-onnx ARGV`, from `python -X importtime`."""
    code = (
        "import sys; from bn_onnx.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    )
    r = bench.measure_process([sys.executable, "-X", "importtime", "-c", code, *argv])
    rows = []
    for line in r.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cum_us, name = line[len("import time:") :].split("|", 2)
        name = name[1:]  # the one space after the bar; the rest is indentation by depth
        depth = (len(name) - len(name.lstrip())) // 2
        rows.append(
            {
                "module": name.strip(),
                "depth": depth,
                "self_ms": int(self_us) / 1e3,
                "cumulative_ms": int(cum_us) / 1e3,
            }
        )
    return sorted((r for r in rows if r["depth"] == 0), key=lambda r: -r["cumulative_ms"])[:top]


def no_site_cli(argv: list[str]) -> list[str]:
    """`bn-onnx ARGV` under `python -S`: site-packages on the path, but no .pth start-up hooks.

    This machine's site runs .pth hooks (a sandbox certificate hook importing certifi, the
    editable-install finder) that a plain install does not have; this shows the project's share.
    """
    import site

    root = str(Path(bench.__file__).resolve().parent.parent)
    paths = [root, *site.getsitepackages()]
    code = (
        f"import sys; sys.path[:0] = {paths!r}\n"
        "from bn_onnx.cli import main\nsys.exit(main(sys.argv[1:]))"
    )
    return [sys.executable, "-S", "-c", code, *argv]


def section_startup(args: argparse.Namespace, out: dict[str, Any]) -> None:
    exe, shim = console_script()
    if exe is None:
        out["skipped"]["startup"] = "the bn-onnx command is not installed"
        return
    with scratch_dir(args) as d:
        src = d / "small.onnx"
        onnx_io.save_model(graphs.build_mlp(NETWORKS["digits 64-128-64-10"], "unfolded"), src)
        cmds = {
            "python -c pass": python_cmd("pass"),
            "python -S -c pass": [sys.executable, "-S", "-c", "pass"],
            "bn-onnx --help": [exe, "--help"],
        }
        if shim:
            cmds["bn-onnx --help (PATH shim)"] = [shim, "--help"]
        cmds["bn-onnx --help (no .pth hooks)"] = no_site_cli(["--help"])
        has_fold_cli = (Path(bench.__file__).parent / "cli" / "fold.py").is_file()
        fold_argv = ["fold", str(src), "-o", str(d / "o.onnx")]
        if has_fold_cli:
            cmds["bn-onnx fold (small)"] = [exe, *fold_argv]
            cmds["bn-onnx fold (small, no .pth hooks)"] = no_site_cli(fold_argv)
        log(f"startup: {list(cmds)} x {args.startup_repeats}")
        runs = interleaved_processes(cmds, args.startup_repeats)
        torch_check = {}
        for name, argv in (("bn-onnx --help", ["--help"]), ("bn-onnx fold (small)", fold_argv)):
            if name not in cmds:
                continue
            probe = (
                python_cmd(
                    "import sys; from bn_onnx.cli import main\n"
                    "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
                    "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)"
                )
                + argv
            )
            r = bench.measure_process(probe)
            torch_check[name] = "NO-TORCH" in r.stderr
        profiles = {"bn-onnx --help": import_profile(["--help"])}
        if has_fold_cli:
            profiles["bn-onnx fold (small)"] = import_profile(fold_argv)
    out["startup"] = {
        "script": exe,
        "path_shim": shim,
        "processes": {k: summarize_runs(v) for k, v in runs.items()},
        "torch_not_imported": torch_check,
        "fold_cli_present": has_fold_cli,
        "slowest_imports": profiles,
    }


TRAIN_CHILD = """
import json, sys, time
import torch
what, n, width, classes, bs, epochs, threads = sys.argv[1], *(int(v) for v in sys.argv[2:8])
torch.set_num_threads(threads)
if what == "bn_onnx.train":
    from bn_onnx.train import TrainSettings, train
    s = TrainSettings(dataset="synthetic", samples=n, features=width, classes=classes,
                      hidden=(128, 64), optimizer="adam", epochs=epochs, batch_size=bs,
                      patience=0, device="cpu", seed=0)
    r = train(s)
    rows = len(r.dataset.x_train)
    print(json.dumps({"inner_s": r.seconds, "rows": rows,
                      "samples_per_s": rows * len(r.history) / r.seconds}))
else:
    from bn_onnx.model import MLP
    from bn_onnx.model_config import MLPConfig
    rows = int(n * 0.7)  # the train split bn_onnx.train uses (0.15 val, 0.15 test)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(rows, width, generator=g)
    y = torch.randint(0, classes, (rows,), generator=g)
    model = MLP(MLPConfig(in_features=width, out_features=classes, hidden=(128, 64)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(rows, generator=g)
        for i in range(0, rows, bs):
            idx = perm[i:i + bs]
            if len(idx) < 2:
                continue
            opt.zero_grad(set_to_none=True)
            loss_fn(model(X[idx]), y[idx]).backward()
            opt.step()
    dt = time.perf_counter() - t0
    print(json.dumps({"inner_s": dt, "rows": rows, "samples_per_s": rows * epochs / dt}))
"""


def section_train(args: argparse.Namespace, out: dict[str, Any]) -> None:
    try:
        import bn_onnx.train  # noqa: F401
    except ImportError as exc:
        out["skipped"]["train"] = f"bn_onnx.train cannot be imported: {exc}"
        return
    n, width, classes, bs = (4000 if args.quick else 20000), 20, 3, 64
    epochs, threads = (1 if args.quick else 3), 1
    cmds = {
        what: python_cmd(TRAIN_CHILD) + [what, *map(str, (n, width, classes, bs, epochs, threads))]
        for what in ("bn_onnx.train", "hand-written torch loop")
    }
    log(f"train: {list(cmds)}, {n} samples x {epochs} epochs, batch {bs}")
    runs = interleaved_processes(cmds, 1 if args.quick else 3)
    res = {}
    for name, rs in runs.items():
        rates = [json.loads(r.stdout.strip().splitlines()[-1])["samples_per_s"] for r in rs]
        res[name] = {"samples_per_s": rates, "median": float(np.median(rates))}
    per_round = np.array(res["bn_onnx.train"]["samples_per_s"]) / np.array(
        res["hand-written torch loop"]["samples_per_s"]
    )
    out["train"] = {
        "samples": n,
        "features": width,
        "classes": classes,
        "batch_size": bs,
        "epochs": epochs,
        "threads": threads,
        "hidden": [128, 64],
        "optimizer": "adam",
        "runs": res,
        "ratio": res["bn_onnx.train"]["median"] / res["hand-written torch loop"]["median"],
        "ratio_per_round": [float(v) for v in per_round],
        "note": "bn_onnx.train's rate counts its whole epoch loop (validation pass included)",
    }


# --- targets, table, plot -------------------------------------------------------------------


def evaluate_targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []
    var_groups = [g for g in out["groups"] if g["section"] == "variants"]
    if var_groups:
        cells = [
            (g["network"], g["threads"], g["opt"], b, p["folded/no_bn"], p["A/A no_bn copy/no_bn"])
            for g in var_groups
            for b, p in g["pairs"].items()
        ]
        worst = max(cells, key=lambda c: c[4]["ratio"])
        worst_aa = max(abs(c[5]["ratio"] - 1) for c in cells)
        over = [c for c in cells if c[4]["ratio"] > 1.02]
        # CPU time of the calling thread is meaningful with one intra-op thread only.
        one_thread = [c for c in cells if c[1] == 1 and "cpu_ratio" in c[4]]
        over_cpu = [c for c in one_thread if c[4]["cpu_ratio"] > 1.02]
        structural = all(f["folded_like_no_bn"] for f in out["networks"].values())
        targets.append(
            {
                "id": "folded/no_bn <= 1.02",
                "met": not over,
                "cells": len(cells),
                "cells_over": len(over),
                "one_thread_cells": len(one_thread),
                "one_thread_cells_over_by_cpu_time": len(over_cpu),
                "worst_cpu_ratio_1t": max((c[4]["cpu_ratio"] for c in one_thread), default=None),
                "worst": {
                    "network": worst[0],
                    "threads": worst[1],
                    "opt": worst[2],
                    "batch": worst[3],
                    **worst[4],
                },
                "median_of_cells": float(np.median([c[4]["ratio"] for c in cells])),
                "aa_noise_max_abs": worst_aa,
                "folded_graph_equals_no_bn_graph": structural,
                "over": [
                    {
                        "network": c[0],
                        "threads": c[1],
                        "opt": c[2],
                        "batch": c[3],
                        **c[4],
                        "aa": c[5]["ratio"],
                    }
                    for c in over
                ],
            }
        )
    for g in out["groups"]:
        if g["section"] != "predictor" or g["network"] != "digits":
            continue
        for b, limit in (("1", 1.25), ("1024", 1.02)):
            p = g["pairs"][b]["Predictor/bare"]
            targets.append(
                {
                    "id": f"Predictor/bare <= {limit} at batch {b} (digits)",
                    "met": p["ratio"] <= limit,
                    **p,
                }
            )
    if "run" in out:
        r = out["run"]
        cli = r["processes"]["bn-onnx run"]
        targets.append(
            {
                "id": "bn-onnx run throughput >= 0.95 x bare chunked loop",
                "met": r["throughput_ratio"] >= 0.95,
                "ratio": r["throughput_ratio"],
                "min": r["throughput_ratio_min"],
                "max": r["throughput_ratio_max"],
            }
        )
        targets.append(
            {
                "id": "bn-onnx run peak memory < input size",
                "met": cli["maxrss_mb_median"] * 2**20 < r["input_bytes"],
                "input_mb": r["input_bytes"] / 2**20,
                "maxrss_mb": cli["maxrss_mb_median"],
                "peak_anon_mb": cli.get("peak_rss_anon_mb_median"),
                "peak_file_mb": cli.get("peak_rss_file_mb_median"),
                "bare_maxrss_mb": r["processes"]["bare chunked session.run"]["maxrss_mb_median"],
            }
        )
    for name, f in out.get("fold", {}).items():
        targets.append(
            {
                "id": f"fold time <= 1.5 x load+save ({name})",
                "met": f["fold_over_load_save"] <= 1.5,
                "ratio": f["fold_over_load_save"],
            }
        )
        if f["fold_over_onnxscript"] is not None:
            targets.append(
                {
                    "id": f"fold faster than onnxscript.optimizer ({name})",
                    "met": f["fold_over_onnxscript"] < 1.0,
                    "ratio": f["fold_over_onnxscript"],
                }
            )
        targets.append(
            {
                "id": f"fold peak memory <= 2 x model ({name})",
                "met": f["fold_peak_over_model"] <= 2.0,
                "ratio": f["fold_peak_over_model"],
                "model_mb": f["model_mb"],
            }
        )
    if "train" in out:
        t = out["train"]
        targets.append(
            {
                "id": "bn-onnx train samples/s >= 0.9 x hand-written torch loop",
                "met": t["ratio"] >= 0.9,
                "ratio": t["ratio"],
                "ratio_per_round": t.get("ratio_per_round"),
                "train_samples_per_s": t["runs"]["bn_onnx.train"]["samples_per_s"],
                "loop_samples_per_s": t["runs"]["hand-written torch loop"]["samples_per_s"],
            }
        )
    if "startup" in out:
        p = out["startup"]["processes"]
        h = p["bn-onnx --help"]
        targets.append(
            {
                "id": "bn-onnx --help < 0.3 s",
                "met": h["wall_median_s"] < 0.3,
                "median_s": h["wall_median_s"],
                "min_s": h["wall_min_s"],
                "max_s": h["wall_max_s"],
                "python_startup_s": p["python -c pass"]["wall_median_s"],
                "torch_not_imported": out["startup"]["torch_not_imported"].get("bn-onnx --help"),
            }
        )
        if "bn-onnx fold (small)" in p:
            f = p["bn-onnx fold (small)"]
            targets.append(
                {
                    "id": "bn-onnx fold (small) < 1 s",
                    "met": f["wall_median_s"] < 1.0,
                    "median_s": f["wall_median_s"],
                    "min_s": f["wall_min_s"],
                    "max_s": f["wall_max_s"],
                    "torch_not_imported": out["startup"]["torch_not_imported"].get(
                        "bn-onnx fold (small)"
                    ),
                }
            )
    return targets


def summary_lines(out: dict[str, Any]) -> list[str]:
    lines = ["## ORT CPU latency, median ms (ratio to no_bn; A/A = second no_bn session)", ""]
    lines.append(
        "| network | threads/opt | batch | unfolded | folded | no_bn | unf/no_bn | "
        "fold/no_bn (IQR) | A/A | fold/no_bn CPU | A/A CPU |"
    )
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for g in out["groups"]:
        if g["section"] != "variants":
            continue
        rows = {(r["subject"], r["batch"]): r for r in g["result"]["rows"]}
        for b, p in g["pairs"].items():
            bi = int(b)
            f = p["folded/no_bn"]
            lines.append(
                f"| {g['network']} | {g['threads']}t {g['opt']} | {b} | "
                f"{rows['unfolded', bi]['median_ms']:.4g} | {rows['folded', bi]['median_ms']:.4g}"
                f" | {rows['no_bn', bi]['median_ms']:.4g} | {p['unfolded/no_bn']['ratio']:.3f} | "
                f"{f['ratio']:.3f} ({f['q1']:.2f}-{f['q3']:.2f}) | "
                f"{p['A/A no_bn copy/no_bn']['ratio']:.3f} | {_cpu(f, g)} | "
                f"{_cpu(p['A/A no_bn copy/no_bn'], g)} |"
            )
    fw = [g for g in out["groups"] if g["section"] == "frameworks"]
    if fw:
        lines += [
            "",
            "## torch eager eval against ORT, median ms (ratio to ORT folded)",
            "",
            "| network | threads | batch | ORT folded | ORT unfolded | torch eager | "
            "torch/ORT folded |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for g in fw:
            rows = {(r["subject"], r["batch"]): r for r in g["result"]["rows"]}
            for b in g["result"]["settings"]["batch_sizes"]:
                t = rows["torch eager (BN)", b]
                lines.append(
                    f"| {g['network']} | {g['threads']} | {b} | "
                    f"{rows['ort folded', b]['median_ms']:.4g} | "
                    f"{rows['ort unfolded', b]['median_ms']:.4g} | {t['median_ms']:.4g} | "
                    f"{t['ratio']:.2f} |"
                )
    pr = [g for g in out["groups"] if g["section"] == "predictor"]
    if pr:
        lines += [
            "",
            "## Predictor.predict against bare session.run (1 thread)",
            "",
            "| model | batch | bare ms | Predictor ms | ratio (IQR of per-round) | CPU ratio |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for g in pr:
            rows = {(r["subject"], r["batch"]): r for r in g["result"]["rows"]}
            for b, p in g["pairs"].items():
                q = p["Predictor/bare"]
                bi = int(b)
                lines.append(
                    f"| {g['network']} | {b} | {rows['bare session.run', bi]['median_ms']:.4g} | "
                    f"{rows['Predictor.predict', bi]['median_ms']:.4g} | {q['ratio']:.3f} "
                    f"({q['q1']:.2f}-{q['q3']:.2f}) | {_cpu(q, g)} |"
                )
    lines += ["", "## Targets", ""]
    for t in out["targets"]:
        facts = {k: v for k, v in t.items() if k not in ("id", "met", "over")}
        lines.append(f"- {'MET' if t['met'] else 'NOT MET'}: {t['id']}: {_compact(facts)}")
    if out["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in out["skipped"].items())]
    return lines


def _cpu(p: dict[str, Any], g: dict[str, Any]) -> str:
    if g["threads"] != 1 or "cpu_ratio" not in p:
        return "-"
    return f"{p['cpu_ratio']:.3f}"


def _compact(d: dict[str, Any]) -> str:
    parts = []
    for k, v in d.items():
        if isinstance(v, float):
            parts.append(f"{k}={v:.4g}")
        elif isinstance(v, dict):
            parts.append(f"{k}=({_compact(v)})")
        else:
            parts.append(f"{k}={v}")
    return ", ".join(parts)


def plot_suite(out: dict[str, Any], path: Path) -> None:
    """Top: wall-clock ratios to the no-BN network (optimization ALL, 1 and 2 threads).
    Bottom: the same from the calling thread's CPU time (1 thread, ALL and DISABLE), which
    other processes on a shared machine disturb far less. Bars: quartiles of per-round ratios.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    var = [g for g in out["groups"] if g["section"] == "variants"]
    nets = list(dict.fromkeys(g["network"] for g in var))
    if not nets:
        return
    fig, axes = plt.subplots(
        2, len(nets), figsize=(4.2 * len(nets), 7), squeeze=False, sharex="col"
    )
    colors = {cfg: c for cfg, c in zip(CONFIGS, ["C0", "C1", "C2", "C3"], strict=True)}
    panels = (
        (0, "", [(1, "all"), (2, "all")], "median wall latency / no-BN"),
        (1, "cpu_", [(1, "all"), (1, "disable")], "median CPU time / no-BN (1 thread)"),
    )
    for row, prefix, cfgs, ylabel in panels:
        for ax, net in zip(axes[row], nets, strict=True):
            top = 1.1
            for g in (g for g in var if g["network"] == net):
                cfg = (g["threads"], g["opt"])
                if cfg not in cfgs:
                    continue
                bs = [int(b) for b in g["pairs"]]
                for key, style in (("unfolded/no_bn", "-o"), ("folded/no_bn", "--s")):
                    r = [g["pairs"][str(b)][key] for b in bs]
                    if prefix and any(f"{prefix}ratio" not in p for p in r):
                        continue
                    med = np.array([p[f"{prefix}ratio"] for p in r])
                    lo = med - np.array([p[f"{prefix}q1"] for p in r])
                    hi = np.array([p[f"{prefix}q3"] for p in r]) - med
                    top = max(top, float(np.nanmax(med)) * 1.1)
                    ax.errorbar(
                        bs,
                        med,
                        yerr=np.clip([lo, hi], 0, None),
                        fmt=style,
                        color=colors[cfg],
                        capsize=2,
                        ms=4,
                        label=f"{key.split('/')[0]} {cfg[0]}t {cfg[1]}",
                    )
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.axhline(1.02, color="grey", lw=0.6, ls=":")
            ax.set_ylim(0.8, min(top, 2.5))
            ax.set(xscale="log")
            ax.grid(True, alpha=0.3)
            if row == 0:
                ax.set_title(net)
            else:
                ax.set_xlabel("batch size")
        axes[row][0].set_ylabel(ylabel)
        axes[row][-1].legend(fontsize=7)
    fig.suptitle(
        "ORT CPU: unfolded (solid) and folded (dashed) over the no-BN network; "
        "bars: quartiles of per-round ratios; dotted: 1.02"
    )
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer configs and rows")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"sections: {','.join(SECTIONS)}")
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--name", default=None, help="output name stem (default suite[_quick])")
    ap.add_argument("--scratch", default=None, help="folder for big temporary files")
    ap.add_argument("--budget", type=float, default=None, help="s of timed rounds per batch")
    ap.add_argument("--max-repeats", type=int, default=None)
    ap.add_argument("--run-rows", type=int, default=None, help="rows for the run section")
    ap.add_argument("--run-repeats", type=int, default=3)
    ap.add_argument("--fold-repeats", type=int, default=None)
    ap.add_argument("--startup-repeats", type=int, default=None)
    args = ap.parse_args(argv)
    q = args.quick
    args.budget = args.budget if args.budget is not None else (0.25 if q else 1.0)
    args.max_repeats = args.max_repeats or (20 if q else 200)
    args.run_rows = args.run_rows or (50_000 if q else 1_000_000)
    args.fold_repeats = args.fold_repeats or (1 if q else 3)
    args.startup_repeats = args.startup_repeats or (3 if q else 7)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections: {', '.join(sorted(unknown))}")

    out: dict[str, Any] = {
        "schema": "bn-onnx-bench-suite",
        "schema_version": 1,
        "machine": bench.machine_info(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "networks": {},
        "groups": [],
        "skipped": {},
    }
    if args.provider == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            out["skipped"]["cuda"] = (
                "CUDAExecutionProvider is not available in this onnxruntime build "
                f"({', '.join(ort.get_available_providers())}); nothing was measured"
            )
            sections = []
    t0 = time.perf_counter()
    funcs = {
        "variants": section_variants,
        "frameworks": section_frameworks,
        "predictor": section_predictor,
        "run": section_run,
        "fold": section_fold,
        "startup": section_startup,
        "train": section_train,
    }
    for s in sections:
        if args.provider == "cuda" and s in ("run", "fold", "startup", "train"):
            continue
        funcs[s](args, out)
    out["elapsed_s"] = time.perf_counter() - t0
    out["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    out["targets"] = evaluate_targets(out)
    stem = args.name or ("suite_quick" if q else "suite") + (
        "_cuda" if args.provider == "cuda" else ""
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    js = args.out_dir / f"{stem}.json"
    bench.save_json(out, js)
    lines = summary_lines(out)
    (args.out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot_suite(out, args.out_dir / f"{stem}.png")
    print("\n".join(lines))
    log(f"wrote {js} and .md/.png in {out['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
