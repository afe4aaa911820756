"""Seeded synthetic MLP graphs for benchmarks and tests, built with `onnx.helper`.

One network, three variants with the same weights:

- `"unfolded"`: Gemm -> BatchNormalization -> Relu per hidden block (or Gemm -> Relu -> BN with
  `bn="post"`), then a head Gemm;
- `"folded"`: the same network with each BN folded by hand in numpy float64 and rounded once
  to float32 (an oracle independent of `bn_onnx.fold`);
- `"no_bn"`: the unfolded network's Gemms with the BN nodes removed: the same shapes and op
  count as a perfect fold, the physical bound for folding.

Parameters of block `i` come from `numpy.random.default_rng([seed, i])`, so a block can be made
without the others: `write_mlp_external` builds multi-GB models one tensor at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bn_onnx.errors import UsageError

VARIANTS = ("unfolded", "folded", "no_bn")
PLACEMENTS = ("pre", "post")
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18
# onnxruntime 1.20+ reads IR 10; newer IR versions buy nothing for these graphs.
IR_VERSION = 10


@dataclass(frozen=True)
class BlockParams:
    """float32 parameters of one hidden block (`bn_*` are None for the head)."""

    weight: np.ndarray  # (out, in), used with transB=1 like torch.nn.Linear
    bias: np.ndarray
    bn_scale: np.ndarray | None = None
    bn_bias: np.ndarray | None = None
    bn_mean: np.ndarray | None = None
    bn_var: np.ndarray | None = None


def _check(widths: Sequence[int], variant: str, bn: str) -> list[int]:
    widths = [int(w) for w in widths]
    if len(widths) < 2 or any(w < 1 for w in widths):
        raise UsageError(f"widths must be >= 2 positive sizes (in, hidden..., out), got {widths}")
    if variant not in VARIANTS:
        raise UsageError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if bn not in PLACEMENTS:
        raise UsageError(f"bn must be one of {', '.join(PLACEMENTS)}, got {bn!r}")
    return widths


def block_params(widths: Sequence[int], i: int, seed: int = 0) -> BlockParams:
    """The float32 parameters of block `i` (the last index is the head, which has no BN).

    He-scaled weights keep activations near unit size through deep chains; BN statistics are
    far from the identity so that a fold that drops them is caught.
    """
    n_in, n_out = int(widths[i]), int(widths[i + 1])
    rng = np.random.default_rng([seed, i])
    weight = rng.standard_normal((n_out, n_in), dtype=np.float32)
    weight *= np.float32(np.sqrt(2.0 / n_in))
    bias = (0.1 * rng.standard_normal(n_out)).astype(np.float32)
    if i == len(widths) - 2:
        return BlockParams(weight, bias)
    return BlockParams(
        weight,
        bias,
        bn_scale=rng.uniform(0.5, 1.5, n_out).astype(np.float32),
        bn_bias=(0.2 * rng.standard_normal(n_out)).astype(np.float32),
        bn_mean=(0.3 * rng.standard_normal(n_out)).astype(np.float32),
        bn_var=rng.uniform(0.25, 4.0, n_out).astype(np.float32),
    )


def _bn_affine(p: BlockParams, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The BN as y = a*x + c, in float64."""
    a = p.bn_scale.astype(np.float64) / np.sqrt(p.bn_var.astype(np.float64) + eps)
    c = p.bn_bias.astype(np.float64) - a * p.bn_mean.astype(np.float64)
    return a, c


def _folded_gemms(
    widths: Sequence[int], seed: int, eps: float, bn: str
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield each Gemm's (weight, bias) of the folded network in float64, block by block."""
    n_blocks = len(widths) - 1
    carry: tuple[np.ndarray, np.ndarray] | None = None  # post-BN affine waiting for the next Gemm
    for i in range(n_blocks):
        p = block_params(widths, i, seed)
        w = p.weight.astype(np.float64)
        b = p.bias.astype(np.float64)
        if carry is not None:  # y = W (a*x + c) + b = (W*a) x + (W c + b)
            a, c = carry
            b = b + w @ c
            w = w * a[None, :]
            carry = None
        if p.bn_scale is not None:
            a, c = _bn_affine(p, eps)
            if bn == "pre":
                w = w * a[:, None]
                b = a * b + c
            else:
                carry = (a, c)
        yield w, b


def gemm_params(
    widths: Sequence[int],
    variant: str = "unfolded",
    *,
    seed: int = 0,
    eps: float = 1e-5,
    bn: str = "pre",
) -> Iterator[BlockParams]:
    """Yield each block's parameters as the given variant stores them, one block at a time."""
    widths = _check(widths, variant, bn)
    if variant == "folded":
        for w, b in _folded_gemms(widths, seed, eps, bn):
            yield BlockParams(w.astype(np.float32), b.astype(np.float32))
        return
    for i in range(len(widths) - 1):
        p = block_params(widths, i, seed)
        yield p if variant == "unfolded" else BlockParams(p.weight, p.bias)


def _node_specs(n_blocks: int, variant: str, bn: str, eps: float) -> list[onnx.NodeProto]:
    """The graph's nodes; initializer names follow `_tensor_names`."""
    nodes: list[onnx.NodeProto] = []
    x = INPUT_NAME
    for i in range(n_blocks):
        head = i == n_blocks - 1
        gemm_out = OUTPUT_NAME if head else f"block{i}.gemm"
        nodes.append(
            helper.make_node(
                "Gemm",
                [x, f"block{i}.weight", f"block{i}.bias"],
                [gemm_out],
                name=f"block{i}.gemm" if not head else "head",
                transB=1,
            )
        )
        if head:
            break
        x = gemm_out
        with_bn = variant == "unfolded"
        order = ["bn", "relu"] if bn == "pre" else ["relu", "bn"]
        for step in order:
            if step == "bn" and with_bn:
                out = f"block{i}.bn"
                nodes.append(
                    helper.make_node(
                        "BatchNormalization",
                        [
                            x,
                            f"block{i}.bn.scale",
                            f"block{i}.bn.bias",
                            f"block{i}.bn.mean",
                            f"block{i}.bn.var",
                        ],
                        [out],
                        name=f"block{i}.bn",
                        epsilon=eps,
                    )
                )
                x = out
            elif step == "relu":
                out = f"block{i}.relu"
                nodes.append(helper.make_node("Relu", [x], [out], name=f"block{i}.relu"))
                x = out
    return nodes


def _tensor_items(p: BlockParams, i: int) -> list[tuple[str, np.ndarray]]:
    items = [(f"block{i}.weight", p.weight), (f"block{i}.bias", p.bias)]
    if p.bn_scale is not None:
        items += [
            (f"block{i}.bn.scale", p.bn_scale),
            (f"block{i}.bn.bias", p.bn_bias),
            (f"block{i}.bn.mean", p.bn_mean),
            (f"block{i}.bn.var", p.bn_var),
        ]
    return items


def _model(
    widths: list[int],
    variant: str,
    bn: str,
    eps: float,
    opset: int,
    initializers: list[onnx.TensorProto],
) -> onnx.ModelProto:
    graph = helper.make_graph(
        _node_specs(len(widths) - 1, variant, bn, eps),
        f"mlp_{variant}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", widths[0]])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", widths[-1]])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="bn_onnx.graphs"
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(
        model,
        {
            "bn_onnx.folded": "true" if variant != "unfolded" else "false",
            "bn_onnx.task": "classification",
            "bn_onnx.synthetic": f"widths={widths} variant={variant} bn={bn}",
        },
    )
    return model


def build_mlp(
    widths: Sequence[int],
    variant: str = "unfolded",
    *,
    seed: int = 0,
    eps: float = 1e-5,
    bn: str = "pre",
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """Build an MLP `widths[0] -> ... -> widths[-1]` as an in-memory ONNX model.

    Args:
        widths: input width, hidden widths, output width (e.g. `[64, 128, 64, 10]`).
        variant: `"unfolded"`, `"folded"` or `"no_bn"` (see the module docstring).
        seed: picks the weights; the three variants of one seed share them.
        eps: the BatchNormalization epsilon.
        bn: `"pre"` (Gemm -> BN -> Relu) or `"post"` (Gemm -> Relu -> BN).
        opset: the default-domain opset.
    """
    widths = _check(widths, variant, bn)
    inits = [
        numpy_helper.from_array(arr, name)
        for i, p in enumerate(gemm_params(widths, variant, seed=seed, eps=eps, bn=bn))
        for name, arr in _tensor_items(p, i)
    ]
    model = _model(widths, variant, bn, eps, opset, inits)
    return model


def mlp_reference(
    widths: Sequence[int],
    x: np.ndarray,
    variant: str = "unfolded",
    *,
    seed: int = 0,
    eps: float = 1e-5,
    bn: str = "pre",
) -> np.ndarray:
    """numpy float64 forward of `build_mlp(widths, variant, ...)` from its float32 parameters.

    For `"unfolded"` this evaluates BN as written, (z - mean) / sqrt(var + eps) * scale + bias,
    not the folded affine map, so it checks the folded variant independently.
    """
    widths = _check(widths, variant, bn)
    h = np.asarray(x, dtype=np.float64)
    params = list(gemm_params(widths, variant, seed=seed, eps=eps, bn=bn))
    for i, p in enumerate(params):
        h = h @ p.weight.astype(np.float64).T + p.bias.astype(np.float64)
        if i == len(params) - 1:
            break
        if bn == "post":
            h = np.maximum(h, 0.0)
        if p.bn_scale is not None:
            var = p.bn_var.astype(np.float64)
            h = (h - p.bn_mean.astype(np.float64)) / np.sqrt(var + eps)
            h = h * p.bn_scale.astype(np.float64) + p.bn_bias.astype(np.float64)
        if bn == "pre":
            h = np.maximum(h, 0.0)
    return h


def model_nbytes(widths: Sequence[int], variant: str = "unfolded") -> int:
    """Bytes of float32 parameters the variant stores (for sizing large models)."""
    widths = _check(widths, variant, "pre")
    n = sum(widths[i] * widths[i + 1] + widths[i + 1] for i in range(len(widths) - 1))
    if variant == "unfolded":
        n += 4 * sum(widths[1:-1])
    return 4 * n


def write_mlp_external(
    path: str | os.PathLike[str],
    widths: Sequence[int],
    variant: str = "unfolded",
    *,
    seed: int = 0,
    eps: float = 1e-5,
    bn: str = "pre",
    opset: int = DEFAULT_OPSET,
    align: int = 4096,
) -> list[Path]:
    """Write `build_mlp(...)` to `path` with every tensor in `<name>.data` beside it.

    Tensors are generated and written one at a time, so a model far larger than memory can be
    built while holding about one layer. Offsets are aligned to `align` bytes (memory mapping).
    Returns the two files written. Not atomic: for tools and tests, not user outputs.
    """
    widths = _check(widths, variant, bn)
    p = Path(path)
    data_name = p.name + ".data"
    inits: list[onnx.TensorProto] = []
    with open(p.parent / data_name, "wb") as f:
        for i, params in enumerate(gemm_params(widths, variant, seed=seed, eps=eps, bn=bn)):
            for name, arr in _tensor_items(params, i):
                pad = (-f.tell()) % align
                if pad:
                    f.write(b"\0" * pad)
                offset = f.tell()
                raw = np.ascontiguousarray(arr, dtype="<f4")
                f.write(memoryview(raw).cast("B"))
                t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=arr.shape)
                t.data_location = TensorProto.EXTERNAL
                for key, value in (
                    ("location", data_name),
                    ("offset", str(offset)),
                    ("length", str(raw.nbytes)),
                ):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
                inits.append(t)
            del params
    model = _model(widths, variant, bn, eps, opset, inits)
    with open(p, "wb") as f:
        f.write(model.SerializeToString())
    return [p, p.parent / data_name]


# --- long chains: per-node work, not weights (it must stay linear in the graph's size) -------

CHAINS = ("identity", "muladd", "mlp")


def chain_model(
    kind: str, n: int, width: int = 4, *, initializers_as_inputs: bool = False
) -> onnx.ModelProto:
    """A graph of about `n` nodes in one chain from `input` to `output` (float32 [batch, width]).

    - `"identity"`: `n` Identity nodes (the cleanup removes all but one);
    - `"muladd"`: a Gemm, then `n - 1` per-channel Mul/Add nodes by seeded constants near 1 and
      0 (folded into the Gemm as one affine map);
    - `"mlp"`: Gemm -> BatchNormalization -> Relu blocks of width 8 and a head Gemm to `width`
      (`build_mlp`; its output is named `logits`).

    `initializers_as_inputs`: list every initializer as a graph input too, as old exporters do.

    Raises:
        UsageError: an unknown `kind` or `n` < 2.
    """
    if kind not in CHAINS or n < 2:
        raise UsageError(f"chain kind must be one of {', '.join(CHAINS)} and n >= 2")
    if kind == "mlp":
        model = build_mlp([8] * ((n - 1) // 3 + 1) + [width])
    else:
        model = _chain(kind, n, width)
    if initializers_as_inputs:
        for t in model.graph.initializer:
            model.graph.input.append(
                helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            )
    return model


def _chain(kind: str, n: int, width: int) -> onnx.ModelProto:
    names = ["input"] + [f"t{i}" for i in range(1, n)] + ["output"]
    if kind == "identity":
        nodes = [
            helper.make_node("Identity", [names[i]], [names[i + 1]], name=f"n{i}") for i in range(n)
        ]
        inits: list[onnx.TensorProto] = []
    else:
        rng = np.random.default_rng(0)
        w = rng.standard_normal((width, width)).astype(np.float32)
        inits = [numpy_helper.from_array(w, "W")]
        nodes = [helper.make_node("Gemm", ["input", "W"], [names[1]], name="n0")]
        for i in range(1, n):
            mul = i % 2 == 1
            c = (1.0 if mul else 0.0) + 1e-3 * rng.standard_normal(width)
            inits.append(numpy_helper.from_array(c.astype(np.float32), f"c{i}"))
            op = "Mul" if mul else "Add"
            nodes.append(helper.make_node(op, [names[i], f"c{i}"], [names[i + 1]], name=f"n{i}"))
    graph = helper.make_graph(
        nodes,
        f"{kind}_chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])
    model.ir_version = IR_VERSION
    return model
