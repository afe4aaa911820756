"""Fold inference-mode BatchNormalization nodes of an ONNX model into neighbouring linear nodes.

Only onnx and numpy: an app that folds models installs no torch. The arithmetic lives in
`bn_onnx.fold_math`; this module finds the places where it applies, proves each one safe, and
rewrites the graph. Every BN that stays is reported with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from bn_onnx import fold_math as fm
from bn_onnx import onnx_meta
from bn_onnx.errors import UnsupportedModelError, UsageError
from bn_onnx.fold_graph import (
    FLOAT_DTYPES,
    Graph,
    attr,
    copy_without_weights,
    drop_attrs,
    fill_deferred,
    is_standard,
    label,
    model_data_bytes,
    set_float_attr,
    validate_model,
    write_model,
)

PASSTHROUGH = ("Identity", "Dropout")
# fold_model copies models with this much tensor data without the weights it will rewrite.
SPLIT_COPY_BYTES = 32 << 20
LINEAR_BEFORE = ("Gemm", "MatMul", "Add", "Conv", "ConvTranspose")

# --------------------------------------------------------------------------------------------
# Report objects


@dataclasses.dataclass
class BnEntry:
    """What happened to one BatchNormalization node."""

    node: str
    status: str  # "folded" | "left"
    direction: str | None = None  # "preceding" | "following" | "merged"
    target: str | None = None  # the node(s) it went into, comma-separated
    target_op: str | None = None
    reason: str | None = None  # why it was left

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FoldReport:
    """The outcome of a fold: one entry per BN node, and graph sizes before and after."""

    entries: list[BnEntry]
    nodes_before: int
    nodes_after: int
    initializers_before: int
    initializers_after: int

    @property
    def n_bn(self) -> int:
        return len(self.entries)

    @property
    def n_folded(self) -> int:
        return sum(e.status == "folded" for e in self.entries)

    @property
    def left(self) -> list[BnEntry]:
        return [e for e in self.entries if e.status == "left"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_bn": self.n_bn,
            "n_folded": self.n_folded,
            "n_left": self.n_bn - self.n_folded,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "initializers_before": self.initializers_before,
            "initializers_after": self.initializers_after,
            "bn": [e.to_dict() for e in self.entries],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclasses.dataclass
class FoldResult:
    """The folded model and its report."""

    model: onnx.ModelProto
    report: FoldReport

    @property
    def n_bn(self) -> int:
        return self.report.n_bn

    @property
    def n_folded(self) -> int:
        return self.report.n_folded


@dataclasses.dataclass
class BnInfo:
    """Foldability of one BN node, as `bn-onnx inspect` shows it."""

    node: str
    foldable: bool
    direction: str | None
    target: str | None
    reason: str | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Match results: a plan to rewrite, or a refusal with its reason (data, not an exception)


@dataclasses.dataclass
class _Refusal:
    reason: str


@dataclasses.dataclass
class _Plan:
    direction: str
    targets: list[onnx.NodeProto]
    apply: Callable[[], None]


# --------------------------------------------------------------------------------------------
# The pass


class FoldBatchNormPass:
    """Fold every inference-mode BatchNormalization that provably can be folded.

    With (a, c) the BN's per-channel affine map (a = scale/sqrt(var+eps), c = B - a*mean,
    computed in float64 and rounded once to the model's dtype), the pass rewrites:

    1. Gemm -> BN: scale the weight's output columns (any transA/transB), fold alpha into the
       weight and beta into the bias; C is created when missing and expanded when broadcast.
    2. MatMul -> BN and MatMul -> Add -> BN (bias as either Add input): scale the weight's
       columns, bias a*b + c (an Add is inserted when there was none). Rank-2 only.
    3. Conv -> BN, with or without bias, any group (grouped, depthwise).
    4. ConvTranspose -> BN, with or without bias, group-aware ((C_in, C_out/group, k...)).
    5. BN -> Gemm: when every reader of the BN output is a Gemm reading it as A (transA=0),
       scale the weight's input rows and add c @ W to the bias (alpha, beta, transB honoured).
    6. BN -> MatMul(+Add): as 5 for rank-2 MatMul; the bias goes into the following Add or a
       new one. Readers of 5 and 6 may be mixed; each gets its own copy of a shared weight.
    7. BN -> BN: two BNs in a row become one (then 1-6 may apply to it).
    8. Identity and inference-mode Dropout between the linear node and the BN are looked
       through (before the BN) and kept (after it).
    9. Parameters and weights may be initializers, Constant nodes or constant subgraphs
       (Identity, Cast, CastLike, Shape of a static shape, Expand, ConstantOfShape, ...).
    10. A weight or bias read by any other node is cloned, never changed under that node.
    11. float32, float16, bfloat16 and float64 models keep their dtype; IR < 4 models (whose
        initializers are all listed as inputs, and constant) keep that convention.

    A BN is left, with the reason, when its parameters are not constant (graph inputs
    included), training_mode=1 or it has extra outputs, the linear node's output is also a
    graph output or read by another node, the channel axis is not the linear node's output
    axis (MatMul of rank > 2, Gemm with transA=1 after the BN), shapes disagree, the variance
    is degenerate (var + eps <= 0 or not finite), or a folded value would not be finite,
    would overflow the dtype, or would underflow to zero where the original was not.
    """

    def __init__(self, *, check_output: bool = False) -> None:
        self.check_output = check_output

    def requires(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Precondition: a valid ONNX model. Returns its inferred (data-free) skeleton."""
        return validate_model(model)

    def ensures(self, model: onnx.ModelProto) -> None:
        """Postcondition: the result is valid ONNX (checked when check_output=True)."""
        try:
            validate_model(model)
        except UnsupportedModelError as exc:  # a bug in this pass, not a user error
            raise RuntimeError(f"fold produced an invalid model: {exc}") from None

    def __call__(self, model: onnx.ModelProto, *, copy: bool = True) -> FoldResult:
        """Fold `model` (a copy of it, unless copy=False) and return the result and report."""
        return self._fold(model, copy=copy, deferred=None)

    def _fold(
        self, model: onnx.ModelProto, *, copy: bool, deferred: dict[str, np.ndarray] | None
    ) -> FoldResult:
        """The pass; with a `deferred` dict, big rewritten weights stay arrays there, out of
        the result's tensors (for `write_model`)."""
        sizes: dict[str, int] = {}
        inferred = validate_model(model, sizes=sizes)  # self.requires, keeping the data size
        sources = None
        if not copy:
            out = model
        elif model_data_bytes(model, sizes["initializers"]) >= SPLIT_COPY_BYTES:
            out, sources = copy_without_weights(model)  # weights copied only if unchanged
        else:
            out = onnx.ModelProto()
            out.CopyFrom(model)
        nodes_before = len(out.graph.node)
        inits_before = len(out.graph.initializer)
        g = Graph(out, inferred, sources)
        g.deferred = deferred
        entries = self._run(g)
        g.sweep()
        g.finish()
        _update_folded_flag(out)
        if self.check_output:
            if deferred:
                fill_deferred(out, deferred)
            self.ensures(out)
        report = FoldReport(
            entries=entries,
            nodes_before=nodes_before,
            nodes_after=len(out.graph.node),
            initializers_before=inits_before,
            initializers_after=len(out.graph.initializer),
        )
        return FoldResult(model=out, report=report)

    # --- driver
    def _run(self, g: Graph) -> list[BnEntry]:
        bns = [
            i for i, n in enumerate(g.nodes) if n.op_type == "BatchNormalization" and is_standard(n)
        ]
        entries = {i: BnEntry(node=label(g.nodes[i]), status="left") for i in bns}
        changed = True
        while changed:
            changed = False
            for i in bns:
                if not g.alive[i]:
                    continue
                outcome = self._try(g, i)
                entry = entries[i]
                if isinstance(outcome, _Refusal):
                    entry.reason = outcome.reason
                    continue
                entry.target = ", ".join(label(t) for t in outcome.targets)
                entry.target_op = ", ".join(sorted({t.op_type for t in outcome.targets}))
                outcome.apply()
                changed = True
                entry.status = "folded"
                entry.reason = None
                entry.direction = outcome.direction
        return [entries[i] for i in bns]

    def _try(self, g: Graph, i: int) -> _Plan | _Refusal:
        params = self._params(g, i)
        if isinstance(params, _Refusal):
            return params
        a, c = params
        before = self._preceding(g, i, a, c)
        if isinstance(before, _Plan):
            return before
        after = self._following(g, i, a, c)
        if isinstance(after, _Plan):
            return after
        merged = self._merge_next(g, i, a, c)
        if isinstance(merged, _Plan):
            return merged
        reason = f"before: {before.reason}; after: {after.reason}"
        if merged.reason:
            reason += f"; {merged.reason}"
        return _Refusal(reason)

    # --- the BN itself
    def _params(self, g: Graph, i: int) -> tuple[np.ndarray, np.ndarray] | _Refusal:
        bn = g.nodes[i]
        if attr(bn, "training_mode", 0):
            return _Refusal("training_mode=1")
        if g.opset < 7 and not attr(bn, "is_test", 0):
            return _Refusal("is_test=0 (training mode)")
        if any(o for o in bn.output[1:]):
            return _Refusal("has running mean/var outputs (training mode)")
        if len(bn.input) < 5 or not bn.input[0]:
            return _Refusal("has fewer than 5 inputs")
        if i in g.overrides:
            return g.overrides[i]
        values = []
        for name in bn.input[1:5]:
            if g.is_graph_input(name):
                return _Refusal(f"parameter {name!r} is a graph input, not a constant")
            v = g.const(name)
            if v is None:
                return _Refusal(f"parameter {name!r} is not a constant")
            if v.dtype not in FLOAT_DTYPES:
                return _Refusal(f"parameter {name!r} is not floating point")
            values.append(v)
        sizes = {v.size for v in values}
        if len(sizes) != 1 or any(v.ndim != 1 for v in values):
            return _Refusal("parameters are not 1-D vectors of one length (spatial=0?)")
        eps = float(attr(bn, "epsilon", 1e-5))
        try:
            return fm.bn_affine(*values, eps)
        except ValueError as exc:
            return _Refusal(str(exc))

    # --- rules 1-4, 8: into the node before
    def _preceding(self, g: Graph, i: int, a: np.ndarray, c: np.ndarray) -> _Plan | _Refusal:
        name = g.nodes[i].input[0]
        chain: list[int] = []
        while True:
            if name in g.graph_outputs:
                return _Refusal(f"{name!r} is also a graph output")
            if g.uses(name) != 1:
                return _Refusal(f"{name!r} is also read by another node")
            p = g.producer.get(name)
            if p is None:
                return _Refusal(f"input {name!r} is not computed by a node")
            pn = g.nodes[p]
            if pn.output[0] == name and _is_passthrough(g, pn):
                chain.append(p)
                name = pn.input[0]
                continue
            break
        if not is_standard(pn) or pn.op_type not in LINEAR_BEFORE:
            return _Refusal(f"comes after {pn.op_type} {label(pn)!r}, not Gemm/MatMul/Conv")
        last = chain[0] if chain else p  # the node whose output the BN reads

        def remove_bn() -> None:
            bn = g.nodes[i]
            x, y = bn.input[0], bn.output[0]
            g.remove_node(i)
            g.set_output(last, 0, y)
            g.candidates.add(x)

        if pn.op_type == "Gemm":
            return self._into_gemm_before(g, i, p, a, c, remove_bn)
        if pn.op_type == "MatMul":
            return self._into_matmul_before(g, i, p, None, a, c, remove_bn)
        if pn.op_type == "Add":
            for pos in (0, 1):
                m = g.producer.get(pn.input[pos])
                if m is not None and g.nodes[m].op_type == "MatMul" and is_standard(g.nodes[m]):
                    mm_out = pn.input[pos]
                    if mm_out in g.graph_outputs or g.uses(mm_out) != 1:
                        return _Refusal(f"MatMul output {mm_out!r} is read by another node")
                    return self._into_matmul_before(g, i, m, (p, 1 - pos), a, c, remove_bn)
            return _Refusal(f"comes after Add {label(pn)!r} that does not add to a MatMul")
        return self._into_conv_before(g, i, p, a, c, remove_bn)

    def _weight(self, g: Graph, name: str, ndim: int | None = 2) -> np.ndarray | _Refusal:
        if g.is_graph_input(name):
            return _Refusal(f"weight {name!r} is a graph input, not a constant")
        w = g.const(name)
        if w is None:
            return _Refusal(f"weight {name!r} is not a constant")
        if ndim is not None and w.ndim != ndim:
            return _Refusal(f"weight {name!r} has rank {w.ndim}, not {ndim}")
        if w.dtype not in FLOAT_DTYPES:
            return _Refusal(f"weight {name!r} has dtype {w.dtype}")
        return w

    def _bias(self, g: Graph, name: str, n: int) -> np.ndarray | None | _Refusal:
        if not name:
            return None
        if g.is_graph_input(name):
            return _Refusal(f"bias {name!r} is a graph input, not a constant")
        b = g.const(name)
        if b is None:
            return _Refusal(f"bias {name!r} is not a constant")
        if b.ndim > 2 or (b.ndim >= 1 and b.shape[-1] not in (1, n)):
            return _Refusal(f"bias {name!r} of shape {list(b.shape)} does not broadcast to {n}")
        return b

    def _into_gemm_before(self, g, i, p, a, c, remove_bn) -> _Plan | _Refusal:
        gemm = g.nodes[p]
        w = self._weight(g, gemm.input[1])
        if isinstance(w, _Refusal):
            return w
        trans_b = bool(attr(gemm, "transB", 0))
        n = w.shape[0] if trans_b else w.shape[1]
        if n != a.size:
            return _Refusal(f"BN has {a.size} channels, Gemm {label(gemm)!r} has {n} outputs")
        c_name = gemm.input[2] if len(gemm.input) > 2 else ""
        b = self._bias(g, c_name, n)
        if isinstance(b, _Refusal):
            return b
        alpha, beta = float(attr(gemm, "alpha", 1.0)), float(attr(gemm, "beta", 1.0))
        factor = fm.preceding_factor(a, 2, out_axis=0 if trans_b else 1, weight_scale=alpha)
        try:
            w_r = fm.scale_rounded(w, factor)
            b_r = fm.round_to(fm.preceding_bias(b, a, c, bias_scale=beta), w.dtype)
        except ValueError as exc:
            return _Refusal(str(exc))

        def apply() -> None:
            g.write_input(p, 1, w_r, gemm.input[1])
            g.write_input(p, 2, b_r, c_name)
            drop_attrs(gemm, ("alpha", "beta"))
            remove_bn()

        return _Plan("preceding", [gemm], apply)

    def _into_matmul_before(self, g, i, m, add, a, c, remove_bn) -> _Plan | _Refusal:
        mm = g.nodes[m]
        w = self._weight(g, mm.input[1])
        if isinstance(w, _Refusal):
            return w
        x = g.nodes[i].input[0]
        rank = g.rank(x)
        if rank is None:
            return _Refusal(f"rank of {x!r} is unknown")
        if rank != 2:
            return _Refusal(
                f"MatMul output has rank {rank}: BN normalizes axis 1, MatMul's outputs are the "
                "last axis"
            )
        n = w.shape[1]
        if n != a.size:
            return _Refusal(f"BN has {a.size} channels, MatMul {label(mm)!r} has {n} outputs")
        b = None
        if add is not None:
            add_idx, bias_pos = add
            b = self._bias(g, g.nodes[add_idx].input[bias_pos], n)
            if isinstance(b, _Refusal):
                return b
        try:
            w_r = fm.scale_rounded(w, fm.preceding_factor(a, 2, out_axis=1))
            b_r = fm.round_to(fm.preceding_bias(b, a, c), (b if b is not None else w).dtype)
        except ValueError as exc:
            return _Refusal(str(exc))

        def apply() -> None:
            g.write_input(m, 1, w_r, mm.input[1])
            remove_bn()
            if add is not None:
                g.write_input(add[0], add[1], b_r, g.nodes[add[0]].input[add[1]])
            else:
                _insert_bias_add(g, m, b_r)

        targets = [mm] if add is None else [mm, g.nodes[add[0]]]
        return _Plan("preceding", targets, apply)

    def _into_conv_before(self, g, i, p, a, c, remove_bn) -> _Plan | _Refusal:
        conv = g.nodes[p]
        transpose = conv.op_type == "ConvTranspose"
        w = self._weight(g, conv.input[1], ndim=None)
        if isinstance(w, _Refusal):
            return w
        group = int(attr(conv, "group", 1))
        if w.ndim < 3 or group < 1 or w.shape[0] % group:
            return _Refusal(f"{conv.op_type} weight shape {list(w.shape)} does not fit group")
        n = w.shape[1] * group if transpose else w.shape[0]
        if n != a.size:
            return _Refusal(f"BN has {a.size} channels, {conv.op_type} has {n} outputs")
        b_name = conv.input[2] if len(conv.input) > 2 else ""
        b = None
        if b_name:
            b = g.const(b_name) if not g.is_graph_input(b_name) else None
            if b is None or b.shape != (n,):
                return _Refusal(f"bias {b_name!r} is not a constant vector of {n}")
        try:
            w_r = fm.scale_rounded(w, fm.conv_factor(a, w.shape, group, transpose))
            b_r = fm.round_to(fm.preceding_bias(b, a, c), w.dtype)
        except ValueError as exc:
            return _Refusal(str(exc))

        def apply() -> None:
            g.write_input(p, 1, w_r, conv.input[1])
            g.write_input(p, 2, b_r, b_name)
            remove_bn()

        return _Plan("preceding", [conv], apply)

    # --- rules 5, 6, 8: into the nodes after
    def _following(self, g: Graph, i: int, a: np.ndarray, c: np.ndarray) -> _Plan | _Refusal:
        bn = g.nodes[i]
        x, y = bn.input[0], bn.output[0]
        if y in g.graph_outputs:
            return _Refusal(f"its output {y!r} is a graph output")
        frontier = [y]
        readers: list[tuple[int, str]] = []  # (linear node, the name it reads)
        while frontier:
            name = frontier.pop()
            if name in g.graph_outputs:
                return _Refusal(f"{name!r} is a graph output")
            cons = g.consumers.get(name, [])
            if not cons:
                return _Refusal(f"{name!r} is not read by any node")
            for j in set(cons):
                node = g.nodes[j]
                if _is_passthrough(g, node) and node.input[0] == name and cons.count(j) == 1:
                    frontier.append(node.output[0])
                elif is_standard(node) and node.op_type in ("Gemm", "MatMul"):
                    readers.append((j, name))
                else:
                    return _Refusal(f"{name!r} is read by {node.op_type} {label(node)!r}")
        applies: list[Callable[[], None]] = []
        for j, name in readers:
            plan = self._into_linear_after(g, j, name, a, c)
            if isinstance(plan, _Refusal):
                return plan
            applies.append(plan)

        def apply() -> None:
            for fn in applies:
                fn()
            g.remove_node(i)
            g.replace_uses(y, x)

        return _Plan("following", [g.nodes[j] for j, _ in readers], apply)

    def _into_linear_after(self, g, j, name, a, c) -> Callable[[], None] | _Refusal:
        node = g.nodes[j]
        if node.input[0] != name or list(node.input).count(name) != 1:
            return _Refusal(f"{label(node)!r} reads {name!r} as its weight or bias")
        if node.op_type == "Gemm":
            if attr(node, "transA", 0):
                return _Refusal(f"Gemm {label(node)!r} has transA=1 (BN channel is its batch)")
            w = self._weight(g, node.input[1])
            if isinstance(w, _Refusal):
                return w
            trans_b = bool(attr(node, "transB", 0))
            k, n = (w.shape[1], w.shape[0]) if trans_b else w.shape
            if k != a.size:
                return _Refusal(f"BN has {a.size} channels, Gemm {label(node)!r} has {k} inputs")
            c_name = node.input[2] if len(node.input) > 2 else ""
            b = self._bias(g, c_name, n)
            if isinstance(b, _Refusal):
                return b
            alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
            try:
                w_r = fm.scale_rounded(w, fm.following_factor(a, trans_b, weight_scale=alpha))
                new_b = fm.following_bias(w, b, c, trans_b, weight_scale=alpha, bias_scale=beta)
                b_r = fm.round_to(new_b, w.dtype)
            except ValueError as exc:
                return _Refusal(str(exc))

            def apply_gemm() -> None:
                g.write_input(j, 1, w_r, node.input[1])
                g.write_input(j, 2, b_r, c_name)
                drop_attrs(node, ("alpha", "beta"))

            return apply_gemm
        # MatMul
        w = self._weight(g, node.input[1])
        if isinstance(w, _Refusal):
            return w
        rank = g.rank(name)
        if rank != 2:
            return _Refusal(
                f"MatMul {label(node)!r} input has rank {rank if rank is not None else '?'}"
                ", not 2: BN's channel axis is not the contracted axis"
            )
        if w.shape[0] != a.size:
            return _Refusal(f"BN has {a.size} channels, MatMul {label(node)!r} has {w.shape[0]}")
        out = node.output[0]
        add = None
        if out not in g.graph_outputs and g.uses(out) == 1:
            k = g.consumers[out][0]
            add_node = g.nodes[k]
            if add_node.op_type == "Add" and is_standard(add_node):
                pos = 1 if add_node.input[0] == out else 0
                if add_node.input[1 - pos] == out and add_node.input[pos] != out:
                    b = self._bias(g, add_node.input[pos], w.shape[1])
                    if not isinstance(b, _Refusal) and b is not None:
                        add = (k, pos, b)
        b = add[2] if add else None
        try:
            w_r = fm.scale_rounded(w, fm.following_factor(a, transposed=False))
            new_b = fm.following_bias(w, b, c)
            b_r = fm.round_to(new_b, (b if b is not None else w).dtype)
        except ValueError as exc:
            return _Refusal(str(exc))

        def apply_matmul() -> None:
            g.write_input(j, 1, w_r, node.input[1])
            if add is not None:
                g.write_input(add[0], add[1], b_r, g.nodes[add[0]].input[add[1]])
            else:
                _insert_bias_add(g, j, b_r)

        return apply_matmul

    # --- rule 7: two BNs in a row
    def _merge_next(self, g: Graph, i: int, a: np.ndarray, c: np.ndarray) -> _Plan | _Refusal:
        bn = g.nodes[i]
        y = bn.output[0]
        cons = g.consumers.get(y, [])
        if y in g.graph_outputs or len(cons) != 1:
            return _Refusal("")
        j = cons[0]
        nxt = g.nodes[j]
        if nxt.op_type != "BatchNormalization" or not is_standard(nxt) or nxt.input[0] != y:
            return _Refusal("")
        second = self._params(g, j)
        if isinstance(second, _Refusal):
            return _Refusal(f"next BN {label(nxt)!r}: {second.reason}")
        a2, c2 = fm.compose_affine(a, c, *second)
        params = [g.const(n) for n in nxt.input[1:5]]
        try:
            scale = fm.round_to(a2, params[0].dtype)
            bias = fm.round_to(c2, params[1].dtype)
        except ValueError as exc:
            return _Refusal(f"merging with {label(nxt)!r}: {exc}")
        mean = np.zeros(a2.shape, params[2].dtype)
        var = np.ones(a2.shape, params[3].dtype)

        def apply() -> None:
            for pos, value in zip((1, 2, 3, 4), (scale, bias, mean, var), strict=True):
                g.write_input(j, pos, value, nxt.input[pos])
            set_float_attr(nxt, "epsilon", 0.0)
            g.overrides[j] = (a2, c2)
            g.remove_node(i)
            g.replace_uses(y, bn.input[0])

        return _Plan("merged", [nxt], apply)


def _is_passthrough(g: Graph, node: onnx.NodeProto) -> bool:
    if not is_standard(node) or node.op_type not in PASSTHROUGH or not node.input:
        return False
    if node.op_type == "Identity":
        return True
    if g.opset < 7 and not attr(node, "is_test", 0):
        return False
    if len(node.input) > 2 and node.input[2]:
        mode = g.const(node.input[2])
        return mode is not None and mode.size == 1 and not bool(mode.reshape(-1)[0])
    return True


def _insert_bias_add(g: Graph, m: int, bias: np.ndarray) -> None:
    """Add `bias` to node m's output with a new Add node; readers keep the original name."""
    node = g.nodes[m]
    out = node.output[0]
    mid = g.fresh(f"{out}_nobias")
    g.set_output(m, 0, mid)
    b_name = g.add_initializer(bias, f"{node.name or out}_bias_bnfold")
    add = helper.make_node("Add", [mid, b_name], [out], name=g.fresh(f"{node.name or out}_bias"))
    g.insert_after(m, add)


# --------------------------------------------------------------------------------------------
# Public API


def _update_folded_flag(model: onnx.ModelProto) -> None:
    """Keep a bn-onnx file's `bn_onnx.folded` metadata true to its graph; other files untouched."""
    if not any(p.key == onnx_meta.FOLDED for p in model.metadata_props):
        return
    left = any(n.op_type == "BatchNormalization" for n in model.graph.node)
    onnx_meta.set_metadata(model, {onnx_meta.FOLDED: "false" if left else "true"})


def fold_model(model: onnx.ModelProto, *, check_output: bool = False) -> FoldResult:
    """Fold every foldable BatchNormalization of `model`; the input model is not changed.

    Raises UnsupportedModelError when the model is not valid ONNX. `check_output=True` also
    runs the checker and strict shape inference on the result (a failure there is a bug in
    this pass and raises RuntimeError).
    """
    return FoldBatchNormPass(check_output=check_output)(model)


def inspect_model(model: onnx.ModelProto) -> list[BnInfo]:
    """Say, for each BatchNormalization of `model`, whether `fold_model` folds it and how.

    Runs the same checks on a private copy; `model` is not changed.
    """
    result = FoldBatchNormPass()(model)
    return [
        BnInfo(
            node=e.node,
            foldable=e.status == "folded",
            direction=e.direction,
            target=e.target,
            reason=e.reason,
        )
        for e in result.report.entries
    ]


def fold_file(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    report_path: str | os.PathLike[str] | None = None,
    in_place: bool = False,
    external_data: bool | None = None,
    progress: Callable[[str], None] | None = None,
) -> FoldReport:
    """Fold the model at `in_path` and write it to `out_path` (atomically), with its report.

    External data is read only from inside the model's folder; the output is one file unless
    `external_data` is True or it nears protobuf's 2 GB limit. The input file is never changed
    unless `in_place` and `out_path` is the input. `progress` is called with the stage
    ("loading", "folding", "writing") as each one starts.
    """
    step = progress or (lambda stage: None)
    from bn_onnx.files import atomic_output, check_output_path
    from bn_onnx.onnx_io import EXTERNAL_DATA_THRESHOLD, load_model, save_model

    src = Path(in_path)
    out = check_output_path(out_path, [src], in_place=in_place)
    if report_path is not None:
        rep = check_output_path(report_path, [src, out])
        if rep.resolve() in (src.resolve(), out.resolve()):
            raise UsageError(f"report path {rep} is the model input or output")
    step("loading")
    model = load_model(src)
    step("folding")
    # A copy (without the weights it rewrites) and not in place: the input is freed before the
    # save serializes the output, so the peak stays near two models, not three.
    # Big rewritten weights stay arrays until they are written (no copy into protobuf, no
    # serialized copy of them).
    deferred: dict[str, np.ndarray] = {}
    result = FoldBatchNormPass()._fold(model, copy=True, deferred=deferred)
    del model
    step("writing")
    if external_data is None:  # decided here from dims: onnx_io would copy every tensor to count
        external_data = model_data_bytes(result.model) > EXTERNAL_DATA_THRESHOLD
    if external_data:
        fill_deferred(result.model, deferred)
        save_model(result.model, out, external_data=True)
    else:
        with atomic_output(out, suffix=".onnx") as tmp:  # as save_model writes one file
            write_model(result.model, deferred, tmp)
    if report_path is not None:
        with atomic_output(rep, suffix=".json") as tmp:
            tmp.write_text(result.report.to_json() + "\n", encoding="utf-8")
    return result.report
