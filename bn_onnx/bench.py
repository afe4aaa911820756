"""Timing harness: warm-up, interleaved repeats (A B A B ...), medians, spread and ratios.

Machines are shared and noisy, so every subject is timed in the same rounds, round-robin, and
each figure is a median with its spread, compared as a ratio to the first subject measured in
the same run. No torch at module level: the torch eager subject imports it when asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bn_onnx.errors import BnOnnxError, UnsupportedModelError, UsageError
from bn_onnx.onnx_check import check_feed_bytes

SCHEMA = "bn-onnx-bench"
SCHEMA_VERSION = 1
DEFAULT_BATCH_SIZES = (1, 32, 1024)
ORDERS = ("round_robin", "alternate", "shuffle")

Call = Callable[[], object]
Clock = Callable[[], float]
Progress = Callable[[int, int, str], None]

_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
}


#: A model to time: a path or the serialized bytes.
ModelSource = str | os.PathLike[str] | bytes


@dataclass
class Subject:
    """One thing to time.

    Attributes:
        name: its label in tables and JSON.
        bind: turns an input batch into a zero-argument call that runs one inference on it
            (binding outside the timed region, e.g. IOBinding or a torch tensor).
        n_features: input width (a model with one 2-D float input), or 0 for a subject fed
            by `make_feeds`.
        kind: `onnxruntime`, `predictor`, `torch` or anything else descriptive.
        dtype: the input dtype.
        sync: waits for asynchronous work (e.g. `torch.cuda.synchronize`), around each timing.
        create_s: seconds to create the session or load the model, if measured.
        info: extra facts for the JSON (path, providers, threads, optimization level).
        make_feeds: for a model with other inputs (a tabular model's raw columns, several
            inputs): `make_feeds(batch, rng)` gives one batch as input name -> array, drawn as
            verify's random probe draws them; `bind` then takes that dict.
        inputs: the inputs `make_feeds` fills, described (subjects timed together must agree).
    """

    name: str
    bind: Callable[[Any], Call]
    n_features: int
    kind: str = "custom"
    dtype: Any = np.float32
    sync: Callable[[], None] | None = None
    create_s: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    make_feeds: Callable[[int, np.random.Generator], dict[str, np.ndarray]] | None = None
    inputs: str | None = None


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass
class Stats:
    """Summary of repeated timings, in seconds."""

    n: int
    median_s: float
    p90_s: float
    q1_s: float
    q3_s: float
    min_s: float
    max_s: float

    @classmethod
    def of(cls, times: Sequence[float] | np.ndarray) -> Stats:
        """Summarize a non-empty sequence of durations."""
        t = np.asarray(times, dtype=np.float64)
        if t.size == 0:
            raise ValueError("no timings to summarize")
        q1, med, q3, p90 = np.percentile(t, [25, 50, 75, 90])
        return cls(
            n=int(t.size),
            median_s=float(med),
            p90_s=float(p90),
            q1_s=float(q1),
            q3_s=float(q3),
            min_s=float(t.min()),
            max_s=float(t.max()),
        )


@dataclass
class Row:
    """One subject at one batch size.

    `ratio` is this subject's median over the first subject's median; `ratio_q1`/`ratio_q3`
    are the quartiles of the per-round ratios (both timed in the same round), its spread.
    With a CPU clock, `cpu_times_s` holds the calling thread's CPU time per call and
    `cpu_ratio` the ratio of medians: less sensitive to other processes than wall time, but
    blind to work done on other threads (only meaningful with one intra-op thread).
    """

    subject: str
    batch: int
    stats: Stats
    throughput: float
    ratio: float
    ratio_q1: float
    ratio_q3: float
    times_s: list[float]
    cpu_times_s: list[float] | None = None
    cpu_ratio: float | None = None

    def to_dict(self, with_times: bool = True) -> dict[str, Any]:
        """JSON-able form; latencies in milliseconds."""
        s = self.stats
        d: dict[str, Any] = {
            "subject": self.subject,
            "batch": self.batch,
            "n": s.n,
            "median_ms": s.median_s * 1e3,
            "p90_ms": s.p90_s * 1e3,
            "q1_ms": s.q1_s * 1e3,
            "q3_ms": s.q3_s * 1e3,
            "min_ms": s.min_s * 1e3,
            "max_ms": s.max_s * 1e3,
            "throughput_rows_s": self.throughput,
            "ratio": self.ratio,
            "ratio_q1": self.ratio_q1,
            "ratio_q3": self.ratio_q3,
        }
        if self.cpu_times_s is not None:
            d["cpu_median_ms"] = float(np.median(self.cpu_times_s)) * 1e3
            d["cpu_ratio"] = self.cpu_ratio
        if with_times:
            d["times_ms"] = [t * 1e3 for t in self.times_s]
            if self.cpu_times_s is not None:
                d["cpu_times_ms"] = [t * 1e3 for t in self.cpu_times_s]
        return d


@dataclass
class BenchResult:
    """All rows of one benchmark run plus what it ran on."""

    subjects: list[dict[str, Any]]
    rows: list[Row]
    settings: dict[str, Any]
    machine: dict[str, Any]

    def row(self, subject: str, batch: int) -> Row:
        """The row of `subject` at `batch`."""
        for r in self.rows:
            if r.subject == subject and r.batch == batch:
                return r
        raise KeyError((subject, batch))

    def to_dict(self, with_times: bool = True) -> dict[str, Any]:
        """JSON-able form (schema `bn-onnx-bench`, version 1)."""
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "machine": self.machine,
            "settings": self.settings,
            "subjects": self.subjects,
            "rows": [r.to_dict(with_times) for r in self.rows],
        }


def time_interleaved(
    calls: Sequence[Call],
    repeats: int,
    *,
    syncs: Sequence[Callable[[], None] | None] | None = None,
    clock: Clock = time.perf_counter,
    order: str = "round_robin",
    cpu_clock: Clock | None = None,
    cpu_out: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Time each call `repeats` times, interleaved; shape (len(calls), repeats).

    With `cpu_clock` (e.g. `time.thread_time`), each call's CPU time is also written into
    `cpu_out` (same shape).

    `order="round_robin"` runs A B C A B C ...: each subject always follows the same one.
    `"alternate"` runs A B C C B A A B C ...: no position is favoured, but the first and last
    subjects run twice in a row at every turn, with their weights still in the CPU caches (this
    made two sessions of one 3.6 MB model differ by 18% at batch 1). `"shuffle"` runs every
    round in a fresh random order (seeded by `seed`) in which no subject runs twice in a row:
    the choice for cache-sensitive comparisons of three or more subjects.

    Each subject's `sync` (if any) runs before the clock starts and before it stops, so that
    asynchronous devices are timed to completion.
    """
    if repeats < 1:
        raise UsageError(f"repeats must be >= 1, got {repeats}")
    if order not in ORDERS:
        raise UsageError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    syncs = list(syncs) if syncs is not None else [None] * len(calls)
    out = np.empty((len(calls), repeats), dtype=np.float64)
    rng = np.random.default_rng(seed)
    last: int | None = None
    for r in range(repeats):
        sequence = _round_order(len(calls), r, order, rng, last)
        last = sequence[-1] if sequence else None
        for i in sequence:
            call = calls[i]
            sync = syncs[i]
            if sync is not None:
                sync()
            if cpu_clock is not None:
                c0 = cpu_clock()
            t0 = clock()
            call()
            if sync is not None:
                sync()
            out[i, r] = clock() - t0
            if cpu_clock is not None and cpu_out is not None:
                cpu_out[i, r] = cpu_clock() - c0
    return out


def _round_order(
    n: int, r: int, order: str, rng: np.random.Generator, last: int | None
) -> list[int]:
    """The subjects' order in round `r` (see `time_interleaved`)."""
    forward = list(range(n))
    if order == "round_robin" or (order == "alternate" and r % 2 == 0):
        return forward
    if order == "alternate":
        return forward[::-1]
    perm = [int(i) for i in rng.permutation(n)]
    if n > 1 and perm[0] == last:  # never the same subject twice in a row
        perm[0], perm[1] = perm[1], perm[0]
    return perm


def _rows(
    names: Sequence[str], batch: int, times: np.ndarray, cpu: np.ndarray | None = None
) -> list[Row]:
    base = times[0]
    base_med = float(np.median(base))
    cpu_base = float(np.median(cpu[0])) if cpu is not None else None
    rows = []
    for k, (name, t) in enumerate(zip(names, times, strict=True)):
        stats = Stats.of(t)
        paired = t / base
        q1, q3 = np.percentile(paired, [25, 75])
        rows.append(
            Row(
                subject=name,
                batch=batch,
                stats=stats,
                throughput=batch / stats.median_s if stats.median_s > 0 else float("inf"),
                ratio=stats.median_s / base_med if base_med > 0 else float("nan"),
                ratio_q1=float(q1),
                ratio_q3=float(q3),
                times_s=[float(x) for x in t],
                cpu_times_s=None if cpu is None else [float(x) for x in cpu[k]],
                cpu_ratio=(
                    float(np.median(cpu[k])) / cpu_base if cpu is not None and cpu_base else None
                ),
            )
        )
    return rows


def _repeats_for(round_s: float, repeats: int, min_repeats: int, budget_s: float | None) -> int:
    if budget_s is None or round_s <= 0:
        return repeats
    return int(max(min(repeats, budget_s // round_s), min(min_repeats, repeats)))


def run_benchmark(
    subjects: Sequence[Subject],
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    *,
    repeats: int = 30,
    warmup: int = 3,
    seed: int = 0,
    budget_s: float | None = None,
    min_repeats: int = 5,
    order: str = "round_robin",
    cpu_clock: Clock | None = None,
    progress: Progress | None = None,
    clock: Clock = time.perf_counter,
) -> BenchResult:
    """Time every subject at every batch size, interleaved, and summarize.

    Per batch size: one random input shared by all subjects; `warmup` untimed rounds; then
    `repeats` timed rounds, A B A B ... . The first call of each subject (at the first batch
    size, before warm-up) is timed on its own as `first_run_s`. With `budget_s`, the repeats per
    batch size are cut so that the timed rounds take about that long (but at least
    `min_repeats`), estimated from the warm-up.

    Args:
        subjects: what to time; the first is the baseline of the ratio column.
        batch_sizes: rows per call.
        repeats: timed rounds per batch size (upper bound with `budget_s`).
        warmup: untimed rounds per batch size.
        seed: the input data's seed.
        budget_s: seconds of timed rounds per batch size, or None for exactly `repeats`.
        min_repeats: lower bound on rounds when `budget_s` cuts them.
        order: `round_robin`, `alternate` or `shuffle` (see `time_interleaved`).
        cpu_clock: also record each call's CPU time with this clock (`time.thread_time`).
        progress: called as `progress(done, total, label)` after each batch size.
        clock: the timer (tests pass a fake one).
    """
    if not subjects:
        raise UsageError("nothing to benchmark")
    names = [s.name for s in subjects]
    if len(set(names)) != len(names):
        raise UsageError(f"subject names must be unique, got {names}")
    widths = {(s.n_features, s.inputs) for s in subjects}
    if len(widths) != 1:
        detail = ", ".join(f"{s.name}: {s.inputs or s.n_features}" for s in subjects)
        what = (
            "different inputs" if any(s.inputs for s in subjects) else "inputs of different widths"
        )
        raise UsageError(f"models take {what} ({detail})")
    make_feeds = subjects[0].make_feeds
    sizes = [int(b) for b in batch_sizes]
    if not sizes or min(sizes) < 1:
        raise UsageError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    if warmup < 0:
        raise UsageError(f"warm-up must be >= 0, got {warmup}")
    n_features = subjects[0].n_features
    rng = np.random.default_rng(seed)
    syncs = [s.sync for s in subjects]
    first_run: dict[str, float] = {}
    rows: list[Row] = []
    used_repeats: dict[int, int] = {}
    for batch in sizes:
        check_feed_bytes(
            f"the input for batch size {batch}",
            (batch, n_features),
            8,
            "give smaller --batch-sizes",
        )
    for k, batch in enumerate(sizes):
        if make_feeds is not None:
            feeds = make_feeds(batch, rng)
            calls = [s.bind(feeds) for s in subjects]
        else:
            x64 = rng.standard_normal((batch, n_features))
            calls = [s.bind(np.ascontiguousarray(x64, dtype=s.dtype)) for s in subjects]
        if k == 0:
            for s, t in zip(
                subjects, time_interleaved(calls, 1, syncs=syncs, clock=clock)[:, 0], strict=True
            ):
                first_run[s.name] = float(t)
        round_s = 0.0
        if warmup:
            w = time_interleaved(calls, warmup, syncs=syncs, clock=clock, order=order)
            round_s = float(np.median(w.sum(axis=0)))
        n = _repeats_for(round_s, repeats, min_repeats, budget_s)
        used_repeats[batch] = n
        cpu = np.empty((len(calls), n)) if cpu_clock is not None else None
        timed = time_interleaved(
            calls,
            n,
            syncs=syncs,
            clock=clock,
            order=order,
            cpu_clock=cpu_clock,
            cpu_out=cpu,
            seed=seed + k,
        )
        rows += _rows(names, batch, timed, cpu)
        if progress is not None:
            progress(k + 1, len(sizes), f"batch {batch}")
    subject_dicts = [
        {
            "name": s.name,
            "kind": s.kind,
            "create_s": s.create_s,
            "first_run_s": first_run.get(s.name),
            **s.info,
        }
        for s in subjects
    ]
    settings = {
        "batch_sizes": sizes,
        "repeats": repeats,
        "repeats_used": {str(b): n for b, n in used_repeats.items()},
        "warmup": warmup,
        "budget_s": budget_s,
        "seed": seed,
        "order": order,
        "cpu_clock": getattr(cpu_clock, "__name__", None) if cpu_clock else None,
    }
    return BenchResult(subject_dicts, rows, settings, machine_info())


def _gpu_name() -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, load, library versions, GPU if any."""
    import onnxruntime as ort

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "ort_providers": list(ort.get_available_providers()),
        "gpu": _gpu_name(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    if "torch" in sys.modules:
        info["torch"] = sys.modules["torch"].__version__
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --- subjects ----------------------------------------------------------------------------


def _input_spec(session: Any, name: str) -> tuple[str, int, Any, str, int | None] | None:
    """(input name, width, dtype, first output name, fixed batch size or None), or None for a
    model without one 2-D float input of a fixed width (fed by `feed_maker`)."""
    inputs = session.get_inputs()
    inp = inputs[0]
    if (
        len(inputs) != 1
        or inp.type not in _DTYPES
        or len(inp.shape) != 2
        or not isinstance(inp.shape[1], int)
    ):
        return None
    batch_dim = inp.shape[0] if isinstance(inp.shape[0], int) else None
    out = session.get_outputs()[0].name
    return inp.name, int(inp.shape[1]), _DTYPES[inp.type], out, batch_dim


def feed_maker(
    model: ModelSource, name: str
) -> tuple[Callable[[int, np.random.Generator], dict[str, np.ndarray]], str]:
    """Random batches for any model's inputs, as verify's random probe draws them.

    Floats from the BatchNormalization that normalizes them in the graph (else N(0, 1)), 10%
    NaN in a tabular model's continuous columns, codes and strings from the column metadata
    or the graph's LabelEncoder keys (`bn_onnx.verify.probes.input_ranges`). Every dimension
    but the batch must be fixed.

    Returns:
        `make(batch, rng) -> {input name: array}` and the inputs in words.

    Raises:
        UnsupportedModelError: an input with a symbolic dimension besides the batch.
    """
    import onnx

    from bn_onnx.verify import probes, signature

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model)
    sig = signature.signature(proto)
    ranges = probes.input_ranges(proto, sig.inputs)
    for spec in sig.inputs:
        if spec.dims is None or any(not isinstance(d, int) for d in spec.dims[1:]):
            raise UnsupportedModelError(
                f"{name}: bench needs every dimension but the batch fixed; input {spec.describe()}"
            )

    def make(batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {
            s.name: ranges[s.name].sample((batch, *s.dims[1:]), s.dtype, rng) for s in sig.inputs
        }

    return make, "; ".join(s.describe() for s in sig.inputs)


def _model_info(
    model: ModelSource,
    providers: Sequence[str],
    threads: int | None,
    **extra: Any,
) -> dict[str, Any]:
    """A model subject's JSON facts: its path (None for bytes), providers, threads, `extra`."""
    path = None if isinstance(model, (bytes, bytearray)) else str(model)
    return {"path": path, "providers": providers, "threads": threads, **extra}


def _feeds_subject(
    model: ModelSource,
    name: str,
    bind: Callable[[Any], Call],
    *,
    kind: str,
    create_s: float,
    info: dict[str, Any],
) -> Subject:
    """A subject fed input name -> array by random feeds of `model`'s own inputs."""
    make, words = feed_maker(model, name)
    return Subject(
        name=name,
        bind=bind,
        n_features=0,
        kind=kind,
        create_s=create_s,
        info=info,
        make_feeds=make,
        inputs=words,
    )


def ort_subject(
    model: ModelSource,
    name: str,
    *,
    provider: str = "cpu",
    threads: int | None = None,
    graph_optimization_level: str = "all",
    iobinding: bool | None = None,
) -> Subject:
    """A bare onnxruntime `session.run` of `model` (path or bytes), creation time measured.

    On CUDA (unless `iobinding=False`) input and output stay bound on the device through
    IOBinding, so the timing is the model, not the host-device copies. `iobinding=True` binds
    on the CPU as well.
    """
    from bn_onnx.runtime import CUDA, create_session

    t0 = time.perf_counter()
    info = create_session(
        model, provider, threads=threads, graph_optimization_level=graph_optimization_level
    )
    create_s = time.perf_counter() - t0
    sess = info.session
    spec = _input_spec(sess, name)
    if spec is None:  # several inputs, strings, NaN: random feeds of the model's own inputs
        outs = [sess.get_outputs()[0].name]
        return _feeds_subject(
            model,
            name,
            lambda feeds: lambda: sess.run(outs, feeds),
            kind="onnxruntime",
            create_s=create_s,
            info=_model_info(
                model,
                info.providers,
                threads,
                graph_optimization_level=graph_optimization_level,
                iobinding=False,
            ),
        )
    in_name, n_features, dtype, out_name, batch_dim = spec
    on_cuda = CUDA in info.providers
    use_binding = on_cuda if iobinding is None else bool(iobinding)

    def bind(x: np.ndarray) -> Call:
        if batch_dim is not None and x.shape[0] != batch_dim:
            raise UsageError(f"{name}: the model's batch size is fixed at {batch_dim}")
        if use_binding:
            import onnxruntime as ort

            binding = sess.io_binding()
            kind, device = ("cuda", info.device_id or 0) if on_cuda else ("cpu", 0)
            value = ort.OrtValue.ortvalue_from_numpy(x, kind, device)
            binding.bind_ortvalue_input(in_name, value)
            binding.bind_output(out_name, kind, device)

            def call() -> object:
                sess.run_with_iobinding(binding)
                # The binding is returned (outputs: `copy_outputs_to_cpu()`); `value`, the
                # input's device copy, is referenced here so it lives as long as the call.
                return binding if value is not None else None

            return call
        run = sess.run
        feed = {in_name: x}
        outs = [out_name]
        return lambda: run(outs, feed)

    return Subject(
        name=name,
        bind=bind,
        n_features=n_features,
        kind="onnxruntime",
        dtype=dtype,
        create_s=create_s,
        info=_model_info(
            model,
            info.providers,
            threads,
            graph_optimization_level=graph_optimization_level,
            iobinding=use_binding,
        ),
    )


def predictor_subject(
    model: ModelSource,
    name: str,
    *,
    provider: str = "cpu",
    threads: int | None = None,
    batch_size: int | None = None,
) -> Subject:
    """`bn_onnx.runtime.Predictor.predict` of `model`: the app-facing path with its checks."""
    from bn_onnx.runtime import DEFAULT_BATCH_SIZE, Predictor

    t0 = time.perf_counter()
    pred = Predictor(model, provider, threads=threads, batch_size=batch_size or DEFAULT_BATCH_SIZE)
    create_s = time.perf_counter() - t0
    if not pred.array_input:  # input name -> array, checked as an app's would be
        return _feeds_subject(
            model,
            name,
            lambda feeds: lambda: pred.predict(feeds),
            kind="predictor",
            create_s=create_s,
            info=_model_info(model, pred.providers, threads),
        )
    if pred.n_features is None:
        raise UnsupportedModelError(f"{name}: bench needs a model with a fixed input width")
    return Subject(
        name=name,
        bind=lambda x: lambda: pred.predict(x),
        n_features=pred.n_features,
        kind="predictor",
        dtype=pred.input_dtype,
        create_s=create_s,
        info=_model_info(model, pred.providers, threads),
    )


def torch_subject(
    module: Any, name: str, n_features: int, *, device: str = "cpu", threads: int | None = None
) -> Subject:
    """Eager PyTorch inference of `module` (eval mode, `torch.inference_mode`).

    On CUDA `torch.cuda.synchronize()` brackets each timing.
    """
    import torch

    if threads is not None:
        torch.set_num_threads(int(threads))
    module = module.eval().to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None

    def bind(x: np.ndarray) -> Call:
        t = torch.from_numpy(x).to(device)

        def call() -> object:
            with torch.inference_mode():
                return module(t)

        return call

    return Subject(
        name=name,
        bind=bind,
        n_features=n_features,
        kind="torch",
        sync=sync,
        info={"device": device, "threads": threads, "torch": torch.__version__},
    )


def checkpoint_subject(
    ckpt_dir: str | os.PathLike[str],
    name: str = "torch eager",
    *,
    device: str = "cpu",
    threads: int | None = None,
) -> Subject:
    """Torch eager eval of a bn-onnx checkpoint directory (imports torch)."""
    from bn_onnx.checkpoint import load_model

    t0 = time.perf_counter()
    model, ckpt = load_model(ckpt_dir)
    create_s = time.perf_counter() - t0
    if ckpt.config.tabular is not None:
        raise UnsupportedModelError(
            f"{ckpt_dir}: bench --checkpoint times a plain MLP; a tabular checkpoint's torch "
            "part takes the preprocessed inputs, not the raw columns the ONNX model takes"
        )
    s = torch_subject(model, name, ckpt.config.in_features, device=device, threads=threads)
    s.create_s = create_s
    s.info["path"] = str(ckpt_dir)
    return s


# --- whole processes ---------------------------------------------------------------------


@dataclass
class ProcessRun:
    """One child process: its exit code, wall time and peak resident memory."""

    returncode: int
    wall_s: float
    maxrss_bytes: int
    stdout: str
    stderr: str
    peak_anon_bytes: int | None = None
    peak_file_bytes: int | None = None
    cpu_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form without the captured output."""
        d: dict[str, Any] = {
            "returncode": self.returncode,
            "wall_s": self.wall_s,
            "maxrss_mb": self.maxrss_bytes / 2**20,
            "cpu_s": self.cpu_s,
        }
        if self.peak_anon_bytes is not None:
            d["peak_rss_anon_mb"] = self.peak_anon_bytes / 2**20
            d["peak_rss_file_mb"] = (self.peak_file_bytes or 0) / 2**20
        return d


# Runs in a fresh, small interpreter: forks the command, polls it, reaps it with wait4. A
# child's peak RSS keeps what its parent had mapped at fork time (Linux carries it across
# exec), so the command must not be forked from a big process such as the benchmark itself.
_LAUNCHER = r"""
import json, os, sys, time
report, sample, timeout = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])
cmd = sys.argv[4:]

def split(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    v = {}
    for line in text.splitlines():
        k, _, rest = line.partition(":")
        if k in ("RssAnon", "RssFile", "RssShmem"):
            v[k] = int(rest.split()[0]) * 1024
    return (v["RssAnon"], v.get("RssFile", 0) + v.get("RssShmem", 0)) if "RssAnon" in v else None

t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
anon = fil = None
while True:
    done, status, usage = os.wait4(pid, os.WNOHANG)
    if done:
        break
    if sample:
        s = split(pid)
        if s is not None:
            anon, fil = max(anon or 0, s[0]), max(fil or 0, s[1])
    now = time.perf_counter()
    if now - t0 > timeout:
        os.kill(pid, 9)
        done, status, usage = os.wait4(pid, 0)
        break
    time.sleep(0.002 if now - t0 < 2.0 else 0.01)
wall = time.perf_counter() - t0
scale = 1 if sys.platform == "darwin" else 1024
with open(report, "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "wall": wall,
               "maxrss": usage.ru_maxrss * scale, "anon": anon, "file": fil,
               "cpu": usage.ru_utime + usage.ru_stime}, f)
"""


def measure_process(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout_s: float = 3600.0,
    sample_rss: bool = False,
) -> ProcessRun:
    """Run `cmd` and return its wall time and peak RSS (`wait4` rusage of that child alone).

    The command is started from a small launcher interpreter, so its peak RSS does not inherit
    this process's size; the floor is the launcher's own RSS (about 10 MB). Peak RSS counts
    file pages mapped into the process (a memory-mapped input that was read stays resident
    while memory is plentiful). With `sample_rss`, /proc is polled every few ms for the peak
    anonymous (heap) and file-backed parts separately (Linux only; a peak shorter than the
    polling interval can be missed). Output goes to temporary files, not pipes.
    """
    import tempfile

    if not hasattr(os, "wait4") or not hasattr(os, "fork"):
        raise UsageError("measuring a process's peak memory needs fork and wait4 (Linux, macOS)")
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.TemporaryDirectory() as tmp,
    ):
        report = Path(tmp) / "report.json"
        launcher = [sys.executable, "-S", "-c", _LAUNCHER, str(report)]
        launcher += ["1" if sample_rss else "0", str(timeout_s), *cmd]
        subprocess.run(
            launcher, stdout=out, stderr=err, env=env, cwd=cwd, timeout=timeout_s + 60, check=False
        )
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
        if not report.is_file():
            raise RuntimeError(f"process launcher failed: {stderr.strip()[-500:]}")
        r = json.loads(report.read_text())
    return ProcessRun(
        r["rc"], r["wall"], int(r["maxrss"]), stdout, stderr, r["anon"], r["file"], r["cpu"]
    )


# --- output -------------------------------------------------------------------------------


def save_json(
    result: BenchResult | dict[str, Any], path: str | os.PathLike[str], group: Any = None
) -> Path:
    """Write the result as JSON, atomically (into `group`, a `files.OutputGroup`, if given)."""
    from bn_onnx.files import OutputGroup, check_output_path

    p = check_output_path(path)
    data = result.to_dict() if isinstance(result, BenchResult) else result
    text = json.dumps(data, indent=1, default=_json_default) + "\n"
    with (
        contextlib.nullcontext(group) if group is not None else OutputGroup() as g,
        g.open(p, "w") as f,
    ):
        f.write(text)
    return p


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-able: {type(obj).__name__}")


def plot_result(
    result: BenchResult, path: str | os.PathLike[str], title: str = "", group: Any = None
) -> Path:
    """Plot median latency (with IQR bars) and the ratio to the first subject per batch size;
    written atomically (into `group`, a `files.OutputGroup`, if given)."""
    from bn_onnx.files import OutputGroup, check_output_path

    p = check_output_path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BnOnnxError("--plot needs matplotlib (pip install matplotlib)") from None
    names = [s["name"] for s in result.subjects]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in names:
        rows = sorted((r for r in result.rows if r.subject == name), key=lambda r: r.batch)
        b = [r.batch for r in rows]
        med = np.array([r.stats.median_s * 1e3 for r in rows])
        lo = med - np.array([r.stats.q1_s * 1e3 for r in rows])
        hi = np.array([r.stats.q3_s * 1e3 for r in rows]) - med
        ax1.errorbar(b, med, yerr=[lo, hi], marker="o", capsize=3, label=name)
        ratio = [r.ratio for r in rows]
        rerr = [[r.ratio - r.ratio_q1 for r in rows], [r.ratio_q3 - r.ratio for r in rows]]
        ax2.errorbar(b, ratio, yerr=np.clip(rerr, 0, None), marker="o", capsize=3, label=name)
    ax1.set(xscale="log", yscale="log", xlabel="batch size", ylabel="median latency (ms)")
    ax2.set(xscale="log", xlabel="batch size", ylabel=f"latency / {names[0]}")
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax1.legend(fontsize=8)
    ax1.grid(True, which="both", alpha=0.3)
    ax2.grid(True, alpha=0.3)
    fig.suptitle(title or "bn-onnx bench (median, bars: quartiles)")
    fig.tight_layout()
    try:
        with (
            contextlib.nullcontext(group) if group is not None else OutputGroup() as g,
            g.open(p, "wb") as f,
        ):
            fig.savefig(f, dpi=110, format="png")
    finally:
        plt.close(fig)
    return p


def format_table(result: BenchResult) -> list[str]:
    """The result as aligned text lines (the CLI prints them)."""
    with_cpu = any(r.cpu_ratio is not None for r in result.rows)
    header = ["model", "batch", "median ms", "p90 ms", "IQR ms", "rows/s", "ratio"]
    if with_cpu:
        header += ["CPU ms", "CPU ratio"]
    lines = [header]
    for r in result.rows:
        s = r.stats
        cells = [
            r.subject,
            str(r.batch),
            f"{s.median_s * 1e3:.4g}",
            f"{s.p90_s * 1e3:.4g}",
            f"{s.q1_s * 1e3:.3g}-{s.q3_s * 1e3:.3g}",
            f"{r.throughput:,.0f}",
            f"{r.ratio:.3f} ({r.ratio_q1:.2f}-{r.ratio_q3:.2f})",
        ]
        if with_cpu:
            cpu = float(np.median(r.cpu_times_s)) * 1e3 if r.cpu_times_s else float("nan")
            cells += [f"{cpu:.4g}", f"{r.cpu_ratio:.3f}" if r.cpu_ratio is not None else "-"]
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = []
    for k, row in enumerate(lines):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def format_subjects(result: BenchResult) -> list[str]:
    """Session creation and first-run times, one line per subject."""
    from bn_onnx.runtime import short_name

    out = []
    for s in result.subjects:
        create = f"{s['create_s'] * 1e3:.1f} ms" if s.get("create_s") is not None else "n/a"
        first = f"{s['first_run_s'] * 1e3:.2f} ms" if s.get("first_run_s") is not None else "n/a"
        prov = ",".join(short_name(p) for p in s.get("providers") or []) or s.get("device", "")
        out.append(f"{s['name']}: {s['kind']} {prov}, created in {create}, first run {first}")
    return out


__all__ = [
    "BenchResult",
    "Row",
    "Stats",
    "Subject",
    "checkpoint_subject",
    "format_subjects",
    "format_table",
    "measure_process",
    "machine_info",
    "ort_subject",
    "percentile",
    "plot_result",
    "predictor_subject",
    "run_benchmark",
    "save_json",
    "time_interleaved",
    "torch_subject",
]
