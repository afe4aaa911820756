"""INT8 pipelines side by side: onnxruntime's own flow (A) against `bn-onnx quantize` (B).

A: `onnxruntime.quantization.shape_inference.quant_pre_process` (symbolic shape inference,
   onnxruntime's optimizer) then `quantize_static`; where the pre-process crashes, again with
   `skip_symbolic_shape=True` (the table says so).
B: `bn_onnx.quantize.quantize_model`: the quantization-aware fold, onnx shape inference and
   onnxruntime's basic optimizations, then the same `quantize_static`.
Both: QDQ, per-channel weights, MinMax, the kernels `choose_kernels` picks for this CPU, the
same calibration batches.

Models: the shipped digits MLP (calibrated on its checkpoint's training split, accuracy on its
test split) and small CNNs built here in torch (resnet-like, mobilenet-like, Conv-ReLU-BN-Conv1x1)
with their BNs randomized as `tools/make_arch_corpus.py` does, exported with dynamo
(`optimize=False`) and the TorchScript exporter (`training=PRESERVE`, BNs kept), batch dynamic.
Per model and pipeline: nodes, BNs left, float Conv/Gemm/MatMul left after onnxruntime's own
optimization (level extended: its QDQ fusions), Q/DQ count, file size, latency at batch 1 and
8 (1 thread, interleaved rounds in shuffled order, medians with the quartiles), SQNR against
the float model on held-out inputs, accuracy where labels exist.

    python tools/bench_quantize.py                    # a few minutes on 2 shared cores
    python tools/bench_quantize.py --nets digits --rounds 11 --json q.json
    python tools/bench_quantize.py --corpus tests/data/corpus --rounds 15 --json c.json

`--corpus DIR` runs the same pipelines and columns (no bound sweep) on every file that DIR's
manifest.json lists with status ok (the architecture corpus, `tools/make_arch_corpus.py`).
Calibration (64 rows) and held-out probes (64 rows) are seeded N(0, 1) draws in each input's
manifest shape, batch axis first. The corpus files have a fixed batch of 1: the batch axis of
the inputs and outputs is made symbolic when onnxruntime then gives, at batch 8, the rows of
eight batch-1 runs (within 1e-4); otherwise the file stays batch 1 and has no batch-8 figure.
A file A or B cannot quantize gets a row saying which and why.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bn_onnx.bench import Stats, time_interleaved  # noqa: E402
from bn_onnx.quantize import choose_kernels, quantize_model  # noqa: E402
from bn_onnx.quantize.pipeline import batches  # noqa: E402
from bn_onnx.quantize.proof import sqnr_db  # noqa: E402

FLOAT_LINEAR = {
    "Conv",
    "FusedConv",
    "NhwcFusedConv",
    "ConvTranspose",
    "Gemm",
    "FusedGemm",
    "MatMul",
    "FusedMatMul",
}
IMG = (3, 32, 32)
PIPELINES = ("fp32", "A", "B", "B full fold")
SWEEP = (1.25, 1.5, 2.0, 3.0)  # bounds of the quantization-aware fold tried for SQNR


def _corpus() -> Any:
    spec = importlib.util.spec_from_file_location("corpus", ROOT / "tools" / "make_arch_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["corpus"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


# --- small CNNs -----------------------------------------------------------------------------


def _nets() -> dict[str, Any]:
    import torch
    from torch import nn

    def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list:
        return [
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.a = nn.Sequential(*cbr(cin, cout, 3, stride), nn.ReLU())
            self.b = nn.Sequential(*cbr(cout, cout, 3))
            self.skip = (
                nn.Sequential(*cbr(cin, cout, 1, stride))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.b(self.a(x)) + self.skip(x))

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
            super().__init__()
            mid = cin * expand
            self.body = nn.Sequential(
                *cbr(cin, mid, 1),
                nn.ReLU6(),
                *cbr(mid, mid, 3, stride, groups=mid),
                nn.ReLU6(),
                *cbr(mid, cout, 1),
            )
            self.res = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.body(x)
            return x + y if self.res else y

    def head(c: int) -> list:
        return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]

    def resnet_like() -> nn.Module:
        return nn.Sequential(
            *cbr(3, 16),
            nn.ReLU(),
            Block(16, 16, 1),
            Block(16, 32, 2),
            Block(32, 64, 2),
            *head(64),
        )

    def mobilenet_like() -> nn.Module:
        return nn.Sequential(
            *cbr(3, 16, 3, 2),
            nn.ReLU6(),
            InvertedResidual(16, 16, 1),
            InvertedResidual(16, 24, 2),
            InvertedResidual(24, 24, 1),
            InvertedResidual(24, 32, 2),
            *head(32),
        )

    def post_bn() -> nn.Module:  # Conv -> ReLU -> BN -> Conv1x1: BN folds forward only
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.BatchNorm2d(32),
            nn.Conv2d(32, 32, 1),
            nn.ReLU(),
            nn.BatchNorm2d(32),
            nn.Conv2d(32, 64, 1),
            *head(64),
        )

    return {"resnet_like": resnet_like, "mobilenet_like": mobilenet_like, "post_bn": post_bn}


def export_cnn(name: str, build: Any, exporter: str, corpus: Any) -> onnx.ModelProto:
    """Build, randomize the BNs (seeded by name), export with a dynamic batch dimension."""
    import torch

    torch.manual_seed(corpus._seed(name))
    model = build().eval()
    example = [torch.randn(1, *IMG)]
    corpus.randomize_bn(model, example, np.random.default_rng(corpus._seed(name)))
    names = {"input_names": ["input"], "output_names": ["logits"]}
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}}
    with corpus._quiet(), torch.no_grad():
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=1024)
            prog = torch.onnx.export(
                model,
                tuple(example),
                dynamo=True,
                optimize=False,
                opset_version=18,
                dynamic_shapes=({0: batch},),
                **names,
            )
            proto = prog.model_proto
            corpus._strip_stack_traces(proto)
            return proto
        buf = io.BytesIO()
        torch.onnx.export(
            model,
            tuple(example),
            buf,
            dynamo=False,
            opset_version=18,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=True,
            dynamic_axes=axes,
            **names,
        )
        return onnx.load_from_string(buf.getvalue())


# --- the pipelines ----------------------------------------------------------------------------


def pipeline_a(model: onnx.ModelProto, calib: list[dict], kernels: Any, tmp: Path) -> tuple:
    """onnxruntime's own flow; returns (model, note)."""
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from bn_onnx.quantize.pipeline import _reader, static_settings

    src, pre, out = tmp / "a_in.onnx", tmp / "a_pre.onnx", tmp / "a_int8.onnx"
    onnx.save(model, src)
    note = ""
    try:
        with _silent():
            quant_pre_process(str(src), str(pre))
    except Exception as exc:  # noqa: BLE001 - the point is to record the crash
        note = f"quant_pre_process crashed ({type(exc).__name__}); skip_symbolic_shape=True"
        with _silent():
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    with _silent():
        quantize_static(str(pre), str(out), _reader(calib), **static_settings(kernels))
    return onnx.load(out), note


@contextlib.contextmanager
def _silent() -> Any:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            root.setLevel(level)


def _session(model: onnx.ModelProto, level: str = "all", save: Path | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    if save is not None:
        opts.optimized_model_filepath = str(save)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def predict(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The first output on x, run in chunks of the input's fixed batch size where it has one."""
    s = _session(model)
    rows = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value or len(x)
    out = [s.run(None, {"input": x[i : i + rows]})[0] for i in range(0, len(x), rows)]
    return np.concatenate(out)


def structure(model: onnx.ModelProto, tmp: Path, tag: str) -> dict[str, Any]:
    """Node counts of the file and float linear ops after onnxruntime's own optimization."""
    ops = [n.op_type for n in model.graph.node]
    saved = tmp / f"{tag}.ort.onnx"
    _session(model, "extended", saved)
    after = [n.op_type for n in onnx.load(saved).graph.node]
    return {
        "nodes": len(ops),
        "bn_left": ops.count("BatchNormalization"),
        "bn_after_ort": after.count("BatchNormalization"),
        "qdq": ops.count("QuantizeLinear") + ops.count("DequantizeLinear"),
        "float_linear_after_ort": sum(op in FLOAT_LINEAR for op in after),
        "bytes": len(model.SerializeToString()),
    }


def latencies(
    models: dict[str, onnx.ModelProto], x: np.ndarray, rounds: int, sizes: tuple = (1, 8)
) -> dict:
    """Per model and batch size: median and quartiles in ms, interleaved, 1 thread."""
    out: dict[str, dict[str, Any]] = {k: {} for k in models}
    blobs: dict[bytes, str] = {}
    same = {}  # a model identical to one before it is timed once
    for k, m in models.items():
        same[k] = blobs.setdefault(m.SerializeToString(), k)
    sessions = {k: _session(m) for k, m in models.items() if same[k] == k}
    for batch in sizes:
        feed = {"input": np.ascontiguousarray(x[:batch])}
        inner = 10 if batch == 1 else 2
        calls = []
        for s in sessions.values():
            s.run(None, feed)  # warm-up
            calls.append(lambda s=s, f=feed, n=inner: [s.run(None, f) for _ in range(n)])
        cpu = np.empty((len(calls), rounds))
        wall = time_interleaved(
            calls, rounds, order="shuffle", cpu_clock=time.thread_time, cpu_out=cpu
        )
        for k, w, c in zip(sessions, wall / inner, cpu / inner, strict=True):
            st = Stats.of(w)
            out[k][f"b{batch}"] = [st.median_s * 1e3, st.q1_s * 1e3, st.q3_s * 1e3]
            out[k][f"b{batch}_cpu"] = float(np.median(c)) * 1e3
    for k, first in same.items():
        out[k] = out[first]
    return out


# --- the models -------------------------------------------------------------------------------


def digits_case() -> tuple[onnx.ModelProto, list[dict], np.ndarray, np.ndarray | None]:
    from bn_onnx.checkpoint import read_checkpoint
    from bn_onnx.data import load_split_from_checkpoint_meta

    data = load_split_from_checkpoint_meta(read_checkpoint(ROOT / "models/digits/checkpoint").meta)
    model = onnx.load(ROOT / "models/digits/model.onnx")
    return model, batches({"input": data.x_train}), data.x_test, np.asarray(data.y_test)


def cnn_case(proto: onnx.ModelProto, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    calib = rng.standard_normal((64, *IMG)).astype(np.float32)
    probe = rng.standard_normal((64, *IMG)).astype(np.float32)
    return proto, batches({"input": calib}, 16), probe, None


class Skip(Exception):
    """A pipeline could not quantize the model; the message names which and why."""


def _failed(which: str, exc: Exception) -> Skip:
    first = (str(exc).strip().splitlines() or [""])[0][:160]
    return Skip(f"{which} failed: {type(exc).__name__}: {first}")


def measure(
    name: str,
    case: tuple,
    kernels: Any,
    rounds: int,
    sweep: bool = True,
    sizes: tuple = (1, 8),
) -> dict[str, Any]:
    model, calib, probe, labels = case
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t = time.perf_counter()
        a_failed = None
        try:
            a, note = pipeline_a(model, calib, kernels, tmp)
        except Exception as exc:  # noqa: BLE001 - reported in the table; B is still tried
            a_failed = _failed("A", exc)
        a_s = time.perf_counter() - t
        t = time.perf_counter()
        try:
            with _silent():
                b = quantize_model(model, calib, kernels).model
                b_full = quantize_model(model, calib, kernels, max_row_range_growth=None).model
        except Exception as exc:  # noqa: BLE001 - reported in the table
            both = f"{a_failed}; " if a_failed else ""
            raise Skip(both + str(_failed("B", exc))) from exc
        if a_failed:
            raise Skip(f"{a_failed}; B quantizes it (not timed without A)")
        b_s = time.perf_counter() - t
        models = {"fp32": model, "A": a, "B": b, "B full fold": b_full}
        ref = predict(model, probe)
        row: dict[str, Any] = {"model": name, "a_note": note, "quantize_s": [a_s, b_s]}
        row["bound_sweep"] = {}
        for bound in SWEEP if sweep else ():
            with _silent():
                qb = quantize_model(model, calib, kernels, max_row_range_growth=bound).model
            y = predict(qb, probe)
            ops = [n.op_type for n in qb.graph.node]
            row["bound_sweep"][str(bound)] = [sqnr_db(ref, y), ops.count("BatchNormalization")]
        for k, m in models.items():
            r = structure(m, tmp, k)
            y = predict(m, probe)
            r["sqnr_db"] = sqnr_db(ref, y) if k != "fp32" else None
            if labels is not None:
                r["accuracy"] = float((y.argmax(1) == labels).mean())
            row[k] = r
        lat = latencies(models, probe, rounds, sizes)
        for k in models:
            row[k]["latency_ms"] = lat[k]
    return row


def table(rows: list[dict]) -> list[str]:
    head = (
        "| model | pipeline | nodes | BN left | float Conv/Gemm/MatMul after ORT | Q/DQ | bytes"
        " | batch 1 ms (IQR) | batch 1 CPU ms | batch 8 ms (IQR) | batch 8 CPU ms | SQNR dB"
        " | accuracy |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | skipped: {r['skipped']} |" + " |" * 11)
            continue
        for k in PIPELINES:
            m = r[k]
            lat = m["latency_ms"]
            b1, b8 = (
                f"{v[0]:.3f} ({v[1]:.3f}-{v[2]:.3f})" if v else "- (fixed batch 1)"
                for v in (lat["b1"], lat.get("b8"))
            )
            sq = f"{m['sqnr_db']:.1f}" if m["sqnr_db"] is not None else "-"
            acc = f"{m['accuracy']:.4f}" if "accuracy" in m else "-"
            label = k + (" *" if k == "A" and r["a_note"] else "")
            lines.append(
                f"| {r['model']} | {label} | {m['nodes']} | {m['bn_left']} |"
                f" {m['float_linear_after_ort']} | {m['qdq']} | {m['bytes']:,} | {b1} |"
                f" {lat['b1_cpu']:.3f} | {b8} | {_ms(lat.get('b8_cpu'))} |"
                f" {sq} | {acc} |"
            )
    return lines


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _ratio(x: Any, y: Any) -> str:
    if x is None or y is None:
        return "-"
    x, y = (v[0] if isinstance(v, list) else v for v in (x, y))
    return f"{x / y:.2f}x"


def ratios(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if "skipped" in r:
            out.append(f"{r['model']}: skipped: {r['skipped']}")
            continue
        a, b, f = (r[k]["latency_ms"] for k in ("A", "B", "fp32"))
        gain = r["B"]["sqnr_db"] - r["A"]["sqnr_db"]
        note = f"; A: {r['a_note']}" if r["a_note"] else ""
        out.append(
            f"{r['model']}: B/A latency b1 {_ratio(b['b1'], a['b1'])},"
            f" b8 {_ratio(b.get('b8'), a.get('b8'))}; B/FP32 b1 {_ratio(b['b1'], f['b1'])},"
            f" b8 {_ratio(b.get('b8'), f.get('b8'))}; on CPU time B/A b1"
            f" {_ratio(b['b1_cpu'], a['b1_cpu'])}, b8 {_ratio(b.get('b8_cpu'), a.get('b8_cpu'))};"
            f" SQNR B-A {gain:+.1f} dB{note}"
        )
    return out


# --- the architecture corpus ------------------------------------------------------------------


def _relax_batch(model: onnx.ModelProto, x: np.ndarray) -> onnx.ModelProto | None:
    """The model with a symbolic batch axis, if it then runs batch 8 as eight batch-1 rows."""
    relaxed = onnx.ModelProto()
    relaxed.CopyFrom(model)
    del relaxed.graph.value_info[:]
    for v in (*relaxed.graph.input, *relaxed.graph.output):
        v.type.tensor_type.shape.dim[0].dim_param = "batch"
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # the failed run below is expected, not news
    try:
        got = _session(relaxed).run(None, {"input": x[:8]})[0]
    except Exception:  # noqa: BLE001 - a batch baked into the graph: keep batch 1
        return None
    s = _session(model)
    want = np.concatenate([s.run(None, {"input": x[i : i + 1]})[0] for i in range(8)])
    ok = got.shape == want.shape and np.allclose(got, want, rtol=1e-4, atol=1e-4)
    return relaxed if ok else None


def corpus_rows(folder: Path, kernels: Any, rounds: int, only: list[str]) -> list[dict]:
    """One row per ok file in folder/manifest.json (single-input files), A and B side by side."""
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = []
    for i, entry in enumerate(manifest["files"]):
        if entry.get("status") != "ok" or (only and entry["name"] not in only):
            continue
        name = f"{entry['name']} ({entry['exporter']})"
        print(f"{name} ...", file=sys.stderr, flush=True)
        if len(entry["inputs"]) != 1 or entry["inputs"][0]["name"] != "input":
            rows.append({"model": name, "skipped": "not one input named 'input'"})
            continue
        shape = entry["inputs"][0]["shape"][1:]
        rng = np.random.default_rng(entry.get("seed", i))
        calib = rng.standard_normal((64, *shape)).astype(np.float32)
        probe = rng.standard_normal((64, *shape)).astype(np.float32)
        model = onnx.load(folder / entry["file"])
        relaxed = _relax_batch(model, probe)
        rows_per = 16 if relaxed is not None else 1
        case = (relaxed or model, batches({"input": calib}, rows_per), probe, None)
        sizes = (1, 8) if relaxed is not None else (1,)
        try:
            row = measure(name, case, kernels, rounds, sweep=False, sizes=sizes)
        except Skip as exc:
            row = {"model": name, "skipped": str(exc)}
        row["file"] = entry["file"]
        row["batch_relaxed"] = relaxed is not None
        rows.append(row)
    return rows


def sweep_table(rows: list[dict]) -> list[str]:
    head = " | ".join(f"bound {b:g}" for b in SWEEP)
    lines = [f"| model | {head} |", "|" + "---|" * (len(SWEEP) + 1)]
    for r in rows:
        cells = " | ".join(f"{sq:.1f} dB ({bn} BN)" for sq, bn in r["bound_sweep"].values())
        lines.append(f"| {r['model']} | {cells} |")
    return lines


def digits_kernels(kernels_for: Any) -> list[str]:
    """Digits test accuracy for each kernel variant, full fold against the guarded fold."""
    from bn_onnx.quantize import Kernels

    model, calib, x, y = digits_case()
    acc = float((_session(model).run(None, {"input": x})[0].argmax(1) == y).mean())
    lines = [f"digits FP32 test accuracy {acc:.4f}", "| kernels | full fold | guarded fold (2) |"]
    lines.append("|---|---|---|")
    for name, rr in (("u8s8", True), ("u8s8", False), ("u8u8", False)):
        k = Kernels(name, rr, "")
        cells = []
        for bound in (None, 2.0):
            with _silent():
                q = quantize_model(model, calib, k, max_row_range_growth=bound).model
            cells.append(f"{(_session(q).run(None, {'input': x})[0].argmax(1) == y).mean():.4f}")
        lines.append(f"| {name}{' reduce_range' if rr else ''} | {cells[0]} | {cells[1]} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nets", default="digits,resnet_like,mobilenet_like,post_bn")
    p.add_argument("--exporters", default="dynamo,torchscript")
    p.add_argument("--rounds", type=int, default=41, help="interleaved rounds per batch size")
    p.add_argument("--json", help="write the rows as JSON")
    p.add_argument("--corpus", type=Path, help="run on DIR/manifest.json's files instead")
    p.add_argument("--only", default="", help="with --corpus: these net names only")
    args = p.parse_args(argv)
    kernels = choose_kernels()
    print(f"kernels: {kernels.describe()}", file=sys.stderr)
    if args.corpus is not None:
        only = [n.strip() for n in args.only.split(",") if n.strip()]
        rows = corpus_rows(args.corpus, kernels, args.rounds, only)
        print(f"kernels: {kernels.describe()}; {os.cpu_count()} CPUs, 1 thread per session")
        print("\n".join(table(rows)))
        print()
        print("\n".join(ratios(rows)))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        return 0
    rows = []
    wanted = [n.strip() for n in args.nets.split(",") if n.strip()]
    if "digits" in wanted:
        print("digits ...", file=sys.stderr, flush=True)
        rows.append(measure("digits MLP (dynamo)", digits_case(), kernels, args.rounds))
    nets = _nets()
    corpus = _corpus() if any(n in nets for n in wanted) else None
    for i, name in enumerate(n for n in wanted if n in nets):
        for exporter in args.exporters.split(","):
            print(f"{name} ({exporter}) ...", file=sys.stderr, flush=True)
            with contextlib.redirect_stdout(io.StringIO()):
                proto = export_cnn(name, nets[name], exporter, corpus)
            case = cnn_case(proto, seed=i)
            rows.append(measure(f"{name} ({exporter})", case, kernels, args.rounds))
    print(f"kernels: {kernels.describe()}; {os.cpu_count()} CPUs, 1 thread per session")
    print("\n".join(table(rows)))
    print()
    print("\n".join(ratios(rows)))
    print()
    print("SQNR of B by the quantization-aware fold's bound (BNs left):")
    print("\n".join(sweep_table(rows)))
    if "digits" in wanted:
        print()
        print("\n".join(digits_kernels(kernels)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
