"""The preprocessing of a tabular model as ONNX nodes, put in front of its exported network.

torch's exporter cannot take string inputs, so a tabular model is exported from its torch
part (inputs `numeric`: filled continuous columns and indicators, float32; `codes`: category
codes, int64) and `add_preprocessing` then gives the graph the raw inputs of
`bn_onnx.columns` and computes the torch part's inputs from them (graph surgery with onnx-ir):

    continuous [batch, k] float32 (NaN = missing)
      -> IsNaN -> Where(missing, fill, x)                     the filled columns
      -> Gather(missing, indicator columns) -> Cast(float)     the was-missing indicators
      -> Concat                                               = numeric
    categorical [batch, m] string ("" = missing)
      -> Split (one [batch, 1] column each)
      -> ai.onnx.ml LabelEncoder per column: vocabulary[k] -> 2 + k, "" -> 0, else 1
      -> Concat                                               = codes

Each kind's nodes are its `ColumnKind.graph` (`bn_onnx.column_kinds`). This is
`TabularSpec.preprocess` as a graph; only the standard domains ai.onnx and ai.onnx.ml. No torch.
"""

from __future__ import annotations

import onnx

from bn_onnx.column_kinds import TABULAR_KINDS
from bn_onnx.errors import UnsupportedModelError
from bn_onnx.tabular import TabularSpec


def add_preprocessing(model: onnx.ModelProto, spec: TabularSpec) -> onnx.ModelProto:
    """A copy of the exported torch part with the raw-column inputs and preprocessing in front.

    Args:
        model: The torch part as torch exported it: inputs `numeric` (when the model has
            continuous columns) and `codes` (when it has categorical ones), batch axis first.
        spec: The model's columns, fills, indicators and vocabularies.

    Returns:
        The model with inputs `continuous` float32 [batch, k] and/or `categorical` string
        [batch, m] (the batch dimension named as in `model`), and the ai.onnx.ml opset
        imported when there are categorical columns.

    Raises:
        UnsupportedModelError: `model`'s inputs are not the ones `spec` implies.
    """
    import onnx_ir as ir

    ir_model = ir.from_proto(model)
    graph = ir_model.graph
    old = {v.name: v for v in graph.inputs}
    if sorted(old) != sorted(spec.model_input_names):
        raise UnsupportedModelError(
            f"the exported network has inputs {sorted(old)}, the tabular columns need "
            f"{spec.model_input_names}"
        )
    batch = next(iter(old.values())).shape[0]
    tape = ir.tape.Tape()
    new_inputs: list[ir.Value] = []
    replacements: dict[str, ir.Value] = {}
    opsets: dict[str, int] = {}

    for kind in TABULAR_KINDS:
        width = spec.width(kind.name)
        if width:
            raw = ir.val(kind.name, ir.DataType(kind.onnx_type), [batch, width])
            new_inputs.append(raw)
            replacements[kind.model_input] = kind.graph(tape, ir, raw, spec)
            opsets.update(kind.opsets)

    for name, value in replacements.items():
        ir.convenience.replace_all_uses_with(old[name], value)
        old[name].name = f"{name}_unused"
    for name, value in replacements.items():
        value.name = name  # the torch part's inputs keep their names inside the graph
    graph.inputs.clear()
    graph.inputs.extend(new_inputs)
    first = next(iter(graph), None)
    if first is None:
        graph.extend(tape.nodes)
    else:
        graph.insert_before(first, tape.nodes)
    for init in tape.initializers:
        graph.register_initializer(init)
    for domain, version in opsets.items():
        ir_model.opset_imports[domain] = version
        graph.opset_imports[domain] = version
    return ir.to_proto(ir_model)
