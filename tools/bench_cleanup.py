"""What the cleanup buys: node counts and onnxruntime latency against onnxscript's optimizer.

Three commands:

    python tools/bench_cleanup.py export --out DIR [--nets mobilenet_v2,densenet121,...]
        Export CNNs with torch's dynamo exporter (`dynamo=True, optimize=False`), BN statistics
        and affine parameters randomized. `tiny_mobilenet` and `tiny_densenet` are built here
        in plain torch; the torchvision and timm names need those packages.
    python tools/bench_cleanup.py latency DIR/*.onnx [--rounds 100] [--runs 2] [--json OUT]
        Per file: the exporter's output, today's `bn_onnx.fold.fold_model`, that plus
        `bn_onnx.fold.cleanup.cleanup`, and `onnxscript.optimizer.optimize` of the same file. Node
        counts, the largest difference to the exporter's output (onnxruntime, optimizations
        off), and latency in onnxruntime (CPU, default graph optimizations, one intra-op
        thread), the variants interleaved round by round: wall time and the calling thread's
        CPU time (onnxruntime runs there with one intra-op thread, so other processes' time is
        left out); medians with min-max, and per-round ratios against onnxscript's output.
        Each round runs a variant at least `--runs` times and for at least 5 ms. Also the ops
        of the graph onnxruntime runs after its own optimizations (saved with
        `optimized_model_filepath`): where fold+cleanup and onnxscript's output give the same
        ops, their latency differs only by noise.
    python tools/bench_cleanup.py process FILE.onnx [...] [--repeats 10]
        Wall and CPU time of whole processes, interleaved: onnx-ir load + save; load + cleanup +
        save; `bn-onnx fold` as it is today. Shows what importing onnxscript costs when it is
        needed.

torch, torchvision and timm are needed only by `export`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------------
# export


_LIBS: list[Any] = []


def _import_torchvision() -> Any:
    """Import torchvision on the CPU build of torch.

    The registry's Linux torchvision wheels are CUDA builds whose `_C` library does not load
    against the CPU torch; the import then fails in torchvision's meta registrations, which
    need the schemas of `torchvision::nms` and `torchvision::qnms`. Defining the two schemas
    (no kernels: the nets measured here never call them) lets the import finish.
    """
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018 - defined when torchvision's own library loads
    except (AttributeError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBS.append(lib)  # the schemas live as long as this object
    import torchvision

    return torchvision


def _tiny_nets() -> dict[str, Any]:
    import torch
    from torch import nn

    class Block(nn.Module):  # MobileNetV2 inverted residual: expand, depthwise, project
        def __init__(self, c: int, t: int = 4) -> None:
            super().__init__()
            h = c * t
            self.body = nn.Sequential(
                nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c),
            )  # fmt: skip

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.body(x)

    class Dense(nn.Module):  # DenseNet layer: BN-ReLU-Conv on the concatenation so far
        def __init__(self, c: int, g: int) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, g, 3, padding=1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, self.body(x)], 1)

    def mobilenet() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
            *[Block(16) for _ in range(4)],
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )  # fmt: skip

    def densenet() -> nn.Module:
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1)]
        c = 16
        for _ in range(6):
            layers.append(Dense(c, 8))
            c += 8
        layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        return nn.Sequential(*layers, nn.Linear(c, 10))

    return {"tiny_mobilenet": (mobilenet, 64), "tiny_densenet": (densenet, 32)}


def _randomize_bn(model: Any, seed: int) -> None:
    """BN far from the identity, about 5% negative scales (as the corpus does)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            n = mod.num_features
            with torch.no_grad():
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if mod.weight is not None:
                    sign = torch.where(torch.rand(n, generator=g) < 0.05, -1.0, 1.0)
                    mod.weight.copy_(sign * (torch.rand(n, generator=g) + 0.5))
                    mod.bias.copy_(torch.randn(n, generator=g) * 0.2)


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tiny = _tiny_nets()
    for name in args.nets.split(","):
        torch.manual_seed(0)
        if name in tiny:
            make, size = tiny[name]
            model = make()
        elif name.startswith("timm:"):
            _import_torchvision()
            import timm

            name = name.removeprefix("timm:")
            model, size = timm.create_model(name, pretrained=False), 224
        else:
            model, size = getattr(_import_torchvision().models, name)(), 224
        model.eval()
        _randomize_bn(model, 0)
        x = torch.randn(1, 3, size, size)
        start = time.perf_counter()
        torch.onnx.export(
            model,
            (x,),
            str(out / f"{name}.onnx"),
            dynamo=True,
            optimize=False,
            external_data=False,
            verbose=False,
        )
        print(f"{name}: exported in {time.perf_counter() - start:.1f} s", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# latency


def _variants(path: Path) -> dict[str, bytes]:
    import onnx
    import onnx_ir as ir
    import onnxscript.optimizer

    from bn_onnx.fold import fold_model
    from bn_onnx.fold.cleanup import cleanup

    original = onnx.load(path)
    folded = fold_model(original, cleanup=False).model  # the fold alone
    model_ir = ir.serde.deserialize_model(folded)
    cleanup(model_ir)
    cleaned = ir.serde.serialize_model(model_ir)
    optimized = onnxscript.optimizer.optimize(onnx.load(path))
    return {
        "export": original.SerializeToString(),
        "fold": folded.SerializeToString(),
        "fold+cleanup": cleaned.SerializeToString(),
        "onnxscript": optimized.SerializeToString(),
    }


def _session(data: bytes, optimize: bool, save_to: str | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if save_to is not None:
        so.optimized_model_filepath = save_to
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _feeds(sess: Any) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    dtypes = {"tensor(float)": np.float32, "tensor(double)": np.float64}
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        feeds[i.name] = rng.normal(size=shape).astype(dtypes[i.type])
    return feeds


def _node_count(data: bytes) -> int:
    import onnx

    return len(onnx.load_from_string(data).graph.node)


def _runtime_ops(data: bytes) -> collections.Counter[str]:
    """Op types (domain-qualified) of the graph onnxruntime runs after its own optimizations.

    Two files whose runtime graphs hold the same ops run the same kernels: a comparison that
    does not depend on the machine's load.
    """
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "optimized.onnx")
        _session(data, optimize=True, save_to=path)
        graph = onnx.load(path).graph
    return collections.Counter(
        f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in graph.node
    )


def _spread(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "q1": q[0], "q3": q[2]}


_AGAIN = "onnxscript, 2nd session"


def cmd_latency(args: argparse.Namespace) -> None:
    results = []
    for path in map(Path, args.models):
        variants = _variants(path)
        oracle = _session(variants["export"], optimize=False)
        feeds = _feeds(oracle)
        want = oracle.run(None, feeds)
        row: dict[str, Any] = {"model": path.stem, "nodes": {}, "max_abs_err": {}}
        runtime = {name: _runtime_ops(data) for name, data in variants.items()}
        row["runtime_nodes"] = {name: sum(c.values()) for name, c in runtime.items()}
        mine, theirs = runtime["fold+cleanup"], runtime["onnxscript"]
        row["runtime_ops_only_in_cleanup"] = dict(mine - theirs)
        row["runtime_ops_only_in_onnxscript"] = dict(theirs - mine)
        sessions = {}
        for name, data in variants.items():
            row["nodes"][name] = _node_count(data)
            got = _session(data, optimize=False).run(None, feeds)
            row["max_abs_err"][name] = max(
                float(np.max(np.abs(g - w))) for g, w in zip(got, want, strict=True)
            )
            sessions[name] = _session(data, optimize=True)
            for _ in range(args.warmup):
                sessions[name].run(None, feeds)
        # A control: a second session of onnxscript's file. Its ratio to the first shows what
        # the machine and the session's place in memory alone make of "the same model".
        sessions[_AGAIN] = _session(variants["onnxscript"], optimize=True)
        for _ in range(args.warmup):
            sessions[_AGAIN].run(None, feeds)
        # Wall time, and this thread's CPU time: with one intra-op thread onnxruntime runs on
        # the calling thread, so the CPU time leaves out the time other processes took.
        wall: dict[str, list[float]] = {name: [] for name in sessions}
        cpu: dict[str, list[float]] = {name: [] for name in sessions}
        names = list(sessions)
        start = time.perf_counter()
        sessions["onnxscript"].run(None, feeds)
        runs = max(args.runs, int(0.005 / (time.perf_counter() - start)))
        row["runs_per_round"] = runs
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                start, start_cpu = time.perf_counter(), time.thread_time()
                for _ in range(runs):
                    sessions[name].run(None, feeds)
                cpu[name].append((time.thread_time() - start_cpu) / runs * 1e3)
                wall[name].append((time.perf_counter() - start) / runs * 1e3)
        for key, times in (("ms", wall), ("cpu_ms", cpu)):
            row[key] = {name: _spread(ts) for name, ts in times.items()}
            row[f"{key}_ratio_vs_onnxscript"] = {
                name: _spread([a / b for a, b in zip(ts, times["onnxscript"], strict=True)])
                for name, ts in times.items()
                if name != "onnxscript"
            }
        results.append(row)
        _print_row(row)
    print(f"load average: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def _print_row(row: dict[str, Any]) -> None:
    n = row["nodes"]
    print(
        f"{row['model']}: nodes export {n['export']}, fold {n['fold']}, "
        f"fold+cleanup {n['fold+cleanup']}, onnxscript {n['onnxscript']}"
    )
    r = row["runtime_nodes"]
    print(
        f"  after onnxruntime's optimizations: export {r['export']}, fold {r['fold']}, "
        f"fold+cleanup {r['fold+cleanup']}, onnxscript {r['onnxscript']}; ops only in "
        f"fold+cleanup {row['runtime_ops_only_in_cleanup']}, only in onnxscript "
        f"{row['runtime_ops_only_in_onnxscript']}"
    )
    for name, s in row["cpu_ms"].items():
        w = row["ms"][name]
        print(
            f"  {name:23s} cpu {s['median']:8.3f} ms [{s['min']:.3f}-{s['max']:.3f}]  "
            f"wall {w['median']:8.3f} ms [{w['min']:.3f}-{w['max']:.3f}]"
            + (f"  max |diff| {row['max_abs_err'][name]:.2e}" if name in row["max_abs_err"] else "")
        )
    for key in ("cpu_ms", "ms"):
        for name, s in row[f"{key}_ratio_vs_onnxscript"].items():
            print(
                f"  {'cpu ' if key == 'cpu_ms' else 'wall'} {name:23s} / onnxscript "
                f"{s['median']:.3f}x (IQR {s['q1']:.3f}-{s['q3']:.3f}, "
                f"range {s['min']:.3f}-{s['max']:.3f})"
            )


# --------------------------------------------------------------------------------------------
# process


_LOAD_SAVE = "import sys, onnx_ir as ir; ir.save(ir.load(sys.argv[1]), sys.argv[2])"
_LOAD_CLEAN_SAVE = (
    "import sys, onnx_ir as ir; from bn_onnx.fold.cleanup import cleanup; "
    "m = ir.load(sys.argv[1]); r = cleanup(m); ir.save(m, sys.argv[2]); "
    "print('used onnxscript' if 'onnxscript' in sys.modules else 'no onnxscript', file=sys.stderr)"
)


def cmd_process(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "out.onnx")
        for path in args.models:
            commands = {
                "onnx-ir load+save": [sys.executable, "-c", _LOAD_SAVE, path, out],
                "load+cleanup+save": [sys.executable, "-c", _LOAD_CLEAN_SAVE, path, out],
                "bn-onnx fold (today)": [
                    sys.executable, "-m", "bn_onnx", "fold", path, "-o", out, "-q",
                ],
            }  # fmt: skip
            # Wall time, and the child's CPU time (user + system: not the time other processes
            # took; a process that waits on the disk would show less CPU than wall time).
            wall: dict[str, list[float]] = {k: [] for k in commands}
            cpu: dict[str, list[float]] = {k: [] for k in commands}
            notes = set()
            for r in range(args.repeats):
                keys = list(commands)
                for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                    before = resource.getrusage(resource.RUSAGE_CHILDREN)
                    start = time.perf_counter()
                    done = subprocess.run(commands[key], capture_output=True, text=True, check=True)
                    wall[key].append(time.perf_counter() - start)
                    after = resource.getrusage(resource.RUSAGE_CHILDREN)
                    cpu[key].append(
                        after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
                    )
                    if key == "load+cleanup+save":
                        notes.add(done.stderr.strip())
            print(f"{Path(path).name} ({', '.join(sorted(notes))}):")
            for label, times in (("cpu ", cpu), ("wall", wall)):
                base = times["onnx-ir load+save"]
                for key, ts in times.items():
                    s = _spread(ts)
                    ratio = _spread([a / b for a, b in zip(ts, base, strict=True)])
                    print(
                        f"  {label} {key:22s} {s['median']:.3f} s [{s['min']:.3f}-{s['max']:.3f}]"
                        f"  {ratio['median']:.2f}x load+save "
                        f"[{ratio['min']:.2f}-{ratio['max']:.2f}]"
                    )
    print(f"load average: {os.getloadavg()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="export CNNs with torch's dynamo exporter")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--nets",
        default="tiny_mobilenet,tiny_densenet,mobilenet_v2,resnet18,shufflenet_v2_x1_0,"
        "efficientnet_b0,densenet121,timm:dpn68",
    )
    p = sub.add_parser("latency", help="node counts and onnxruntime latency")
    p.add_argument("models", nargs="+")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--runs", type=int, default=2, help="runs per variant per round")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json")
    p = sub.add_parser("process", help="whole-process wall time")
    p.add_argument("models", nargs="+")
    p.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    {"export": cmd_export, "latency": cmd_latency, "process": cmd_process}[args.command](args)


if __name__ == "__main__":
    main()
