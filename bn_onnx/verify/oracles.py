"""The checkpoint's own oracles: its numpy float64 forward and torch eval, fed by input name.

`checkpoint_input(feeds)` is the one place that turns verify's feeds (input name -> array) into
what a checkpoint's oracles take: for an MLP checkpoint, whose model has the one input
`input` [batch, features], that array; for a checkpoint whose model takes several named inputs
(tabular columns), the feeds dict itself, which `bn_onnx.checkpoint_forward` and the
torch runner then accept. No torch here: the torch runner is passed in by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from bn_onnx.checkpoint_forward import checkpoint_forward
from bn_onnx.columns import CONTINUOUS
from bn_onnx.errors import UsageError
from bn_onnx.onnx_meta import INPUT_NAME
from bn_onnx.verify.runs import Outputs, Run, merge
from bn_onnx.verify.signature import Signature
from bn_onnx.verify.taps import checkpoint_tap_nodes

if TYPE_CHECKING:
    from bn_onnx.checkpoint import Checkpoint
    from bn_onnx.tabular import TabularSpec

# f(checkpoint_dir, inputs) -> outputs, or (outputs, [(label, values), ...]) at the MLP's
# matching points; `inputs` is what `checkpoint_input` returns.
CheckpointInput = np.ndarray | dict[str, np.ndarray]
TorchRunner = Callable[[str, CheckpointInput], Any]
Taps = dict[str, np.ndarray]


def checkpoint_input(feeds: Mapping[str, np.ndarray]) -> CheckpointInput:
    """What the checkpoint oracles take for one run's feeds (see the module docstring)."""
    if set(feeds) == {INPUT_NAME}:
        return feeds[INPUT_NAME]
    return dict(feeds)


def check_inputs(checkpoint: Checkpoint, sig: Signature) -> None:
    """Raise `UsageError` when an MLP checkpoint's width differs from the models' input."""
    names = [s.name for s in sig.inputs]
    if names != [INPUT_NAME]:
        return  # several named inputs: the checkpoint's own oracles check their feeds
    dims = sig.inputs[0].dims
    width = dims[1] if dims is not None and len(dims) == 2 else None
    n = int(checkpoint.config.in_features)
    if isinstance(width, int) and width != n:
        raise UsageError(f"checkpoint takes {n} features, the models take {width}")


def _merge_taps(per_run: Sequence[Sequence[tuple[str, np.ndarray]]]) -> Taps:
    labels = [label for label, _ in per_run[0]]
    return merge([dict(t) for t in per_run]) if labels else {}


def float64_outputs(
    checkpoint: Checkpoint, feeds: Sequence[dict[str, np.ndarray]], output: str
) -> tuple[Outputs, Taps]:
    """The checkpoint's numpy float64 forward over each run: outputs by name, and taps."""
    runs = [checkpoint_forward(checkpoint, checkpoint_input(f)) for f in feeds]
    return merge([{output: r.output} for r in runs]), _merge_taps([r.taps for r in runs])


def torch_outputs(
    runner: TorchRunner, path: str, feeds: Sequence[dict[str, np.ndarray]], output: str
) -> tuple[Outputs, Taps | None]:
    """torch eval of the checkpoint over each run: outputs by name, and taps when given."""
    outs, taps = [], []
    for f in feeds:
        result = runner(path, checkpoint_input(f))
        if isinstance(result, tuple):
            result, t = result
            taps.append(list(t))
        outs.append({output: np.asarray(result)})
    return merge(outs), (_merge_taps(taps) if taps else None)


def test_split(checkpoint: Checkpoint) -> tuple[dict[str, np.ndarray], str]:
    """The checkpoint's test split as feeds, rebuilt from the recipe in its config.json.

    Raises:
        BnOnnxError: the recipe is missing or its data file is gone or changed.
    """
    from bn_onnx.data import load_split_from_checkpoint_meta

    data = load_split_from_checkpoint_meta(checkpoint.meta)
    name = checkpoint.meta["dataset"].get("name", "dataset")
    split = "test" if len(data.x_test) else "val"  # trained with --test-fraction 0
    words = "test split" if split == "test" else "validation split (it has no test split)"
    tab = getattr(data, f"feeds_{split}", None)
    if tab is not None:  # a tabular model: its raw columns
        feeds = {k: np.asarray(v) for k, v in tab.items()}
        rows = len(next(iter(feeds.values())))
        return feeds, f"the checkpoint's {words} ({name}, {rows} rows of raw columns)"
    x = np.asarray(getattr(data, f"x_{split}"))
    return {INPUT_NAME: x}, f"the checkpoint's {words} ({name}, {len(x)} rows)"


def input_stats(checkpoint: Checkpoint) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-feature (mean, var + eps) of each input from the checkpoint's input normalization.

    var + eps is what the model divides by: a feature with no variance in training is probed
    at sqrt(eps), the scale at which the model sees values of order 1.
    """
    tensors = checkpoint.tensors
    eps = float(getattr(checkpoint.config, "bn_eps", 1e-5))
    spec = _tabular_spec(checkpoint)
    if spec is not None:
        # The input BN spans [embeddings..., continuous..., indicators...]: the raw
        # `continuous` input's statistics are its slice after the embeddings.
        if "input_norm.running_mean" not in tensors or not spec.n_continuous:
            return {}
        part = slice(spec.embedding_width, spec.embedding_width + spec.n_continuous)
        mean = np.asarray(tensors["input_norm.running_mean"], np.float64)[part]
        var = np.asarray(tensors["input_norm.running_var"], np.float64)[part] + eps
        return {CONTINUOUS: (mean, var)}
    if "input_norm.running_mean" in tensors:
        return {
            INPUT_NAME: (
                np.asarray(tensors["input_norm.running_mean"], np.float64),
                np.asarray(tensors["input_norm.running_var"], np.float64) + eps,
            )
        }
    norm = checkpoint.preprocessing.get("input_norm")
    if isinstance(norm, dict) and "mean" in norm and "var" in norm:
        try:
            eps = float(norm.get("eps", eps))
            mean, var = np.asarray(norm["mean"], float), np.asarray(norm["var"], float)
        except (TypeError, ValueError):
            return {}
        return {INPUT_NAME: (mean, var + eps)}
    return {}


def _tabular_spec(checkpoint: Checkpoint) -> TabularSpec | None:
    """The checkpoint's `TabularSpec`, or None for a plain MLP."""
    spec = getattr(checkpoint.config, "tabular", None)
    if spec is None:
        return None
    from bn_onnx.tabular import TabularSpec

    return spec if isinstance(spec, TabularSpec) else TabularSpec.from_dict(spec)


def read(path: str) -> Checkpoint:
    """Read a checkpoint directory (numpy only)."""
    from bn_onnx.checkpoint import read_checkpoint

    return read_checkpoint(path)


CHECKPOINT_LABEL = "float64 checkpoint"
TORCH_LABEL = "torch eval"


class CheckpointRunner:
    """The checkpoint's numpy float64 forward (`bn_onnx.checkpoint_forward`), the
    baseline: a `bn_onnx.verify.runners.Runner` without a graph, whose intermediates are the
    MLP's matching points."""

    kind = "checkpoint"
    provider: str | None = None
    folded: bool | None = None
    graph: onnx.ModelProto | None = None

    def __init__(self, checkpoint: Checkpoint, path: str, output: str) -> None:
        self.label = CHECKPOINT_LABEL
        self.detail = f"numpy float64 forward of {path}"
        self.checkpoint, self.path, self.output = checkpoint, path, output
        self.tap_nodes = checkpoint_tap_nodes(checkpoint.config)

    def run(self, feeds: Sequence[dict[str, np.ndarray]]) -> Outputs:
        """See `Runner.run`."""
        return float64_outputs(self.checkpoint, feeds, self.output)[0]

    def intermediates(self, feed: dict[str, np.ndarray], names: Sequence[str] | None) -> Outputs:
        """The matching points for one feed (`names`: their labels; None: all)."""
        taps = float64_outputs(self.checkpoint, [feed], self.output)[1]
        return {k: v for k, v in taps.items() if names is None or k in names}

    def result(self) -> Run:
        """See `Runner.result`."""
        return Run(self.label, self.kind, self.detail)


class TorchEvalRunner(CheckpointRunner):
    """torch eval of the checkpoint through `fn` (`TorchRunner`, e.g.
    `bn_onnx.torch_eval.run_checkpoint_taps`): this module never imports torch."""

    kind = "torch"

    def __init__(self, checkpoint: Checkpoint, path: str, output: str, fn: TorchRunner) -> None:
        super().__init__(checkpoint, path, output)
        self.label = TORCH_LABEL
        self.detail = "torch float32, CPU, eval mode"
        self.fn = fn

    def run(self, feeds: Sequence[dict[str, np.ndarray]]) -> Outputs:
        """See `Runner.run`."""
        return torch_outputs(self.fn, self.path, feeds, self.output)[0]

    def intermediates(self, feed: dict[str, np.ndarray], names: Sequence[str] | None) -> Outputs:
        """The matching points for one feed, empty when `fn` gives none."""
        taps = torch_outputs(self.fn, self.path, [feed], self.output)[1] or {}
        return {k: v for k, v in taps.items() if names is None or k in names}
