"""Runners: the interchangeable ways verify computes a model's outputs (Polygraphy's model).

A `Runner` has a label, a kind, the provider and folded flag of the model it runs, `run(feeds)`
(every output over a probe's feeds) and `intermediates(feed, names)` (values inside it, for
`--locate`). The engine runs every runner over every probe into `Run` results and compares the
results; it never asks which class a runner is. The runners here run ONNX graphs:

- `OrtRunner`: a model in onnxruntime on one execution provider;
- `OnnxReferenceRunner`: a model in onnx.reference, in the model's own dtypes;
- `Float64Runner`: a model's graph cast to float64 (`bn_onnx.verify.float64`).

The checkpoint's own runners (its numpy float64 forward, torch eval) are in
`bn_onnx.verify.oracles`. A new runner is one class with these attributes and methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import onnx

from bn_onnx.verify import evaluator_ops, float64
from bn_onnx.verify.runs import EvaluatorSession, OrtSession, Outputs, Run, mark_outputs
from bn_onnx.verify.signature import compute_dtype

Feed = dict[str, np.ndarray]
ONNX_REFERENCE = "reference"  # the pseudo-provider: onnx.reference in the model's own dtypes
ONNX_REFERENCE_DETAIL = "onnx.reference (numpy, in the model's own dtypes)"
# Run kinds: what a runner computes (see `Run`).
ONNX, FLOAT64, CHECKPOINT, TORCH = "onnx", "float64", "checkpoint", "torch"


class Runner(Protocol):
    """One way of computing a model's outputs.

    `graph` is the ONNX graph whose tensor names `intermediates` takes, or None for a runner
    without one (the checkpoint's forward, torch eval), whose `intermediates` takes the MLP's
    matching-point labels (`bn_onnx.verify.taps`; None: all of them) and whose `tap_nodes`
    say what computes each.
    """

    label: str
    kind: str
    detail: str
    provider: str | None
    folded: bool | None
    graph: onnx.ModelProto | None
    tap_nodes: Mapping[str, list[str]]

    def run(self, feeds: Sequence[Feed]) -> Outputs:
        """Every output over a probe's feeds (stacked as `runs.merge` does)."""
        ...

    def intermediates(self, feed: Feed, names: Sequence[str] | None) -> Outputs:
        """The values `names` for one feed (missing names are left out)."""
        ...

    def result(self) -> Run:
        """An empty run result describing this runner (outputs filled by the engine)."""
        ...


class _GraphRunner:
    """What the runners of an ONNX file share: its path, proto, label and folded flag."""

    kind = ONNX
    tap_nodes: Mapping[str, list[str]] = {}
    tf32: bool | None = None
    int8 = False  # a quantized model: no side of the folding rows

    def __init__(
        self, label: str, path: str, graph: onnx.ModelProto, folded: bool | None, detail: str
    ) -> None:
        self.label = label
        self.path = path
        self.graph: onnx.ModelProto | None = graph
        self.folded = folded
        self.detail = detail
        self.compute_dtype = compute_dtype(graph)
        self.provider: str | None = None

    def result(self) -> Run:
        """See `Runner.result`."""
        run = Run(self.label, self.kind, self.detail, model=self.path, tf32=self.tf32)
        run.provider, run.folded, run.compute_dtype = self.provider, self.folded, self.compute_dtype
        run.int8 = self.int8
        return run


class OrtRunner(_GraphRunner):
    """A model in onnxruntime on one provider (TF32 off); `session` is made by the caller.

    `intermediates` needs the tensors marked as outputs: one more session per set of names,
    kept for the next feed.
    """

    def __init__(
        self,
        label: str,
        path: str,
        graph: onnx.ModelProto,
        folded: bool | None,
        session: OrtSession,
        *,
        optimization: str = "all",
    ) -> None:
        super().__init__(label, path, graph, folded, f"onnxruntime {session.info.describe()}")
        self.session = session
        self.provider = session.info.main_provider
        self.tf32 = session.info.tf32
        self.optimization = optimization
        self._marked: dict[tuple[str, ...], OrtSession] = {}

    def run(self, feeds: Sequence[Feed]) -> Outputs:
        """See `Runner.run`."""
        return self.session.run(feeds)

    def intermediates(self, feed: Feed, names: Sequence[str] | None) -> Outputs:
        """See `Runner.intermediates`."""
        key = tuple(names or ())
        if key not in self._marked:
            assert self.graph is not None
            self._marked[key] = OrtSession(
                mark_outputs(self.graph, key), str(self.provider), optimization=self.optimization
            )
        return self._marked[key].run([feed], key or None)


class OnnxReferenceRunner(_GraphRunner):
    """A model in onnx.reference in its own dtypes, with the same corrected kernels as the
    float64 graph (onnx's grouped Conv and old BatchNormalization are wrong), each rounding
    its result to the model's dtype."""

    def __init__(self, label: str, path: str, graph: onnx.ModelProto, folded: bool | None) -> None:
        super().__init__(label, path, graph, folded, ONNX_REFERENCE_DETAIL)
        self.provider = ONNX_REFERENCE
        self.session = EvaluatorSession(graph, new_ops=evaluator_ops.corrected_ops())

    def run(self, feeds: Sequence[Feed]) -> Outputs:
        """See `Runner.run`."""
        return self.session.run(feeds)

    def intermediates(self, feed: Feed, names: Sequence[str] | None) -> Outputs:
        """See `Runner.intermediates`."""
        return self.session.run([feed], names)


class Float64Runner:
    """A model's graph cast to float64 (`float64.build`), run in onnxruntime or onnx.reference.

    Its compute dtype is the model's: the graph's constants (epsilon, GELU's sqrt(2)) are
    float32 numbers, a float32 distance from the checkpoint's exact ones.
    """

    kind = FLOAT64
    provider: str | None = None
    folded: bool | None = None
    tap_nodes: Mapping[str, list[str]] = {}

    def __init__(self, label: str, ref: float64.Float64Reference, model: onnx.ModelProto) -> None:
        self.label = label
        self.ref = ref
        self.graph: onnx.ModelProto | None = ref.model
        self.compute_dtype = compute_dtype(model)

    @property
    def detail(self) -> str:
        """What ran (its engine may change to onnx.reference on a failed run)."""
        return f"{self.ref.source} in float64 ({self.ref.engine})"

    def run(self, feeds: Sequence[Feed]) -> Outputs:
        """See `Runner.run`."""
        return self.ref.run(feeds)

    def intermediates(self, feed: Feed, names: Sequence[str] | None) -> Outputs:
        """See `Runner.intermediates`."""
        return self.ref.run([feed], names)

    def result(self) -> Run:
        """See `Runner.result`."""
        return Run(self.label, self.kind, self.detail, compute_dtype=self.compute_dtype)
