"""Helpers for the export tests: random trained-looking checkpoints and onnxruntime runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ATOL, RTOL = 1e-5, 1e-4


def randomize_bn(model, seed: int) -> None:
    """Give every BN non-trivial statistics and affine parameters, as training would."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=gen))
                mod.running_var.copy_(torch.rand(n, generator=gen) * 2.5 + 0.25)
                if mod.affine:
                    mod.weight.copy_(torch.randn(n, generator=gen) * 0.5 + 1.0)
                    mod.bias.copy_(torch.randn(n, generator=gen) * 0.5)


def random_checkpoint(path: Path, seed: int = 0, **config) -> Path:
    """Write a checkpoint of a random `MLP(MLPConfig(**config))` with random BN statistics."""
    import torch

    from bn_onnx.checkpoint import save_checkpoint
    from bn_onnx.model import MLP, MLPConfig

    torch.manual_seed(seed)
    cfg = MLPConfig(**config)
    model = MLP(cfg)
    randomize_bn(model, seed)
    classes = (
        [f"class{i}" for i in range(cfg.out_features)] if cfg.task == "classification" else None
    )
    meta = {
        "class_names": classes,
        "preprocessing": {"input": "raw features", "normalization": "inside the model"},
        "dataset": {"name": "synthetic", "seed": seed},
    }
    return save_checkpoint(model.eval(), path, meta=meta)


def run_ort(path_or_model, x: np.ndarray) -> np.ndarray:
    """The model's only output for `x` on onnxruntime's CPU provider (all optimizations)."""
    src = (
        path_or_model.SerializeToString()
        if isinstance(path_or_model, onnx.ModelProto)
        else str(path_or_model)
    )
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def bn_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)
