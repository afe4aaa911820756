"""Hand-built ONNX MLPs for the service tests and their float64 oracle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def make_mlp(path: Path, n_in: int, hidden: int, n_out: int, *, task: str, seed: int = 0) -> dict:
    """Write an input-normalized one-hidden-layer MLP; return its float64 weights."""
    rng = np.random.default_rng(seed)
    w = {
        "mean": rng.uniform(0, 8, n_in),
        "inv_std": rng.uniform(0.1, 1.0, n_in),
        "W1": rng.normal(0, 0.3, (n_in, hidden)),
        "b1": rng.normal(0, 0.1, hidden),
        "W2": rng.normal(0, 0.3, (hidden, n_out)),
        "b2": rng.normal(0, 0.1, n_out),
    }
    w = {k: v.astype(np.float32) for k, v in w.items()}
    out_name = "logits" if task == "classification" else "prediction"
    nodes = [
        helper.make_node("Sub", ["input", "mean"], ["c"]),
        helper.make_node("Mul", ["c", "inv_std"], ["z"]),
        helper.make_node("Gemm", ["z", "W1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("Gemm", ["a", "W2", "b2"], [out_name]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", n_out])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    names = [f"digit {i}" for i in range(n_out)] if task == "classification" else None
    props = {
        "bn_onnx.folded": "true",
        "bn_onnx.task": task,
        "bn_onnx.class_names": json.dumps(names),
    }
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return {k: v.astype(np.float64) for k, v in w.items()} | {"names": names}


def forward(w: dict, X: np.ndarray) -> np.ndarray:
    """The float64 oracle: the same equations as the graph."""
    z = (np.asarray(X, np.float64) - w["mean"]) * w["inv_std"]
    return np.maximum(z @ w["W1"] + w["b1"], 0) @ w["W2"] + w["b2"]
