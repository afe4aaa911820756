"""`bn-onnx fold IN.onnx -o OUT.onnx`: fold BatchNormalization nodes away, report every BN left."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# Folded BNs are listed one a line up to this many; beyond, only counted (one screen).
MAX_FOLDED_LINES = 12
# The cleanup line names this many op types, most removed first.
MAX_CLEANUP_OPS = 6
# Without a TTY, the stages (loading, folding, writing) are printed for files this big.
BIG_FILE_BYTES = 64 << 20


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "fold",
        help="fold BatchNormalization into neighbouring Gemm/MatMul/Conv nodes",
        description=(
            "Fold every inference-mode BatchNormalization that can provably be folded into the "
            "Gemm, MatMul(+Add), Conv or ConvTranspose before it, or the Gemm/MatMul after it. "
            "Every BN that stays is listed with the reason. Then the constants the exporter left "
            "(CastLike, Shape of static dims, Expand, Identity ...) are folded and dead code is "
            "removed (--no-cleanup: every other node stays as it was). The input file is never "
            "changed (unless --in-place) and the output is written atomically."
        ),
    )
    p.add_argument("model", metavar="IN.onnx", help="the model to fold")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="folded model")
    p.add_argument("--report", metavar="REPORT.json", help="write the fold report as JSON")
    p.add_argument(
        "--in-place", action="store_true", help="allow OUT.onnx to be IN.onnx (still atomic)"
    )
    p.add_argument(
        "--external-data",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write the weights to OUT.onnx.data (default: only when the model nears 2 GB)",
    )
    p.add_argument(
        "--cleanup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after the fold, fold the constants the exporter left and remove dead code "
        "(default); --no-cleanup leaves every node other than the folded BNs as it was",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument(
        "--verify",
        action="store_true",
        help="prove the folded model computes what IN.onnx does (bn-onnx verify with its "
        "defaults) before writing it: exit 1 and no output file when the proof fails",
    )
    return p


def summary_lines(report: Any, src: str, dst: str) -> list[str]:
    """The one-screen summary of a FoldReport."""
    from bn_onnx.cli.inspect import located

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


def _progress(args: argparse.Namespace) -> tuple[Any, Any]:
    """(callback, context): a rich status line on a TTY; plain stderr lines for big files."""
    import contextlib
    import os
    import sys

    if args.quiet:
        return None, contextlib.nullcontext()
    if sys.stderr.isatty():
        from rich.console import Console

        status = Console(stderr=True).status("bn-onnx fold")
        return (lambda stage: status.update(f"{stage} {args.model}")), status
    try:
        big = os.path.getsize(args.model) >= BIG_FILE_BYTES
    except OSError:
        big = False
    if not big:
        return None, contextlib.nullcontext()
    return (lambda stage: print(f"{stage} {args.model}", file=sys.stderr)), (
        contextlib.nullcontext()
    )


def run(args: argparse.Namespace) -> int:
    from bn_onnx.fold import fold_file

    if args.verify:
        return _fold_verified(args)
    callback, context = _progress(args)
    with context:
        report = fold_file(
            args.model,
            args.output,
            report_path=args.report,
            in_place=args.in_place,
            external_data=args.external_data,
            progress=callback,
            cleanup=args.cleanup,
        )
    if not args.quiet:
        print("\n".join(summary_lines(report, args.model, args.output)))
    return 0


def _fold_verified(args: argparse.Namespace) -> int:
    """Fold into the output group (temporary files beside OUT), verify against IN, and only
    then rename."""
    from bn_onnx.files import OutputGroup
    from bn_onnx.fold import fold_file
    from bn_onnx.verify import render, verify

    with OutputGroup() as group:
        callback, context = _progress(args)
        with context:
            report = fold_file(
                args.model,
                args.output,
                report_path=args.report,
                in_place=args.in_place,
                external_data=args.external_data,
                progress=callback,
                cleanup=args.cleanup,
                group=group,
            )
        folded = group.staged(args.output)
        names = [Path(args.model).name, Path(args.output).name]
        if names[0] == names[1]:
            names = [f"{names[0]} (original)", f"{names[1]} (folded)"]
        proof = verify(
            [args.model, folded],
            labels=names,
            locate=True,
            renamed=report.to_dict().get("renamed"),
        )
        if not proof:
            group.discard()
            print(render(proof))
            print(
                f"not written: {args.output} (the folded model does not compute what "
                f"{args.model} does)"
            )
            return 1
    if not args.quiet:
        print("\n".join(summary_lines(report, args.model, args.output)))
        print(f"verified: {render(proof).splitlines()[-1]}")
    return 0
