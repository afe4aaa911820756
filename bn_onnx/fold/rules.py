"""The rule interface: a rule family (`Rule`), a kind of affine site (`SiteKind`), and the
one refusal made from every rule's (`combine`).

A rule is a function `(site, ctx) -> Plan | Refusal` over a `bn_onnx.fold.sites.AffineSite` and
the fold's `bn_onnx.fold.context.FoldContext`. These names live apart from `sites` because
the context itself reads sites: kept there, they would close an import cycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import onnx_ir as ir

from bn_onnx.fold.sites import AffineSite, Plan, Refusal

if TYPE_CHECKING:
    from bn_onnx.fold.context import FoldContext

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
