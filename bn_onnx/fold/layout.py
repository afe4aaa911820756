"""Rules 19-20: a site's channels followed through Transpose, Reshape, Flatten, Squeeze and
Unsqueeze, so that a fold reaches the linear node on the other side.

A layout op moves elements without changing them, so a per-channel map `a*x + c` on one side is
the same map on the other, with the channel on another axis. `Channels` records where: index
`i` along `axis` of a value belongs to pattern position `(i // inner) % period`, and pattern
position `p` has scale `a[p]`, shift `c[p]` and is the site's channel `ids[p]`. At the site
itself `inner` = 1 and the pattern is the site's (a, c). The linear node at the end of the walk
gets the pattern repeated over its channel axis (`Channels.expand`): a 4-D BN followed by Flatten
and Gemm scales each of the Gemm's input rows by its channel's factor, repeated over the
channel's spatial positions.

How each op maps the axis (forward: input 0 to output 0; back: the reverse):

- Transpose: `perm` (default: reversed); the axis moves, `inner` stays.
- Squeeze, Unsqueeze: `axes` from the input (opset >= 13) or the attribute, negative axes
  counted from the end; Squeeze without axes drops the dims of size 1. A channel axis that is
  removed or inserted is refused.
- Reshape, Flatten: by the static shapes from shape inference (so `allowzero` and a `-1` dim
  are already resolved). In row-major order an element's flat index f is kept, and its channel
  is `(f // P) % period` with `P = inner * prod(dims after the axis)`. On the other side the
  channel is on axis j, with `inner' = P / stride_j`, when the dims after j multiply to a
  stride_j that divides P and `stride_j * dim_j` is a multiple of `P * period` (the channel
  block lies inside axis j): a merge with trailing dims (Flatten: inner' = inner * H * W), a
  split of the channel into (C, k) or of other dims, or a no-op. The dims before the axis need
  not be static. Otherwise the channel is spread over several axes and the fold is refused.

The layout nodes stay in the graph; only the site goes. Each value on the way must be read by
nothing else (shape-only readers aside), since its values change (checked by the walks in
`preceding` and `following`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from bn_onnx.fold.context import FoldContext
from bn_onnx.fold.nodes import attr_ints, is_standard, label
from bn_onnx.fold.sites import AffineSite, Refusal

LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})


@dataclasses.dataclass(frozen=True, eq=False)
class Channels:
    """Where a site's channels lie on a value (see the module docstring).

    Attributes:
        axis: the axis of the value that carries the channels (non-negative).
        inner: how many consecutive indices along `axis` share one pattern position.
        a: scale per pattern position, float64, shape (period,).
        c: shift per pattern position, float64, shape (period,).
        ids: the site's channel of each pattern position, int, shape (period,).
        via: the ops walked through from the site, for reasons ("Transpose 't'").
        uniform: the same map on every element (a Mul/Add chain by scalars,
            `AffineSite.uniform`): it is per channel of any axis (`at`), with any count.
    """

    axis: int
    inner: int
    a: np.ndarray
    c: np.ndarray
    ids: np.ndarray
    via: tuple[str, ...] = ()
    uniform: bool = False

    @classmethod
    def of(cls, site: AffineSite) -> Channels:
        """The channels at the site's own input and output."""
        axis = site.axis
        if axis < 0 and site.rank is not None:
            axis += site.rank
        return cls(axis, 1, site.a, site.c, np.arange(site.channels), uniform=site.uniform)

    @property
    def period(self) -> int:
        return int(self.a.size)

    def at(self, axis: int) -> Channels:
        """A uniform map as per channel of `axis` (what the linear node needs); others as they
        are."""
        return dataclasses.replace(self, axis=axis, inner=1) if self.uniform else self

    def expand(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Scale and shift of each of the n indices along the axis; None when n is not a
        whole number of pattern blocks."""
        if self.uniform:
            return (np.full(n, self.a[0]), np.full(n, self.c[0])) if n > 0 else None
        block = self.inner * self.period
        if n <= 0 or n % block:
            return None
        if self.inner == 1 and n == self.period:
            return self.a, self.c
        idx = (np.arange(n) // self.inner) % self.period
        return self.a[idx], self.c[idx]

    def moved(self, node: ir.Node, axis: int, inner: int | None = None) -> Channels:
        """The channels after walking through `node` onto `axis`."""
        return dataclasses.replace(
            self,
            axis=axis,
            inner=self.inner if inner is None else inner,
            via=(*self.via, f"{node.op_type} {label(node)!r}"),
        )

    def subset(self, node: ir.Node, start: int, stop: int) -> Channels:
        """The channels of indices [start, stop) of the axis, as an explicit pattern."""
        idx = (np.arange(start, stop) // self.inner) % self.period
        return Channels(
            self.axis,
            1,
            self.a[idx],
            self.c[idx],
            self.ids[idx],
            (*self.via, f"{node.op_type} {label(node)!r}"),
        )

    def prefix(self) -> str:
        """ "through Transpose 't': " when the walk went through ops, else ""."""
        return f"through {', '.join(self.via)}: " if self.via else ""


def axes_of(node: ir.Node, ctx: FoldContext, pos: int = 1) -> list[int] | None | Refusal:
    """A node's `axes`: from input `pos` (a constant) when given, else the attribute; None when
    neither is there."""
    value = node.inputs[pos] if len(node.inputs) > pos else None
    if value is not None:
        axes = ctx.const(value)
        if axes is None:
            return Refusal(f"{node.op_type} {label(node)!r} axes {value.name!r} are not constant")
        return [int(v) for v in np.asarray(axes).reshape(-1)]
    return attr_ints(node, "axes")


def is_layout(node: ir.Node) -> bool:
    return is_standard(node) and node.op_type in LAYOUT_OPS


def forward(node: ir.Node, ch: Channels, ctx: FoldContext) -> tuple[ir.Value, Channels] | Refusal:
    """The channels on the output of layout op `node`, given them on its input 0."""
    moved = _map(node, ch, ctx, forward=True)
    return moved if isinstance(moved, Refusal) else (node.outputs[0], moved)


def back(node: ir.Node, ch: Channels, ctx: FoldContext) -> tuple[ir.Value, Channels] | Refusal:
    """The channels on input 0 of layout op `node`, given them on its output."""
    moved = _map(node, ch, ctx, forward=False)
    return moved if isinstance(moved, Refusal) else (node.inputs[0], moved)  # type: ignore[return-value]


def _fmt(shape: tuple[int | None, ...] | None) -> str:
    if shape is None:
        return "[?]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _map(node: ir.Node, ch: Channels, ctx: FoldContext, *, forward: bool) -> Channels | Refusal:
    src_value, dst_value = node.inputs[0], node.outputs[0]
    if src_value is None:
        return Refusal(f"{node.op_type} {label(node)!r} has no input")
    if not forward:
        src_value, dst_value = dst_value, src_value
    op, name = node.op_type, f"{node.op_type} {label(node)!r}"
    if ch.uniform:  # the same map on every element: any layout keeps it
        return ch.moved(node, 0)
    src_rank, dst_rank = ctx.rank(src_value), ctx.rank(dst_value)
    if src_rank is None or dst_rank is None:
        return Refusal(f"{ch.prefix()}the rank around {name} is unknown")
    if op == "Transpose":
        perm = attr_ints(node, "perm") or list(range(src_rank))[::-1]
        if sorted(perm) != list(range(src_rank)):
            return Refusal(f"{name} has perm {perm}")
        axis = perm.index(ch.axis) if forward else perm[ch.axis]
        return ch.moved(node, axis)
    if op in ("Squeeze", "Unsqueeze"):
        axes = axes_of(node, ctx)
        if isinstance(axes, Refusal):
            return axes
        in_value = node.inputs[0]
        full_rank = ctx.rank(node.outputs[0] if op == "Unsqueeze" else in_value)
        assert full_rank is not None
        if axes is None or (op == "Squeeze" and not axes):
            shape = ctx.shape(in_value)
            if op == "Unsqueeze" or shape is None or None in shape:
                return Refusal(f"{name} has no axes and its input shape is not static")
            axes = [i for i, d in enumerate(shape) if d == 1]
        axes = sorted({a + full_rank if a < 0 else a for a in axes})
        # "Squeeze forward" and "Unsqueeze back" go from the full rank to the reduced one.
        to_reduced = forward == (op == "Squeeze")
        if to_reduced:
            if ch.axis in axes:
                return Refusal(f"{ch.prefix()}{name} removes the channel axis {ch.axis}")
            return ch.moved(node, ch.axis - sum(a < ch.axis for a in axes))
        kept = [i for i in range(full_rank) if i not in axes]
        return ch.moved(node, kept[ch.axis])
    # Reshape, Flatten: by static shapes
    src, dst = ctx.shape(src_value), ctx.shape(dst_value)
    moved = reshape_axis(src, dst, ch.axis, ch.inner, ch.period)
    if isinstance(moved, str):
        shapes = (src, dst) if forward else (dst, src)
        return Refusal(
            f"{ch.prefix()}{name} reshapes {_fmt(shapes[0])} to {_fmt(shapes[1])} (the"
            f" channels on axis {ch.axis} of its {'input' if forward else 'output'}): {moved}"
        )
    return ch.moved(node, *moved)


def reshape_axis(
    src: tuple[int | None, ...] | None,
    dst: tuple[int | None, ...] | None,
    axis: int,
    inner: int,
    period: int,
) -> tuple[int, int] | str:
    """Where a channel pattern on `axis` of shape `src` lands after a row-major reshape to
    `dst`: (axis, inner) on `dst`, or why it does not land on one axis.

    The channel of flat index f is `(f // P) % period` with P = inner * prod(src[axis+1:]);
    see the module docstring for the condition.
    """
    if src is None or dst is None:
        return "the shapes are not known"
    tail = src[axis + 1 :]
    if any(d is None for d in tail):
        return "the dims after the channel axis are not static"
    p = inner * math.prod(tail)  # type: ignore[arg-type]
    block = p * period
    stride = 1
    for j in range(len(dst) - 1, -1, -1):
        dim = dst[j]
        if dim is None:
            return f"dim {j} of the other side is not static"
        span = stride * dim
        if span <= p:  # axis j lies inside one channel's positions
            if p % span:
                return "the channel's positions do not align with the axes"
            stride = span
            continue
        if p % stride == 0 and span % block == 0:
            return j, p // stride
        return "the channel axis is spread over several axes"
    return "the channel axis is spread over several axes"
