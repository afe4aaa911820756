"""Matching points of an MLP, for locating a divergence between a graph and its checkpoint.

A checkpoint's float64 forward and torch eval have no ONNX tensor names, so values are matched
by position in the chain instead: the input and the output of each activation, then the
output. These points exist in unfolded and folded graphs alike: a BN before an activation ends
up inside the linear layer's values, a BN after one is moved into the next linear layer, after
the activation's output. verify uses them only where one side is the checkpoint or torch;
graphs are compared with each other by tensor name (`bn_onnx.verify.locate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx

if TYPE_CHECKING:
    from bn_onnx.model_config import MLPConfig

# Nodes that start or continue an affine stage (linear layer, its bias, a batch norm).
_LINEAR_START = {"Gemm", "MatMul", "BatchNormalization"}
_LINEAR_CONT = {"Add", "Sub", "Identity", "Dropout", "Cast", "Reshape", "Flatten"}


@dataclass
class Tap:
    """A matching point of a graph: its label, the tensor holding it, the nodes leading to it."""

    label: str
    tensor: str
    nodes: list[str]


def find_taps(model: onnx.ModelProto) -> list[Tap]:
    """The matching points of an MLP-shaped graph, in chain order.

    For each activation (a run of nodes that are not Gemm/MatMul/bias/BN), its input
    ("block k pre-activation") and output ("block k activation"); finally the first graph
    output ("output"). Nodes that read no value derived from the input (constants, weight
    transposes) are ignored.
    """
    graph = model.graph
    init = {t.name for t in graph.initializer}
    dynamic = {i.name for i in graph.input if i.name not in init}
    taps: list[Tap] = []
    state = "linear"
    stage: list[str] = []
    last_act = ""
    k = 0
    for node in graph.node:
        dyn_in = [n for n in node.input if n in dynamic]
        if not dyn_in:
            continue
        dynamic.update(n for n in node.output if n)
        name = node.name or f"{node.op_type}#{len(stage)}"
        op = node.op_type
        if op in _LINEAR_START or (op in _LINEAR_CONT and state == "linear"):
            if state == "act":
                taps.append(Tap(f"block {k} activation", last_act, stage))
                stage, k = [], k + 1
            state = "linear"
        elif state == "linear":
            taps.append(Tap(f"block {k} pre-activation", dyn_in[0], stage))
            stage, state = [], "act"
        stage.append(name)
        if state == "act":
            last_act = node.output[0]
    out = graph.output[0].name
    if state == "act" and last_act != out:
        taps.append(Tap(f"block {k} activation", last_act, stage))
        stage = []
    taps.append(Tap("output", out, stage))
    return taps


def checkpoint_tap_nodes(config: MLPConfig) -> dict[str, list[str]]:
    """The checkpoint modules behind each matching point (`blocks.1.linear`, ...)."""
    n = len(config.hidden)
    nodes: dict[str, list[str]] = {}
    for i in range(n):
        pre = [f"blocks.{i}.linear"]
        if i == 0 and config.input_norm:
            pre.insert(0, "input_norm")
        if config.bn == "post" and i > 0:
            pre.insert(0, f"blocks.{i - 1}.bn")
        if config.bn == "pre":
            pre.append(f"blocks.{i}.bn")
        nodes[f"block {i} pre-activation"] = pre
        nodes[f"block {i} activation"] = [f"blocks.{i}.act"]
    out = ["head"]
    if config.bn == "post" and n:
        out.insert(0, f"blocks.{n - 1}.bn")
    if n == 0 and config.input_norm:
        out.insert(0, "input_norm")
    nodes["output"] = out
    return nodes
