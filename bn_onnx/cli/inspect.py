"""`bn-onnx inspect MODEL.onnx`: inputs, outputs, metadata, op counts and BN foldability."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from bn_onnx.cli._common import add_command

HELP = "show a model's inputs, outputs, metadata, ops and which BN nodes fold"
DESCRIPTION = """\
List the inputs and outputs (names, shapes, dtypes), metadata, opset, op counts and every
BatchNormalization node (in subgraphs and model-local functions too, with where it sits)
with whether `bn-onnx fold` folds it, and why not."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(subparsers, "inspect", HELP, DESCRIPTION)
    p.add_argument("model", metavar="MODEL.onnx", help="the model to inspect")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def _value(vi: Any) -> dict[str, Any]:
    from onnx import helper

    tt = vi.type.tensor_type
    dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else "?"
    shape: list[Any] | None = None
    if tt.HasField("shape"):
        shape = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim
        ]
    return {"name": vi.name, "dtype": dtype, "shape": shape}


def describe_model(model: Any) -> dict[str, Any]:
    """Everything `inspect` shows, as a JSON-able dict."""
    from bn_onnx.fold import inspect_model

    # First: the fold pass checks the model (as fold does) before anything reads its fields.
    batch_norm = [b.to_dict() for b in inspect_model(model)]
    g = model.graph
    stored = {t.name for t in g.initializer}  # once: old exporters list each also as an input
    return {
        "ir_version": model.ir_version,
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [_value(v) for v in g.input if v.name not in stored],
        "outputs": [_value(v) for v in g.output],
        "metadata": {p.key: p.value for p in model.metadata_props},
        "ops": dict(sorted(Counter(n.op_type for n in g.node).items())),
        "n_nodes": len(g.node),
        "n_initializers": len(g.initializer),
        "functions": [
            {
                "function": f"{f.domain}::{f.name}",
                "inputs": list(f.input),
                "outputs": list(f.output),
                "ops": dict(sorted(Counter(n.op_type for n in f.node).items())),
            }
            for f in model.functions
        ],
        "batch_norm": batch_norm,
    }


def text_lines(info: dict[str, Any], path: str) -> list[str]:
    """The human-readable form of `describe_model`."""
    from bn_onnx.fold.report import located

    def shape(v: dict[str, Any]) -> str:
        return "?" if v["shape"] is None else "[" + ", ".join(map(str, v["shape"])) + "]"

    opset = ", ".join(f"{d} {v}" for d, v in info["opset"].items())
    lines = [f"{path}: IR {info['ir_version']}, opset {opset}, {info['producer'] or 'no producer'}"]
    lines.append("inputs:")
    lines += [f"  {v['name']}  {v['dtype']}{shape(v)}" for v in info["inputs"]]
    lines.append("outputs:")
    lines += [f"  {v['name']}  {v['dtype']}{shape(v)}" for v in info["outputs"]]
    if info["metadata"]:
        lines.append("metadata:")
        for k, v in info["metadata"].items():
            short = v if len(v) <= 70 else v[:67] + "..."
            lines.append(f"  {k} = {short}")
    ops = ", ".join(f"{op} {n}" for op, n in info["ops"].items())
    lines.append(f"ops ({info['n_nodes']} nodes, {info['n_initializers']} initializers): {ops}")
    if info["functions"]:
        lines.append("functions:")
        for f in info["functions"]:
            ops = ", ".join(f"{op} {n}" for op, n in f["ops"].items())
            sig = f"({', '.join(f['inputs'])}) => ({', '.join(f['outputs'])})"
            lines.append(f"  {f['function']} {sig}: {ops}")
    sites = info["batch_norm"]
    kinds = ["BatchNormalization"] + sorted({b["kind"] for b in sites} - {"BatchNormalization"})
    for kind in kinds:  # BN nodes, then other affine sites (Mul/Add chains)
        bns = [b for b in sites if b["kind"] == kind]
        n_fold = sum(b["foldable"] for b in bns)
        lines.append(f"{kind}: {len(bns)}, {n_fold} foldable")
        for b in bns:
            at = located(b.get("where"))
            if b["foldable"]:
                lines.append(f"  foldable  {b['node']}{at}  {b['direction']} -> {b['target']}")
            else:
                lines.append(f"  kept      {b['node']}{at}: {b['reason']}")
    return lines


def run(args: argparse.Namespace) -> int:
    from bn_onnx.onnx_io import load_model

    model = load_model(args.model, check=False)  # the fold pass checks it (as fold does)
    info = describe_model(model)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print("\n".join(text_lines(info, args.model)))
    return 0
