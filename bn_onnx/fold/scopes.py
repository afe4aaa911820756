"""Scopes: the subgraphs of If, Loop and Scan nodes (at any depth) and model-local functions.

The fold treats every scope as it treats the main graph (rule 15). What differs from
one scope to the next is decided here:

- *Where a site sits* (`ScopeIndex.where`): `main`, `main/If 'cond'/then_branch`,
  `function pkg.blocks::ConvBn`, `function pkg.blocks::ConvBn/Loop 'l'/body`.
- *What is a constant.* A subgraph sees the values of its enclosing graphs directly (onnx-ir
  gives the captured value itself): an outer initializer or Constant is a constant inside,
  an outer value computed at run time is not, and the inputs of a Loop or Scan body (iteration
  count, loop-carried state, scanned slices) are never constants. A function body's inputs
  are its parameters: such an input is a constant only when every call of the function in the
  model passes the same constant (model-local functions have no other callers), because the
  body is shared by all calls; an attribute that refers to a function attribute (`@eps`) is
  set per call and never a constant.
- *Where a new constant goes* (`FoldContext.add_initializer`, `constant_node`): an
  initializer of the site's own graph (GraphProto holds initializers at any depth; the main
  graph for IR < 4, whose initializers are all listed as inputs), or a Constant node at the
  top of a function body (FunctionProto has no initializers) or of a subgraph inside one.
- *What a fold may touch* (`check_plan`): only nodes of the site's own graph (the node before a
  BN in a subgraph may sit in the enclosing graph: folding into it would move the BN's output
  to the outer graph, and a subgraph may not return an outer value directly in onnxruntime),
  and no node with an attribute that refers to a function attribute.
- *Writing a function input* (`write_through`): when a fold rewrites a weight that a function
  body reads from its input, and every call passes an initializer for it, the initializers in
  the callers are rewritten (in place when only calls of this function at this position read
  them), so the function's signature stays and the weight is not stored twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import onnx_ir as ir

from bn_onnx.fold.nodes import label
from bn_onnx.fold.sites import MAIN_GRAPH, AffineSite, Plan, Refusal
from bn_onnx.fold.views import ValueView

Identifier = tuple[str, str, str]  # (domain, name, overload) of a function


class _ConstantStore(Protocol):
    nodes: set[ir.Node]

    def remember(self, value: ir.Value, array: np.ndarray | None) -> None: ...


class RewriteContext(ValueView, Protocol):
    """What `check_plan`, `constant_node` and `write_through` use of the fold's context
    (`bn_onnx.fold.context.FoldContext`): values, where a new constant goes, and the store
    of constants."""

    scope: ir.Graph
    candidates: list[ir.Value]

    @property
    def legacy_inputs(self) -> bool: ...

    @property
    def scopes(self) -> ScopeIndex: ...

    @property
    def constants(self) -> _ConstantStore: ...

    def where(self, graph: ir.Graph | ir.Function | None) -> str: ...

    def add_initializer(self, array: np.ndarray, base: str) -> ir.Value: ...


def reference_attributes(node: ir.Node) -> list[tuple[str, str]]:
    """The node's attributes that refer to a function attribute: (name, referenced name)."""
    return [(k, a.ref_attr_name or "") for k, a in node.attributes.items() if a.is_ref()]


def describe_references(node: ir.Node) -> str | None:
    """Why a node with attribute references cannot be read, or None when it has none."""
    refs = reference_attributes(node)
    if not refs:
        return None
    name, ref = refs[0]
    return (
        f"{node.op_type} {label(node)!r}: attribute {name!r} refers to the function's "
        f"attribute {ref!r} (its value is set by each call)"
    )


def _subgraphs(node: ir.Node) -> list[tuple[str, ir.Graph]]:
    """The node's subgraph attributes as (key, graph); `key` is `name` or `name[i]`."""
    found: list[tuple[str, ir.Graph]] = []
    for key, attr in node.attributes.items():
        if attr.is_ref() or attr.value is None:
            continue
        if attr.type == ir.AttributeType.GRAPH:
            found.append((key, attr.value))
        elif attr.type == ir.AttributeType.GRAPHS:
            found.extend((f"{key}[{i}]", g) for i, g in enumerate(attr.value))
    return found


class ScopeIndex:
    """Every scope of a model: graphs, who holds them, function bodies and their calls.

    Built once per fold (the fold adds or removes no subgraph and no call).

    Attributes:
        main: the main graph.
        graphs: every scope: the main graph and its subgraphs (each listed when the node
            holding it is reached), then each function body and its subgraphs.
        nodes: every node in the same order (a node before the nodes of its subgraphs).
        owners: subgraph -> (the node holding it, the attribute key).
        functions: function body graph -> its `ir.Function`.
        enclosing: scope -> the function whose body it is or is inside (None: the main graph
            and its subgraphs).
        calls: function identifier -> the nodes calling it, anywhere in the model.
    """

    def __init__(self, model: ir.Model) -> None:
        self.main = model.graph
        self.graphs: list[ir.Graph] = []
        self.nodes: list[ir.Node] = []
        self.owners: dict[ir.Graph, tuple[ir.Node, str]] = {}
        self.functions: dict[ir.Graph, ir.Function] = {}
        self.enclosing: dict[ir.Graph, ir.Function | None] = {}
        self.calls: dict[Identifier, list[ir.Node]] = {key: [] for key in model.functions}
        self._not_constant: dict[ir.Value, str | None] = {}
        self._walk(model.graph, None)
        for function in model.functions.values():
            self.functions[function.graph] = function
            self._walk(function.graph, function)

    def _walk(self, graph: ir.Graph, function: ir.Function | None) -> None:
        """One pass over `graph` and its subgraphs, depth first, in graph order (each node
        before the nodes of its subgraphs, as `ir.traversal.RecursiveGraphIterator`)."""
        self.graphs.append(graph)
        self.enclosing[graph] = function
        stack: list[Iterator[ir.Node]] = [iter(graph)]
        while stack:  # no recursion: the nesting depth is the model's
            node = next(stack[-1], None)
            if node is None:
                stack.pop()
                continue
            self.nodes.append(node)
            calls = self.calls.get(node.op_identifier())
            if calls is not None:
                calls.append(node)
            inner = _subgraphs(node)
            for key, sub in inner:
                self.owners[sub] = (node, key)
                self.graphs.append(sub)
                self.enclosing[sub] = function
            stack.extend(iter(sub) for _, sub in reversed(inner))

    # --- naming
    def where(self, graph: ir.Graph | ir.Function | None) -> str:
        """A scope's path for the report: `main`, then `/Op 'label'/attribute` per level
        (`main/If 'cond'/then_branch`), or `function domain::name` (`:overload` when set)."""
        if isinstance(graph, ir.Function):
            graph = graph.graph
        if graph is None or graph is self.main:
            return MAIN_GRAPH
        function = self.functions.get(graph)
        if function is not None:
            overload = f":{function.overload}" if function.overload else ""
            return f"function {function.domain}::{function.name}{overload}"
        owner = self.owners.get(graph)
        if owner is None:
            return graph.name or "?"
        node, key = owner
        return f"{self.where(node.graph)}/{node.op_type} {label(node)!r}/{key}"

    def in_function(self, graph: ir.Graph | None) -> bool:
        """Whether the scope is a function body or inside one."""
        return graph is not None and self.enclosing.get(graph) is not None

    # --- function inputs
    def function_input(self, value: ir.Value) -> tuple[ir.Function, int] | None:
        """(function, position) when `value` is an input of a function body."""
        function = self.functions.get(value.graph) if value.graph is not None else None
        if function is None or not value.is_graph_input():
            return None
        for i, v in enumerate(function.inputs):
            if v is value:
                return function, i
        return None

    def not_constant(self, ctx: ValueView, value: ir.Value) -> str | None:
        """For a function input: None when every call passes the same constant, else why not
        (a phrase after "is"). Cached: folds never make a call's argument constant or not,
        and `write_through` writes the same array for every call."""
        if value in self._not_constant:
            return self._not_constant[value]
        found = self.function_input(value)
        if found is None:
            return "a graph input"
        self._not_constant[value] = "a function input"  # while computing: no cycles
        reason = self._check_calls(ctx, *found)
        self._not_constant[value] = reason
        return reason

    def _check_calls(self, ctx: ValueView, function: ir.Function, pos: int) -> str | None:
        calls = self.calls.get(function.identifier(), [])
        if not calls:
            return "a function input of a function the model never calls"
        first: np.ndarray | None = None
        for call in calls:
            arg = call.inputs[pos] if pos < len(call.inputs) else None
            if arg is None:
                return f"a function input that call {label(call)!r} leaves out"
            array = ctx.const(arg)
            if array is None:
                return "a function input"
            if first is None:
                first = array
            elif (
                array.dtype != first.dtype
                or array.shape != first.shape
                or array.tobytes() != first.tobytes()
            ):
                return "a function input whose calls pass different values"
        return None

    def argument(self, ctx: ValueView, value: ir.Value) -> np.ndarray | None:
        """The constant every call passes for function input `value`, or None."""
        found = self.function_input(value)
        if found is None or self.not_constant(ctx, value) is not None:
            return None
        function, pos = found
        call = self.calls[function.identifier()][0]
        return ctx.const(call.inputs[pos])

    def describe_input(self, ctx: ValueView, value: ir.Value) -> str:
        """What feeds a graph input, as a phrase after "is": `a graph input` (the main
        graph's), `a function input` (with why it is not a constant), `an input of
        main/Loop 'l'/body`."""
        graph = value.graph
        if graph is None or graph is self.main:
            return "a graph input"
        if graph in self.functions:
            return self.not_constant(ctx, value) or "a function input"
        return f"an input of {self.where(graph)}"


def count(index: ScopeIndex) -> tuple[int, int]:
    """Nodes and initializers of every scope: main graph, subgraphs and function bodies."""
    return sum(len(g) for g in index.graphs), sum(len(g.initializers) for g in index.graphs)


def check_plan(plan: Plan, site: AffineSite, ctx: RewriteContext) -> Plan | Refusal:
    """The plan, or why it may not be applied from the site's scope (see the module
    docstring)."""
    for target in plan.targets:
        if target.graph is not site.graph:
            return Refusal(
                f"{target.op_type} {label(target)!r} is in {ctx.where(target.graph)}, outside "
                f"the {site.short}'s graph {site.where}"
            )
        refs = describe_references(target)
        if refs is not None:
            return Refusal(refs)
    return plan


def constant_node(ctx: RewriteContext, array: np.ndarray, name: str, graph: ir.Graph) -> ir.Value:
    """A Constant node named `name` holding `array`, at the top of `graph` (a function body or
    a subgraph inside one, where no initializers may go); swept like an evaluated constant
    once nothing reads it."""
    # No type on the output: for IR < 10 onnx-ir would write it as a value_info of the main
    # graph named "domain::function/value".
    value = ir.Value(name=name)
    node = ir.Node(
        "",
        "Constant",
        [],
        attributes=[ir.AttrTensor("value", ir.Tensor(array, name=name))],
        outputs=[value],
        name=name,
    )
    if len(graph):
        graph.insert_before(graph[0], node)
    else:
        graph.append(node)
    ctx.constants.nodes.add(node)
    ctx.constants.remember(value, array)
    return value


def write_through(
    ctx: RewriteContext, node: ir.Node, pos: int, old: ir.Value, array: np.ndarray, base: str | None
) -> bool:
    """Give the function input `old` (read only by input `pos` of `node`) the value `array`
    by rewriting the initializers every call passes for it; False (nothing done) when `old` is
    no such input or a call passes something other than an initializer outside a function."""
    found = ctx.scopes.function_input(old)
    if found is None or list(old.uses()) != [(node, pos)]:
        return False
    if ctx.scopes.not_constant(ctx, old) is not None:
        return False
    function, index = found
    calls = ctx.scopes.calls[function.identifier()]
    groups: dict[ir.Value, list[ir.Node]] = {}
    for call in calls:
        arg = call.inputs[index]
        if (
            arg is None
            or not arg.is_initializer()
            or ctx.is_graph_input(arg)
            or ctx.scopes.in_function(arg.graph)
        ):
            return False
        groups.setdefault(arg, []).append(call)
    for arg, users in groups.items():
        mine = {(call, index) for call in users}
        if (
            set(arg.uses()) == mine
            and not arg.is_graph_output()
            and not arg.is_graph_input()
            and not ctx.legacy_inputs
        ):
            tensor = ir.Tensor(array, name=arg.name)
            arg.const_value = tensor
            if arg.dtype != tensor.dtype:
                arg.type = ir.TensorType(tensor.dtype)
            if arg.shape is None or arg.shape.dims != array.shape:
                arg.shape = ir.Shape(array.shape)
            ctx.constants.remember(arg, array)
            continue
        scope, ctx.scope = ctx.scope, arg.graph  # the new initializer goes beside the old
        try:
            new = ctx.add_initializer(array, f"{base or arg.name}_bnfold")
        finally:
            ctx.scope = scope
        for call in users:
            call.replace_input_with(index, new)
        ctx.candidates.append(arg)
    ctx.constants.remember(old, array)
    return True
