"""Affine sites, the rule interface, and the BatchNormalization site.

An *affine site* is a place in a graph where a value is an affine map of another, per channel:
`y = a * x + c` along one axis of x, computed by a few nodes (a BatchNormalization node, or a
chain of Mul/Add by constants: `bn_onnx.fold.affine_ops`). Rules fold a site into its
neighbours. A rule is a function `(site, ctx) -> Plan | Refusal`: a `Plan` rewrites the graph
when called, a `Refusal` says why the rule does not apply, as data. Rule families and site
kinds register in `bn_onnx.fold._pass` (`DEFAULT_RULES`, `DEFAULT_SITE_KINDS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from bn_onnx.fold import math as fm
from bn_onnx.fold.flush import flush_constant_channels
from bn_onnx.fold.nodes import (  # re-exported: the node helpers' old home
    FLOAT_DTYPES,
    attr_float,
    attr_int,
    is_standard,
    label,
)

if TYPE_CHECKING:
    from bn_onnx.fold.context import FoldContext

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


RuleFn = Callable[[AffineSite, "FoldContext"], "Plan | Refusal"]


@dataclasses.dataclass(frozen=True)
class Rule:
    """A rule family: `apply(site, ctx) -> Plan | Refusal`.

    `label` prefixes its refusal in the combined reason ("before: ...; after: ..."); an empty
    label adds the refusal as it is.
    """

    name: str
    label: str
    apply: RuleFn


@dataclasses.dataclass(frozen=True)
class SiteKind:
    """A kind of affine site: `claims(node)` says whether a node anchors one (each anchor
    gets a report entry), `build(node, ctx)` reads the site or says why it is not foldable."""

    kind: str
    claims: Callable[[ir.Node], bool]
    build: Callable[[ir.Node, FoldContext], AffineSite | Refusal]


def combine(outcomes: Sequence[tuple[Rule, Refusal]]) -> Refusal:
    """One refusal from every rule's: "before: ...; after: ..." in rule order."""
    parts = [
        f"{rule.label}: {ref.reason}" if rule.label else ref.reason
        for rule, ref in outcomes
        if not ref.silent and ref.reason
    ]
    return Refusal("; ".join(parts))


# --------------------------------------------------------------------------------------------
# The BatchNormalization site


def _claims_batch_norm(node: ir.Node) -> bool:
    return node.op_type == "BatchNormalization" and is_standard(node)


def batch_norm_site(node: ir.Node, ctx: FoldContext) -> AffineSite | Refusal:
    """The affine map of an inference-mode BatchNormalization node with constant parameters.

    a = scale / sqrt(var + eps), c = B - a * mean (ONNX BatchNormalization, spatial=1), in
    float64. Refused: training_mode=1 (or is_test=0 before opset 7), running-stat outputs,
    `spatial=0` (opset <= 8) on an input that is not 2-D, parameters that are graph inputs or
    not constant or not floating point, parameters that are not 1-D vectors of one length, a
    degenerate variance.

    Legacy attributes (BatchNormalization-1, -6, -7): `is_test=0` (opset < 7) is training
    mode, which normalizes with the batch's own statistics. `spatial=0` (opset < 9)
    normalizes per (channel, position) with parameters of shape (C, D1, ..., Dn): not a
    per-channel map, except on a 2-D input (N, C), where both modes are the same map.
    `consumed_inputs` (opset < 6) is "a legacy optimization attribute": it marks the inputs a
    training-mode node updates in place (mean and var, whose updates are the extra outputs);
    it does not change Y, and the opset 5 -> 6 version converter drops it, so it does not
    affect foldability (is_test and the extra outputs decide).

    A channel whose output the unfolded model rounds to one value for every finite input
    (float16: a scale too small to move the shift) becomes that constant (a = 0):
    `bn_onnx.fold.flush`.
    """
    if attr_int(node, "training_mode", 0):
        return Refusal("training_mode=1")
    if ctx.opset < 7 and not attr_int(node, "is_test", 0):
        return Refusal(
            f"is_test=0 (opset {ctx.opset}): BatchNormalization-{6 if ctx.opset == 6 else 1}"
            " normalizes with the batch's statistics (training mode)"
        )
    if any(o.name for o in node.outputs[1:]):
        return Refusal("has running mean/var outputs (training mode)")
    inputs = node.inputs
    if len(inputs) < 5 or inputs[0] is None:
        return Refusal("has fewer than 5 inputs")
    x, y = inputs[0], node.outputs[0]
    if ctx.opset < 9 and not attr_int(node, "spatial", 1):
        rank = ctx.rank(x)
        if rank != 2:
            has = "unknown rank" if rank is None else f"rank {rank}"
            return Refusal(
                f"spatial=0 (opset {ctx.opset}) on an input of {has}: it normalizes per channel"
                " and position, not per channel (only a 2-D input, where spatial=0 and"
                " spatial=1 agree, is folded)"
            )
    exact = ctx.exact_affine.get(node)
    if exact is not None:  # a merged BN: its exact float64 map, not the rounded parameters
        a, c = exact
    else:
        values = []
        for value in inputs[1:5]:
            name = value.name if value is not None else ""
            if value is not None and ctx.is_graph_input(value):
                return Refusal(f"parameter {name!r} is {ctx.describe_input(value)}, not a constant")
            v = ctx.const(value)
            if v is None:
                return Refusal(f"parameter {name!r} is not a constant")
            if v.dtype not in FLOAT_DTYPES:
                return Refusal(f"parameter {name!r} is not floating point")
            values.append(v)
        if len({v.size for v in values}) != 1 or any(v.ndim != 1 for v in values):
            return Refusal("parameters are not 1-D vectors of one length")
        eps = attr_float(node, "epsilon", 1e-5)
        try:
            a, c = fm.bn_affine(*values, eps)
        except ValueError as exc:
            return Refusal(str(exc))
    shape = ctx.shape(x)
    elem_type = ctx.elem_type(x)
    if exact is None and elem_type is not None:  # a merged BN's channels were flushed before
        a, c = flush_constant_channels([(a, c)], a, c, x, ir.DataType(elem_type), ctx)
    return AffineSite(
        kind="BatchNormalization",
        label=label(node),
        nodes=(node,),
        x=x,
        y=y,
        a=a,
        c=c,
        axis=1,
        rank=None if shape is None else len(shape),
        dtype=None if elem_type is None else ir.DataType(elem_type),
        graph=node.graph,  # type: ignore[arg-type]
        where=ctx.where(node.graph),
    )


BATCH_NORM = SiteKind("BatchNormalization", _claims_batch_norm, batch_norm_site)
