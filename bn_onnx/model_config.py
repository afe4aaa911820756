"""The MLP's configuration and the tensors it implies, without torch.

`MLPConfig` lives here (re-exported by `bn_onnx.model`) so that torch-free code - checkpoint
reading, the numpy reference, verify - can describe a model and check its tensors.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from bn_onnx.errors import UsageError
from bn_onnx.tabular import TabularSpec

ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "silu")
BN_PLACEMENTS = ("pre", "post", "none")
TASKS = ("classification", "regression")


@dataclass
class MLPConfig:
    """Shape and options of an `MLP`; stored as `config.json["model"]` in a checkpoint.

    Attributes:
        in_features: Width of the raw input rows.
        out_features: Number of classes (classification) or targets (regression).
        hidden: Width of each hidden block.
        activation: One of relu, gelu, tanh, sigmoid, silu.
        bn: Batch-norm placement in each block: "pre" (linear -> BN -> act), "post"
            (linear -> act -> BN) or "none".
        bn_eps: Epsilon of every batch-norm layer, the input norm included.
        bn_momentum: PyTorch momentum of the hidden BN running statistics.
        input_norm: Normalize raw inputs with frozen training-set statistics.
        dropout: Dropout probability after each block (0 disables it).
        task: "classification" (outputs logits) or "regression" (outputs predictions).
        tabular: For a model of raw table columns (`bn_onnx.tabular`): the columns, fills,
            vocabularies and embedding widths; `in_features` is then the width of the first
            layer's input (embeddings, continuous columns, indicators). None for a plain MLP
            whose input is `in_features` numbers.
    """

    in_features: int
    out_features: int
    hidden: tuple[int, ...] = (128, 64)
    activation: str = "relu"
    bn: str = "pre"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    input_norm: bool = True
    dropout: float = 0.0
    task: str = "classification"
    tabular: TabularSpec | None = None

    def __post_init__(self) -> None:
        self.hidden = tuple(self.hidden)
        self.validate()

    def validate(self) -> None:
        """Raise `UsageError` (one line) for any value the MLP cannot be built from."""

        def positive_int(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"model config: {name} must be a whole number >= 1, got {value!r}")

        positive_int("in_features", self.in_features)
        positive_int("out_features", self.out_features)
        for width in self.hidden:
            positive_int("hidden size", width)
        if self.activation not in ACTIVATIONS:
            raise UsageError(
                f"model config: unknown activation {self.activation!r} "
                f"(choose from {', '.join(ACTIVATIONS)})"
            )
        if self.bn not in BN_PLACEMENTS:
            raise UsageError(
                f"model config: unknown bn placement {self.bn!r} "
                f"(choose from {', '.join(BN_PLACEMENTS)})"
            )
        if self.task not in TASKS:
            raise UsageError(
                f"model config: unknown task {self.task!r} (choose from {', '.join(TASKS)})"
            )
        for name in ("bn_eps", "bn_momentum", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UsageError(f"model config: {name} must be a number, got {value!r}")
        if not (math.isfinite(self.bn_eps) and self.bn_eps > 0):
            raise UsageError(f"model config: bn_eps must be > 0, got {self.bn_eps!r}")
        if not 0 <= self.bn_momentum <= 1:
            raise UsageError(
                f"model config: bn_momentum must be in [0, 1], got {self.bn_momentum!r}"
            )
        if not 0 <= self.dropout < 1:
            raise UsageError(f"model config: dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.input_norm, bool):
            raise UsageError(
                f"model config: input_norm must be true or false, got {self.input_norm!r}"
            )
        if self.tabular is not None:
            if not isinstance(self.tabular, TabularSpec):
                raise UsageError("model config: tabular must be a TabularSpec")
            if self.in_features != self.tabular.in_features:
                raise UsageError(
                    f"model config: in_features {self.in_features} differs from the tabular "
                    f"columns' {self.tabular.in_features}"
                )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form stored in `config.json["model"]` (no `tabular` key when None)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "hidden":
                value = list(value)
            elif f.name == "tabular":
                if value is None:
                    continue
                value = value.to_dict()
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Any) -> MLPConfig:
        """Build a config from `config.json["model"]`; unknown or missing keys are refused."""
        if not isinstance(data, dict):
            raise UsageError("model config must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UsageError(f"model config: unknown key(s) {', '.join(unknown)}")
        for required in ("in_features", "out_features"):
            if required not in data:
                raise UsageError(f"model config: missing key {required!r}")
        kwargs = dict(data)
        if "hidden" in kwargs:
            if not isinstance(kwargs["hidden"], (list, tuple)):
                raise UsageError(f"model config: hidden must be a list, got {kwargs['hidden']!r}")
            kwargs["hidden"] = tuple(kwargs["hidden"])
        if kwargs.get("tabular") is not None:
            kwargs["tabular"] = TabularSpec.from_dict(kwargs["tabular"])
        return cls(**kwargs)


def expected_tensor_shapes(config: MLPConfig) -> dict[str, tuple[int, ...]]:
    """Every state_dict name of `MLP(config)` with its shape, in the module's order."""
    shapes: dict[str, tuple[int, ...]] = {}
    if config.input_norm:
        shapes["input_norm.running_mean"] = (config.in_features,)
        shapes["input_norm.running_var"] = (config.in_features,)
        shapes["input_norm.num_batches_tracked"] = ()
    width = config.in_features
    for i, out in enumerate(config.hidden):
        shapes[f"blocks.{i}.linear.weight"] = (out, width)
        shapes[f"blocks.{i}.linear.bias"] = (out,)
        if config.bn != "none":
            for name in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"blocks.{i}.bn.{name}"] = (out,)
            shapes[f"blocks.{i}.bn.num_batches_tracked"] = ()
        width = out
    shapes["head.weight"] = (config.out_features, width)
    shapes["head.bias"] = (config.out_features,)
    if config.tabular is not None:
        spec = config.tabular
        for j, (rows, dim) in enumerate(zip(spec.embedding_rows, spec.embedding_dims, strict=True)):
            shapes[f"embeddings.{j}.weight"] = (rows, dim)
    return shapes


def expected_tensor_dtype(name: str) -> str:
    """numpy dtype name a tensor must have: int64 counters, float32 for everything else."""
    return "int64" if name.endswith("num_batches_tracked") else "float32"
