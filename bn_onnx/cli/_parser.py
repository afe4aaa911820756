"""The top-level parser: one subparser per command module, usage errors on one line."""

from __future__ import annotations

import argparse
import difflib
import importlib
import pkgutil
import sys
from pathlib import Path
from typing import Any, NoReturn

from bn_onnx import __version__

# Order in `--help`; modules not listed here come after, alphabetically.
ORDER = [
    "train",
    "export",
    "fold",
    "quantize",
    "inspect",
    "verify",
    "run",
    "bench",
    "serve",
    "serve_web",
]


def _command_modules() -> list[str]:
    here = [str(Path(__file__).parent)]  # this package's folder
    found = {m.name for m in pkgutil.iter_modules(here) if not m.name.startswith("_")}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


class OneLineErrorParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line; subcommand parsers inherit it.

    argparse reports a missing required option before an unknown one, so a typo such as
    `--inptu X` would read "the following arguments are required: --input"; here an unknown
    option is named first, with the closest known one.
    """

    _arg_strings: list[str] = []
    is_command = False  # set on each subcommand's parser

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._arg_strings = list(sys.argv[1:] if args is None else args)
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self.is_command:  # the command's own error, not the top level's
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def _unknown_options(self) -> list[str]:
        known = list(self._option_string_actions)
        unknown = []
        for token in self._arg_strings:
            if token == "--":
                break
            if not token.startswith("-") or token == "-":
                continue
            if self._negative_number_matcher.match(token):
                continue  # a value such as -1
            name = token.split("=", 1)[0]
            if token.startswith("--"):
                hit = any(o.startswith(name) for o in known if o.startswith("--"))
            else:
                hit = name[:2] in known  # -o, -oFILE
            if not hit:
                unknown.append(name)
        return unknown

    def error(self, message: str) -> NoReturn:
        unknown = self._unknown_options()
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(self._option_string_actions), 1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            message = f"unrecognized arguments: {' '.join(unknown)}{hint}"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command module."""
    parser = OneLineErrorParser(
        prog="bn-onnx",
        description=(
            "Train MLPs with batch normalization, export them to ONNX, fold the batch norm "
            "into the neighbouring Gemm/MatMul/Conv, and verify that nothing changed."
        ),
    )
    parser.add_argument("--version", action="version", version=f"bn-onnx {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show a traceback for errors instead of one line"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _command_modules():
        module = importlib.import_module(f"bn_onnx.cli.{name}")
        cmd = module.add_parser(sub)
        cmd.is_command = True
        cmd.set_defaults(_run=module.run)
    return parser
