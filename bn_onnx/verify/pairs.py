"""Which runs are compared with which, per probe, and the folding rows.

Every run against the baseline (the checkpoint's float64 forward, else the float64 graph
reference), counted. Each further model against the first one on the same provider: shown, not
counted, because both sides carry float32 error and may be up to twice the tolerance apart
while each is within it of the truth. Without any float64 baseline those pairs are all there
is, so they count, at twice the default tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bn_onnx.compare import TolerancePolicy, compare_outputs, is_float_dtype, lowest_precision
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


def add_pairs(
    report: VerifyReport,
    providers: Sequence[str],
    policy: TolerancePolicy,
    classifier: set[str],
    *,
    baseline: Sequence[str],
) -> None:
    """Fill `report.pairs` and `report.folding`; `baseline` lists run labels by preference."""
    runs = {r.label: r for r in report.runs}
    base = next((runs[b] for b in baseline if b in runs), None)
    if base is not None:
        report.warnings.extend(nonfinite_warnings(base))
    model_runs = [r for r in report.runs if r.kind == "onnx"]

    def same_provider(prov: str) -> list[Run]:
        return [r for r in model_runs if r.label.endswith(f"[{prov}]")]

    for p in report.probes:
        if base is not None:
            for r in report.runs:
                if r is not base:
                    report.pairs.append(
                        compare(p.kind, r, base, policy, classifier, counted=True, kind="float64")
                    )
        for prov in providers:
            same = same_provider(prov)
            for r in same[1:]:
                kind = "float32 pair" if base is None else "info"
                report.pairs.append(
                    compare(p.kind, r, same[0], policy, classifier, counted=base is None, kind=kind)
                )
    if base is None:
        return
    errors = {(pr.probe, pr.actual): pr for pr in report.pairs if pr.expected == base.label}
    for p in report.probes:
        for prov in providers:
            same = same_provider(prov)
            unf = [r for r in same if not r.folded]
            fol = [r for r in same if r.folded]
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
                    )
                )
