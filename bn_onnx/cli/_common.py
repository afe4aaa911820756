"""Small helpers shared by the command modules: option parsers that fail as usage errors."""

from __future__ import annotations

import argparse
from typing import Any


def _whole_number(text: str, what: str = "a whole number") -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0..65535 (0: the system picks a free one)."""
    value = _whole_number(text, "a port number")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers, e.g. `128,64`."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected comma-separated whole numbers, e.g. 128,64")
    return [positive_int(p) for p in parts]


def add_command(
    subparsers: Any, name: str, help: str, description: str, epilog: str | None = None
) -> argparse.ArgumentParser:
    """Register the command `name` with its help line and description.

    An `epilog` (the examples) keeps its line breaks and indents, as the description does then.
    """
    if epilog is None:
        return subparsers.add_parser(name, help=help, description=description)
    return subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
