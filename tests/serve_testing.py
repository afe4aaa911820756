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


# --- a tabular model that follows the bn_onnx.columns seam -----------------------------------

# Training-file order; the target is not a column. Codes inside the graph: 0 unknown, 1 missing,
# 2.. the vocabulary.
TABULAR_COLUMNS = [
    {"name": "age", "kind": "continuous", "input": "continuous", "index": 0, "fill": 41.0},
    {
        "name": "city",
        "kind": "categorical",
        "input": "categorical",
        "index": 0,
        "vocabulary": ["Busan", "Seoul", "Incheon"],
    },
    {"name": "income", "kind": "continuous", "input": "continuous", "index": 1, "fill": 3.5},
    {
        "name": "grade",
        "kind": "categorical",
        "input": "categorical",
        "index": 1,
        "vocabulary": ["1", "2", "3", "4"],
    },
]


def make_tabular(path: Path, *, hidden: int = 16, n_out: int = 3, seed: int = 0) -> dict:
    """Write a tabular classifier with the raw-column inputs of `bn_onnx.columns`.

    Inputs `continuous` float32 [batch, 2] (NaN = missing) and `categorical` string [batch, 2]
    ("" = missing). Inside: Where(IsNaN) fill, missing indicators, a normalization, ai.onnx.ml
    LabelEncoder per categorical column (unseen -> code 0, "" -> 1), Gather from an embedding
    table, Concat, Gemm -> Relu -> Gemm. Returns the float64 weights and the schema.
    """
    rng = np.random.default_rng(seed)
    cont = [c for c in TABULAR_COLUMNS if c["kind"] == "continuous"]
    cats = [c for c in TABULAR_COLUMNS if c["kind"] == "categorical"]
    n_cont = len(cont)
    w: dict = {
        "fill": np.array([c["fill"] for c in cont], np.float32),
        "mean": rng.uniform(0, 50, n_cont).astype(np.float32),
        "inv_std": rng.uniform(0.02, 0.5, n_cont).astype(np.float32),
    }
    dims = [3, 2]
    width = 2 * n_cont + sum(dims)
    for j, (c, d) in enumerate(zip(cats, dims, strict=True)):
        w[f"emb{j}"] = rng.normal(0, 1, (len(c["vocabulary"]) + 2, d)).astype(np.float32)
    w["W1"] = rng.normal(0, 0.4, (width, hidden)).astype(np.float32)
    w["b1"] = rng.normal(0, 0.1, hidden).astype(np.float32)
    w["W2"] = rng.normal(0, 0.4, (hidden, n_out)).astype(np.float32)
    w["b2"] = rng.normal(0, 0.1, n_out).astype(np.float32)
    nodes = [
        helper.make_node("IsNaN", ["continuous"], ["isnan"]),
        helper.make_node("Where", ["isnan", "fill", "continuous"], ["filled"]),
        helper.make_node("Cast", ["isnan"], ["indicator"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["filled", "mean"], ["centred"]),
        helper.make_node("Mul", ["centred", "inv_std"], ["normed"]),
        helper.make_node(
            "Split",
            ["categorical"],
            [f"cat{j}" for j in range(len(cats))],
            axis=1,
            num_outputs=len(cats),
        ),
    ]
    parts = ["normed", "indicator"]
    for j, c in enumerate(cats):
        vocab = list(c["vocabulary"])
        nodes += [
            helper.make_node(
                "LabelEncoder",
                [f"cat{j}"],
                [f"code{j}"],
                domain="ai.onnx.ml",
                keys_strings=["", *vocab],
                values_int64s=list(range(1, len(vocab) + 2)),
                default_int64=0,
            ),
            helper.make_node("Gather", [f"emb{j}", f"code{j}"], [f"gathered{j}"], axis=0),
            helper.make_node("Flatten", [f"gathered{j}"], [f"embedded{j}"], axis=1),
        ]
        parts.append(f"embedded{j}")
    nodes += [
        helper.make_node("Concat", parts, ["features"], axis=1),
        helper.make_node("Gemm", ["features", "W1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tabular",
        [
            helper.make_tensor_value_info("continuous", TensorProto.FLOAT, ["batch", n_cont]),
            helper.make_tensor_value_info("categorical", TensorProto.STRING, ["batch", len(cats)]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_out])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.onnx.ml", 3)]
    )
    model.ir_version = 10
    names = [f"class {i}" for i in range(n_out)]
    props = {
        "bn_onnx.folded": "true",
        "bn_onnx.task": "classification",
        "bn_onnx.class_names": json.dumps(names),
        "bn_onnx.columns": json.dumps(TABULAR_COLUMNS),
    }
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return {k: v.astype(np.float64) for k, v in w.items()} | {"names": names}


def tabular_records(n: int, seed: int = 0) -> list[dict]:
    """Rows by column name with missing cells, an unseen city and integer grades."""
    rng = np.random.default_rng(seed)
    cities = ["Busan", "Seoul", "Incheon", "Daegu", None, " Seoul "]
    rows = []
    for _ in range(n):
        age = None if rng.random() < 0.15 else round(float(rng.uniform(18, 80)), 2)
        income = None if rng.random() < 0.15 else round(float(rng.lognormal(1, 0.5)), 3)
        grade = None if rng.random() < 0.1 else int(rng.integers(1, 6))  # 5 is unseen
        rows.append(
            {
                "age": age,
                "city": cities[rng.integers(len(cities))],
                "income": income,
                "grade": grade,
            }
        )
    return rows


def bare_tabular(path: Path, records: list[dict]) -> np.ndarray:
    """A bare onnxruntime session fed through bn_onnx.columns.feeds_from_columns: the
    reference a tabular model's readers (run, serve, Predictor) are compared with."""
    import onnxruntime as ort

    from bn_onnx.columns import feeds_from_columns, read_columns

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    columns = read_columns(sess.get_modelmeta().custom_metadata_map)
    data = {c.name: [r.get(c.name) for r in records] for c in columns}
    return sess.run(None, feeds_from_columns(columns, data))[0]


def tabular_forward(w: dict, records: list[dict]) -> np.ndarray:
    """The float64 oracle for `make_tabular`: the preprocessing in Python, then the MLP."""
    cont = [c for c in TABULAR_COLUMNS if c["kind"] == "continuous"]
    cats = [c for c in TABULAR_COLUMNS if c["kind"] == "categorical"]
    rows = []
    for r in records:
        values = [_number(r.get(c["name"])) for c in cont]
        missing = [v is None for v in values]
        filled = [c["fill"] if m else v for c, v, m in zip(cont, values, missing, strict=True)]
        x = list((np.array(filled) - w["mean"]) * w["inv_std"]) + [float(m) for m in missing]
        for j, c in enumerate(cats):
            text = _text(r.get(c["name"]))
            code = (
                1
                if text == ""
                else (c["vocabulary"].index(text) + 2 if text in c["vocabulary"] else 0)
            )
            x += list(w[f"emb{j}"][code])
        rows.append(x)
    X = np.array(rows, np.float64)
    return np.maximum(X @ w["W1"] + w["b1"], 0) @ w["W2"] + w["b2"]


def _number(v: object) -> float | None:
    """A continuous cell as the seam reads it: None, NaN and blank text are missing."""
    if isinstance(v, str):
        v = v.strip()
        if not v:
            return None
    if v is None:
        return None
    x = float(v)  # type: ignore[arg-type]
    return None if np.isnan(x) else x


def _text(v: object) -> str:
    """A categorical cell as the seam reads it: integral numbers as integers, "" if missing."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()
