"""Prove that ONNX models compute the same thing: every model, provider and probe, against float64.

The pieces, composed by `verify()` (and by `bn-onnx verify` through it):

- `signature`: each model's inputs and outputs, and probe shapes for symbolic dims (`--shape`);
- `probes`: the given data (`--input`, the checkpoint's test split) and seeded random inputs
  spanning each input's range; each is a probe kind of its own, and both count;
- `runs`: a model on an execution provider (or onnx.reference), every output by name;
- `float64`: the float64 reference of any graph (its float tensors cast to double, run in
  onnxruntime or onnx.reference); `oracles`: a checkpoint's own float64 forward and torch eval;
- `bn_onnx.compare`: per-output comparison with per-dtype tolerances and overrides; `pairs`:
  which runs are compared with which;
- `locate`: the first intermediate tensor where two runs part ways; `report`: the result.

Reference chain (DESIGN.md): float64 (checkpoint, else the first unfolded graph) -> torch
float32 eval -> onnxruntime unfolded -> onnxruntime folded, per provider. Where no float64
reference can exist (quantization ops), the float32 models are compared with each other at
twice the default tolerance, and the report says so. No torch import here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
from bn_onnx.verify.oracles import TorchRunner
from bn_onnx.verify.report import FoldingRow, Pair, VerifyReport, render, write_report
from bn_onnx.verify.runs import OrtRunner, ReferenceRunner, Run, mark_outputs
from bn_onnx.verify.taps import Tap, checkpoint_tap_nodes, find_taps

__all__ = [
    "DEFAULT_ROWS",
    "FoldingRow",
    "Location",
    "Pair",
    "Tap",
    "TorchRunner",
    "VerifyReport",
    "find_taps",
    "render",
    "verify",
    "verify_providers",
    "write_report",
]

DEFAULT_ROWS = 256
REFERENCE = "reference"  # the pseudo-provider: onnx.reference in the model's own dtypes
F64 = "float64 reference"
CKPT = "float64 checkpoint"
TORCH = "torch eval"


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
        short = REFERENCE if name == REFERENCE else short_name(resolve_providers(name)[0])
        if short not in out:
            out.append(short)
    return out


REFERENCE_DETAIL = "onnx.reference (numpy, in the model's own dtypes)"


def _reference_runner(model: onnx.ModelProto) -> ReferenceRunner:
    # The same corrected kernels as the float64 reference (onnx's grouped Conv and old
    # BatchNormalization are wrong), each rounding its result to the model's dtype.
    return ReferenceRunner(model, new_ops=float64.reference_ops())


def _labels(paths: Sequence[str]) -> list[str]:
    names = [Path(p).name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


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


class _Models:
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


def _as_arrays(inputs: Any, sig: signature.Signature) -> dict[str, Any]:
    if isinstance(inputs, Mapping):
        return dict(inputs)
    if len(sig.inputs) != 1:
        names = ", ".join(s.name for s in sig.inputs)
        raise UsageError(
            f"the model takes {len(sig.inputs)} inputs ({names}): give an .npz with one array "
            "per input name"
        )
    return {sig.inputs[0].name: inputs}


def _build_probes(
    m: _Models,
    *,
    ckpt: Any,
    inputs: Any,
    input_source: str | None,
    shapes: Mapping[str, Sequence[int]] | None,
    rows: int,
    seed: int,
    warnings: list[str],
) -> list[probes.Probe]:
    nan_ok = [
        c.get("input") for c in probes.columns_metadata(m.protos[0]) if c.get("kind") in NAN_KINDS
    ]
    out: list[probes.Probe] = []
    if inputs is not None:
        arrays = _as_arrays(inputs, m.sig)
        out.append(
            probes.data_probe(
                m.sig.inputs, arrays, input_source or "the given input", allow_nan=nan_ok
            )
        )
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
    plan = signature.plan_shapes(m.sig.inputs, shapes, rows=rows)
    out.append(probes.random_probe(m.sig.inputs, plan, ranges, seed))
    return out


def _classifier(m: _Models, ckpt: Any) -> set[str]:
    task = get_metadata(m.protos[0]).get("bn_onnx.task") or (
        ckpt.config.task if ckpt is not None else None
    )
    first = m.outputs[0]
    if task == "classification" or (task is None and first == "logits"):
        return {first}
    return set()


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


class _Verifier:
    """The state of one verify call: runs per probe, then pairs, folding rows and locations."""

    def __init__(self, m: _Models, report: VerifyReport, policy: TolerancePolicy) -> None:
        self.m = m
        self.report = report
        self.policy = policy
        self.runners: dict[str, Any] = {}  # run label -> runner (for locate)
        self.ref: float64.Float64Reference | None = None
        self.ckpt: Any = None
        self.ckpt_path: str | None = None
        self.torch_runner: TorchRunner | None = None
        self.classifier: set[str] = set()

    # -- runs ---------------------------------------------------------------------------------

    def add_reference(self) -> None:
        # a float model first (an INT8 one has no float64 meaning), unfolded before folded
        order = sorted(
            range(len(self.m.protos)),
            key=lambda i: (self.m.quantized[i], self.m.folded[i] is True),
        )
        i = order[0]
        crash.note(f"{self.m.paths[i]} (its float64 reference)")
        self.ref = float64.build(self.m.protos[i], F64, self.m.labels[i])
        self.report.reference = self.ref.describe()
        if not self.ref:
            return
        # Its tolerance is the model's: the graph's constants (epsilon, GELU's sqrt(2)) are
        # float32 numbers, a float32 distance from the checkpoint's exact ones.
        run = Run(
            F64,
            "float64",
            f"{self.m.labels[i]} in float64 ({self.ref.engine})",
            compute_dtype=signature.compute_dtype(self.m.protos[i]),
        )
        try:
            for p in self.report.probes:
                run.outputs[p.kind] = self.ref.run(p.feeds)
        except UnsupportedModelError as exc:
            self.ref.blocker = str(exc)
            self.report.reference = self.ref.describe()
            return
        run.detail = f"{self.m.labels[i]} in float64 ({self.ref.engine})"
        self.report.reference = self.ref.describe()
        self.report.runs.append(run)

    def add_checkpoint(self) -> None:
        out = self.m.outputs[0]
        run = Run(CKPT, "checkpoint", f"numpy float64 forward of {self.ckpt_path}")
        try:
            for p in self.report.probes:
                run.outputs[p.kind], _ = oracles.float64_outputs(self.ckpt, p.feeds, out)
        except BnOnnxError as exc:
            self.report.warnings.append(f"the checkpoint's float64 forward cannot run: {exc}")
            return
        self.report.runs.insert(0, run)
        if self.torch_runner is None:
            self.report.warnings.append("torch is not installed: torch eval skipped")
            return
        trun = Run(TORCH, "torch", "torch float32, CPU, eval mode")
        for p in self.report.probes:
            trun.outputs[p.kind], _ = oracles.torch_outputs(
                self.torch_runner, str(self.ckpt_path), p.feeds, out
            )
        self.report.runs.append(trun)

    def add_models(self, providers: list[str], auto: bool) -> list[str]:
        used: list[str] = []
        for path, label, proto, folded, int8 in zip(
            self.m.paths, self.m.labels, self.m.protos, self.m.folded, self.m.quantized, strict=True
        ):
            for prov in providers:
                runner, detail, prov_used = self._runner(path, proto, prov, auto)
                if runner is None:
                    continue
                run_label = f"{label} [{prov_used}]"
                run = Run(
                    run_label,
                    "onnx",
                    detail,
                    model=path,
                    folded=folded,
                    int8=int8,
                    compute_dtype=signature.compute_dtype(proto),
                )
                if isinstance(runner, OrtRunner):
                    run.provider = runner.info.main_provider
                    run.tf32 = runner.info.tf32
                    self.report.warnings.extend(runner.info.warnings)
                else:
                    run.provider = REFERENCE
                for p in self.report.probes:
                    run.outputs[p.kind] = runner.run(p.feeds)
                self.runners[run_label] = (proto, prov_used)
                self.report.runs.append(run)
                if prov_used not in used:
                    used.append(prov_used)
        return used

    def _runner(
        self, path: str, proto: onnx.ModelProto, prov: str, auto: bool
    ) -> tuple[Any, str, str]:
        if prov == REFERENCE:
            return _reference_runner(proto), REFERENCE_DETAIL, REFERENCE
        try:
            try:
                runner = OrtRunner(path, prov)
            except UnsupportedModelError as exc:
                # onnxruntime's own graph optimizer can produce nodes it has no kernel for
                # (MatMul + BN fused into an opset-6 Gemm); try the graph as written.
                runner = OrtRunner(path, prov, optimization="disable")
                self.report.warnings.append(
                    f"{Path(path).name} [{prov}]: {exc}; ran with graph optimizations off"
                )
        except ProviderError as exc:
            if not (auto and prov == "cuda"):
                raise
            # auto: CUDA was only found, not asked for; verify on the rest and say so.
            self.report.warnings.append(f"CUDA skipped: {exc}")
            return None, "", prov
        except UnsupportedModelError as exc:
            if not auto:
                raise
            self.report.warnings.append(
                f"{Path(path).name}: {exc}; ran in onnx.reference instead (--provider reference)"
            )
            return _reference_runner(proto), REFERENCE_DETAIL, REFERENCE
        return runner, f"onnxruntime {runner.info.describe()}", prov

    # -- locate -------------------------------------------------------------------------------

    def locate(self, renamed: Mapping[str, str] | None) -> None:
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
                loc = self._locate_pair(pair, renamed)
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

    def _graph_source(
        self, label: str, feed: dict[str, np.ndarray]
    ) -> tuple[str, onnx.ModelProto, Any] | None:
        if label == F64 and self.ref:
            ref = self.ref
            return label, ref.model, lambda names: ref.run([feed], names)
        if label in self.runners:
            proto, prov = self.runners[label]
            if prov == REFERENCE:
                runner = _reference_runner(proto)
                return label, proto, lambda names: runner.run([feed], names)
            return (
                label,
                proto,
                lambda names: OrtRunner(mark_outputs(proto, names), prov).run([feed], names),
            )
        return None

    def _taps_source(
        self, label: str, probe: str, feed: dict[str, np.ndarray]
    ) -> tuple[str, dict, dict] | None:
        nodes = checkpoint_tap_nodes(self.ckpt.config) if self.ckpt is not None else {}
        if label == CKPT:
            _, taps = oracles.float64_outputs(self.ckpt, [feed], self.m.outputs[0])
            return label, taps, nodes
        if label == TORCH and self.torch_runner is not None:
            _, taps = oracles.torch_outputs(
                self.torch_runner, str(self.ckpt_path), [feed], self.m.outputs[0]
            )
            return (label, taps, nodes) if taps else None
        src = self._graph_source(label, feed)
        if src is None:
            return None
        _, model, run = src
        found = find_taps(model)
        values = run([t.tensor for t in found])
        return (
            label,
            {t.label: values[t.tensor] for t in found if t.tensor in values},
            {t.label: t.nodes for t in found},
        )

    def _locate_pair(self, pair: Pair, renamed: Mapping[str, str] | None) -> Location:
        feed = self._feed(pair)
        scale = 1.0 if pair.kind == "float64" else pairs.PAIR_SCALE
        expected = pair.expected
        note = None
        if expected == CKPT and pair.actual != F64 and self.ref:
            ref_ok = [
                pr
                for pr in self.report.pairs
                if pr.probe == pair.probe and pr.actual == F64 and pr.expected == CKPT and pr.passed
            ]
            if ref_ok and pair.actual in self.runners:
                expected = F64
                note = "located against the float64 reference, which agrees with the checkpoint"
        if expected != CKPT and pair.actual not in (TORCH, CKPT):
            a = self._graph_source(pair.actual, feed)
            e = self._graph_source(expected, feed)
            if a is not None and e is not None:
                loc = locating.by_names(
                    a, e, probe=pair.probe, policy=self.policy, scale=scale, renamed=renamed
                )
                loc.expected = pair.expected if note is None else expected
                if note:
                    loc.note = note if loc.note is None else f"{note}; {loc.note}"
                return loc
        a_t = self._taps_source(pair.actual, pair.probe, feed)
        e_t = self._taps_source(pair.expected, pair.probe, feed)
        if a_t is None or e_t is None:
            return Location(
                pair.actual,
                pair.expected,
                pair.probe,
                "-",
                note="no intermediate values for one of these runs",
            )
        return locating.by_taps(a_t, e_t, probe=pair.probe, policy=self.policy, scale=scale)


def verify(
    models: Sequence[str | os.PathLike[str]],
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    inputs: np.ndarray | Mapping[str, np.ndarray] | None = None,
    input_source: str | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    provider: str = "auto",
    atol: float | Mapping[str, float] | None = None,
    rtol: float | Mapping[str, float] | None = None,
    locate: bool = False,
    torch_runner: TorchRunner | None = None,
    rows: int = DEFAULT_ROWS,
    seed: int = 0,
    renamed: Mapping[str, str] | None = None,
    labels: Sequence[str] | None = None,
) -> VerifyReport:
    """Run every model on every provider and probe, plus float64 references, and compare.

    Args:
        models: ONNX files (typically unfolded then folded); they must take the same inputs.
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

    Raises:
        BnOnnxError: bad models, inputs or options (exit 2), or nothing to compare.
    """
    m = _Models(models, labels)
    policy = TolerancePolicy.from_values(atol, rtol)
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
    v = _Verifier(m, report, policy)
    if checkpoint is not None:
        v.ckpt = oracles.read(checkpoint)
        v.ckpt_path = str(checkpoint)
        v.torch_runner = torch_runner
        oracles.check_inputs(v.ckpt, m.sig)
    v.classifier = _classifier(m, v.ckpt)
    report.probes = _build_probes(
        m,
        ckpt=v.ckpt,
        inputs=inputs,
        input_source=input_source,
        shapes=shapes,
        rows=rows,
        seed=seed,
        warnings=report.warnings,
    )
    providers = verify_providers(provider)
    v.add_reference()
    if v.ckpt is not None:
        v.add_checkpoint()
    used = v.add_models(providers, provider.strip().lower() == "auto")
    if not used:
        raise ProviderError("no execution provider could run the models")
    policy = pairs.calibrate(
        report,
        policy,
        baseline=(CKPT, F64),
        original=m.paths[0],
        independent=TORCH,
        own_graph=F64,
    )
    v.policy = policy
    pairs.add_pairs(report, used, policy, v.classifier, baseline=(CKPT, F64))
    pairs.forgive_float_noise(report, original=m.paths[0])
    if not report.counted:
        raise UnsupportedModelError(
            f"nothing to compare: one model and no float64 reference "
            f"({v.ref.blocker if v.ref else '-'}); give the original and the folded model"
        )
    if locate:
        v.locate(renamed)
    return report
