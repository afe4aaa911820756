"""Affine sites and what a rule answers: a `Plan` or a `Refusal`.

An *affine site* is a place in a graph where a value is an affine map of another, per channel:
`y = a * x + c` along one axis of x, computed by a few nodes (a BatchNormalization node, or a
chain of Mul/Add by constants: `bn_onnx.fold.affine_ops`). Rules fold a site into its
neighbours. A rule is a function `(site, ctx) -> Plan | Refusal`: a `Plan` rewrites the graph
when called, a `Refusal` says why the rule does not apply, as data. The rule and site-kind
interfaces are in `bn_onnx.fold.rules`; rule families and site kinds register in
`bn_onnx.fold._pass` (`DEFAULT_RULES`, `DEFAULT_SITE_KINDS`); the site kinds themselves are
`bn_onnx.fold.bn_site` and `bn_onnx.fold.affine_ops`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

MAIN_GRAPH = "main"


@dataclasses.dataclass(eq=False)
class AffineSite:
    """`y = a * x + c` per channel along `axis` of x, computed by `nodes`.

    Attributes:
        kind: what computes it, as the report names it ("BatchNormalization").
        label: the name the report gives it (its first node's name, or `Op(output)`).
        nodes: the nodes computing y from x, in graph order; removed when the site is folded.
        x: the input value.
        y: the output value (the last node's output).
        a: per-channel scale, float64, shape (C,).
        c: per-channel shift, float64, shape (C,).
        axis: the channel axis of x (BatchNormalization: 1).
        rank: the rank of x, or None when shape inference does not know it.
        dtype: the element type of x and y (None when unknown).
        graph: the graph (or function body) that holds `nodes`.
        where: that graph's path: "main" for the main graph.
        quiet: when no rule folds it, the site gets no report entry (a Mul/Add chain by
            scalars only: everyday arithmetic such as x / sqrt(d), not a BN in disguise).
    """

    kind: str
    label: str
    nodes: tuple[ir.Node, ...]
    x: ir.Value
    y: ir.Value
    a: np.ndarray
    c: np.ndarray
    axis: int
    rank: int | None
    dtype: ir.DataType | None
    graph: ir.Graph
    where: str = MAIN_GRAPH
    quiet: bool = False

    @property
    def channels(self) -> int:
        return int(self.a.size)

    @property
    def uniform(self) -> bool:
        """Whether a and c are the same on every channel (a chain by scalars): the map is
        then per channel of any axis (`fit_uniform`)."""
        return bool(self.a.size) and bool(
            (self.a == self.a[0]).all() and (self.c == self.c[0]).all()
        )

    @property
    def short(self) -> str:
        """How reasons name the site ("BN")."""
        return "BN" if self.kind == "BatchNormalization" else self.kind


def fit_uniform(site: AffineSite, axis: int, n: int) -> AffineSite:
    """A uniform site as the same map per channel of `axis` with `n` channels (what a rule's
    neighbour needs); any other site unchanged."""
    if not site.uniform or (site.axis == axis and site.channels == n) or n < 1:
        return site
    return dataclasses.replace(site, a=np.full(n, site.a[0]), c=np.full(n, site.c[0]), axis=axis)


@dataclasses.dataclass
class Refusal:
    """Why a rule does not fold a site. `silent`: the rule does not apply at all and has
    nothing worth saying (the merge rule when no second BN follows)."""

    reason: str
    silent: bool = False


@dataclasses.dataclass
class Plan:
    """A checked fold, ready to apply: `rewrite()` changes the graph.

    `direction` goes into the report ("preceding", "following", "merged"); `targets` are the
    nodes the site goes into (their labels and op types are reported before the rewrite);
    `note`, when given, says how it was folded ("scale only; centred by Sub: ...").
    """

    direction: str
    targets: Sequence[ir.Node]
    rewrite: Callable[[], None]
    note: str | None = None
