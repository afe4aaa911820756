"""The fold pass: find affine sites, try each rule family on each, apply the first plan.

The driver knows no rule: site kinds (`DEFAULT_SITE_KINDS`) say where sites are, rule families
(`DEFAULT_RULES`) say how each folds. A new family is a module with a `Rule` and one more entry
in `DEFAULT_RULES`; a new kind of site is a `SiteKind` in `DEFAULT_SITE_KINDS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import onnx
import onnx_ir as ir

from bn_onnx import onnx_meta
from bn_onnx.errors import BnOnnxError, one_line
from bn_onnx.fold import affine_ops, bn_merge, following, preceding, scopes
from bn_onnx.fold.bn_site import BATCH_NORM
from bn_onnx.fold.context import FoldContext
from bn_onnx.fold.nodes import label
from bn_onnx.fold.report import BnEntry, BnInfo, FoldReport, FoldResult
from bn_onnx.fold.rules import Rule, SiteKind, combine
from bn_onnx.fold.sites import Plan, Refusal
from bn_onnx.fold.validate import (
    FoldCheckError,
    FoldOutputError,
    InvalidModelError,
    ShapeTable,
    validate_model,
    validate_skeleton,
)

# Tried in this order on every site; the first plan wins. Their refusals make the reason text.
DEFAULT_RULES: tuple[Rule, ...] = (
    preceding.RULE,
    following.RULE,
    bn_merge.MERGE,
    affine_ops.MERGE_BACK,
)
DEFAULT_SITE_KINDS: tuple[SiteKind, ...] = (BATCH_NORM, affine_ops.MUL_ADD_CHAIN)


@dataclasses.dataclass
class FoldPassResult(ir.passes.PassResult):
    """onnx-ir's PassResult with the fold report."""

    report: FoldReport | None = None


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold every inference-mode BatchNormalization that provably can be folded.

    An onnx-ir pass on an `ir.Model`, in place. With (a, c) the BN's per-channel affine map
    (a = scale/sqrt(var+eps), c = B - a*mean, computed in float64 and rounded once to the
    model's dtype), the pass rewrites:

    The rules are docs/fold.md's, numbered as there ("The fold rules and the tests that cover
    them"):

    - 1-4: into the node before: Gemm, MatMul (and MatMul -> Add), Conv, ConvTranspose
      (`preceding`);
    - 5-6, 21: into every node after: Gemm, MatMul(+Add), a Conv that pads nothing or a
      ConvTranspose whose outputs all see every tap (`following`);
    - 7: BN -> BN merged into one (`bn_merge`); 8: Identity and inference Dropout looked
      through;
    - 9-15: constant parameters (any constant subgraph: `constants`, `evaluate`), shared
      weights cloned, dtypes kept, shape-only readers never block, IR < 4, external data,
      every scope (`scopes`);
    - 16-18: Mul/Add chains by per-channel constants as sites (`affine_ops`), legacy opsets
      (`legacy`), float16 flush (`flush`);
    - 19-20, 22-25: the walk steps: layout ops, Concat, commuting pools, Cast, Split
      (`preceding.BACK_STEPS`, `following.FORWARD_STEPS`).

    A BN is left, with the reason, when its parameters are not constant (graph inputs
    included), training_mode=1 or it has extra outputs, the linear node's output is also a
    graph output or read by another node, the channel axis is not the linear node's output
    axis (the BN channel of a rank-3 MatMul's rows), shapes disagree, the variance
    is degenerate (var + eps <= 0 or not finite), or a folded value would not be finite,
    would overflow the dtype, or would underflow to zero where the original was not.

    `requires` validates the model (checker and strict shape inference without the weights)
    and raises `InvalidModelError` (a `BnOnnxError` and an onnx-ir `PreconditionError`);
    `ensures` re-validates the result when `check_output` is set and raises
    `FoldOutputError` (a bug in the pass). `call` returns a `FoldPassResult` with the report.
    With `keep_input_skeleton`, the input's checked skeleton stays in `input_skeleton` (for
    `bn_onnx.fold.guard`).
    """

    def __init__(
        self,
        *,
        check_output: bool = False,
        rules: Sequence[Rule] = DEFAULT_RULES,
        site_kinds: Sequence[SiteKind] = DEFAULT_SITE_KINDS,
        keep_input_skeleton: bool = False,
    ) -> None:
        super().__init__()
        self.check_output = check_output
        self.keep_input_skeleton = keep_input_skeleton
        # The input's checked skeleton (`validate_skeleton`), kept for the output check.
        self.input_skeleton: onnx.ModelProto | None = None
        self.rules = tuple(rules)
        self.site_kinds = tuple(site_kinds)
        self._validated: tuple[ir.Model, ShapeTable] | None = None

    def requires(self, model: ir.Model) -> None:
        skeleton, table = validate_skeleton(model)
        if self.keep_input_skeleton:
            self.input_skeleton = skeleton
        self._validated = (model, table)

    def ensures(self, model: ir.Model) -> None:
        if not self.check_output:
            return
        try:
            validate_model(model)
        except InvalidModelError as exc:
            raise FoldOutputError(f"fold produced an invalid model: {exc}") from None

    def call(self, model: ir.Model) -> FoldPassResult:
        if self._validated is not None and self._validated[0] is model:
            shapes = self._validated[1]
        else:  # called directly, without requires
            shapes = validate_model(model)
        self._validated = None
        ctx = FoldContext(model, shapes)
        nodes_before, inits_before = scopes.count(ctx.scopes)  # subgraphs and functions too
        entries = self._run(ctx)
        ctx.sweep()
        update_folded_flag(model)
        nodes_after, inits_after = scopes.count(ctx.scopes)
        report = FoldReport(
            entries=entries,
            nodes_before=nodes_before,
            nodes_after=nodes_after,
            initializers_before=inits_before,
            initializers_after=inits_after,
        )
        return FoldPassResult(model, modified=report.n_folded > 0, report=report)

    def _run(self, ctx: FoldContext) -> list[BnEntry]:
        """The driver: every site is tried, in graph order, until a round folds nothing (a
        fold can make another possible: a merge, a reader freed).

        Sites are found in every scope (`scopes`): the main graph, the subgraphs of If, Loop
        and Scan at any depth (each after the node that holds it), then model-local function
        bodies; a plan must stay in the site's own graph (`scopes.check_plan`).
        """
        anchors: list[tuple[ir.Node, SiteKind]] = []
        for node in ctx.scopes.nodes:
            kind = next((k for k in self.site_kinds if k.claims(node)), None)
            if kind is not None:
                anchors.append((node, kind))
        entries = {
            node: BnEntry(
                node=label(node), status="left", kind=kind.kind, where=ctx.where(node.graph)
            )
            for node, kind in anchors
        }
        # An anchor gets an entry once its build says it is a site (a site, or a refusal that
        # is not silent); a quiet site that no rule folds, and an anchor removed with another
        # site before its turn (a chain's inner node), get none.
        hidden: set[ir.Node] = {node for node, _ in anchors}
        changed = True
        while changed:
            changed = False
            for node, kind in anchors:
                if node.graph is None:  # folded (or merged) away
                    continue
                entry = entries[node]
                refs = scopes.describe_references(node)
                if refs is not None:  # epsilon=@eps: set per call of the function
                    entry.reason = refs
                    hidden.discard(node)
                    continue
                site = kind.build(node, ctx)
                if isinstance(site, Refusal):
                    entry.reason = site.reason
                    (hidden.add if site.silent else hidden.discard)(node)
                    continue
                entry.node = site.label
                entry.where = site.where
                refusals: list[tuple[Rule, Refusal]] = []
                plan: Plan | None = None
                for rule in self.rules:
                    outcome = rule.apply(site, ctx)
                    if isinstance(outcome, Plan):
                        outcome = scopes.check_plan(outcome, site, ctx)
                    if isinstance(outcome, Plan):
                        plan = outcome
                        break
                    refusals.append((rule, outcome))
                if plan is None:
                    entry.reason = combine(refusals).reason
                    (hidden.add if site.quiet else hidden.discard)(node)
                    continue
                hidden.discard(node)
                entry.target = ", ".join(label(t) for t in plan.targets)
                entry.target_op = ", ".join(sorted({t.op_type for t in plan.targets}))
                ctx.scope = site.graph  # new constants go into the site's graph
                try:
                    plan.rewrite()
                finally:
                    ctx.scope = ctx.graph
                changed = True
                entry.status = "folded"
                entry.reason = None
                entry.direction = plan.direction
                entry.note = plan.note
        return [entries[node] for node, _ in anchors if node not in hidden]


def update_folded_flag(model: ir.Model) -> None:
    """Write the `bn_onnx.folded` metadata of a folded model, true to its graph: "false" when
    any BN is left anywhere (subgraphs and functions included), else "true". Every file the
    fold writes gets it: `verify` labels a model "(folded)" from it."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    for function in model.functions.values():
        nodes.extend(ir.traversal.RecursiveGraphIterator(function))
    left = any(n.op_type == "BatchNormalization" for n in nodes)
    model.metadata_props[onnx_meta.FOLDED] = "false" if left else "true"


@contextlib.contextmanager
def quiet_onnx_ir() -> Iterator[None]:
    """Silence onnx-ir's warnings (an invalid graph logs some while it is read): the fold
    reports problems as one-line errors, and a CLI's stderr gets nothing else."""
    logger = logging.getLogger("onnx_ir")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def to_ir(model: onnx.ModelProto) -> ir.Model:
    """Read a ModelProto into onnx-ir (sharing its tensors, which are never written).

    Raises:
        InvalidModelError: no graph or opset, or a proto onnx-ir cannot read.
    """
    if not model.HasField("graph") or not model.opset_import:
        raise InvalidModelError("not an ONNX model (no graph or opset)")
    try:
        with quiet_onnx_ir():
            work = ir.serde.deserialize_model(model)
    except BnOnnxError:
        raise
    except Exception as exc:
        raise InvalidModelError(f"invalid ONNX model: {one_line(exc)}") from None
    _own_constant_tensors(work)
    return work


def _own_constant_tensors(model: ir.Model) -> None:
    """Give each Constant node a tensor of its own instead of a view of the input proto.

    onnx-ir's tensors read from a ModelProto write a name change through to that proto, and
    the cleanup names the tensors of the Constants it lifts into initializers: without this,
    `fold_model` would change its input. Constant values are small; initializers, which the
    pass never renames, stay shared.
    """
    graphs = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.op_type != "Constant" or node.domain != "":
                continue
            attr = node.attributes.get("value")
            if attr is None or attr.is_ref() or not isinstance(attr.value, ir.TensorProtoTensor):
                continue
            own = onnx.TensorProto()
            own.CopyFrom(attr.value.raw)
            node.attributes["value"] = ir.AttrTensor("value", ir.TensorProtoTensor(own))


def fold_in_place(
    model: ir.Model,
    *,
    cleanup: bool = True,
    check_output: bool = False,
    max_row_range_growth: float | None = None,
    guard: bool = True,
    reload: Callable[[], ir.Model] | None = None,
) -> FoldReport:
    """Fold `model` in place with `FoldBatchNormPass`, then clean it; return the report.

    The cleanup (`bn_onnx.fold.cleanup.cleanup`, unless `cleanup=False`) folds the constants
    an exporter left and removes dead code; the report's `nodes_after`/`initializers_after`,
    its `cleanup` counts, its `renamed` map and the `bn_onnx.folded` metadata are taken after
    it. With `guard` (the default), the result is checked (`bn_onnx.fold.guard`: the full
    checker with strict shape inference, and an onnxruntime session where onnxruntime loads
    the input): a cleanup step that breaks the model is left out (or the whole cleanup), and
    the report's `checks` says which and why. The fold alone, which that needs, is made again
    from `reload()` (a fresh copy of the input: a file read again, a proto deserialized) only
    when the check fails; without `reload`, the folded model is cloned before the cleanup
    (O(nodes): 0.27 s for 10,000 nodes here). With `check_output`, the final model is
    validated once more (checker and strict shape inference). `max_row_range_growth` (for
    INT8: `bn_onnx.fold.quant_guard`) keeps a BN whose forward fold would widen a weight's
    per-channel range more than that factor.

    Raises:
        InvalidModelError: the model is not valid ONNX.
        FoldCheckError: the fold alone made a model that fails the check (exit 2; the model
            is left folded but must not be written).
        FoldOutputError: the result failed `check_output` (a bug in the pass or the cleanup).
    """
    from bn_onnx.fold.guard import OutputChecker

    graph = model.graph
    original = {v.name for v in _computed_values(graph)}
    rules = rules_for(max_row_range_growth)
    fold_pass = FoldBatchNormPass(rules=rules, keep_input_skeleton=guard)
    with quiet_onnx_ir():
        result = fold_pass(model)
    assert isinstance(result, FoldPassResult) and result.report is not None
    report = result.report
    checker = OutputChecker(fold_pass.input_skeleton) if guard else None
    if cleanup:
        snapshot = model.clone() if checker is not None and reload is None else None
        problem = None
        try:
            _clean(model, report, original, ())
        except Exception as exc:  # noqa: BLE001 - a library failing is a step to leave out
            if checker is None:
                raise
            problem = f"cleanup failed: {type(exc).__name__}: {one_line(exc)}"
        if checker is not None:
            problem = problem or checker.problem(model)
            if problem is not None:
                if snapshot is None:
                    assert reload is not None
                    snapshot = reload()
                    with quiet_onnx_ir():
                        FoldBatchNormPass(rules=rules)(snapshot)  # the fold alone, once more
                _fall_back(model, snapshot, report, original, checker, problem)
    elif checker is not None and (problem := checker.problem(model)) is not None:
        raise _refusal(problem)
    if checker is not None:
        report.checks = checker.checks.to_dict()
    if check_output:
        try:
            validate_model(model)
        except InvalidModelError as exc:
            raise FoldOutputError(f"fold produced an invalid model: {exc}") from None
    return report


def rules_for(max_row_range_growth: float | None) -> tuple[Rule, ...]:
    """DEFAULT_RULES, the forward fold bounded by `max_row_range_growth` when given."""
    if max_row_range_growth is None:
        return DEFAULT_RULES
    bounded = following.guarded(max_row_range_growth)
    return tuple(bounded if r is following.RULE else r for r in DEFAULT_RULES)


def _clean(model: ir.Model, report: FoldReport, original: set[str | None], skip: Any) -> None:
    """Run the cleanup on `model` (leaving out the steps in `skip`) and record it in `report`."""
    from bn_onnx.fold.cleanup import cleanup as run_cleanup

    graph = model.graph
    names = {v: v.name for v in _computed_values(graph)}
    cleaned = run_cleanup(model, skip=skip)
    alive = set(_computed_values(graph))
    # The cleanup keeps values: one that survives it computes what it computed before,
    # under its new name (Identity before a graph output, a no-op replaced by its input).
    report.renamed = {
        old: v.name
        for v, old in names.items()
        if v in alive and v.name != old and old in original and v.name
    }
    report.cleanup = cleaned.to_dict()
    report.nodes_after = len(graph)
    report.initializers_after = len(graph.initializers)
    update_folded_flag(model)  # a BN the cleanup removed as dead code counts too


def _fall_back(
    model: ir.Model,
    snapshot: ir.Model,
    report: FoldReport,
    original: set[str | None],
    checker: Any,
    problem: str,
) -> None:
    """Replace the cleaned `model` by the fold (`snapshot`) cleaned without the step that
    broke it, or by the fold alone; FoldCheckError when even that fails the check."""
    from bn_onnx.fold.guard import fallback_skips

    for skip in fallback_skips():
        trial = snapshot.clone()
        try:
            with quiet_onnx_ir():
                _clean(trial, report, original, skip)
        except Exception:  # noqa: BLE001 - this combination fails too
            continue
        if checker.problem(trial) is None:
            _adopt(model, trial)
            checker.checks.dropped_steps = dict.fromkeys(skip, problem)
            return
    alone = checker.problem(snapshot)
    if alone is not None:
        raise _refusal(alone)
    _adopt(model, snapshot)
    report.cleanup = None
    report.renamed = {}
    report.nodes_after = len(snapshot.graph)
    report.initializers_after = len(snapshot.graph.initializers)
    checker.checks.cleanup_dropped = problem


def _adopt(model: ir.Model, other: ir.Model) -> None:
    """Make `model` hold `other`'s graph, functions and metadata (`other` is discarded)."""
    model.graph = other.graph
    model.functions.clear()
    model.functions.update(other.functions)
    model.metadata_props.clear()
    model.metadata_props.update(other.metadata_props)
    update_folded_flag(model)


def _refusal(problem: str) -> FoldCheckError:
    return FoldCheckError(
        f"the folded model would fail the output check ({problem}) while the input passes "
        "it: not written (a bug in bn-onnx's fold for this model; --no-cleanup does not help)"
    )


def _computed_values(graph: ir.Graph) -> Iterator[ir.Value]:
    """The main graph's inputs and node outputs (the values `verify --locate` compares)."""
    yield from graph.inputs
    for node in graph:
        yield from node.outputs


def fold_model(
    model: onnx.ModelProto | ir.Model,
    *,
    check_output: bool = False,
    cleanup: bool = True,
    max_row_range_growth: float | None = None,
    guard: bool = True,
) -> FoldResult:
    """Fold every foldable BatchNormalization of `model`, then clean it; the input model is
    not changed.

    Args:
        model: an `onnx.ModelProto`, or an `onnx_ir.Model` (which is cloned first).
        check_output: also run the checker and strict shape inference on the result.
        cleanup: run `bn_onnx.fold.cleanup.cleanup` after the fold (constants the exporter
            left, dead code, duplicate initializers); False leaves every node other than the
            folded BNs (and the constants only they read) as it was.
        max_row_range_growth: keep a BN whose fold into the node after it would widen that
            weight's per-channel range (mean max/rms) more than this factor: the
            quantization-aware fold (`bn_onnx.fold.quant_guard`); None folds regardless.
        guard: check the result and leave out a cleanup step that breaks it (see
            `fold_in_place`).

    Returns:
        The folded model, of the type given, and the report.

    Raises:
        UnsupportedModelError: the model is not valid ONNX (`InvalidModelError`).
        FoldCheckError: the fold alone fails the output check (`fold_in_place`).
        FoldOutputError: (a RuntimeError) the result failed `check_output`: a bug in the pass.
    """
    as_proto = isinstance(model, onnx.ModelProto)

    def fresh() -> ir.Model:
        return to_ir(model) if as_proto else model.clone()  # type: ignore[arg-type, union-attr]

    work = fresh()
    report = fold_in_place(
        work,
        cleanup=cleanup,
        check_output=check_output,
        max_row_range_growth=max_row_range_growth,
        guard=guard,
        reload=fresh,
    )
    with quiet_onnx_ir():
        out = ir.serde.serialize_model(work) if as_proto else work
    return FoldResult(model=out, report=report)


def inspect_model(model: onnx.ModelProto | ir.Model) -> list[BnInfo]:
    """Say, for each BatchNormalization of `model`, whether `fold_model` folds it and how.

    Runs the fold on a private copy; `model` is not changed.
    """
    work = to_ir(model) if isinstance(model, onnx.ModelProto) else model.clone()
    with quiet_onnx_ir():
        result = FoldBatchNormPass()(work)
    assert isinstance(result, FoldPassResult) and result.report is not None
    return [
        BnInfo(
            node=e.node,
            foldable=e.status == "folded",
            direction=e.direction,
            target=e.target,
            reason=e.reason,
            kind=e.kind,
            where=e.where,
        )
        for e in result.report.entries
    ]
