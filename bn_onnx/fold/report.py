"""The fold's report objects: one entry per affine site, graph sizes before and after, what the
cleanup removed, and the values that ended up under another name; and their text, as
`bn-onnx fold` and `bn-onnx export --fold` print it (`summary_lines`, `cleanup_line`)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

BN_KIND = "BatchNormalization"
# Folded BNs are listed one a line up to this many; beyond, only counted (one screen).
MAX_FOLDED_LINES = 12
# The cleanup line names this many op types, most removed first.
MAX_CLEANUP_OPS = 6


@dataclasses.dataclass
class BnEntry:
    """What happened to one BatchNormalization node (or, later, another affine site).

    Attributes:
        node: the site's label (node name, or `Op(output)` for a nameless node).
        status: "folded" or "left".
        direction: "preceding", "following" or "merged" (folded entries).
        target: the node(s) it went into, comma-separated.
        target_op: their op types, comma-separated.
        reason: why it was left.
        kind: what the site is ("BatchNormalization").
        where: the graph it sits in ("main" for the main graph).
        note: how it was folded, when not plainly ("scale only; centred by Sub: mean/std up
            to 2.51e+03", `bn_onnx.fold.centring`).
    """

    node: str
    status: str
    direction: str | None = None
    target: str | None = None
    target_op: str | None = None
    reason: str | None = None
    kind: str = "BatchNormalization"
    where: str = "main"
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FoldReport:
    """The outcome of a fold: one entry per BN node (and per other affine site that is listed:
    a Mul/Add chain), and graph sizes before and after.

    Attributes:
        entries: one per BatchNormalization node (and other listed affine site), in graph order.
            `n_bn`, `n_folded` count the BatchNormalization nodes; `other_kinds()` the others.
        nodes_before, initializers_before: counts of the input (the main graph, its subgraphs
            and the function bodies).
        nodes_after, initializers_after: the same of the output (after the cleanup when it
            ran).
        cleanup: the cleanup's counts (`CleanupResult.to_dict()`: nodes and initializers
            before and after, `removed_ops` by op type, `deduplicated`, `rewrites`,
            `used_constant_folder`; node counts include subgraphs and functions), or None when
            the cleanup did not run.
        renamed: original value name -> name in the output, for values of the main graph that
            the output still computes under another name (for `bn-onnx verify --locate
            --fold-report`); values whose name did not change are not listed.
        checks: the output check (`bn_onnx.fold.guard.OutputChecks.to_dict()`: `checker`,
            `onnxruntime`, `dropped_steps` (cleanup step -> why it was left out),
            `cleanup_dropped`), or None when the fold ran without it.
    """

    entries: list[BnEntry]
    nodes_before: int
    nodes_after: int
    initializers_before: int
    initializers_after: int
    cleanup: dict[str, Any] | None = None
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)
    checks: dict[str, Any] | None = None

    @property
    def n_bn(self) -> int:
        """BatchNormalization nodes (entries of other kinds, Mul/Add chains, not counted)."""
        return sum(e.kind == BN_KIND for e in self.entries)

    @property
    def n_folded(self) -> int:
        """BatchNormalization nodes folded."""
        return sum(e.status == "folded" and e.kind == BN_KIND for e in self.entries)

    def other_kinds(self) -> dict[str, tuple[int, int]]:
        """Sites of kinds other than BatchNormalization: kind -> (count, folded)."""
        counts: dict[str, tuple[int, int]] = {}
        for e in self.entries:
            if e.kind != BN_KIND:
                n, f = counts.get(e.kind, (0, 0))
                counts[e.kind] = (n + 1, f + (e.status == "folded"))
        return counts

    @property
    def left(self) -> list[BnEntry]:
        return [e for e in self.entries if e.status == "left"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_bn": self.n_bn,
            "n_folded": self.n_folded,
            "n_left": self.n_bn - self.n_folded,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "initializers_before": self.initializers_before,
            "initializers_after": self.initializers_after,
            "other_sites": {k: {"n": n, "folded": f} for k, (n, f) in self.other_kinds().items()},
            "bn": [e.to_dict() for e in self.entries],
            "cleanup": self.cleanup,
            "renamed": dict(self.renamed),
            "checks": self.checks,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclasses.dataclass
class FoldResult:
    """The folded model (an `onnx.ModelProto`, or an `onnx_ir.Model` when one was given) and
    its report."""

    model: Any
    report: FoldReport

    @property
    def n_bn(self) -> int:
        return self.report.n_bn

    @property
    def n_folded(self) -> int:
        return self.report.n_folded


@dataclasses.dataclass
class BnInfo:
    """Foldability of one BN node, as `bn-onnx inspect` shows it."""

    node: str
    foldable: bool
    direction: str | None
    target: str | None
    reason: str | None
    kind: str = "BatchNormalization"
    where: str = "main"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# The report as text


def located(where: str | None) -> str:
    """How a text line says where a BN sits: nothing for the main graph, else `  in WHERE`
    (`in main/If 'cond'/then_branch`, `in function pkg::Block`)."""
    return "" if where in (None, "main") else f"  in {where}"


def summary_lines(report: FoldReport, src: str, dst: str) -> list[str]:
    """The one-screen summary of a FoldReport, as `bn-onnx fold` prints it: the counts, each
    folded site (up to `MAX_FOLDED_LINES`), each site left with its reason, the graph sizes, the
    cleanup line and what the output check left out."""
    others = "".join(f", {f} of {n} {k}s" for k, (n, f) in report.other_kinds().items())
    lines = [
        f"folded {report.n_folded} of {report.n_bn} BatchNormalization nodes{others}: "
        f"{src} -> {dst}"
    ]
    folded = [e for e in report.entries if e.status == "folded"]
    for e in folded[:MAX_FOLDED_LINES]:
        lines.append(
            f"  folded  {e.node}{located(e.where)}  {e.direction} -> {e.target} ({e.target_op})"
            + (f" ({e.note})" if e.note else "")
        )
    if len(folded) > MAX_FOLDED_LINES:
        lines.append(f"  ... and {len(folded) - MAX_FOLDED_LINES} more folded")
    for e in report.left:
        lines.append(f"  left    {e.node}{located(e.where)}: {e.reason}")
    lines.append(
        f"nodes {report.nodes_before} -> {report.nodes_after}, "
        f"initializers {report.initializers_before} -> {report.initializers_after}"
    )
    if report.cleanup is not None:
        lines.append(cleanup_line(report.cleanup))
    lines.extend(check_lines(report.checks))
    return lines


def check_lines(checks: dict[str, Any] | None) -> list[str]:
    """What the output check left out, one line each (none when it left out nothing), e.g.
    "cleanup: left out rewrite_rules (onnxruntime: ... Unrecognized attribute: allowzero ...)"."""
    if not checks:
        return []
    lines = []
    steps = checks.get("dropped_steps") or {}
    if steps:
        reason = next(iter(steps.values()))
        lines.append(f"cleanup: left out {', '.join(steps)} ({reason})")
    if checks.get("cleanup_dropped"):
        lines.append(f"cleanup: left out entirely ({checks['cleanup_dropped']})")
    return lines


def cleanup_line(counts: dict[str, Any]) -> str:
    """One line from the cleanup's counts, e.g. "cleanup: 247 -> 100 nodes (removed CastLike
    40, Shape 12, ...; added Cast 2), 3 initializers merged", or "cleanup: nothing to clean
    (5 nodes)"."""
    before, after = counts["nodes_before"], counts["nodes_after"]
    if not counts.get("modified"):
        return f"cleanup: nothing to clean ({before} nodes)"
    ops = counts.get("removed_ops", {})
    removed = sorted(((n, op) for op, n in ops.items() if n > 0), key=lambda t: (-t[0], t[1]))
    added = sorted(((-n, op) for op, n in ops.items() if n < 0), key=lambda t: (-t[0], t[1]))
    parts = []
    if removed:
        shown = ", ".join(f"{op} {n}" for n, op in removed[:MAX_CLEANUP_OPS])
        more = ", ..." if len(removed) > MAX_CLEANUP_OPS else ""
        parts.append(f"removed {shown}{more}")
    if added:
        parts.append("added " + ", ".join(f"{op} {n}" for n, op in added[:MAX_CLEANUP_OPS]))
    line = f"cleanup: {before} -> {after} nodes" + (f" ({'; '.join(parts)})" if parts else "")
    merged = counts.get("deduplicated", 0)
    if merged:
        line += f", {merged} initializer{'s' if merged != 1 else ''} merged"
    return line
