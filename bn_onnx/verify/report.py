"""What verify found: objects (`bool(report)`: every counted comparison passed), text, JSON."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bn_onnx.compare import Comparison, OutputComparison, lowest_precision
from bn_onnx.verify.locate import Location, layer_words
from bn_onnx.verify.probes import Probe
from bn_onnx.verify.runs import Run


@dataclass
class Pair:
    """One run compared with another on one probe, every output (`expected`: the reference).

    `kind`: `float64` (against a float64 oracle), `float32 pair` (two float runs, counted
    because there is no float64 reference), `info` (shown, not counted).
    """

    probe: str
    actual: str
    expected: str
    comparison: Comparison
    counted: bool = True
    kind: str = "float64"

    @property
    def passed(self) -> bool:
        """Every output within tolerance."""
        return self.comparison.passed

    def __bool__(self) -> bool:
        return self.passed

    @property
    def max_abs(self) -> float:
        """The largest absolute error over the outputs."""
        return max((o.max_abs for o in self.comparison.outputs), default=0.0)

    @property
    def median_abs(self) -> float:
        """The largest median absolute error over the outputs."""
        return max((o.median_abs for o in self.comparison.outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = {k: v for k, v in self.__dict__.items() if k != "comparison"}
        return {
            **d,
            "passed": self.passed,
            "outputs": [o.to_dict() for o in self.comparison.outputs],
        }


@dataclass
class FoldingRow:
    """Folded vs unfolded error against float64 per provider and probe: does folding add error?"""

    probe: str
    provider: str
    unfolded: str
    folded: str
    unfolded_max_abs: float
    folded_max_abs: float
    unfolded_median_abs: float
    folded_median_abs: float
    atol: float = 0.0  # the smallest atol the folded run was held to on this probe

    @property
    def adds_error(self) -> bool:
        """The folded model's max error is more than twice the unfolded one's (plus 1e-7) and
        more than half its atol. Below half the atol the difference is float32 rounding: the
        folded weights are rounded once more, which can double an error far inside tolerance
        (a wine MLP trained under ATen's default kernels: 1.6e-6 unfolded, 3.4e-6 folded)."""
        return (
            self.folded_max_abs > 2.0 * self.unfolded_max_abs + 1e-7
            and self.folded_max_abs > 0.5 * self.atol
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {**self.__dict__, "adds_error": self.adds_error}


@dataclass
class VerifyReport:
    """Everything verify found; `bool(report)` is True when every counted comparison passed."""

    models: list[dict[str, Any]] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    reference: str | None = None
    runs: list[Run] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    folding: list[FoldingRow] = field(default_factory=list)
    locations: list[Location] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def counted(self) -> list[Pair]:
        """The comparisons that decide pass or fail."""
        return [p for p in self.pairs if p.counted]

    @property
    def n_compared(self) -> int:
        """How many output elements the counted comparisons compared in all."""
        return sum(o.n_total for p in self.counted for o in p.comparison.outputs)

    @property
    def passed(self) -> bool:
        """At least one counted comparison of at least one element, and every one within
        tolerance."""
        counted = self.counted
        return bool(counted) and self.n_compared > 0 and all(p.passed for p in counted)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def exit_code(self) -> int:
        """0 when all pass, 1 otherwise."""
        return 0 if self.passed else 1

    @property
    def cuda_used(self) -> bool:
        """Whether any run used the CUDA provider."""
        return any(r.provider == "cuda" for r in self.runs)

    def tf32_line(self) -> str:
        """Whether TF32 was off on CUDA (it must be, for verification)."""
        if not self.cuda_used:
            return "TF32: not applicable (CUDA not used)"
        on = [r.label for r in self.runs if r.provider == "cuda" and r.tf32]
        return "TF32: ON for " + ", ".join(on) if on else "TF32: off on every CUDA session"

    def tolerances(self) -> list[tuple[str, str, OutputComparison]]:
        """(output, the dtype of the values under test, a comparison) per distinct tolerance."""
        runs = {r.label: r for r in self.runs}
        seen: dict[tuple, tuple[str, str, OutputComparison]] = {}
        for p in self.counted:
            run = runs.get(p.actual)
            dtypes = run.dtypes() if run is not None else {}
            for o in p.comparison.outputs:
                dtype = dtypes.get(o.name, "?")
                inside = run.compute_dtype if run is not None else None
                if inside and lowest_precision(dtype, inside) != dtype:
                    dtype = f"{dtype}, of a {inside} model"
                key = (o.name, dtype, o.atol, o.rtol, o.origin)
                seen.setdefault(key, (o.name, dtype, o))
        return list(seen.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-able report (written by `--report`)."""
        return {
            "passed": self.passed,
            "models": self.models,
            "inputs": self.inputs,
            "probes": [
                {
                    "kind": p.kind,
                    "source": p.source,
                    "rows": p.rows,
                    "runs": p.runs,
                    "notes": p.notes,
                }
                for p in self.probes
            ],
            "float64_reference": self.reference,
            "tolerances": [
                {"output": n, "dtype": d, "atol": o.atol, "rtol": o.rtol, "origin": o.origin}
                for n, d, o in self.tolerances()
            ],
            "runs": [r.to_dict() for r in self.runs],
            "pairs": [p.to_dict() for p in self.pairs],
            "folding": [f.to_dict() for f in self.folding],
            "locations": [loc.to_dict() for loc in self.locations],
            "tf32": self.tf32_line(),
            "warnings": list(self.warnings),
        }


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if np.isfinite(v) else str(v)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(head), *[line(r) for r in rows]]


def _status(p: Pair, o: OutputComparison) -> str:
    if not p.counted:
        return "ok (info)" if o.passed else "differs (info)"
    if o.passed and o.n_forgiven:
        return f"ok ({o.n_forgiven} within the original's own error)"
    return "ok" if o.passed else "FAIL" + (f" ({o.note})" if o.note else "")


def render(report: VerifyReport) -> str:
    """The report as `bn-onnx verify` prints it: inputs, runs, a table of pairs, verdict."""
    lines = [
        "models: "
        + ", ".join(
            m["label"]
            + (
                " (INT8)"
                if m.get("int8")
                else {True: " (folded)", False: " (unfolded)"}.get(m["folded"], "")
            )
            for m in report.models
        )
    ]
    lines.append("inputs: " + "; ".join(report.inputs))
    lines.append("probes:")
    for p in report.probes:
        lines.append(f"  {p.kind:<6}  {p.describe()}: {p.source}")
        for note in p.notes:
            lines.append(f"          {note}")
    if report.reference is not None:
        lines.append(f"float64 reference: {report.reference}")
    if any(p.kind == "float32 pair" for p in report.pairs):
        lines.append(
            "  so each model is compared with the first one on the same provider instead "
            "(float32 pairs, counted, at twice the default tolerance: both sides carry "
            "rounding error)"
        )
    lines.append("tolerance (an element fails only where |a - b| > atol + rtol * |b|):")
    for name, dtype, o in report.tolerances():
        lines.append(f"  {name} ({dtype}): atol {_fmt(o.atol)}, rtol {_fmt(o.rtol)} [{o.origin}]")
    lines += ["", "runs:"]
    width = max((len(r.label) for r in report.runs), default=0)
    for r in report.runs:
        lines.append(f"  {r.label:<{width}}  {r.detail}")
    lines.append("")
    multi = len({o.name for p in report.pairs for o in p.comparison.outputs}) > 1
    head = [
        "probe",
        *(["output"] if multi else []),
        "actual",
        "expected",
        "max abs",
        "median abs",
        "max rel",
        "worst",
        "argmax",
        "bad",
        "",
    ]
    rows = []
    for p in report.pairs:
        for o in p.comparison.outputs:
            rows.append(
                [
                    p.probe,
                    *([o.name] if multi else []),
                    p.actual,
                    p.expected,
                    _fmt(o.max_abs),
                    _fmt(o.median_abs),
                    _fmt(o.max_rel),
                    str(list(o.worst_index)) if o.worst_index is not None else "-",
                    f"{100 * o.argmax_agreement:.2f}%" if o.argmax_agreement is not None else "-",
                    f"{o.n_mismatched}/{o.n_total}",
                    _status(p, o),
                ]
            )
    if rows:
        lines += _table(head, rows)
    infos = [p for p in report.pairs if not p.counted]
    if infos:
        runs = {r.label: r for r in report.runs}
        kinds = sorted(
            {
                " vs ".join(
                    "/".join(sorted(set(runs[x].dtypes().values()))) or "?"
                    for x in (p.actual, p.expected)
                )
                for p in infos
                if p.actual in runs and p.expected in runs
            }
        )
        lines.append(
            f"  (info: {', '.join(kinds)} runs, not counted; each side is checked against float64)"
        )
    for p in report.pairs:
        for o in p.comparison.outputs:
            if o.forgiven:
                lines.append(f"  ({p.actual}, {p.probe}, {o.name}: {o.forgiven})")
    if report.folding:
        lines += ["", "folding vs float64 (does folding add error?):"]
        for f in report.folding:
            lines.append(
                f"  [{f.provider}, {f.probe}] unfolded max abs {_fmt(f.unfolded_max_abs)} (median "
                f"{_fmt(f.unfolded_median_abs)}), folded max abs {_fmt(f.folded_max_abs)} "
                f"(median {_fmt(f.folded_median_abs)}): "
                + ("folding ADDS error" if f.adds_error else "no added error")
            )
    for loc in report.locations:
        lines += _render_location(loc)
    used = sorted({r.detail.removeprefix("onnxruntime ") for r in report.runs if r.kind == "onnx"})
    lines += ["", f"providers used: {'; '.join(used) or '-'}; {report.tf32_line()}"]
    for w in report.warnings:
        lines.append(f"warning: {w}")
    counted = report.counted
    failed = sum(not p.passed for p in counted)
    n_out = sum(len(p.comparison.outputs) for p in counted)
    if not counted:
        verdict = "FAIL: nothing was compared"
    elif report.n_compared == 0:
        verdict = f"FAIL: nothing compared: the {len(counted)} comparisons hold 0 elements"
    elif report.passed:
        verdict = f"PASS: all {len(counted)} comparisons ({n_out} outputs) within tolerance"
    else:
        verdict = f"FAIL: {failed} of {len(counted)} comparisons outside tolerance"
    lines.append(verdict)
    return "\n".join(lines)


def _render_location(loc: Location) -> list[str]:
    lines = ["", f"locate ({loc.method}, {loc.probe} probe): {loc.actual} vs {loc.expected}"]
    points = loc.points
    if loc.first is not None:
        i = points.index(loc.first)
        shown = points[max(0, i - 2) : i + 3]
    else:
        shown = points[-3:]
    width = max((len(p.name) for p in shown), default=0)
    if shown and points.index(shown[0]) > 0:
        lines.append(f"  ... {points.index(shown[0])} earlier value(s) agree")
    for pt in shown:
        mark = (
            "ok"
            if pt.passed
            else ("differs (renamed?)" if pt.same_name_other_value else "DIVERGES")
        )
        where = f"  {pt.node}" if pt.node and loc.method == "tensor names" else ""
        lines.append(f"  {pt.name:<{width}}  max abs {_fmt(pt.max_abs):<9}  {mark}{where}")
    rest = len(points) - (points.index(shown[-1]) + 1) if shown else 0
    if rest:
        lines.append(f"  ... and {rest} later value(s)")
    first = loc.first
    if first is None:
        lines.append(f"  no divergence among {len(points)} shared values")
    elif loc.method == "tensor names":
        lines.append(f"  first divergence: {first.name}, computed by {first.node}")
        if loc.expected_nodes:
            lines.append(f"    in {loc.expected}: {', '.join(loc.expected_nodes)}")
        if loc.weight_free:
            lines.append(
                "    computed without weights from values that agree: the graphs compute it "
                "differently (a batch norm moved across this node, or dropped)"
            )
            if loc.weighted is not None:
                lines.append(
                    f"  next divergence computed with weights: {loc.weighted.name}, computed "
                    f"by {loc.weighted.node}"
                )
        if len(loc.nodes) > 1:
            lines.append(f"    from the last values that agree: {', '.join(loc.nodes)}")
        if loc.reads:
            lines.append(f"    reading initializers {', '.join(loc.reads)}")
    else:
        lines.append(f"  first divergence: {layer_words(first.name)}")
        lines.append(f"    nodes in {loc.actual}: {', '.join(loc.actual_nodes) or '-'}")
        lines.append(f"    nodes in {loc.expected}: {', '.join(loc.expected_nodes) or '-'}")
    if loc.note:
        lines.append(f"  note: {loc.note}")
    return lines


def write_report(report: VerifyReport, path: str | os.PathLike[str]) -> None:
    """Write the JSON report atomically (`OutputFileError` if it cannot be written)."""
    from bn_onnx.files import OutputGroup

    with OutputGroup() as group, group.open(path, "w") as f:
        f.write(json.dumps(report.to_dict(), indent=2) + "\n")
