"""Test models for runtime/verify/reference: checkpoints from real datasets, ONNX built by hand.

The ONNX graphs are written here with `onnx.helper` straight from checkpoint tensors - unfolded
(BatchNormalization nodes) and folded in numpy float64 - so the runtime tests do not depend on
the exporter or the fold pass. The tests at the bottom check these builders themselves.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bn_onnx.model_config import MLPConfig

DATASETS = ("iris", "wine", "breast-cancer", "digits")


def dataset(name: str) -> tuple[np.ndarray, list[str]]:
    """Raw float32 features and class names of a small sklearn dataset."""
    from sklearn import datasets

    loader = {
        "iris": datasets.load_iris,
        "wine": datasets.load_wine,
        "breast-cancer": datasets.load_breast_cancer,
        "digits": datasets.load_digits,
    }[name]
    d = loader()
    names = [str(n) for n in getattr(d, "target_names", range(int(d.target.max()) + 1))]
    return d.data.astype(np.float32), names


def make_tensors(config: MLPConfig, x: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """A checkpoint state_dict: torch's init, input stats from `x`, BN stats from `x`'s batches.

    BN running statistics are the real batch statistics of the data flowing through the net,
    and gamma/beta are moved off 1/0, so that dropping or misplacing a BN changes the output.
    """
    import torch

    from bn_onnx.model import MLP

    torch.manual_seed(seed)
    model = MLP(config)
    if config.input_norm:
        model.set_input_stats(x.mean(0), x.var(0))
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for block in model.blocks:
            if config.bn != "none":
                block.bn.momentum = None  # cumulative average over the batches below
                block.bn.weight.copy_(
                    torch.from_numpy(
                        rng.uniform(0.5, 1.5, block.bn.num_features).astype(np.float32)
                    )
                )
                block.bn.bias.copy_(
                    torch.from_numpy(
                        (0.2 * rng.standard_normal(block.bn.num_features)).astype(np.float32)
                    )
                )
        model.train()
        xt = torch.from_numpy(x)
        for part in torch.tensor_split(xt, 3):
            model(part)
    model.eval()
    from bn_onnx.checkpoint import state_dict_to_numpy

    return state_dict_to_numpy(model)


def dataset_checkpoint(
    tmp_path: Path,
    dataset_name: str = "iris",
    *,
    name: str = "ckpt",
    seed: int = 0,
    **config_kwargs,
) -> tuple[Path, MLPConfig, dict[str, np.ndarray], np.ndarray, list[str]]:
    """Write a checkpoint directory for an MLP on `dataset_name`; return it and its parts."""
    from bn_onnx.checkpoint import write_checkpoint_files

    x, classes = dataset(dataset_name)
    config_kwargs.setdefault("hidden", (16, 12))
    config = MLPConfig(in_features=x.shape[1], out_features=len(classes), **config_kwargs)
    tensors = make_tensors(config, x, seed)
    path = write_checkpoint_files(tmp_path / name, config, tensors, {"class_names": classes})
    return path, config, tensors, x, classes


def _act_nodes(kind: str, x: str, out: str, prefix: str) -> tuple[list[onnx.NodeProto], list]:
    """Activation nodes; gelu and silu are decomposed the way exporters write them at opset 18."""
    if kind == "relu":
        return [helper.make_node("Relu", [x], [out], name=prefix)], []
    if kind == "tanh":
        return [helper.make_node("Tanh", [x], [out], name=prefix)], []
    if kind == "sigmoid":
        return [helper.make_node("Sigmoid", [x], [out], name=prefix)], []
    if kind == "silu":
        return [
            helper.make_node("Sigmoid", [x], [prefix + ".sig"], name=prefix + ".sigmoid"),
            helper.make_node("Mul", [x, prefix + ".sig"], [out], name=prefix + ".mul"),
        ], []
    if kind == "gelu":
        consts = [
            numpy_helper.from_array(np.array(math.sqrt(2.0), np.float32), prefix + ".sqrt2"),
            numpy_helper.from_array(np.array(1.0, np.float32), prefix + ".one"),
            numpy_helper.from_array(np.array(0.5, np.float32), prefix + ".half"),
        ]
        return [
            helper.make_node("Div", [x, prefix + ".sqrt2"], [prefix + ".d"], name=prefix + ".div"),
            helper.make_node("Erf", [prefix + ".d"], [prefix + ".e"], name=prefix + ".erf"),
            helper.make_node(
                "Add", [prefix + ".e", prefix + ".one"], [prefix + ".a"], name=prefix + ".add"
            ),
            helper.make_node("Mul", [x, prefix + ".a"], [prefix + ".m"], name=prefix + ".mul"),
            helper.make_node(
                "Mul", [prefix + ".m", prefix + ".half"], [out], name=prefix + ".half"
            ),
        ], consts
    raise ValueError(kind)


def _affine(t: dict[str, np.ndarray], prefix: str, eps: float, affine: bool = True):
    """BN as y = a*x + c in float64."""
    mean = t[prefix + "running_mean"].astype(np.float64)
    var = t[prefix + "running_var"].astype(np.float64)
    a = 1.0 / np.sqrt(var + eps)
    if affine:
        a = a * t[prefix + "weight"].astype(np.float64)
        c = t[prefix + "bias"].astype(np.float64) - a * mean
    else:
        c = -a * mean
    return a, c


def build_onnx(
    config: MLPConfig,
    tensors: dict[str, np.ndarray],
    *,
    folded: bool,
    class_names: list[str] | None = None,
    opset: int = 18,
) -> onnx.ModelProto:
    """The checkpoint as an ONNX graph: BN nodes kept (`folded=False`) or folded in float64."""
    t = tensors
    eps = config.bn_eps
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    def bn_node(x: str, prefix: str, affine: bool = True) -> str:
        n = prefix.rstrip(".")
        c = config.in_features if n == "input_norm" else len(t[prefix + "running_mean"])
        scale = t[prefix + "weight"] if affine else np.ones(c, np.float32)
        bias = t[prefix + "bias"] if affine else np.zeros(c, np.float32)
        ins = [
            x,
            init(prefix + "scale", scale),
            init(prefix + "b", bias),
            init(prefix + "mean", t[prefix + "running_mean"]),
            init(prefix + "var", t[prefix + "running_var"]),
        ]
        nodes.append(helper.make_node("BatchNormalization", ins, [n + ".out"], name=n, epsilon=eps))
        return n + ".out"

    layers = [(f"blocks.{i}.linear", f"blocks.{i}.bn.") for i in range(len(config.hidden))]
    layers.append(("head", None))
    x = "input"
    carry = None  # (a, c) of a BN waiting to be folded into the next linear layer
    if config.input_norm:
        if folded:
            carry = _affine(t, "input_norm.", eps, affine=False)
        else:
            x = bn_node(x, "input_norm.", affine=False)
    for i, (lin, bnp) in enumerate(layers):
        w = t[lin + ".weight"].astype(np.float64)
        b = t[lin + ".bias"].astype(np.float64)
        if folded and carry is not None:
            a, c = carry
            b = b + w @ c
            w = w * a[None, :]
            carry = None
        has_bn = bnp is not None and config.bn != "none"
        if folded and has_bn and config.bn == "pre":
            a, c = _affine(t, bnp, eps)
            w = w * a[:, None]
            b = a * b + c
        out = "logits" if bnp is None else f"{lin}.out"
        nodes.append(
            helper.make_node(
                "Gemm", [x, init(lin + ".w", w), init(lin + ".b", b)], [out], name=lin, transB=1
            )
        )
        x = out
        if bnp is None:
            break
        if has_bn and config.bn == "pre" and not folded:
            x = bn_node(x, bnp)
        act_out = f"blocks.{i}.act.out"
        act, consts = _act_nodes(config.activation, x, act_out, f"blocks.{i}.act")
        nodes += act
        inits += consts
        x = act_out
        if has_bn and config.bn == "post":
            if folded:
                carry = _affine(t, bnp, eps)
            else:
                x = bn_node(x, bnp)
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", config.in_features])],
        [
            helper.make_tensor_value_info(
                "logits", TensorProto.FLOAT, ["batch", config.out_features]
            )
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    helper.set_model_props(
        model,
        {
            "bn_onnx.folded": "true" if folded else "false",
            "bn_onnx.task": config.task,
            "bn_onnx.class_names": __import__("json").dumps(class_names),
        },
    )
    return model


def write_pair(tmp_path: Path, config, tensors, classes=None) -> tuple[Path, Path]:
    """Save the unfolded and folded graphs; return their paths."""
    u, f = tmp_path / "model.onnx", tmp_path / "model.folded.onnx"
    onnx.save(build_onnx(config, tensors, folded=False, class_names=classes), u)
    onnx.save(build_onnx(config, tensors, folded=True, class_names=classes), f)
    return u, f


def perturb(path: Path, tensor: str, out: Path, delta: float = 0.05) -> Path:
    """Copy an ONNX file with one element of initializer `tensor` changed by `delta`."""
    model = onnx.load(path)
    for t in model.graph.initializer:
        if t.name == tensor:
            arr = numpy_helper.to_array(t).copy()
            arr.flat[arr.size // 2] += delta
            t.CopyFrom(numpy_helper.from_array(arr, tensor))
            break
    else:
        raise KeyError(tensor)
    onnx.save(model, out)
    return out


# ---- the builders themselves ----------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh", "sigmoid"])
@pytest.mark.parametrize("bn", ["pre", "post", "none"])
def test_hand_built_graphs_are_valid_and_folded_ones_have_no_bn(bn, activation):
    config = MLPConfig(in_features=5, out_features=3, hidden=(6, 4), bn=bn, activation=activation)
    x = np.random.default_rng(0).standard_normal((40, 5)).astype(np.float32)
    tensors = make_tensors(config, x)
    for folded in (False, True):
        model = build_onnx(config, tensors, folded=folded)
        onnx.checker.check_model(model, full_check=True)
        n_bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
        expected = 0 if folded else (1 + 2 * (bn != "none"))
        assert n_bn == expected


def test_bn_statistics_are_far_from_identity_so_a_dropped_bn_shows():
    config = MLPConfig(in_features=4, out_features=3, hidden=(8,))
    x, _ = dataset("iris")
    t = make_tensors(config, x)
    assert np.abs(t["blocks.0.bn.running_mean"]).max() > 0.05
    assert np.abs(t["blocks.0.bn.running_var"] - 1).max() > 0.05
    assert np.abs(t["input_norm.running_mean"] - x.mean(0)).max() < 1e-4
