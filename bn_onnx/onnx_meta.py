"""bn-onnx's ONNX metadata keys and small graph queries shared by export, fold and inspect.

No torch: this module is safe to import from the torch-free layers.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import onnx

# metadata_props keys written on every file bn-onnx exports.
PRODUCER_VERSION = "bn_onnx.producer_version"
FOLDED = "bn_onnx.folded"
TASK = "bn_onnx.task"
CONFIG = "bn_onnx.config"
PREPROCESSING = "bn_onnx.preprocessing"
CLASS_NAMES = "bn_onnx.class_names"
METADATA_KEYS = (PRODUCER_VERSION, FOLDED, TASK, CONFIG, PREPROCESSING, CLASS_NAMES)

INPUT_NAME = "input"
OUTPUT_NAMES = {"classification": "logits", "regression": "prediction"}


def get_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The model's metadata_props as a dict (a repeated key keeps its last value)."""
    return {p.key: p.value for p in model.metadata_props}


def set_metadata(model: onnx.ModelProto, values: Mapping[str, str]) -> None:
    """Set metadata_props in place: keys in `values` are replaced, other keys are kept."""
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    for key, value in [*kept, *values.items()]:
        model.metadata_props.add(key=key, value=str(value))


def json_value(value: Any) -> str:
    """Compact, key-ordered JSON for a metadata value (`None` becomes "null")."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of `graph` and of the subgraphs in its nodes' attributes, depth first."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_nodes(sub)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each op type the model holds (subgraphs included), by op name."""
    return dict(sorted(Counter(n.op_type for n in iter_nodes(model.graph)).items()))


def bn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The model's BatchNormalization nodes of the default ONNX domain (subgraphs included)."""
    return [
        n
        for n in iter_nodes(model.graph)
        if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")
    ]


def bn_training_mode(node: onnx.NodeProto) -> int:
    """A BatchNormalization node's `training_mode` attribute (0 when absent)."""
    for attr in node.attribute:
        if attr.name == "training_mode":
            return int(attr.i)
    return 0
