"""`bn-onnx verify`: do the models compute the same thing (and the checkpoint, in float64)?"""

from __future__ import annotations

import argparse

from bn_onnx.cli._common import non_negative_float, positive_int


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `verify`."""
    p = subparsers.add_parser(
        "verify",
        help="compare models against each other, torch and a float64 reference",
        description=(
            "Run every MODEL on every provider and compare the outputs with the float64 "
            "reference (of the checkpoint, else of the first unfolded model), torch eval "
            "(with --checkpoint) and each other. Exit 0 when all agree, 1 on a mismatch, "
            "2 on bad input."
        ),
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="ONNX files (unfolded, folded...)")
    p.add_argument("--checkpoint", metavar="DIR", help="the checkpoint the models came from")
    p.add_argument(
        "--input",
        metavar="X",
        help="rows to run (.npy or .csv); default: the checkpoint's test split, else random rows",
    )
    p.add_argument(
        "--provider",
        default="auto",
        help="auto (every available of cuda, cpu), cpu, cuda, or cpu,cuda (default: auto)",
    )
    p.add_argument(
        "--atol",
        type=non_negative_float,
        default=None,
        help="absolute tolerance (default 1e-5 for float32)",
    )
    p.add_argument(
        "--rtol",
        type=non_negative_float,
        default=None,
        help="relative tolerance (default 1e-4 for float32)",
    )
    p.add_argument("--report", metavar="R.json", help="also write the report as JSON")
    p.add_argument(
        "--locate",
        action="store_true",
        help="for models that disagree, name the first layer whose values diverge",
    )
    p.add_argument(
        "--rows",
        type=positive_int,
        default=256,
        metavar="N",
        help="number of random rows when there is no input (default 256)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random rows (default 0)")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the verdict")
    return p


def run(args: argparse.Namespace) -> int:
    """Verify, print the table, write the report; 0 all pass, 1 any mismatch."""
    import numpy as np

    from bn_onnx.files import check_input_file, check_output_path
    from bn_onnx.verify import render, verify, write_report

    for m in args.models:
        check_input_file(m, "model file")
    if args.report:
        check_output_path(args.report, [*args.models, *([args.input] if args.input else [])])
    inputs = None
    source = None
    if args.input:
        from bn_onnx.arrays import read_array

        inputs = np.asarray(read_array(args.input))
        source = f"from {args.input}"
    torch_runner = None
    if args.checkpoint:
        try:
            from bn_onnx.torch_eval import run_checkpoint_taps
        except ImportError:  # torch-free install: verify without the torch run
            run_checkpoint_taps = None
        torch_runner = run_checkpoint_taps
    report = verify(
        args.models,
        checkpoint=args.checkpoint,
        inputs=inputs,
        input_source=source,
        provider=args.provider,
        atol=args.atol,
        rtol=args.rtol,
        locate=args.locate,
        torch_runner=torch_runner,
        rows=args.rows,
        seed=args.seed,
    )
    text = render(report)
    print(text.splitlines()[-1] if args.quiet else text)
    if args.report:
        write_report(report, args.report)
    return report.exit_code
