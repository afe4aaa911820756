"""`bn-onnx verify`: do the models compute the same thing (and the checkpoint, in float64)?"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from bn_onnx.cli._common import positive_int

if TYPE_CHECKING:
    import numpy as np

    from bn_onnx.verify import TorchRunner, VerifyOptions

INPUT_FORMATS = (".npz", ".npy", ".csv")


def tolerance_arg(text: str) -> tuple[str, float]:
    """argparse type: `VALUE` (every output, key `*`) or `NAME=VALUE` (one output)."""
    name, sep, value = text.rpartition("=")
    key = name if sep else "*"
    if sep and not name:
        raise argparse.ArgumentTypeError(f"expected VALUE or NAME=VALUE, got {text!r}")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected VALUE or NAME=VALUE, got {text!r}") from None
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {value}")
    return key, number


def shape_arg(text: str) -> tuple[str, tuple[int, ...]]:
    """argparse type: `NAME:1x3x224x224`."""
    from bn_onnx.errors import UsageError
    from bn_onnx.verify.signature import parse_shape

    try:
        return parse_shape(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_verify_options(p: argparse.ArgumentParser, *, locate: bool = False) -> None:
    """The data, probe, provider, tolerance and --locate options, shared with `bn-onnx fold
    --verify` (read back once by `verify_options`); `locate`: the --locate default."""
    p.add_argument(
        "--input",
        metavar="X",
        help="data to run: .npz (one array per input name), .npy or .csv (one input); "
        "default: the checkpoint's test split; a random probe always runs too",
    )
    p.add_argument(
        "--shape",
        type=shape_arg,
        action="append",
        default=[],
        metavar="NAME:DIMS",
        help="dims of an input with symbolic dims, e.g. input:1x3x224x224 (repeatable); "
        "default: a symbolic first dim is the probe batch, others 16",
    )
    p.add_argument(
        "--provider",
        default="auto",
        help="auto (every available of cuda, cpu), cpu, cuda, reference (onnx.reference), "
        "or a list such as cpu,cuda (default: auto)",
    )
    p.add_argument(
        "--atol",
        type=tolerance_arg,
        action="append",
        default=[],
        metavar="[NAME=]A",
        help="absolute tolerance for every output, or NAME=A for one (repeatable); "
        "default per dtype: 1e-5 for float32, 1e-2 for float16, raised to twice the atol "
        "the first model itself needs against float64 where that is larger (a deep net)",
    )
    p.add_argument(
        "--rtol",
        type=tolerance_arg,
        action="append",
        default=[],
        metavar="[NAME=]R",
        help="relative tolerance, like --atol; default 1e-4 for float32, 1e-2 for float16",
    )
    p.add_argument(
        "--rows",
        type=positive_int,
        default=256,
        metavar="N",
        help="rows of the random probe (default 256; fewer for big inputs)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random probe (default 0)")
    p.add_argument(
        "--locate",
        action=argparse.BooleanOptionalAction,
        default=locate,
        help="for models that disagree, name the first node whose values diverge "
        f"(default: {'on' if locate else 'off'})",
    )


# The values `add_verify_options` leaves when none of its options is given (--locate aside).
VERIFY_DEFAULTS: dict[str, Any] = {
    "input": None,
    "shape": [],
    "provider": "auto",
    "atol": [],
    "rtol": [],
    "rows": 256,
    "seed": 0,
}


def verify_options_given(args: argparse.Namespace) -> list[str]:
    """The options of `add_verify_options` that `args` sets to other than their defaults."""
    return [f"--{k}" for k, v in VERIFY_DEFAULTS.items() if getattr(args, k, v) != v]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `verify`."""
    p = subparsers.add_parser(
        "verify",
        help="compare models against each other, torch and a float64 reference",
        description=(
            "Run every MODEL on every provider over the given data and a seeded random probe, "
            "and compare every output with the float64 reference (the checkpoint's forward, "
            "or the first unfolded model cast to float64), torch eval (with --checkpoint) and "
            "each other. Exit 0 when all agree, 1 on a mismatch, 2 on bad input."
        ),
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="ONNX files (unfolded, folded...)")
    p.add_argument("--checkpoint", metavar="DIR", help="the checkpoint the models came from")
    add_verify_options(p)
    p.add_argument("--report", metavar="R.json", help="also write the report as JSON")
    p.add_argument(
        "--fold-report",
        metavar="R.json",
        help="a fold report whose `renamed` mapping (original -> folded tensor names) --locate "
        "uses",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="print only the verdict")
    return p


def tolerances(pairs: list[tuple[str, float]]) -> dict[str, float] | None:
    """The --atol/--rtol values as output name -> value (`*`: every output), None if none."""
    return dict(pairs) if pairs else None


def read_inputs(path: str) -> np.ndarray | dict[str, np.ndarray]:
    """`--input`: an .npz as name -> array, an .npy or .csv as one array (no pickles)."""
    from pathlib import Path

    import numpy as np

    from bn_onnx.errors import InputFileError, one_line

    if Path(path).suffix.lower() == ".npz":
        from bn_onnx.files import check_input_file

        p = check_input_file(path, "input file")
        try:
            with np.load(p, allow_pickle=False) as data:
                return {k: np.asarray(data[k]) for k in data.files}
        except (ValueError, OSError, EOFError) as exc:
            raise InputFileError(f"not a readable .npz of arrays: {p} ({one_line(exc)})") from None
    from bn_onnx.arrays import array_format, read_array

    if Path(path).suffix.lower() not in INPUT_FORMATS:
        array_format(path)  # the usual one-line error for a wrong suffix
        raise InputFileError(f"input {path} must be .npz, .npy or .csv")
    return np.asarray(read_array(path))


def read_renamed(path: str | None) -> dict[str, str] | None:
    """The `renamed` mapping of a fold report JSON (absent: None)."""
    if not path:
        return None
    import json

    from bn_onnx.errors import InputFileError
    from bn_onnx.files import check_input_file

    p = check_input_file(path, "fold report")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except RecursionError:
        raise InputFileError(f"not a JSON fold report: {p} (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputFileError(f"not a JSON fold report: {p} ({exc})") from None
    renamed = data.get("renamed") if isinstance(data, dict) else None
    if isinstance(renamed, dict):
        return {str(k): str(v) for k, v in renamed.items()}
    return None


def torch_runner_or_none() -> TorchRunner | None:
    """torch eval of a checkpoint, or None on a torch-free install."""
    try:
        from bn_onnx.torch_eval import run_checkpoint_taps
    except ImportError:
        return None
    return run_checkpoint_taps


def verify_options(args: argparse.Namespace) -> VerifyOptions:
    """The `VerifyOptions` of `verify`'s arguments (`add_verify_options`' and the rest that
    `args` has: --checkpoint, --input, --locate, --fold-report), made once."""
    from bn_onnx.verify import VerifyOptions

    checkpoint = getattr(args, "checkpoint", None)
    source = getattr(args, "input", None)
    fold_report = getattr(args, "fold_report", None)
    return VerifyOptions(
        checkpoint=checkpoint,
        inputs=read_inputs(source) if source else None,
        input_source=f"from {source}" if source else None,
        shapes=dict(args.shape),
        provider=args.provider,
        atol=tolerances(args.atol),
        rtol=tolerances(args.rtol),
        locate=bool(getattr(args, "locate", False)),
        torch_runner=torch_runner_or_none() if checkpoint else None,
        rows=args.rows,
        seed=args.seed,
        renamed=read_renamed(fold_report),
    )


def run(args: argparse.Namespace) -> int:
    """Verify, print the table, write the report; 0 all pass, 1 any mismatch."""
    from bn_onnx.checkpoint import CHECKPOINT_FILES
    from bn_onnx.files import (
        check_input_file,
        check_output_path,
        check_outputs,
        checkpoint_files,
        model_files,
    )
    from bn_onnx.verify import render, verify_models, write_report

    for m in args.models:
        check_input_file(m, "model file")
    if args.report:
        check_output_path(args.report)
        check_outputs(
            [("--report", args.report)],
            lambda: [
                *(f for m in args.models for f in model_files(m)),
                *([("the input file", args.input)] if args.input else []),
                *([("the fold report", args.fold_report)] if args.fold_report else []),
                *checkpoint_files(args.checkpoint, CHECKPOINT_FILES),
            ],
        )
    report = verify_models(args.models, verify_options(args))
    text = render(report)
    print(text.splitlines()[-1] if args.quiet else text)
    if args.report:
        write_report(report, args.report)
    return report.exit_code
