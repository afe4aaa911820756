"""verify on folds of small real nets: it passes, a changed weight fails, --locate names it.

Issue 13's done-when, on three of the committed architecture-corpus files
(tests/data/corpus/, plain torch nets from both exporters): a Conv1d audio net (its float64
reference runs in onnx.reference: onnxruntime has no double Conv), a Conv3d video net, and an
MLP with BN after each activation, which the fold moves into the *following* Gemm (reference
in onnxruntime). For each, folded by `fold_file`:

- `verify([original, folded])` passes, with a float64 reference row for every model run;
- the folded model with one element of a weight the fold rewrote changed by +0.5 fails, and
  `--locate` names a node that reads that weight;
- given data whose input channel 0 is 0 in every row, a change to the first linear node's
  weight on input channel 0 is invisible in that data (its row passes), and verify still fails
  through its random probe, located at that node, also where a tolerance below float32
  rounding makes the data probe fail as well.

`tools/verify_fold_pairs.py --dir` runs the same checks over the whole corpus, a process per
step; the tampering helpers used here are its own.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest

from bn_onnx.fold import fold_file
from bn_onnx.verify import render, verify

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "corpus"
F64 = "float64 reference"

# file stem -> the engine that runs its float64 reference
CASES = {
    "audio_conv1d.torchscript": "onnx.reference",
    "video_conv3d.dynamo": "onnx.reference",
    "mlp_bn_post.dynamo": "onnxruntime",
}


def _tool():
    spec = importlib.util.spec_from_file_location(
        "verify_fold_pairs", ROOT / "tools" / "verify_fold_pairs.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _tool()


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    stem = request.param
    tmp = tmp_path_factory.mktemp(stem.replace(".", "_"))
    original = DATA / f"{stem}.onnx"
    folded = tmp / f"{stem}.folded.onnx"
    report = fold_file(original, folded)
    assert report.n_folded > 0
    return stem, original, folded, onnx.load(folded), report.to_dict(), tmp


def _run(path: Path) -> str:
    """The label of a model's onnxruntime CPU run in the report."""
    return f"{path.name} [cpu]"


def test_the_fold_passes_with_a_float64_reference(pair):
    stem, original, folded, _, _, _ = pair
    report = verify([original, folded])
    assert report, render(report)
    ref = next(r for r in report.runs if r.label == F64)
    assert f"({CASES[stem]})" in ref.detail
    counted = {(p.actual, p.probe) for p in report.counted if p.expected == F64}
    for path in (original, folded):
        assert (_run(path), "random") in counted


def test_a_changed_weight_of_a_rewritten_node_fails_and_is_located(pair):
    _, original, _, model, fold_report, tmp = pair
    node, weight, _ = tool.rewritten_target(model, fold_report)
    assert node.name in {e["target"] for e in fold_report["bn"] if e["status"] == "folded"}
    bad, _ = tool.change_weight(model, weight)
    path = tmp / "rewritten.onnx"
    onnx.save(bad, path)
    report = verify([original, path], locate=True)
    assert not report
    loc = next(x for x in report.locations if x.actual == _run(path))
    assert weight in loc.reads, render(report)


def test_a_weight_on_a_constant_input_channel_fails_through_the_random_probe(pair):
    _, original, folded, model, _, tmp = pair
    data = tool.constant_channel_data(model)
    assert all(np.all(v[:, 0] == 0) for v in data.values())
    _, weight, index = tool.input_target(model)
    bad, _ = tool.change_weight(model, weight, index)
    path = tmp / "channel0.onnx"
    onnx.save(bad, path)
    report = verify([original, path], inputs=data, locate=True)
    assert not report
    by_probe = {p.probe: p.passed for p in report.counted if p.actual == _run(path)}
    # The data cannot see the change (channel 0 is 0 there); the random probe does.
    assert by_probe == {"data": True, "random": False}, render(report)
    loc = next(x for x in report.locations if x.actual == _run(path))
    assert loc.probe == "random"
    assert weight in loc.reads, render(report)
    # The unchanged fold passes on the same data.
    assert verify([original, folded], inputs=data)
    # A tolerance below float32 rounding fails the data probe too (by rounding alone): locate
    # still takes the probe that fails by far the most, and names the changed weight.
    report = verify([original, path], inputs=data, locate=True, atol=1e-9, rtol=0.0)
    assert not any(p.passed for p in report.counted if p.actual == _run(path))
    loc = next(x for x in report.locations if x.actual == _run(path))
    assert loc.probe == "random"
    assert weight in loc.reads, render(report)
