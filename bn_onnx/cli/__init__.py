"""The `bn-onnx` command line.

Each subcommand lives in its own module of this package, exposing `add_parser(subparsers)`
and `run(args) -> int`; `bn_onnx.cli._parser` builds the parser from them. Modules import heavy
libraries (torch, onnxruntime) inside `run`, so `bn-onnx --help` and the torch-free commands
stay fast. A `BnOnnxError` is printed as one line and exits 2; `--debug` shows the traceback
instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bn_onnx.cli._parser import build_parser
from bn_onnx.errors import BnOnnxError

__all__ = ["build_parser", "main"]

# Commands that run onnxruntime: on the command line they run in a watched child process, so
# that a native crash is one line and exit 2 (`bn_onnx.crash`).
CONTAINED = ("verify", "run", "bench", "fold")


def _models(args: argparse.Namespace) -> list[str]:
    found = getattr(args, "models", None) or [getattr(args, "model", None)]
    return [str(m) for m in [*found, *(getattr(args, "others", None) or [])] if m]


def main(argv: Sequence[str] | None = None, *, contain: bool | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 a check failed, 2 bad input).

    `contain` (default: when `argv` is None, i.e. the real command line) runs the commands in
    `CONTAINED` in a forked child watched for native crashes (`bn_onnx.crash`).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    if (argv is None if contain is None else contain) and args.command in CONTAINED:
        from bn_onnx import crash

        def work() -> int:
            if args.debug:
                import faulthandler

                faulthandler.enable()  # a native crash shows the Python stack too
            return _dispatch(args)

        return crash.run_watched(args.command, _models(args), work)
    return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command: a `BnOnnxError` is one line and its exit code."""
    try:
        return int(args._run(args) or 0)
    except BnOnnxError as exc:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()] or [""]
        if args.debug:
            detail = exc.detail or (str(exc) if len(lines) > 1 else None)
            if detail:
                print(detail, file=sys.stderr)
            raise
        print(f"bn-onnx {args.command}: error: {lines[0]}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("bn-onnx: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
