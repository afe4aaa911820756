"""Which runs are compared with which, per probe, and the folding rows.

Every run against the baseline (the checkpoint's float64 forward, else the float64 graph
reference), counted. Each further model against the first one on the same provider: shown, not
counted, because both sides carry float32 error and may be up to twice the tolerance apart
while each is within it of the truth. Without any float64 baseline those pairs are all there
is, so they count, at twice the default tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from bn_onnx.compare import (
    OutputComparison,
    TolerancePolicy,
    compare_outputs,
    is_float_dtype,
    lowest_precision,
    mismatch_mask,
)
from bn_onnx.verify.report import FoldingRow, Pair, VerifyReport
from bn_onnx.verify.runs import Run

PAIR_SCALE = 2.0  # two float runs, each within tolerance of the truth, may be twice as far apart
PAIR_REASON = "two float runs"


def compare(
    probe: str,
    a: Run,
    b: Run,
    policy: TolerancePolicy,
    classifier: set[str],
    *,
    counted: bool,
    kind: str,
) -> Pair:
    """Every output of run `a` against run `b` on one probe.

    The tolerance is picked by the lowest float precision of `a`'s output and the model
    behind it (and `b`'s, for a pair of two float runs, whose defaults are doubled).
    """
    scale, why = (PAIR_SCALE, PAIR_REASON) if kind != "float64" else (1.0, "")
    inside = [a.compute_dtype] if kind == "float64" else [a.compute_dtype, b.compute_dtype]
    dtypes = {name: lowest_precision(arr.dtype, *inside) for name, arr in a.outputs[probe].items()}
    comp = compare_outputs(
        a.outputs[probe],
        b.outputs[probe],
        policy=policy,
        scale=scale,
        scale_reason=why,
        actual_label=a.label,
        expected_label=b.label,
        classifier=bool(classifier),
        equal_nan=True,
        tolerance_dtypes=dtypes,
    )
    for o in comp.outputs:
        if o.name not in classifier:
            o.argmax_agreement = None
    return Pair(probe, a.label, b.label, comp, counted, kind if counted else "info")


CALIBRATION = 2.0  # folding may add about the original model's own float error, not more


def baseline(runs: Sequence[Run]) -> Run | None:
    """The run every other is judged against: the checkpoint's float64 forward, else the
    float64 graph (None: neither ran)."""
    for kind in ("checkpoint", "float64"):
        found = next((r for r in runs if r.kind == kind), None)
        if found is not None:
            return found
    return None


def calibrate(report: VerifyReport, policy: TolerancePolicy, *, original: str) -> TolerancePolicy:
    """Raise a float output's default atol to twice what the original model itself needs.

    A deep float32 network (a timm DLA-34 with random weights: 2.3e-5 max abs on outputs near
    1) differs from its float64 self by more than the float32 default atol (1e-5) allows, so
    against a fixed tolerance the *unfolded* model would fail its own proof. The atol the
    original model (file `original`, on every provider) needs to pass against the float64
    baseline at the output's rtol, max(|a - b| - rtol * |b|), is what float32 costs this
    graph; DESIGN.md's numerics policy asks that folding add no more than about that. So where
    twice that exceeds the default atol, it becomes the default (printed with its reason;
    capped at `FLOOR_CAP` times the default, above which the original itself fails). A user's
    --atol is used as given. With one model only, a model cannot calibrate its own proof;
    what float32 costs is then taken from the runs that leave the model's constants out of it:
    the float32 run of the same checkpoint that is not the model (the `torch` run: torch
    eval) against the baseline, and the model against its own graph in float64 (the
    `float64` run: the same constants, exact arithmetic), which measures the runtime's
    float32 arithmetic only. The model's constants are still checked against the checkpoint
    at that tolerance (the float64 graph's own comparison). Without a float64 baseline, or with
    one model and neither run, the defaults stay.
    """
    base = baseline(report.runs)
    models = [r for r in report.runs if r.kind == "onnx"]
    own = [r for r in models if r.model == original]
    against = {r.label: base for r in own}
    if base is not None and len(own) == len(models):
        own = [r for r in report.runs if r.kind == "torch"]
        against = {r.label: base for r in own}
        graph = next((r for r in report.runs if r.kind == "float64"), None)
        if graph is not None and graph is not base:
            for r in models:
                own.append(r)
                against[r.label] = graph
        if not own:
            return policy
    elif base is None:
        return policy
    worst: dict[str, tuple[float, str]] = {}
    for r in own:
        ref = against[r.label]
        for probe, outputs in r.outputs.items():
            for name, arr in outputs.items():
                exp = ref.outputs.get(probe, {}).get(name)
                if exp is None or not is_float_dtype(arr.dtype) or arr.shape != exp.shape:
                    continue
                rtol = policy.resolve(name, lowest_precision(arr.dtype, r.compute_dtype)).rtol
                e = exp.astype(np.float64)
                need = np.abs(arr.astype(np.float64) - e) - rtol * np.abs(e)
                need = need[np.isfinite(need)]
                if need.size and float(need.max()) > worst.get(name, (0.0, ""))[0]:
                    label = r.label if ref is base else f"{r.label} against {ref.label}"
                    worst[name] = (float(need.max()), label)
    floor = {
        name: (CALIBRATION * need, f"{CALIBRATION:g}x the atol {label} needs ({need:.3g})")
        for name, (need, label) in worst.items()
    }
    return replace(policy, atol_floor=floor)


def nonfinite_warnings(base: Run) -> list[str]:
    """One line per output of the baseline that holds NaN or infinities."""
    out = []
    for probe, outputs in base.outputs.items():
        for name, arr in outputs.items():
            if is_float_dtype(arr.dtype):
                n = int(np.sum(~np.isfinite(arr.astype(np.float64))))
                if n:
                    out.append(
                        f"{base.label} has {n} of {arr.size} values of {name} ({probe} probe) "
                        "that are NaN or infinite: there a run matches only the same value"
                    )
    return out


def by_provider(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """The model runs (kind `onnx`) per provider, in run order."""
    out: dict[str, list[Run]] = {}
    for r in runs:
        if r.kind == "onnx":
            out.setdefault(str(r.provider), []).append(r)
    return out


def add_pairs(report: VerifyReport, policy: TolerancePolicy, classifier: set[str]) -> None:
    """Fill `report.pairs` and `report.folding` from the runs' kinds and providers."""
    base = baseline(report.runs)
    if base is not None:
        report.warnings.extend(nonfinite_warnings(base))
    groups = by_provider(report.runs)
    for p in report.probes:
        if base is not None:
            for r in report.runs:
                if r is not base:
                    report.pairs.append(
                        compare(p.kind, r, base, policy, classifier, counted=True, kind="float64")
                    )
        for same in groups.values():
            for r in same[1:]:
                kind = "float32 pair" if base is None else "info"
                report.pairs.append(
                    compare(p.kind, r, same[0], policy, classifier, counted=base is None, kind=kind)
                )
    if base is None:
        return
    errors = {(pr.probe, pr.actual): pr for pr in report.pairs if pr.expected == base.label}
    for p in report.probes:
        for prov, same in groups.items():
            floats = [r for r in same if not r.int8]  # INT8 error is quantization's
            unf = [r for r in floats if not r.folded]
            fol = [r for r in floats if r.folded]
            if unf and fol:
                u, f = errors[(p.kind, unf[0].label)], errors[(p.kind, fol[0].label)]
                report.folding.append(
                    FoldingRow(
                        p.kind,
                        prov,
                        unf[0].label,
                        fol[0].label,
                        u.max_abs,
                        f.max_abs,
                        u.median_abs,
                        f.median_abs,
                        min((o.atol for o in f.comparison.outputs), default=0.0),
                    )
                )


NOISE_FACTOR = 2.0  # an element may err up to this many times the original's error there


def forgive_float_noise(report: VerifyReport, *, original: str) -> None:
    """Accept a model's elements that miss the float64 tolerance but are no further from
    float64 than the original model (file `original`) is: folding adds no error there.

    Per element of a float output of a counted float64 pair whose actual run is another
    model, the bound is max(atol + rtol * |ref|, NOISE_FACTOR * |orig - ref|, the original's
    largest error in the same channel (axis 1; the whole output for rank < 2)), with `orig`
    the original's output on the same provider and probe. The original's float32 error at
    one element says little about another model's there (the folded model rounds other
    products), but its largest error in a channel is what float32 costs that channel. A
    changed weight moves its channel's values by more than that and still fails. Elements so
    accepted leave `n_mismatched` for `n_forgiven`, with the reason in `forgiven`.
    """
    runs = {r.label: r for r in report.runs}
    own = {r.provider: r for r in report.runs if r.kind == "onnx" and r.model == original}
    for pair in report.counted:
        run, base = runs.get(pair.actual), runs.get(pair.expected)
        if pair.kind != "float64" or run is None or base is None or run.model == original:
            continue
        orig = own.get(run.provider)
        if orig is None or run.kind != "onnx":
            continue
        for oc in pair.comparison.outputs:
            if oc.n_mismatched == 0 or oc.note is not None:
                continue
            got = run.outputs.get(pair.probe, {}).get(oc.name)
            ref = base.outputs.get(pair.probe, {}).get(oc.name)
            theirs = orig.outputs.get(pair.probe, {}).get(oc.name)
            if got is None or ref is None or theirs is None:
                continue
            if not is_float_dtype(got.dtype) or not got.shape == ref.shape == theirs.shape:
                continue
            _forgive(oc, got, ref, theirs, orig.label)


def _forgive(
    oc: OutputComparison, got: np.ndarray, ref: np.ndarray, theirs: np.ndarray, label: str
) -> None:
    b = ref.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(got.astype(np.float64) - b)
        own = np.abs(theirs.astype(np.float64) - b)
    own = np.where(np.isfinite(own), own, 0.0)  # a non-finite original excuses nothing
    if own.ndim >= 2:
        axes = tuple(i for i in range(own.ndim) if i != 1)
        ceiling = own.max(axis=axes, keepdims=True)
    else:
        ceiling = np.full_like(own, own.max() if own.size else 0.0)
    tol = oc.atol + oc.rtol * np.abs(b)
    bound = np.maximum(np.maximum(tol, NOISE_FACTOR * own), ceiling)
    bad = mismatch_mask(got, b, oc.atol, oc.rtol, equal_nan=True)
    still = bad & ~(np.isfinite(err) & (err <= bound))
    forgiven = int(bad.sum() - still.sum())
    if not forgiven:
        return
    oc.n_mismatched = int(still.sum())
    oc.n_forgiven = forgiven
    oc.forgiven = (
        f"{forgiven} of {oc.n_total} values beyond atol + rtol * |ref| are no further from "
        f"float64 than {label} is ({NOISE_FACTOR:g}x its error there, or its largest error in "
        "the channel): no added error"
    )
