"""The CUDA execution provider: sessions, Predictor, verify with TF32 off. Skips without a GPU."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bn_onnx import graphs, runtime, verify

_REASON = (
    "needs onnxruntime-gpu (instead of onnxruntime) and an NVIDIA GPU; "
    f"available providers here: {', '.join(ort.get_available_providers())}"
)
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        "CUDAExecutionProvider" not in ort.get_available_providers(), reason=_REASON
    ),
]

WIDTHS = [64, 128, 64, 10]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cuda")
    u, f = tmp / "u.onnx", tmp / "f.onnx"
    onnx.save(graphs.build_mlp(WIDTHS, "unfolded", seed=1), u)
    onnx.save(graphs.build_mlp(WIDTHS, "folded", seed=1), f)
    return u, f


def test_strict_cuda_session_runs_on_cuda_with_tf32_off(models):
    info = runtime.create_session(models[1], provider="cuda", use_tf32=False)
    assert info.providers[0] == runtime.CUDA
    assert info.tf32 is False and info.device_id == 0
    assert info.describe() == "cuda (device 0, TF32 off)"


def test_predictor_on_cuda_matches_cpu(models):
    x = np.random.default_rng(0).standard_normal((2048, 64)).astype(np.float32)
    gpu = runtime.Predictor(models[1], provider="cuda", use_tf32=False, batch_size=1000)
    cpu = runtime.Predictor(models[1], provider="cpu")
    assert gpu.providers[0] == runtime.CUDA
    np.testing.assert_allclose(gpu.predict(x), cpu.predict(x), rtol=1e-4, atol=1e-5)


def test_verify_on_cpu_and_cuda_passes_and_says_tf32_off(models):
    report = verify.verify(list(models), provider="cpu,cuda")
    assert {r.provider for r in report.runs if r.kind == "onnx"} == {"cpu", "cuda"}
    assert report.tf32_line() == "TF32: off on every CUDA session"
    assert report.passed, verify.render(report)
    assert {row.provider for row in report.folding} == {"cpu", "cuda"}


def test_verify_a_conv_net_on_cuda_against_the_float64_reference(tmp_path):
    from pathlib import Path

    from bn_onnx.fold import fold_model

    case = Path(__file__).parent / "data" / "fold_cases" / "depthwise_bias_bn.onnx"
    folded = tmp_path / "f.onnx"
    onnx.save(fold_model(onnx.load(case)).model, folded)
    report = verify.verify([case, folded], provider="cuda")
    assert {r.provider for r in report.runs if r.kind == "onnx"} == {"cuda"}
    assert report.tf32_line() == "TF32: off on every CUDA session"
    assert report.passed, verify.render(report)


def test_locate_on_cuda_names_the_changed_gemm(models, tmp_path):
    from onnx import numpy_helper

    bad = onnx.load(models[1])
    for t in bad.graph.initializer:
        if t.name == "block1.weight":
            w = numpy_helper.to_array(t).copy()
            w[3] += 0.5
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    onnx.save(bad, tmp_path / "bad.onnx")
    report = verify.verify([models[0], tmp_path / "bad.onnx"], provider="cuda", locate=True)
    assert not report.passed
    assert report.locations[0].first.node == "block1.gemm (Gemm)", verify.render(report)
