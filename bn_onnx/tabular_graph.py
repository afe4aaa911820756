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

This is `TabularSpec.preprocess` as a graph; only the standard domains ai.onnx and
ai.onnx.ml. No torch.
"""

from __future__ import annotations

import numpy as np
import onnx

from bn_onnx.columns import CATEGORICAL, CONTINUOUS, MISSING_TEXT
from bn_onnx.errors import UnsupportedModelError
from bn_onnx.tabular import (
    CODES_INPUT,
    FIRST_CATEGORY_CODE,
    MISSING_CODE,
    NUMERIC_INPUT,
    UNKNOWN_CODE,
    TabularSpec,
)

ML_DOMAIN = "ai.onnx.ml"
# LabelEncoder with keys_strings / values_int64s / default_int64 is ai.onnx.ml version 2;
# ai.onnx.ml opset 3 still resolves to it, and onnxruntime runs it.
ML_OPSET = 3


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

    if spec.n_continuous:
        cont = ir.val(CONTINUOUS, ir.DataType.FLOAT, [batch, spec.n_continuous])
        new_inputs.append(cont)
        fills = np.array([c.fill for c in spec.continuous], dtype=np.float32)
        fill = tape.initializer(ir.tensor(fills, name="tabular_fill_values"))
        missing = tape.op("IsNaN", [cont], name="tabular_missing")
        missing.name = "continuous_missing"
        filled = tape.op("Where", [missing, fill, cont], name="tabular_fill")
        filled.name = "continuous_filled"
        parts = [filled]
        if spec.indicators:
            indices = spec.indicator_indices
            chosen = missing
            if indices != list(range(spec.n_continuous)):
                cols = tape.initializer(
                    ir.tensor(np.array(indices, dtype=np.int64), name="tabular_indicator_columns")
                )
                chosen = tape.op("Gather", [missing, cols], {"axis": 1}, name="tabular_indicators")
                chosen.name = "indicator_missing"
            indicators = tape.op("Cast", [chosen], {"to": ir.DataType.FLOAT}, name="tabular_cast")
            indicators.name = "indicators"
            parts.append(indicators)
        numeric = (
            tape.op("Concat", parts, {"axis": 1}, name="tabular_numeric")
            if len(parts) > 1
            else filled
        )
        replacements[NUMERIC_INPUT] = numeric

    if spec.n_categorical:
        cat = ir.val(CATEGORICAL, ir.DataType.STRING, [batch, spec.n_categorical])
        new_inputs.append(cat)
        columns = spec.categorical
        if len(columns) > 1:
            split = tape.op_multi_out(
                "Split",
                [cat],
                {"axis": 1, "num_outputs": len(columns)},
                num_outputs=len(columns),
                name="tabular_split",
            )
            for col, value in zip(columns, split, strict=True):
                value.name = f"categorical_{col.index}"
        else:
            split = [cat]
        codes = []
        for col, text in zip(columns, split, strict=True):
            vocab = list(col.vocabulary or ())
            codes.append(
                tape.op(
                    "LabelEncoder",
                    [text],
                    {
                        "keys_strings": [*vocab, MISSING_TEXT],
                        "values_int64s": [FIRST_CATEGORY_CODE + k for k in range(len(vocab))]
                        + [MISSING_CODE],
                        "default_int64": UNKNOWN_CODE,
                    },
                    domain=ML_DOMAIN,
                    name=f"tabular_codes_{col.index}",
                )
            )
            codes[-1].name = f"codes_{col.index}"
        replacements[CODES_INPUT] = (
            tape.op("Concat", codes, {"axis": 1}, name="tabular_codes")
            if len(codes) > 1
            else codes[0]
        )

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
    if spec.n_categorical:
        ir_model.opset_imports[ML_DOMAIN] = ML_OPSET
        graph.opset_imports[ML_DOMAIN] = ML_OPSET
    return ir.to_proto(ir_model)
