"""inspect, fold and verify do work linear in the graph's size (issue 19, item 7).

Counted, not timed: the number of Python and C function calls (`sys.setprofile`) for a chain of
300 nodes and one of 1,200 (`bn_onnx.graphs.chain_model`). Linear work gives a ratio of about
4, a per-node scan of all nodes about 16. The wall-clock figures for 10k and 100k nodes are
`tools/bench_graph_size.py`'s.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from bn_onnx.cli import main
from bn_onnx.fold import fold_model, inspect_model
from bn_onnx.graphs import chain_model

SMALL, LARGE = 300, 1200
# LARGE / SMALL = 4; n log n would give about 4.9, n**2 16.
MAX_RATIO = 4.6


def _calls(fn: Callable[[], object]) -> int:
    n = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal n
        if event in ("call", "c_call"):
            n += 1

    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(None)
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
