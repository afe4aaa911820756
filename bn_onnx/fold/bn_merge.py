"""Chains: two BNs in a row merged into one (the passthroughs the walks look through, Identity
and inference-mode Dropout, are `nodes.is_passthrough`).

- BN -> BN: the first site's map is composed into the second BN, whose parameters become
  scale = a2*a1, B = a2*c1 + c2, mean = 0, var = 1, epsilon = 0; the exact float64 map is kept
  in `ctx.exact_affine`, so a later fold of the merged BN rounds once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from bn_onnx.fold import affine_math as fm
from bn_onnx.fold.bn_site import batch_norm_site
from bn_onnx.fold.context import FoldContext
from bn_onnx.fold.nodes import is_standard, label
from bn_onnx.fold.rules import Rule
from bn_onnx.fold.sites import AffineSite, Plan, Refusal, fit_uniform


def merge_into_next_bn(site: AffineSite, ctx: FoldContext) -> Plan | Refusal:
    """Rule 7: a BN whose only reader is another BN is merged into it."""
    y = site.y
    readers = ctx.readers(y)
    if y.is_graph_output() or len(readers) != 1:
        return Refusal("", silent=True)
    nxt, index = readers[0]
    if nxt.op_type != "BatchNormalization" or not is_standard(nxt) or index != 0:
        return Refusal("", silent=True)
    if nxt.graph is not site.graph:
        return Refusal("", silent=True)
    second = batch_norm_site(nxt, ctx)
    if isinstance(second, Refusal):
        return Refusal(f"next BN {label(nxt)!r}: {second.reason}")
    return merge_plan(site, nxt, second, ctx, bn_first=False)


def merge_plan(
    site: AffineSite, bn: ir.Node, bn_map: AffineSite, ctx: FoldContext, *, bn_first: bool
) -> Plan | Refusal:
    """The plan merging `site` with BN node `bn` (whose map is `bn_map`) into that BN: the BN
    before the site (`bn_first`: the BN then computes y, under y's name) or after it (the BN
    keeps its name). The composed map is exact (float64), rounded once (`set_bn_map`)."""
    site = fit_uniform(site, 1, bn_map.channels)
    if site.axis != 1:
        return Refusal(f"{site.short} is per channel of axis {site.axis}, BN {label(bn)!r} of 1")
    if bn_map.channels != site.channels:
        return Refusal(f"BN {label(bn)!r} has {bn_map.channels} channels, not {site.channels}")
    first, second = (bn_map, site) if bn_first else (site, bn_map)
    a2, c2 = fm.compose_affine(first.a, first.c, second.a, second.c)
    write = set_bn_map(bn, a2, c2, ctx)
    if isinstance(write, Refusal):
        return write

    def rewrite() -> None:
        write()
        ctx.remove_site(site, keep_name=bn_first)

    return Plan("merged", [bn], rewrite)


def set_bn_map(
    bn: ir.Node, a: np.ndarray, c: np.ndarray, ctx: FoldContext
) -> Callable[[], None] | Refusal:
    """A rewrite giving BN node `bn` the map (a, c): scale = a, B = c, mean = 0, var = 1,
    epsilon = 0, each rounded once to its parameter's dtype; the exact map is kept in
    `ctx.exact_affine`. A Refusal when a parameter is not constant or a value does not round
    safely."""
    params = [ctx.const(v) for v in bn.inputs[1:5]]
    if any(p is None for p in params):  # an exact merged map without its parameters
        return Refusal(f"BN {label(bn)!r}: parameters are not constant")
    try:
        scale = fm.round_to(a, params[0].dtype)  # type: ignore[union-attr]
        bias = fm.round_to(c, params[1].dtype)  # type: ignore[union-attr]
    except ValueError as exc:
        return Refusal(f"merging with {label(bn)!r}: {exc}")
    mean = np.zeros(a.shape, params[2].dtype)  # type: ignore[union-attr]
    var = np.ones(a.shape, params[3].dtype)  # type: ignore[union-attr]

    def rewrite() -> None:
        for pos, array in zip((1, 2, 3, 4), (scale, bias, mean, var), strict=True):
            value = bn.inputs[pos]
            ctx.write_input(bn, pos, array, value.name if value is not None else None)
        ctx.set_attribute_float(bn, "epsilon", 0.0)
        ctx.exact_affine[bn] = (a, c)

    return rewrite


MERGE = Rule("merged", "", merge_into_next_bn)
