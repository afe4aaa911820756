"""verify's engine: runners over probes into run results, then pairs, calibration and locate.

The shape is Polygraphy's `Comparator.run(runners, data_loader)` then
`compare_accuracy(results, compare_func)`: `build_runners` makes the runners (`runners`,
`oracles`), `run_all` runs each over every probe into a `Run`, `bn_onnx.verify.pairs` plans
and compares the pairs from the runs' kinds and providers, and `Locator` reuses the same
runners for `--locate`. No torch import here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from bn_onnx import crash
from bn_onnx.column_kinds import NAN_KINDS
from bn_onnx.compare import TolerancePolicy
from bn_onnx.errors import BnOnnxError, ProviderError, UnsupportedModelError, UsageError
from bn_onnx.onnx_meta import get_metadata
from bn_onnx.runtime import CUDA, resolve_providers, short_name
from bn_onnx.verify import float64, oracles, pairs, probes, signature
from bn_onnx.verify import locate as locating
from bn_onnx.verify.locate import Location
from bn_onnx.verify.oracles import CheckpointRunner, TorchEvalRunner, TorchRunner
from bn_onnx.verify.report import Pair, VerifyReport
from bn_onnx.verify.runners import (
    ONNX_REFERENCE,
    Float64Runner,
    OnnxReferenceRunner,
    OrtRunner,
    Runner,
)
from bn_onnx.verify.runs import OrtSession, Run
from bn_onnx.verify.taps import find_taps

if TYPE_CHECKING:
    from bn_onnx.checkpoint import Checkpoint

DEFAULT_ROWS = 256
F64 = "float64 reference"
Arrays = np.ndarray | Mapping[str, np.ndarray]


@dataclass(frozen=True)
class VerifyOptions:
    """What to verify with, made once from the CLI arguments (or `verify()`'s keywords).

    Attributes:
        checkpoint: the checkpoint directory the models came from: adds its numpy float64
            forward (the baseline), torch eval, its test split as data and its input
            statistics as the random probe's range.
        inputs: data to run: an array (single-input models) or input name -> array.
        input_source: words for where `inputs` came from.
        shapes: input name -> dims for symbolic dims (`--shape`).
        provider: `auto` (every available of cuda, cpu), `cpu`, `cuda`, `reference` or a
            comma-separated list.
        atol, rtol: a number for every output, or output name -> number (`"*"`: every
            output); None takes the per-dtype defaults (`bn_onnx.compare`).
        locate: for failing pairs, find the first intermediate value that diverges.
        torch_runner: `f(checkpoint_dir, inputs) -> outputs` running the checkpoint in torch.
        rows, seed: the size and seed of the random probe.
        renamed: original tensor name -> folded tensor name (from a fold report), for locate.
        labels: names for the models in the report (default: their file names).
    """

    checkpoint: str | os.PathLike[str] | None = None
    inputs: Arrays | None = None
    input_source: str | None = None
    shapes: Mapping[str, Sequence[int]] | None = None
    provider: str = "auto"
    atol: float | Mapping[str, float] | None = None
    rtol: float | Mapping[str, float] | None = None
    locate: bool = False
    torch_runner: TorchRunner | None = None
    rows: int = DEFAULT_ROWS
    seed: int = 0
    renamed: Mapping[str, str] | None = None
    labels: Sequence[str] | None = None


def verify_providers(spec: str) -> list[str]:
    """Short provider names to verify on: `auto` means every one of cuda, cpu available.

    `reference` (onnx.reference in the model's own dtypes) may be listed like a provider.
    """
    if spec.strip().lower() == "auto":
        return ["cuda", "cpu"] if CUDA in resolve_providers("auto") else ["cpu"]
    names = [p.strip().lower() for p in spec.split(",") if p.strip()]
    if not names:
        raise UsageError("no provider given (choose from auto, cpu, cuda, reference)")
    out = []
    for name in names:
        short = name if name == ONNX_REFERENCE else short_name(resolve_providers(name)[0])
        if short not in out:
            out.append(short)
    return out


def is_folded(model: onnx.ModelProto) -> bool | None:
    """The `bn_onnx.folded` metadata (which export and fold write), or None when the model
    does not say: a graph without BatchNormalization may still hold what the fold removes (a
    Mul/Add chain), so the absence of BN nodes proves nothing."""
    flag = get_metadata(model).get("bn_onnx.folded")
    return flag == "true" if flag in ("true", "false") else None


QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether the model is an INT8 one: `bn_onnx.quantized` metadata (which `quantize`
    writes) or a QuantizeLinear/DequantizeLinear node in its main graph."""
    if "bn_onnx.quantized" in get_metadata(model):
        return True
    return any(n.op_type in QDQ_OPS for n in model.graph.node)


def _labels(paths: Sequence[str]) -> list[str]:
    names = [Path(p).name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


class Models:
    """The models under test: paths, labels, protos, folded flags and the shared signature."""

    def __init__(
        self, models: Sequence[str | os.PathLike[str]], labels: Sequence[str] | None = None
    ) -> None:
        from bn_onnx.onnx_io import load_model

        if not models:
            raise UsageError("give at least one model")
        self.paths = [str(m) for m in models]
        self.protos = [load_model(p) for p in self.paths]
        self.labels = list(labels) if labels else _labels(self.paths)
        if len(self.labels) != len(self.paths) or len(set(self.labels)) != len(self.labels):
            raise UsageError("give one distinct label per model")
        self.folded = [is_folded(m) for m in self.protos]
        self.quantized = [is_quantized(m) for m in self.protos]
        self.sig = signature.signature(self.protos[0])
        for label, proto in zip(self.labels[1:], self.protos[1:], strict=True):
            signature.check_compatible(self.sig, signature.signature(proto), self.labels[0], label)
        self.outputs = [o.name for o in self.sig.outputs]


def _as_arrays(inputs: Arrays, sig: signature.Signature) -> dict[str, np.ndarray]:
    if isinstance(inputs, Mapping):
        return dict(inputs)
    if len(sig.inputs) != 1:
        names = ", ".join(s.name for s in sig.inputs)
        raise UsageError(
            f"the model takes {len(sig.inputs)} inputs ({names}): give an .npz with one array "
            "per input name"
        )
    return {sig.inputs[0].name: inputs}


def build_probes(
    m: Models, ckpt: Checkpoint | None, opts: VerifyOptions, warnings: list[str]
) -> list[probes.Probe]:
    """The data probe (given inputs, else the checkpoint's test split) and the random one."""
    nan_ok = [
        c.get("input") for c in probes.columns_metadata(m.protos[0]) if c.get("kind") in NAN_KINDS
    ]
    out: list[probes.Probe] = []
    if opts.inputs is not None:
        arrays = _as_arrays(opts.inputs, m.sig)
        source = opts.input_source or "the given input"
        out.append(probes.data_probe(m.sig.inputs, arrays, source, allow_nan=nan_ok))
    elif ckpt is not None and isinstance(ckpt.meta.get("dataset"), dict):
        try:
            arrays, source = oracles.test_split(ckpt)
            out.append(probes.data_probe(m.sig.inputs, arrays, source, allow_nan=nan_ok))
        except (BnOnnxError, ImportError) as exc:
            warnings.append(f"cannot rebuild the checkpoint's test split ({exc})")
    stats = oracles.input_stats(ckpt) if ckpt is not None else None
    ranges = probes.input_ranges(
        m.protos[0], m.sig.inputs, data=out[0] if out else None, stats=stats
    )
    plan = signature.plan_shapes(m.sig.inputs, opts.shapes, rows=opts.rows)
    out.append(probes.random_probe(m.sig.inputs, plan, ranges, opts.seed))
    return out


def _classifier(m: Models, ckpt: Checkpoint | None) -> set[str]:
    task = get_metadata(m.protos[0]).get("bn_onnx.task") or (
        ckpt.config.task if ckpt is not None else None
    )
    first = m.outputs[0]
    if task == "classification" or (task is None and first == "logits"):
        return {first}
    return set()


def _model_runner(m: Models, i: int, prov: str, auto: bool, warnings: list[str]) -> Runner | None:
    """Model `i` on provider `prov` (None: CUDA was only found by `auto` and cannot run)."""
    path, proto, folded = m.paths[i], m.protos[i], m.folded[i]

    def reference() -> Runner:
        return OnnxReferenceRunner(f"{m.labels[i]} [{ONNX_REFERENCE}]", path, proto, folded)

    if prov == ONNX_REFERENCE:
        return reference()
    optimization = "all"
    try:
        try:
            session = OrtSession(path, prov)
        except UnsupportedModelError as exc:
            # onnxruntime's own graph optimizer can produce nodes it has no kernel for
            # (MatMul + BN fused into an opset-6 Gemm); try the graph as written.
            optimization = "disable"
            session = OrtSession(path, prov, optimization=optimization)
            warnings.append(f"{Path(path).name} [{prov}]: {exc}; ran with graph optimizations off")
    except ProviderError as exc:
        if not (auto and prov == "cuda"):
            raise
        # auto: CUDA was only found, not asked for; verify on the rest and say so.
        warnings.append(f"CUDA skipped: {exc}")
        return None
    except UnsupportedModelError as exc:
        if not auto:
            raise
        warnings.append(
            f"{Path(path).name}: {exc}; ran in onnx.reference instead (--provider reference)"
        )
        return reference()
    warnings.extend(session.info.warnings)
    label = f"{m.labels[i]} [{prov}]"
    return OrtRunner(label, path, proto, folded, session, optimization=optimization)


def float64_runner(m: Models) -> tuple[Float64Runner, float64.Float64Reference]:
    """The float64 graph of the first unfolded float model (else the first float one): an
    INT8 model has no float64 meaning."""
    i = sorted(range(len(m.protos)), key=lambda k: (m.quantized[k], m.folded[k] is True))[0]
    crash.note(f"{m.paths[i]} (its float64 reference)")
    ref = float64.build(m.protos[i], F64, m.labels[i])
    return Float64Runner(F64, ref, m.protos[i]), ref


def run_all(
    runners: Sequence[Runner],
    probe_list: Sequence[probes.Probe],
    skip: Callable[[Runner, BnOnnxError], bool] = lambda runner, exc: False,
) -> tuple[list[Run], list[Runner]]:
    """Each runner over every probe: the run results and the runners that made them, in the
    runners' order. A runner whose error `skip(runner, exc)` accepts is left out."""
    runs, ran = [], []
    for runner in runners:
        run = runner.result()
        try:
            for p in probe_list:
                run.outputs[p.kind] = runner.run(p.feeds)
        except BnOnnxError as exc:
            if skip(runner, exc):
                continue
            raise
        run.detail = runner.detail  # what ran may have changed (a float64 engine fallback)
        runs.append(run)
        ran.append(runner)
    return runs, ran


def _excess(pair: Pair) -> float:
    """How far a pair is outside tolerance: the largest max abs error of a failing output over
    the tolerance at its worst element (inf for a shape or type mismatch, or NaN)."""
    worst = 0.0
    for o in pair.comparison.outputs:
        if o.passed:
            continue
        if o.note is not None or o.worst_expected is None or not np.isfinite(o.max_abs):
            return math.inf
        tol = o.atol + o.rtol * abs(o.worst_expected)
        worst = max(worst, o.max_abs / tol if tol > 0 else math.inf)
    return worst


class Locator:
    """Locates failing pairs with the runners that made their runs (none is rebuilt)."""

    def __init__(
        self, report: VerifyReport, runners: Sequence[Runner], policy: TolerancePolicy
    ) -> None:
        self.report = report
        self.runners = {r.label: r for r in runners}
        self.policy = policy

    def locate_all(self, renamed: Mapping[str, str] | None) -> None:
        """Locate each failing counted pair; an info pair only for a run not located yet.

        Where a run fails on several probes, the probe on which it is furthest outside
        tolerance is located: a changed weight that only the random probe exercises shows
        there, while the data probe may fail too, barely, by float32 rounding in a deep net,
        and locating that would name rounding noise.
        """
        done: set[tuple[str, str]] = set()
        located: set[str] = set()
        failing = sorted(
            (p for p in self.report.pairs if not p.passed),
            key=lambda p: (not p.counted, -_excess(p)),
        )
        for pair in failing:
            key = (pair.actual, pair.expected)
            if key in done or (not pair.counted and pair.actual in located):
                continue
            done.add(key)
            located.add(pair.actual)
            try:
                loc = self._locate(pair, renamed)
            except BnOnnxError as exc:
                loc = Location(
                    pair.actual, pair.expected, pair.probe, "-", note=f"cannot locate: {exc}"
                )
            self.report.locations.append(loc)

    def _feed(self, pair: Pair) -> dict[str, np.ndarray]:
        probe = next(p for p in self.report.probes if p.kind == pair.probe)
        if probe.runs == 1:
            return probe.feeds[0]
        worst = max(pair.comparison.outputs, key=lambda o: (not o.passed, o.max_abs))
        k = worst.worst_index[0] if worst.worst_index else 0
        return probe.feeds[k]

    def _by_names(self, runner: Runner, feed: dict[str, np.ndarray]) -> locating.NamedSource:
        assert runner.graph is not None
        return runner.label, runner.graph, lambda names: runner.intermediates(feed, names)

    def _taps(self, runner: Runner, feed: dict[str, np.ndarray]) -> locating.TapSource | None:
        if runner.graph is None:
            taps = runner.intermediates(feed, None)
            return (runner.label, taps, runner.tap_nodes) if taps else None
        found = find_taps(runner.graph)
        values = runner.intermediates(feed, [t.tensor for t in found])
        return (
            runner.label,
            {t.label: values[t.tensor] for t in found if t.tensor in values},
            {t.label: t.nodes for t in found},
        )

    def _locate(self, pair: Pair, renamed: Mapping[str, str] | None) -> Location:
        feed = self._feed(pair)
        scale = 1.0 if pair.kind == "float64" else pairs.PAIR_SCALE
        actual, expected = self.runners.get(pair.actual), self.runners.get(pair.expected)
        if actual is None or expected is None:
            return Location(pair.actual, pair.expected, pair.probe, "-", note="no runner")
        graph = self.runners.get(F64)
        note = None
        # Against the float64 graph, where it agrees with the checkpoint: by tensor names.
        if (
            expected.kind == "checkpoint"
            and actual.kind == "onnx"
            and graph is not None
            and any(
                pr.probe == pair.probe
                and pr.actual == graph.label
                and pr.expected == expected.label
                and pr.passed
                for pr in self.report.pairs
            )
        ):
            expected = graph
            note = "located against the float64 reference, which agrees with the checkpoint"
        if actual.graph is not None and expected.graph is not None:
            loc = locating.by_names(
                self._by_names(actual, feed),
                self._by_names(expected, feed),
                probe=pair.probe,
                policy=self.policy,
                scale=scale,
                renamed=renamed,
            )
            loc.expected = pair.expected if note is None else expected.label
            if note:
                loc.note = note if loc.note is None else f"{note}; {loc.note}"
            return loc
        expected = self.runners[pair.expected]
        a_t, e_t = self._taps(actual, feed), self._taps(expected, feed)
        if a_t is None or e_t is None:
            return Location(
                pair.actual,
                pair.expected,
                pair.probe,
                "-",
                note="no intermediate values for one of these runs",
            )
        return locating.by_taps(a_t, e_t, probe=pair.probe, policy=self.policy, scale=scale)


def build_runners(
    m: Models, ckpt: Checkpoint | None, opts: VerifyOptions, warnings: list[str]
) -> tuple[list[Runner], float64.Float64Reference]:
    """Every runner, in report order: the checkpoint's forward, the float64 graph (when it
    can be built), torch eval, then each model on each provider; and the float64 graph."""
    out: list[Runner] = []
    ref_runner, ref = float64_runner(m)
    if ckpt is not None:
        path = str(opts.checkpoint)
        out.append(CheckpointRunner(ckpt, path, m.outputs[0]))
    if ref:
        out.append(ref_runner)
    if ckpt is not None and opts.torch_runner is not None:
        out.append(TorchEvalRunner(ckpt, path, m.outputs[0], opts.torch_runner))
    auto = opts.provider.strip().lower() == "auto"
    for i in range(len(m.paths)):
        for prov in verify_providers(opts.provider):
            runner = _model_runner(m, i, prov, auto, warnings)
            if runner is not None:
                runner.int8 = m.quantized[i]  # type: ignore[attr-defined]
                out.append(runner)
    return out, ref


class _Skips:
    """Which runner errors leave a run out (`run_all`'s `skip`), saying so in the report."""

    def __init__(self, report: VerifyReport, ref: float64.Float64Reference) -> None:
        self.report, self.ref = report, ref
        self.checkpoint_failed = False

    def __call__(self, runner: Runner, exc: BnOnnxError) -> bool:
        if runner.kind == "float64" and isinstance(exc, UnsupportedModelError):
            self.ref.blocker = str(exc)
            return True
        if runner.kind == "checkpoint":
            self.report.warnings.append(f"the checkpoint's float64 forward cannot run: {exc}")
            self.checkpoint_failed = True
            return True
        return False


def verify_models(
    models: Sequence[str | os.PathLike[str]], opts: VerifyOptions | None = None
) -> VerifyReport:
    """Run every model on every provider and probe, plus float64 references, and compare.

    Raises:
        BnOnnxError: bad models, inputs or options (exit 2), or nothing to compare.
    """
    opts = opts or VerifyOptions()
    m = Models(models, opts.labels)
    policy = TolerancePolicy.from_values(opts.atol, opts.rtol)
    unknown = policy.unknown_outputs(m.outputs)
    if unknown:
        raise UsageError(
            f"--atol/--rtol name no output of the model: {', '.join(unknown)} "
            f"(outputs: {', '.join(m.outputs)})"
        )
    report = VerifyReport(
        models=[
            {"label": lab, "path": p, "folded": f, "int8": q}
            for lab, p, f, q in zip(m.labels, m.paths, m.folded, m.quantized, strict=True)
        ],
        inputs=[s.describe() for s in m.sig.inputs],
    )
    for label, int8 in zip(m.labels, m.quantized, strict=True):
        if int8:
            report.warnings.append(
                f"{label} is INT8 (QDQ): its error is quantization's, not float rounding, so "
                "float tolerances fail it; `bn-onnx quantize` proves it by accuracy and top-1 "
                "agreement, or give verify a wider --atol"
            )
    ckpt = None
    if opts.checkpoint is not None:
        ckpt = oracles.read(str(opts.checkpoint))
        oracles.check_inputs(ckpt, m.sig)
    classifier = _classifier(m, ckpt)
    report.probes = build_probes(m, ckpt, opts, report.warnings)
    runners, ref = build_runners(m, ckpt, opts, report.warnings)
    skips = _Skips(report, ref)
    # The baselines first: a failed checkpoint forward leaves torch eval out.
    head = [r for r in runners if r.kind in ("checkpoint", "float64")]
    runs, ran = run_all(head, report.probes, skips)
    rest = [r for r in runners if r not in head]
    if ckpt is not None and not skips.checkpoint_failed and opts.torch_runner is None:
        report.warnings.append("torch is not installed: torch eval skipped")
    if skips.checkpoint_failed:
        rest = [r for r in rest if r.kind != "torch"]
    more, more_ran = run_all(rest, report.probes)
    report.reference = ref.describe()
    report.runs, ran = runs + more, ran + more_ran
    if not any(r.kind == "onnx" for r in ran):
        raise ProviderError("no execution provider could run the models")
    policy = pairs.calibrate(report, policy, original=m.paths[0])
    pairs.add_pairs(report, policy, classifier)
    pairs.forgive_float_noise(report, original=m.paths[0])
    if not report.counted:
        raise UnsupportedModelError(
            f"nothing to compare: one model and no float64 reference "
            f"({ref.blocker or '-'}); give the original and the folded model"
        )
    if opts.locate:
        Locator(report, ran, policy).locate_all(opts.renamed)
    return report
