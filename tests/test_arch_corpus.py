"""The small nets of the architecture corpus, folded: outputs unchanged, interface kept, valid ONNX.

tests/data/corpus/ holds ten plain-torch nets from tools/make_arch_corpus.py (`--ci-data`), each
exported by both torch exporters: a Conv1d audio net, a Conv3d video net, a DCGAN generator
(ConvTranspose, one grouped), four MLP placements, a Linear on (N, L, C) with BatchNorm1d
between transposes, a FrozenBatchNorm2d-style (per-channel Mul/Add) residual net, and a net of
the placements issue 12 lists. Their BN statistics are random with ~5% negative scales, so a
wrong fold shows in the outputs. They are committed (< 200 KB each) rather than exported here:
an export costs seconds per file and needs torch, and the expected counts below refer to
exactly these graphs. `test_ci_nets_regenerate` (slow) checks the tool still writes them.

`LEFT` is what the issue-12 rules leave on each file, exactly: leaving more is a regression,
leaving fewer a fold that must be proven and then recorded here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bn_onnx.fold import fold_file

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "corpus"
MANIFEST = json.loads((DATA / "manifest.json").read_text(encoding="utf-8"))
FILES = sorted(e["file"].removesuffix(".onnx") for e in MANIFEST["files"] if e["status"] == "ok")
ATOL, RTOL = 1e-4, 1e-3

# (BatchNormalization nodes, constant scales right after a Conv/Gemm/MatMul) the fold leaves.
# Every file but bn_patterns folds completely; bn_patterns keeps 2 by design: the BN after a
# MaxPool with negative scales that also feeds a padded Conv (rules 23, 21), and the BN before
# the padded 3x3 Conv (rule 21). Before issue 12 the fold left 1 in audio_conv1d (BN -> unpadded
# Conv1d, rule 21), 5 in bn_patterns (Flatten -> Gemm, unpadded Conv, Concat: rules 20-22), 4
# FrozenBatchNorm2d scales in frozen_resnet (Mul/Add chains, rule 16), 1 in the dynamo
# mlp_bn_noaffine (Shape/CastLike readers, rule 12) and 2 in seq_linear_bn (BN between
# Transposes, rule 19).
LEFT = {
    "audio_conv1d.dynamo": (0, 0),
    "audio_conv1d.torchscript": (0, 0),
    "bn_patterns.dynamo": (2, 0),
    "bn_patterns.torchscript": (2, 0),
    "dcgan_generator.dynamo": (0, 0),
    "dcgan_generator.torchscript": (0, 0),
    "frozen_resnet.dynamo": (0, 0),
    "frozen_resnet.torchscript": (0, 0),
    "mlp_bn_input.dynamo": (0, 0),
    "mlp_bn_input.torchscript": (0, 0),
    "mlp_bn_noaffine.dynamo": (0, 0),
    "mlp_bn_noaffine.torchscript": (0, 0),
    "mlp_bn_post.dynamo": (0, 0),
    "mlp_bn_post.torchscript": (0, 0),
    "mlp_bn_pre.dynamo": (0, 0),
    "mlp_bn_pre.torchscript": (0, 0),
    "seq_linear_bn.dynamo": (0, 0),
    "seq_linear_bn.torchscript": (0, 0),
    "video_conv3d.dynamo": (0, 0),
    "video_conv3d.torchscript": (0, 0),
}


@pytest.fixture(scope="module")
def scorer():
    """tools/score_fold_tools.py as a module: its node counts and interface reader."""
    spec = importlib.util.spec_from_file_location(
        "score_fold_tools", ROOT / "tools" / "score_fold_tools.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["score_fold_tools"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("score_fold_tools", None)


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def folded(tmp_path_factory, scorer):
    """Fold each file once with `fold_file`; per stem: original and folded paths and counts."""
    out_dir = tmp_path_factory.mktemp("corpus_folded")
    cache: dict[str, dict] = {}

    def get(stem: str) -> dict:
        if stem not in cache:
            src = DATA / f"{stem}.onnx"
            dst = out_dir / f"{stem}.onnx"
            fold_file(src, dst)
            cache[stem] = {
                "src": src,
                "dst": dst,
                "before": scorer.model_counts(onnx.load(str(src))),
                "after": scorer.model_counts(onnx.load(str(dst))),
            }
        return cache[stem]

    return get


def test_manifest_lists_every_committed_file():
    on_disk = sorted(p.name.removesuffix(".onnx") for p in DATA.glob("*.onnx"))
    assert on_disk == FILES
    assert set(FILES) == set(LEFT)
    assert all(e["file_bytes"] < 200_000 for e in MANIFEST["files"])


@pytest.mark.parametrize("stem", FILES)
def test_fold_keeps_outputs_interface_and_validity(stem, folded, scorer, record_property):
    f = folded(stem)
    src, dst = f["src"], f["dst"]
    onnx.checker.check_model(str(dst), full_check=True)
    assert scorer.interface(onnx.load(str(dst))) == scorer.interface(onnx.load(str(src)))
    ref_sess, got_sess = _session(src), _session(dst)
    rng = np.random.default_rng(zlib.crc32(stem.encode()))
    for _ in range(3):
        feed = {
            i.name: rng.standard_normal(i.shape).astype(np.float32) for i in ref_sess.get_inputs()
        }
        for ref, got in zip(ref_sess.run(None, feed), got_sess.run(None, feed), strict=True):
            assert got.shape == ref.shape
            # The BN here are far from identity: a wrong fold misses by far more than this.
            np.testing.assert_allclose(got, ref, atol=ATOL, rtol=RTOL)
    left = (f["after"]["bn"], f["after"]["scale_after_linear"])
    record_property("bn_left", left[0])
    record_property("scales_left", left[1])
    assert f["after"]["custom"] == 0, "the fold introduced a custom-domain node"
    assert left[0] <= f["before"]["bn"]
    assert left == LEFT[stem], f"{stem}: left {left} (BN, scales), expected {LEFT[stem]}"


def test_scale_count_sees_frozen_bn_chains(folded):
    """The FrozenBatchNorm2d net has no BN node but four Conv -> Mul(constant) scales."""
    for exporter in ("dynamo", "torchscript"):
        before = folded(f"frozen_resnet.{exporter}")["before"]
        assert before["bn"] == 0
        assert before["scale_after_linear"] == 4


@pytest.mark.slow
def test_ci_nets_regenerate(tmp_path):
    """tools/make_arch_corpus.py still writes these graphs: same ops, same initializers (to
    float tolerance: the randomization is rounded to 3 digits, the export is exact)."""
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location(
        "make_arch_corpus", ROOT / "tools" / "make_arch_corpus.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_arch_corpus"] = module
    try:
        spec.loader.exec_module(module)
        assert module.main(["--only", "frozen_resnet", "--out", str(tmp_path)]) == 0
    finally:
        sys.modules.pop("make_arch_corpus", None)
    for stem in [f"frozen_resnet.{e}" for e in module.EXPORTERS]:
        new, old = onnx.load(str(tmp_path / f"{stem}.onnx")), onnx.load(str(DATA / f"{stem}.onnx"))
        assert [n.op_type for n in new.graph.node] == [n.op_type for n in old.graph.node]
        new_w = {t.name: onnx.numpy_helper.to_array(t) for t in new.graph.initializer}
        old_w = {t.name: onnx.numpy_helper.to_array(t) for t in old.graph.initializer}
        assert new_w.keys() == old_w.keys()
        for name, w in old_w.items():
            np.testing.assert_allclose(new_w[name], w, rtol=1e-5, atol=1e-6, err_msg=name)
