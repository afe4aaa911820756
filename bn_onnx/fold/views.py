"""What the ground-floor fold modules read from a fold's context, as a `typing.Protocol`.

`bn_onnx.fold.context.FoldContext` is the one implementation. The modules the context itself
imports (`nodes`, `legacy`, `evaluate`, `constants`, `scopes`) take a `ValueView` (or a
protocol of their own built on it) instead of the context, so that no import, not even one
made only for type checking, leads back to `context`. This module imports no fold module.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import onnx_ir as ir


class ValueView(Protocol):
    """Read-only facts about a graph's values: the opset, constants and inferred shapes."""

    @property
    def opset(self) -> int:
        """The default-domain opset version."""
        ...

    def const(self, value: ir.Value | None) -> np.ndarray | None:
        """The value's array if it is a constant, else None."""
        ...

    def shape(self, value: ir.Value) -> tuple[int | None, ...] | None:
        """The value's inferred shape (None where unknown)."""
        ...

    def elem_type(self, value: ir.Value) -> int | None:
        """The value's inferred element type (`onnx.TensorProto` code), None where unknown."""
        ...

    def is_graph_input(self, value: ir.Value) -> bool:
        """Whether the caller feeds the value (so it is no constant)."""
        ...
