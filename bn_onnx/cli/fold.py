"""`bn-onnx fold IN.onnx -o OUT.onnx`: fold BatchNormalization nodes away, report every BN left."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bn_onnx.cli._common import add_command
from bn_onnx.cli.verify import add_verify_options, verify_options, verify_options_given

if TYPE_CHECKING:
    from bn_onnx.fold.model_io import FoldOptions
    from bn_onnx.fold.report import FoldReport

# Without a TTY, the stages (loading, folding, writing) are printed for files this big.
BIG_FILE_BYTES = 64 << 20


HELP = "fold BatchNormalization into neighbouring Gemm/MatMul/Conv nodes"
DESCRIPTION = """\
Fold every inference-mode BatchNormalization that can provably be folded into the Gemm,
MatMul(+Add), Conv or ConvTranspose before it, or the Gemm/MatMul after it. Every BN that
stays is listed with the reason. Then the constants the exporter left (CastLike, Shape of
static dims, Expand, Identity ...) are folded and dead code is removed (--no-cleanup: every
other node stays as it was). The input file is never changed (unless --in-place) and the
output is written atomically."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(subparsers, "fold", HELP, DESCRIPTION)
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
        help="prove the folded model computes what IN.onnx does (bn-onnx verify, with the "
        "options below) before writing it: exit 1 and no output file when the proof fails",
    )
    add_verify_options(p.add_argument_group("--verify options (as bn-onnx verify's)"), locate=True)
    return p


def fold_options(args: argparse.Namespace) -> FoldOptions:
    """The fold's options, from the arguments."""
    from bn_onnx.fold.model_io import FoldOptions

    return FoldOptions(
        report_path=args.report,
        in_place=args.in_place,
        external_data=args.external_data,
        cleanup=args.cleanup,
    )


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


def _fold(args: argparse.Namespace, options: FoldOptions, group: Any = None) -> FoldReport:
    """Fold IN into OUT (into `group`, when given), with the progress line."""
    from bn_onnx.fold import fold_file

    callback, context = _progress(args)
    with context:
        return fold_file(
            args.model, args.output, **options.keywords(), progress=callback, group=group
        )


def run(args: argparse.Namespace) -> int:
    from bn_onnx.errors import UsageError
    from bn_onnx.fold.report import summary_lines

    options = fold_options(args)
    if args.verify:
        return _fold_verified(args, options)
    given = verify_options_given(args) + ([] if args.locate else ["--no-locate"])
    if given:
        raise UsageError(f"the verify options ({', '.join(given)}) need --verify")
    report = _fold(args, options)
    if not args.quiet:
        print("\n".join(summary_lines(report, args.model, args.output)))
    return 0


def _fold_verified(args: argparse.Namespace, options: FoldOptions) -> int:
    """Fold into the output group (temporary files beside OUT), verify against IN, and only
    then rename."""
    import dataclasses

    from bn_onnx.files import OutputGroup
    from bn_onnx.fold.report import summary_lines
    from bn_onnx.verify import render, verify_models

    check = verify_options(args)  # reads --input: a bad file fails before the fold
    with OutputGroup() as group:
        report = _fold(args, options, group)
        folded = group.staged(args.output)
        names = [Path(args.model).name, Path(args.output).name]
        if names[0] == names[1]:
            names = [f"{names[0]} (original)", f"{names[1]} (folded)"]
        proof = verify_models(
            [args.model, folded],
            dataclasses.replace(check, labels=names, renamed=report.to_dict().get("renamed")),
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
