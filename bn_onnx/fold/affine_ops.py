"""Per-channel Mul/Add chains as affine sites (rule 16): BN in all but name.

A node Mul, Add, Sub or Div with one dynamic input x and one constant k is a per-channel
affine map of x when k broadcasts along at most one axis of x and the output has x's shape:

    Mul  x * k, k * x  ->  a = k,    c = 0
    Add  x + k, k + x  ->  a = 1,    c = k
    Sub  x - k         ->  a = 1,    c = -k
    Sub  k - x         ->  a = -1,   c = k
    Div  x / k         ->  a = 1/k,  c = 0      (k / x is not affine)

The constant lines up with x by numpy broadcasting (opset >= 7) or by the legacy
`broadcast`/`axis` attributes (`bn_onnx.fold.legacy`): shapes (C,1,1), (1,C,1,1), (1,C) or a
scalar. It must be a floating-point constant of finite values on a floating-point x, and it
must not expand x (rank above x's, or a dim > 1 where x's is 1 or unknown). Such nodes in a
row, each inner value read by nothing but the next node (shape-only readers aside) and no
graph output, make one site, "Mul/Add chain": its map is the composition, in float64; its
channel axis is the one axis its constants vary along (two constants varying along different
axes end a chain and start the next). A chain by scalars only is the same map on every
channel: its site is per channel of axis 1 (the channel axis of Conv and BN, the output axis
of a 2-D Gemm/MatMul), every rule fits it to the axis and channel count it needs
(`sites.fit_uniform`: into a MatMul of any rank, along its last axis), and it is reported only
when it folds (`AffineSite.quiet`).

This covers a decomposed BN ((x - mean) / sqrt(var + eps) * gamma + beta), torchvision's
FrozenBatchNorm2d (x * scale + bias, whose scale and bias both torch exporters leave as
constant subgraphs or initializers of shape (1, C, 1, 1)), and Caffe2's Scale layers after a
BN (BN -> Mul -> Add). The rules of the BN apply to the site unchanged (into the node before,
the nodes after, merged into a BN after it); `MERGE_BACK` also merges a chain into the BN
right before it. A lone Add of a constant right after a MatMul is no site: it is the MatMul's
bias, which rule 2 already reads with it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bn_onnx.fold import affine_math as fm
from bn_onnx.fold.bn_merge import merge_plan
from bn_onnx.fold.bn_site import batch_norm_site
from bn_onnx.fold.context import FoldContext
from bn_onnx.fold.flush import flush_constant_channels
from bn_onnx.fold.legacy import aligned_shape
from bn_onnx.fold.nodes import FLOAT_DTYPES, is_standard, label
from bn_onnx.fold.rules import Rule, SiteKind
from bn_onnx.fold.sites import AffineSite, Plan, Refusal

KIND = "Mul/Add chain"
AFFINE_OPS = frozenset({"Mul", "Add", "Sub", "Div"})
_FLOAT_TYPES = frozenset(ir.DataType.from_numpy(d) for d in FLOAT_DTYPES)
_NOT_A_SITE = Refusal("not a per-channel affine chain", silent=True)
_MAX_CHAIN = 256  # no chain walk is longer than this


@dataclasses.dataclass(frozen=True)
class Step:
    """One node of a chain: y = scale * x + shift, per channel of `axis` (None: the same for
    every channel, scale and shift of shape ())."""

    node: ir.Node
    x: ir.Value
    y: ir.Value
    scale: np.ndarray
    shift: np.ndarray
    axis: int | None


def _claims(node: ir.Node) -> bool:
    return node.op_type in AFFINE_OPS and is_standard(node)


def affine_step(node: ir.Node, ctx: FoldContext) -> Step | None:
    """The node as a per-channel affine map of its one dynamic input, or None."""
    if not _claims(node) or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    if any(v is None for v in node.inputs):
        return None
    k0, k1 = (ctx.const(v) for v in node.inputs)
    if (k0 is None) == (k1 is None):  # both dynamic, or a constant subgraph
        return None
    pos = 0 if k0 is None else 1  # x's position
    k = k1 if pos == 0 else k0
    x = node.inputs[pos]
    op = node.op_type
    if op == "Div" and pos == 1:
        return None  # k / x
    assert k is not None and x is not None
    elem = ctx.elem_type(x)
    if elem is None or elem not in _FLOAT_TYPES or k.dtype not in FLOAT_DTYPES:
        return None
    if not np.isfinite(k.astype(np.float64)).all():
        return None
    x_shape = ctx.shape(x)
    if x_shape is None:
        return None
    full = aligned_shape(node, ctx.opset, k.shape, 1 - pos, x_shape)
    if full is None:
        return None
    axes = [i for i, d in enumerate(full) if d != 1]
    if len(axes) > 1:
        return None  # varies along two axes: not per channel
    vec = k.astype(np.float64).reshape(-1) if axes else k.astype(np.float64).reshape(())
    zero = np.zeros_like(vec)
    if op == "Mul":
        scale, shift = vec, zero
    elif op == "Add":
        scale, shift = np.ones_like(vec), vec
    elif op == "Sub":
        scale, shift = (np.ones_like(vec), -vec) if pos == 0 else (-np.ones_like(vec), vec)
    else:  # Div x / k
        if not vec.all():
            return None  # x / 0
        scale, shift = 1.0 / vec, zero
    return Step(node, x, node.outputs[0], scale, shift, axes[0] if axes else None)


def _next(step: Step, ctx: FoldContext) -> Step | None:
    """The step that reads this step's output, when it is its only reader."""
    y = step.y
    if y.is_graph_output():
        return None
    readers = ctx.readers(y)
    if len(readers) != 1:
        return None
    node, _ = readers[0]
    if node.graph is not step.node.graph:
        return None
    nxt = affine_step(node, ctx)
    return nxt if nxt is not None and nxt.x is y else None


def _prev(step: Step, ctx: FoldContext) -> Step | None:
    """The step whose output is this step's input and is read by nothing else."""
    producer = step.x.producer()
    if producer is None or producer.graph is not step.node.graph:
        return None
    prev = affine_step(producer, ctx)
    if prev is None or prev.y is not step.x:
        return None
    nxt = _next(prev, ctx)
    return prev if nxt is not None and nxt.node is step.node else None


def _joins(axis: int | None, step: Step) -> bool:
    return axis is None or step.axis is None or step.axis == axis


def chain_from(node: ir.Node, ctx: FoldContext) -> list[Step] | None:
    """The chain that starts at `node`, or None when `node` starts none.

    The maximal run of linked steps through `node` is split greedily from its first node
    wherever a constant varies along another axis than the chain's so far.
    """
    step = affine_step(node, ctx)
    if step is None:
        return None
    run = [step]
    while len(run) < _MAX_CHAIN:
        prev = _prev(run[0], ctx)
        if prev is None:
            break
        run.insert(0, prev)
    # Group the run greedily from its start: does a group start at `node`?
    axis: int | None = None
    for i, s in enumerate(run):
        starts = i == 0 or not _joins(axis, s)
        if starts or axis is None:
            axis = s.axis
        if s.node is node and not starts:
            return None
    chain = [step]
    axis = step.axis
    while len(chain) < _MAX_CHAIN:
        nxt = _next(chain[-1], ctx)
        if nxt is None or not _joins(axis, nxt):
            break
        chain.append(nxt)
        axis = axis if axis is not None else nxt.axis
    return chain


def _is_matmul_bias(step: Step) -> bool:
    """A lone Add/Sub of a constant right after a MatMul is that MatMul's bias (rule 2 reads
    MatMul -> Add as one linear node): folding it into the MatMul would only put a new Add
    where it was."""
    producer = step.x.producer()
    return (
        step.node.op_type in ("Add", "Sub")
        and bool(np.all(step.scale == 1))
        and producer is not None
        and producer.op_type == "MatMul"
        and is_standard(producer)
    )


def chain_site(node: ir.Node, ctx: FoldContext) -> AffineSite | Refusal:
    """The Mul/Add chain starting at `node` as an affine site; a silent refusal (no report
    entry) when `node` starts no chain."""
    chain = chain_from(node, ctx)
    if chain is None:
        return _NOT_A_SITE
    x, y = chain[0].x, chain[-1].y
    if len(chain) == 1 and _is_matmul_bias(chain[0]):
        return _NOT_A_SITE
    shape = ctx.shape(x)
    assert shape is not None
    rank = len(shape)
    axis = next((s.axis for s in chain if s.axis is not None), None)
    quiet = axis is None
    if axis is None:  # scalars only: per channel of axis 1 when static, else the last
        if rank == 0:
            return _NOT_A_SITE
        axis = 1 if rank >= 2 and shape[1] is not None else rank - 1
        n = shape[axis] if shape[axis] is not None else 1  # rules fit it (`fit_uniform`)
    else:
        n = shape[axis]
    if n is None or n < 1:
        return _NOT_A_SITE
    a = np.ones(n)
    c = np.zeros(n)
    steps = []
    for s in chain:
        a, c = fm.compose_affine(a, c, s.scale, s.shift)
        steps.append((s.scale, s.shift))
    a = np.broadcast_to(a, (n,)).copy()
    c = np.broadcast_to(c, (n,)).copy()
    if not (np.isfinite(a).all() and np.isfinite(c).all()):
        return Refusal("the chain's composed map is not finite")
    elem = ctx.elem_type(x)
    dtype = ir.DataType(elem) if elem is not None else None
    if dtype is not None:
        a, c = flush_constant_channels(steps, a, c, x, dtype, ctx)
    return AffineSite(
        kind=KIND,
        label=" -> ".join(label(s.node) for s in chain),
        nodes=tuple(s.node for s in chain),
        x=x,
        y=y,
        a=a,
        c=c,
        axis=axis,
        rank=rank,
        dtype=dtype,
        graph=node.graph,  # type: ignore[arg-type]
        where=ctx.where(node.graph),
        quiet=quiet,
    )


MUL_ADD_CHAIN = SiteKind(KIND, _claims, chain_site)


def merge_into_previous_bn(site: AffineSite, ctx: FoldContext) -> Plan | Refusal:
    """A chain right after a BN whose output nothing else reads is merged into that BN
    (Caffe2's Scale layer after a BN with no linear node to fold into)."""
    if site.kind == "BatchNormalization":
        return Refusal("", silent=True)  # BN -> BN is the forward merge's
    x = site.x
    bn = x.producer()
    if bn is None or bn.op_type != "BatchNormalization" or not is_standard(bn):
        return Refusal("", silent=True)
    if bn.graph is not site.graph or bn.outputs[0] is not x:
        return Refusal("", silent=True)
    if x.is_graph_output() or ctx.uses(x) != 1:
        return Refusal(f"the output of BN {label(bn)!r} before it is also read elsewhere")
    first = batch_norm_site(bn, ctx)
    if isinstance(first, Refusal):
        return Refusal(f"BN {label(bn)!r} before it: {first.reason}")
    return merge_plan(site, bn, first, ctx, bn_first=True)


MERGE_BACK = Rule("merged-back", "", merge_into_previous_bn)
