"""The MLP with batch normalization that bn-onnx trains and exports.

State-dict names are a contract (see `bn_onnx.model_config.expected_tensor_shapes`):
`input_norm.*`, `blocks.{i}.linear.*`, `blocks.{i}.bn.*`, `head.*`, and for a tabular model
`embeddings.{j}.weight`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bn_onnx.errors import UsageError
from bn_onnx.model_config import (
    ACTIVATIONS,
    BN_PLACEMENTS,
    TASKS,
    MLPConfig,
    expected_tensor_shapes,
)

__all__ = [
    "ACTIVATIONS",
    "BN_PLACEMENTS",
    "TASKS",
    "MLP",
    "TabularMLP",
    "Block",
    "FrozenBatchNorm1d",
    "MLPConfig",
    "build_network",
    "expected_tensor_shapes",
    "make_activation",
]


def make_activation(name: str) -> nn.Module:
    """The activation module for one of `ACTIVATIONS`."""
    factories = {
        "relu": nn.ReLU,
        "gelu": nn.GELU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "silu": nn.SiLU,
    }
    if name not in factories:
        raise UsageError(f"unknown activation {name!r} (choose from {', '.join(ACTIVATIONS)})")
    return factories[name]()


class FrozenBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that always normalizes with its stored statistics.

    Used for the input normalization: its running statistics are the training set's mean and
    (population) variance, set once by `MLP.set_input_stats`, and `train()` never switches it
    to batch statistics, so training cannot change them. It exports like any BatchNorm1d.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.training = False

    def train(self, mode: bool = True) -> FrozenBatchNorm1d:
        """Stay in eval mode whatever `mode` is asked for."""
        return super().train(False)


class Block(nn.Module):
    """One hidden layer: linear, then BN and activation in the configured order, then dropout."""

    def __init__(self, in_features: int, out_features: int, config: MLPConfig) -> None:
        super().__init__()
        self.placement = config.bn
        self.linear = nn.Linear(in_features, out_features)
        if config.bn != "none":
            self.bn = nn.BatchNorm1d(out_features, eps=config.bn_eps, momentum=config.bn_momentum)
        self.act = make_activation(config.activation)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        if self.placement == "pre":
            x = self.act(self.bn(x))
        elif self.placement == "post":
            x = self.bn(self.act(x))
        else:
            x = self.act(x)
        return self.dropout(x)


class MLP(nn.Module):
    """x -> input_norm (optional, frozen) -> blocks -> head (logits or predictions)."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        if config.input_norm:
            # momentum 0 as a second guard: even a batch-stat forward would not move the stats.
            self.input_norm = FrozenBatchNorm1d(
                config.in_features, eps=config.bn_eps, momentum=0.0, affine=False
            )
        widths = (config.in_features, *config.hidden)
        self.blocks = nn.ModuleList(
            Block(widths[i], widths[i + 1], config) for i in range(len(config.hidden))
        )
        self.head = nn.Linear(widths[-1], config.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.input_norm:
            x = self.input_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    @torch.no_grad()
    def set_input_stats(self, mean: np.ndarray, var: np.ndarray) -> None:
        """Store the training set's per-feature mean and population variance in `input_norm`."""
        if not self.config.input_norm:
            raise UsageError("this model has no input normalization")
        n = self.config.in_features
        mean = np.asarray(mean, dtype=np.float64)
        var = np.asarray(var, dtype=np.float64)
        if mean.shape != (n,) or var.shape != (n,):
            raise UsageError(f"input statistics must have shape ({n},)")
        if not (np.isfinite(mean).all() and np.isfinite(var).all() and (var >= 0).all()):
            raise UsageError("input statistics must be finite with variance >= 0")
        self.input_norm.running_mean.copy_(torch.from_numpy(mean.astype(np.float32)))
        self.input_norm.running_var.copy_(torch.from_numpy(var.astype(np.float32)))


class TabularMLP(MLP):
    """fastai's TabularModel in bn-onnx's shape: embeddings per categorical column, then the MLP.

    forward(numeric, codes) (either left out when the model has no such columns; see
    `TabularSpec.model_input_names`): `numeric` float32 [batch, continuous + indicators] is
    what `TabularSpec.preprocess` (or the exported graph) makes of the raw continuous columns,
    `codes` int64 [batch, categorical] the category codes. The first layer reads
    `[embedding of each code..., numeric...]`.

    The input normalization (a frozen BatchNorm1d, as in `MLP`) spans that whole vector: its
    statistics are the training split's mean and variance for the continuous columns and
    mean 0, variance 1 for the indicators (`bn_onnx.train` sets them) and for the embedding
    columns, which it therefore scales by the constant
    1/sqrt(1 + eps) (the learned embeddings absorb it). fastai normalizes the continuous
    columns only, before the concatenation; normalizing after it keeps the BN next to the
    first Gemm, so that `bn-onnx fold` folds it there like a plain MLP's input normalization.
    Embedding rows start from N(0, 0.01) (fastai's `trunc_normal_(std=0.01)`), so the
    "unknown" row, which no training row uses, stays near zero.
    """

    def __init__(self, config: MLPConfig) -> None:
        super().__init__(config)
        spec = config.tabular
        if spec is None:
            raise UsageError("TabularMLP needs a model config with tabular columns")
        self.spec = spec
        self.embeddings = nn.ModuleList(
            nn.Embedding(rows, dim)
            for rows, dim in zip(spec.embedding_rows, spec.embedding_dims, strict=True)
        )
        for emb in self.embeddings:
            nn.init.trunc_normal_(emb.weight, std=0.01)
        p = spec.embedding_dropout
        self.embedding_dropout = nn.Dropout(p) if p > 0 else nn.Identity()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        names = self.spec.model_input_names
        if len(inputs) != len(names):
            raise UsageError(f"TabularMLP takes {len(names)} inputs ({', '.join(names)})")
        given = dict(zip(names, inputs, strict=True))
        parts = []
        if self.embeddings:
            codes = given["codes"]
            emb = [e(codes.select(1, j)) for j, e in enumerate(self.embeddings)]
            parts.append(self.embedding_dropout(torch.cat(emb, dim=1)))
        if "numeric" in given:
            parts.append(given["numeric"])
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return super().forward(x)

    @torch.no_grad()
    def set_input_stats(self, mean: np.ndarray, var: np.ndarray) -> None:
        """Store the numeric columns' mean and population variance; embeddings get (0, 1).

        `mean` and `var` have one value per numeric column (`spec.n_numeric`).
        """
        width = self.spec.embedding_width
        super().set_input_stats(
            np.concatenate([np.zeros(width), np.asarray(mean, dtype=np.float64)]),
            np.concatenate([np.ones(width), np.asarray(var, dtype=np.float64)]),
        )


def build_network(config: MLPConfig) -> MLP:
    """The module a config describes: `TabularMLP` when it has tabular columns, else `MLP`."""
    return TabularMLP(config) if config.tabular is not None else MLP(config)
