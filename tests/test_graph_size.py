"""inspect, fold and verify do work linear in the graph's size (issue 19, item 7).

Counted, not timed: the Python lines and calls and the C calls run (`sys.settrace`,
`sys.setprofile`) for a chain of 200 nodes and one of 800 (`bn_onnx.graphs.chain_model`).
Linear work gives a ratio of about 4, a per-node scan of all nodes about 16. The wall-clock
figures for 10k and 100k nodes are `tools/bench_graph_size.py`'s.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from bn_onnx.cli import main
from bn_onnx.cli.inspect import describe_model
from bn_onnx.fold import fold_model, inspect_model
from bn_onnx.graphs import chain_model

SMALL, LARGE = 200, 800
# LARGE / SMALL = 4; n log n would give about 4.9, n**2 16.
MAX_RATIO = 4.6


def _calls(fn: Callable[[], object]) -> int:
    """Python calls and lines run by `fn` (`sys.settrace`; a loop on one line counts once a
    turn), C functions called from Python (`sys.setprofile`)."""
    n = 0

    def trace(frame: object, event: str, arg: object) -> object:
        nonlocal n
        n += 1
        return trace

    def profile(frame: object, event: str, arg: object) -> None:
        nonlocal n
        if event == "c_call":
            n += 1

    sys.settrace(trace)
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
        sys.settrace(None)
    return n


def _ratio(work: Callable[[int], Callable[[], object]]) -> float:
    work(SMALL)()  # imports and caches out of the count
    return _calls(work(LARGE)) / _calls(work(SMALL))


@pytest.mark.parametrize("kind", ["identity", "muladd", "mlp"])
def test_fold_work_grows_linearly_with_a_chain(kind: str) -> None:
    def work(n: int) -> Callable[[], object]:
        model = chain_model(kind, n)
        return lambda: fold_model(model)

    assert _ratio(work) < MAX_RATIO


@pytest.mark.parametrize("kind", ["identity", "mlp"])
def test_inspect_work_grows_linearly_with_a_chain(kind: str) -> None:
    def work(n: int) -> Callable[[], object]:
        model = chain_model(kind, n)
        return lambda: inspect_model(model)

    assert _ratio(work) < MAX_RATIO


def test_inspect_work_grows_linearly_when_initializers_are_also_inputs() -> None:
    # Old exporters list every initializer as a graph input too; inspect built the set of
    # initializer names once per input (quadratic: 45 s of CPU for 20,000 nodes, now 2.7 s).
    def work(n: int) -> Callable[[], object]:
        model = chain_model("muladd", n, initializers_as_inputs=True)
        return lambda: describe_model(model)

    assert _ratio(work) < MAX_RATIO


def test_verify_work_grows_linearly_with_a_chain(tmp_path: Path) -> None:
    def work(n: int) -> Callable[[], object]:
        src, dst = tmp_path / f"m{n}.onnx", tmp_path / f"m{n}.folded.onnx"
        model = chain_model("mlp", n)
        onnx.save(model, src)
        onnx.save(fold_model(model).model, dst)

        def run() -> None:
            with contextlib.redirect_stdout(io.StringIO()):
                assert main(["verify", str(src), str(dst)]) == 0

        return run

    assert _ratio(work) < MAX_RATIO


def test_a_folded_chain_is_what_the_fold_promises() -> None:
    # The chains measure what they claim: the fold removes the BNs, the Mul/Add and Identities.
    assert [n.op_type for n in fold_model(chain_model("identity", 50)).model.graph.node] == [
        "Identity"
    ]
    assert [n.op_type for n in fold_model(chain_model("muladd", 50)).model.graph.node] == ["Gemm"]
    folded = fold_model(chain_model("mlp", 31)).model
    assert {n.op_type for n in folded.graph.node} == {"Gemm", "Relu"}


def test_verify_locate_work_grows_linearly_when_the_fold_is_wrong(tmp_path: Path) -> None:
    # --locate compared every shared tensor, then walked a region per agreeing one, each walk
    # rebuilding the producer map of the whole graph: 105 s of CPU for 8,000 nodes, now 6 s.
    def work(n: int) -> Callable[[], object]:
        src, bad = tmp_path / f"m{n}.onnx", tmp_path / f"m{n}.bad.onnx"
        model = chain_model("mlp", n)
        onnx.save(model, src)
        folded = fold_model(model).model
        head = [x for x in folded.graph.node if x.op_type == "Gemm"][-1]
        for t in folded.graph.initializer:
            if t.name == head.input[1]:  # a changed head weight: verify fails, locate runs
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.5, t.name))
        onnx.save(folded, bad)

        def run() -> None:
            with contextlib.redirect_stdout(io.StringIO()) as out:
                assert main(["verify", str(src), str(bad), "--locate"]) == 1
            assert "earlier value(s) agree" in out.getvalue()  # locate compared them

        return run

    assert _ratio(work) < MAX_RATIO
