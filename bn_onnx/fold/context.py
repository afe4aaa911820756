"""What every rule needs from the graph: readers, constants, shapes, and safe rewrites.

One `FoldContext` serves one run of the pass over one `ir.Model`. Rules read through it
(`readers`, `uses`, `const`, `shape`, `is_graph_input`) and rewrite through it
(`write_input`, `insert_bias_add`, `remove_site`), so that the invariants live in one place:
a weight read by another node is cloned, never changed under it; a value that becomes unused
is remembered and swept at the end (`sweep`) if the fold made it dead; IR < 4 models keep their
initializers listed as inputs.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bn_onnx.fold import legacy, scopes
from bn_onnx.fold.constants import Constants
from bn_onnx.fold.lazy import ScaledTensor, release_pages
from bn_onnx.fold.nodes import is_standard
from bn_onnx.fold.sites import AffineSite
from bn_onnx.fold.validate import ShapeTable

Use = tuple[ir.Node, int]  # onnx-ir's Usage(node, index), a NamedTuple it does not export

# Readers that see only a value's shape or type (op type -> input positions): folding changes
# values, never shapes or types, so these never block a fold (rule 12).
SHAPE_ONLY_READERS: dict[str, frozenset[int]] = {
    "Shape": frozenset({0}),
    "Size": frozenset({0}),
    "CastLike": frozenset({1}),
}


def is_shape_only(use: Use) -> bool:
    """Whether this use reads only the value's shape or element type."""
    node, index = use
    positions = SHAPE_ONLY_READERS.get(node.op_type)
    return positions is not None and index in positions and is_standard(node)


class FoldContext:
    """The graph side of one fold: see the module docstring.

    Attributes:
        model: the model being folded (in place).
        graph: its main graph.
        opset: the default-domain opset version.
        legacy_inputs: IR < 4, where every initializer is also listed as a graph input and
            stays a constant (from IR 4 on such an initializer is an overridable default).
        shapes: inferred shapes by value name (from validation).
        constants: the constant evaluator.
        exact_affine: for a BN rewritten by a merge, its exact float64 (a, c).
        candidates: values that may have lost their last reader (for `sweep`).
        scope: the graph of the site being rewritten (set by the driver): new constants go
            there (`add_initializer`).
    """

    def __init__(self, model: ir.Model, shapes: ShapeTable) -> None:
        self.model = model
        self.graph = model.graph
        opsets = model.opset_imports
        self.opset = int(opsets.get("", opsets.get("ai.onnx", 1)))
        self.legacy_inputs = model.ir_version < 4
        self.shapes = shapes
        self.constants = Constants(self)
        self.exact_affine: dict[ir.Node, tuple[np.ndarray, np.ndarray]] = {}
        self.candidates: list[ir.Value] = []
        self._names: set[str] | None = None
        self._scopes: scopes.ScopeIndex | None = None
        self.scope: ir.Graph = self.graph

    @property
    def scopes(self) -> scopes.ScopeIndex:
        """The model's scopes: subgraphs, function bodies and their calls (built on first use)."""
        if self._scopes is None:
            self._scopes = scopes.ScopeIndex(self.model)
        return self._scopes

    # --- reading
    def is_graph_input(self, value: ir.Value) -> bool:
        """Whether the value is fed by the caller (an IR < 4 initializer is a constant; a
        function input is one when every call passes the same constant)."""
        if not value.is_graph_input():
            return False
        if value.graph is not None and value.graph in self.scopes.functions:
            return self.scopes.not_constant(self, value) is not None
        return not (self.legacy_inputs and value.const_value is not None)

    def describe_input(self, value: ir.Value) -> str:
        """What feeds an input, for reasons ("a graph input", "a function input", "an input
        of main/Loop 'l'/body")."""
        return self.scopes.describe_input(self, value)

    def const(self, value: ir.Value | None) -> np.ndarray | None:
        """The value's array if it is a constant (see `bn_onnx.fold.constants`)."""
        return self.constants.value(value)

    def shape(self, value: ir.Value) -> tuple[int | None, ...] | None:
        return self.shapes.shape(value)

    def rank(self, value: ir.Value) -> int | None:
        shape = self.shapes.shape(value)
        return None if shape is None else len(shape)

    def elem_type(self, value: ir.Value) -> int | None:
        return self.shapes.elem_type(value)

    def readers(self, value: ir.Value) -> list[Use]:
        """The uses of `value` that read its data (shape-only and type-only uses left out)."""
        return [u for u in value.uses() if not is_shape_only(u)]

    def uses(self, value: ir.Value) -> int:
        """How many times the value's data is read: node inputs (shape-only uses left out),
        plus one if it is a graph output."""
        return len(self.readers(value)) + value.is_graph_output()

    def owner_in(self, node: ir.Node, graph: ir.Graph) -> ir.Node:
        """The node of `graph` that holds `node` in one of its subgraphs (or `node` itself)."""
        while node.graph is not graph and node.graph is not None:
            owner = self.scopes.owners.get(node.graph)
            if owner is None:
                break
            node = owner[0]
        return node

    def where(self, graph: ir.Graph | ir.Function | None) -> str:
        """A graph's path for the report: "main", or the path of the node holding it, then
        `/Op 'label'/attribute`, e.g. `main/If 'cond'/then_branch`; `function dom::name`."""
        return self.scopes.where(graph)

    # --- names
    def fresh(self, base: str) -> str:
        """A value or node name not used anywhere in the model, made from `base`."""
        if self._names is None:
            names: set[str] = set()
            for graph in self.scopes.graphs:  # subgraphs and function bodies too
                for v in (*graph.inputs, *graph.outputs, *graph.initializers.values()):
                    names.add(v.name or "")
            for node in self.scopes.nodes:
                names.add(node.name or "")
                names.update(v.name or "" for v in node.outputs)
                names.update(v.name or "" for v in node.inputs if v is not None)
            self._names = names
        base = base or "bnfold"
        name, k = base, 0
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    # --- rewriting
    def add_initializer(self, array: np.ndarray | ir.TensorProtocol, base: str) -> ir.Value:
        """A new initializer holding `array` (or a tensor computed when the model is written,
        `bn_onnx.fold.lazy.ScaledTensor`), under a fresh name made from `base`, in the graph
        being rewritten (`scope`; the main graph for IR < 4); inside a function body, which has
        no initializers, a Constant node at the top of that graph instead."""
        name = self.fresh(base)
        if self.scopes.in_function(self.scope):
            return scopes.constant_node(self, _array(array), name, self.scope)
        tensor = _tensor(array, name)
        value = ir.Value(
            name=name,
            type=ir.TensorType(tensor.dtype),
            shape=ir.Shape(tensor.shape.numpy()),
            const_value=tensor,
        )
        graph = self.graph if self.legacy_inputs else self.scope
        graph.register_initializer(value)
        if self.legacy_inputs:  # IR < 4: every initializer is listed as an input too
            self.graph.inputs.append(value)
        self._remember(value, array)
        return value

    def write_input(
        self, node: ir.Node, pos: int, array: np.ndarray | ir.TensorProtocol, base: str | None
    ) -> None:
        """Give input `pos` of `node` the constant `array`.

        In place when only this node reads the initializer (and it is no graph input or
        output, and the model is IR >= 4); otherwise a new initializer named from `base` (or
        the old name) + "_bnfold", so that no other reader sees a changed value. `array` may
        be a tensor computed when the model is written (`bn_onnx.fold.lazy.scaled`).
        """
        old = node.inputs[pos] if pos < len(node.inputs) else None
        if (
            old is not None
            and self.scopes.function_input(old) is not None
            and scopes.write_through(self, node, pos, old, _array(array), base)
        ):
            return  # a function input: the callers' initializers were rewritten
        if (
            old is not None
            and old.is_initializer()
            and not old.is_graph_input()
            and not old.is_graph_output()
            and not self.legacy_inputs
            and list(old.uses()) == [(node, pos)]
        ):
            tensor = _tensor(array, old.name)
            old.const_value = tensor
            if old.dtype != tensor.dtype:
                old.type = ir.TensorType(tensor.dtype)
            dims = tuple(tensor.shape.numpy())
            if old.shape is None or old.shape.dims != dims:  # a broadcast C may grow
                old.shape = ir.Shape(dims)
            self._remember(old, array)
            return
        stem = old.name if old is not None and old.name else f"{node.name or node.op_type}_bias"
        new = self.add_initializer(array, f"{base or stem}_bnfold")
        if pos >= len(node.inputs):
            node.resize_inputs(pos + 1)
        node.replace_input_with(pos, new)
        if old is not None:
            self.candidates.append(old)

    def _remember(self, value: ir.Value, array: np.ndarray | ir.TensorProtocol) -> None:
        if isinstance(array, np.ndarray):
            self.constants.remember(value, array)
        else:  # computed when written: read again (whole) if a later fold needs it
            self.constants.cache.pop(value, None)
            if isinstance(array, ScaledTensor):
                release_pages(array.weight)  # pages a plan read after the check

    def insert_bias_add(self, node: ir.Node, bias: np.ndarray) -> ir.Node:
        """Add `bias` to the node's first output with a new Add node after it; every reader
        (and the graph output, if it is one) reads the Add's output under the original name.
        Before opset 7 the Add gets `broadcast=1` (`bn_onnx.fold.legacy`)."""
        out = node.outputs[0]
        stem = node.name or out.name or node.op_type
        bias_value = self.add_initializer(bias, f"{stem}_bias_bnfold")
        name = out.name
        added = ir.Value(name=None, type=out.type, shape=out.shape)
        readers = list(out.uses())
        out.name = self.fresh(f"{name}_nobias")
        added.name = name
        add = ir.Node(
            "", "Add", [out, bias_value], outputs=[added], name=self.fresh(f"{stem}_bias")
        )
        legacy.mark_broadcast(self, add)  # Add-6 and older broadcast only with broadcast=1
        for user, index in readers:
            user.replace_input_with(index, added)
        graph = node.graph
        assert isinstance(graph, ir.Graph)
        if out.is_graph_output():
            for i, o in enumerate(graph.outputs):
                if o is out:
                    graph.outputs[i] = added
        graph.insert_after(node, add)
        return add

    def write_bias(self, node: ir.Node, add: tuple | None, bias: np.ndarray) -> None:
        """The folded bias of a MatMul: into its Add (input `add[1]` of node `add[0]`) when it
        has one, else a new Add after it; none for a pure scale (a Mul chain), whose bias is 0."""
        if add is not None:
            self.write_input(add[0], add[1], bias, None)
            self.mark_broadcast(add[0])
        elif bias.any():
            self.insert_bias_add(node, bias)

    def remove_site(self, site: AffineSite, *, keep_name: bool) -> None:
        """Remove the site's nodes; readers of y (and shape-only readers of a chain's inner
        values, which have x's shape) read x instead.

        `keep_name`: x takes y's name (and type, for a graph output), as when the node before
        the site now computes what the site computed.
        """
        x, y = site.x, site.y
        name, was_output = y.name, y.is_graph_output()
        y_type, y_shape = y.type, y.shape
        for node in site.nodes[:-1]:  # a chain's inner values: their shape-only readers
            for inner in node.outputs:
                for user, index in list(inner.uses()):
                    if user not in site.nodes:
                        user.replace_input_with(index, x)
        y.replace_all_uses_with(x, replace_graph_outputs=True)
        detached = [v for n in site.nodes for v in n.inputs if v is not None]
        site.graph.remove(site.nodes, safe=True)
        self.candidates.extend(detached)
        if keep_name:
            y.name = None
            x.name = name
            if was_output:  # the graph output keeps its declared type and shape
                x.type, x.shape = y_type, y_shape

    def mark_broadcast(self, node: ir.Node) -> None:
        """Before opset 7: `broadcast=1` on an Add or Gemm whose bias the fold wrote."""
        legacy.mark_broadcast(self, node)

    def set_attribute_float(self, node: ir.Node, name: str, value: float) -> None:
        node.attributes[name] = ir.AttrFloat32(name, value)

    def drop_attributes(self, node: ir.Node, names: tuple[str, ...]) -> None:
        for n in names:
            node.attributes.pop(n, None)

    # --- finishing
    def sweep(self) -> None:
        """Remove the initializers and constant nodes that the rewrites left without readers
        (and nothing else: a node that was dead in the input stays)."""
        todo = list(self.candidates)
        self.candidates.clear()
        evaluated = self.constants.nodes
        while todo:
            value = todo.pop()
            if value.uses() or value.is_graph_output() or self.is_graph_input(value):
                continue
            graph = value.graph
            if value.is_initializer():
                if isinstance(graph, ir.Graph) and graph.initializers.get(value.name) is value:
                    graph.initializers.pop(value.name)
                    if value.is_graph_input():  # IR < 4
                        graph.inputs.remove(value)
                continue
            node = value.producer()
            if node is None or node.graph is None or node not in evaluated:
                continue
            if any(o.uses() or o.is_graph_output() for o in node.outputs):
                continue
            inputs = [v for v in node.inputs if v is not None]
            node.graph.remove(node, safe=True)
            todo.extend(inputs)


def _tensor(array: np.ndarray | ir.TensorProtocol, name: str | None) -> ir.TensorProtocol:
    """An onnx-ir tensor named `name`: the array wrapped, or the tensor itself, renamed."""
    if isinstance(array, np.ndarray):
        return ir.Tensor(array, name=name)
    array.name = name
    return array


def _array(array: np.ndarray | ir.TensorProtocol) -> np.ndarray:
    """The values of a tensor computed when written (a function body's Constant, a caller's
    initializer), or the array itself."""
    return array if isinstance(array, np.ndarray) else array.numpy()
