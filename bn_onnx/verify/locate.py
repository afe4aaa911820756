"""Where two runs part ways: the first intermediate value, in node order, that differs.

Two graphs are compared by tensor name, as Polygraphy does when it marks every tensor as an
output (`--onnx-outputs mark all`): the fold keeps the output names of the nodes it keeps (a
Gemm that absorbed the BN after it takes over the BN's output name), so every name the two
graphs share holds the same value when the fold is right. A fold report may add a mapping of
renamed tensors (`renamed`: original name -> folded name). The first shared tensor, in the
actual graph's topological order, that is outside tolerance names the node that computes it:
the node next to a changed weight.

Where one side is the checkpoint's float64 forward or torch, which have no tensor names, the
MLP's matching points (`bn_onnx.verify.taps`) are compared instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from bn_onnx.compare import TolerancePolicy, compare_arrays
from bn_onnx.verify.runs import Outputs, value_types
from bn_onnx.verify.signature import FLOAT_TYPES

# (label, graph whose tensor names are used, f(names) -> values): a run seen by tensor name.
NamedSource = tuple[str, onnx.ModelProto, Callable[[Sequence[str]], Outputs]]
# (label, tap label -> values, tap label -> the nodes or modules computing it).
TapSource = tuple[str, Mapping[str, np.ndarray], Mapping[str, list[str]]]


@dataclass
class Point:
    """One value compared: its name in each run, the node computing it, and the error."""

    name: str
    expected_name: str
    node: str | None
    op: str | None
    passed: bool
    max_abs: float
    n_mismatched: int
    n_total: int
    same_name_other_value: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = dict(self.__dict__)
        d["max_abs"] = float(self.max_abs) if np.isfinite(self.max_abs) else str(self.max_abs)
        return d


@dataclass
class Location:
    """The values compared between two runs, and the first that diverges (None: none does).

    `nodes` are the nodes of the actual graph between the last values that agree and the first
    that diverges (usually one: the node next to a changed weight), `reads` the initializers
    they read (their weights); `expected_node` computes the same value on the expected side,
    `expected_nodes` are the expected graph's nodes over the same stretch. When the first
    diverging value is computed without weights from values that agree (`weight_free`: the
    other graph computes it with a BN this one moved or dropped), `weighted` is the next
    diverging value that weights compute, and `nodes` and `reads` are that one's.
    """

    actual: str
    expected: str
    probe: str
    method: str  # "tensor names" | "MLP matching points"
    points: list[Point] = field(default_factory=list)
    first: Point | None = None
    weight_free: bool = False
    weighted: Point | None = None
    nodes: list[str] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)
    expected_node: str | None = None
    expected_nodes: list[str] = field(default_factory=list)
    actual_nodes: list[str] = field(default_factory=list)
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "actual": self.actual,
            "expected": self.expected,
            "probe": self.probe,
            "method": self.method,
            "first": self.first.to_dict() if self.first else None,
            "node": self.first.node if self.first else None,
            "weight_free": self.weight_free,
            "weighted": self.weighted.to_dict() if self.weighted else None,
            "nodes": self.nodes,
            "reads": self.reads,
            "expected_node": self.expected_node,
            "actual_nodes": self.actual_nodes,
            "expected_nodes": self.expected_nodes,
            "note": self.note,
            "points": [p.to_dict() for p in self.points],
        }


def _dynamic_producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor -> producing node, for main-graph values that depend on the graph inputs."""
    graph = model.graph
    init = {t.name for t in graph.initializer}
    dynamic = {i.name for i in graph.input if i.name not in init}
    producers: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        has_graph = any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        )
        if has_graph or any(n in dynamic for n in node.input):
            for out in node.output:
                if out:
                    dynamic.add(out)
                    producers[out] = node
    return producers


def shared_tensors(
    actual: onnx.ModelProto,
    expected: onnx.ModelProto,
    renamed: Mapping[str, str] | None = None,
) -> list[tuple[str, str]]:
    """(actual name, expected name) of float values both graphs compute, in actual's node order.

    `renamed` maps original names to folded ones; it is read both ways.
    """
    pa, pe = _dynamic_producers(actual), _dynamic_producers(expected)
    ta, te = value_types(actual), value_types(expected)
    back = {v: k for k, v in (renamed or {}).items()}
    fwd = dict(renamed or {})
    out = []
    for name in pa:
        other = name if name in pe else back.get(name, fwd.get(name))
        if other is None or other not in pe:
            continue
        if ta.get(name) in FLOAT_TYPES and te.get(other) in FLOAT_TYPES:
            out.append((name, other))
    return out


def _node_label(node: onnx.NodeProto | None) -> str | None:
    if node is None:
        return None
    if node.name:
        return f"{node.name} ({node.op_type})"
    return f"{node.op_type} -> {', '.join(o for o in node.output if o)}"


def reads(node: onnx.NodeProto, initializers: set[str]) -> list[str]:
    """The initializers a node reads, its subgraphs' outer-scope reads included."""
    names = list(node.input)
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for inner in g.node:
                names += reads(inner, initializers)
    return [n for n in dict.fromkeys(names) if n in initializers]


def region(
    model: onnx.ModelProto,
    tensor: str,
    agree: set[str],
    *,
    producers: Mapping[str, onnx.NodeProto] | None = None,
    order: Mapping[int, int] | None = None,
) -> list[onnx.NodeProto]:
    """The nodes computing `tensor` from values known to agree (or the graph inputs).

    Walks back from `tensor` through producers and stops at `agree`, the graph inputs and
    initializers; the nodes are returned in graph (topological) order. A caller asking for
    many regions of one model passes `producers` (`_dynamic_producers(model)`) and `order`
    (`node_order(model)`) once, so each region costs its own size, not the graph's.
    """
    if producers is None:
        producers = _dynamic_producers(model)
    seen: dict[int, onnx.NodeProto] = {}
    stack = [tensor]
    while stack:
        t = stack.pop()
        node = producers.get(t)
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(n for n in node.input if n and n not in agree)
    if order is None:
        return [n for n in model.graph.node if id(n) in seen]
    return sorted(seen.values(), key=lambda n: order[id(n)])


def node_order(model: onnx.ModelProto) -> dict[int, int]:
    """id(node) -> its position in the main graph, for `region`."""
    return {id(n): i for i, n in enumerate(model.graph.node)}


def _point(
    name: str,
    other: str,
    a: np.ndarray,
    b: np.ndarray,
    policy: TolerancePolicy,
    scale: float,
    node: onnx.NodeProto | None,
) -> Point:
    tol = policy.resolve(name, a.dtype, scale=scale)
    comp = compare_arrays(a, b, atol=tol.atol, rtol=tol.rtol, name=name, equal_nan=True)
    return Point(
        name,
        other,
        _node_label(node),
        node.op_type if node is not None else None,
        comp.passed,
        comp.max_abs,
        comp.n_mismatched,
        comp.n_total,
    )


def by_names(
    actual: NamedSource,
    expected: NamedSource,
    *,
    probe: str,
    policy: TolerancePolicy,
    scale: float = 1.0,
    renamed: Mapping[str, str] | None = None,
) -> Location:
    """Compare every tensor the two graphs share; the first outside tolerance locates.

    `actual` and `expected` are (label, graph whose names are used, f(names) -> values).
    """
    (la, ma, run_a), (le, me, run_e) = actual, expected
    loc = Location(la, le, probe, "tensor names")
    pairs = shared_tensors(ma, me, renamed)
    if not pairs:
        loc.note = "the two graphs share no intermediate tensor names"
        return loc
    va = run_a([a for a, _ in pairs])
    ve = run_e([e for _, e in pairs])
    producers = _dynamic_producers(ma)
    producers_e = _dynamic_producers(me)
    init = {t.name for t in ma.graph.initializer}
    renamed_here: set[str] = set()
    skipped = 0
    for a, e in pairs:
        if a not in va or e not in ve or np.shape(va[a]) != np.shape(ve[e]):
            skipped += 1  # a name without a value, or of another shape: not a matching point
            continue
        loc.points.append(_point(a, e, va[a], ve[e], policy, scale, producers.get(a)))
    shared = {p.name for p in loc.points}
    agree = {p.name for p in loc.points if p.passed}
    # A shared name may hold another value in each graph (a fold that kept a Gemm's output
    # name for the Gemm+BN value): when a value computed straight from it agrees, it is not
    # a divergence.
    order, order_e = node_order(ma), node_order(me)

    def region_a(name: str, stop: set[str]) -> list[onnx.NodeProto]:
        return region(ma, name, stop, producers=producers, order=order)

    for p in loc.points:
        if p.passed:
            # The walk starts at p.name and never comes back to it (a DAG): `shared` stops it
            # as `shared - {p.name}` would, without a copy of the set per point.
            for node in region_a(p.name, shared):
                for name in node.input:
                    if name in shared and name not in agree:
                        renamed_here.add(name)
    for p in loc.points:
        p.same_name_other_value = p.name in renamed_here
    diverging = [p for p in loc.points if not p.passed and p.name not in renamed_here]
    if not diverging:  # nothing else differs: the first renamed-looking value is the answer
        diverging = [p for p in loc.points if not p.passed][:1]
        for p in diverging:
            p.same_name_other_value = False
            renamed_here.discard(p.name)
    if diverging:
        float_init = {t.name for t in ma.graph.initializer if t.data_type in FLOAT_TYPES}
        stop = agree | renamed_here
        first = diverging[0]
        nodes = region_a(first.name, stop)
        loc.first = first
        loc.expected_node = _node_label(producers_e.get(first.expected_name))
        agree_e = {p.expected_name for p in loc.points if p.passed}
        nodes_e = region(me, first.expected_name, agree_e, producers=producers_e, order=order_e)
        loc.expected_nodes = [str(_node_label(n)) for n in nodes_e]
        if not any(reads(n, float_init) for n in nodes):
            # Computed without weights from values that agree: the other graph computes it
            # differently (a BN moved across this node, or dropped). Name the next diverging
            # value that weights compute, too: with a moved BN, that is where it went.
            loc.weight_free = True
            past_first = stop | {first.name}
            later = ((p, region_a(p.name, past_first)) for p in diverging[1:])  # lazily
            weighted = next(
                ((p, n) for p, n in later if any(reads(x, float_init) for x in n)), None
            )
            if weighted is not None:
                loc.weighted, nodes = weighted
        loc.nodes = [str(_node_label(n)) for n in nodes]
        loc.reads = list(dict.fromkeys(i for n in nodes for i in reads(n, init)))
    notes = []
    if renamed_here:
        notes.append(
            f"{len(renamed_here)} shared name(s) seem to hold other values in the two graphs "
            f"({', '.join(sorted(renamed_here)[:3])}{', ...' if len(renamed_here) > 3 else ''}"
            "): not counted as divergences"
        )
    if skipped:
        notes.append(f"{skipped} shared name(s) without a comparable value were skipped")
    loc.note = "; ".join(notes) or None
    return loc


def by_taps(
    actual: TapSource,
    expected: TapSource,
    *,
    probe: str,
    policy: TolerancePolicy,
    scale: float = 1.0,
) -> Location:
    """Compare the MLP matching points of two runs; the first outside tolerance locates.

    `actual` and `expected` are (label, tap label -> values, tap label -> the nodes or
    modules that compute it).
    """
    (la, va, na), (le, ve, ne) = actual, expected
    loc = Location(la, le, probe, "MLP matching points")
    common = [lab for lab in va if lab in ve]
    if list(va) != list(ve):
        loc.note = (
            f"the runs have {len(va)} and {len(ve)} matching points; compared the "
            f"{len(common)} with the same label"
        )
    for lab in common:
        a, b = np.asarray(va[lab]), np.asarray(ve[lab])
        if a.shape != b.shape:
            continue
        pt = _point(lab, lab, a, b, policy, scale, None)
        pt.node = ", ".join(na.get(lab, [])) or None
        loc.points.append(pt)
        if not pt.passed and loc.first is None:
            loc.first = pt
            loc.actual_nodes = list(na.get(lab, []))
            loc.expected_nodes = list(ne.get(lab, []))
    return loc


def layer_words(label: str) -> str:
    """A matching point's label in words: which layer computes it."""
    if label == "output":
        return "the head (last linear layer)"
    block, what = label.rsplit(" ", 1)
    if what == "pre-activation":
        return f"{block}: its linear layer (with any batch norm before the activation)"
    return f"{block}: its activation"
