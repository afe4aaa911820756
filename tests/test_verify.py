"""verify on MLP checkpoints: folded vs unfolded vs float64 vs torch on real datasets.

Tampering is caught on the given data and on the random probe, and located: by tensor name
between graphs, by matching point where torch or the checkpoint is one side.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_verify_models import DATASETS, build_onnx, dataset_checkpoint, perturb, write_pair

from bn_onnx import graphs, verify
from bn_onnx.errors import InputDataError, ProviderError, UsageError
from bn_onnx.model_config import MLPConfig

ACTIVATIONS = ["relu", "gelu", "silu", "tanh", "sigmoid"]


def _torch_runner():
    pytest.importorskip("torch")
    from bn_onnx.torch_eval import run_checkpoint

    return run_checkpoint


CASES = [
    (ds, bn, ACTIVATIONS[(i + j) % len(ACTIVATIONS)], True)
    for i, ds in enumerate(DATASETS)
    for j, bn in enumerate(["pre", "post", "none"])
] + [("wine", "pre", "relu", False), ("breast-cancer", "post", "gelu", False)]


@pytest.mark.cpu_sensitive  # it trains: the weights, so the float errors, follow the kernels
@pytest.mark.parametrize("dataset, bn, activation, input_norm", CASES)
def test_folded_unfolded_torch_and_float64_agree(tmp_path, dataset, bn, activation, input_norm):
    ckpt, config, tensors, x, classes = dataset_checkpoint(
        tmp_path, dataset, bn=bn, activation=activation, input_norm=input_norm
    )
    unfolded, folded = write_pair(tmp_path, config, tensors, classes)
    report = verify.verify(
        [unfolded, folded], checkpoint=ckpt, inputs=x, provider="cpu", torch_runner=_torch_runner()
    )
    labels = [r.label for r in report.runs]
    assert labels == [
        "float64 checkpoint",
        "float64 reference",
        "torch eval",
        "model.onnx [cpu]",
        "model.folded.onnx [cpu]",
    ]
    assert report.passed, verify.render(report)
    assert report.exit_code == 0
    # per probe kind (the data and the random probe): every run against the checkpoint's
    # float64 forward, and folded against unfolded (not counted)
    assert [p.kind for p in report.probes] == ["data", "random"]
    assert len(report.pairs) == 2 * 5 and len(report.counted) == 2 * 4
    assert all(p.comparison.outputs[0].argmax_agreement == 1.0 for p in report.pairs)
    # the graph's float64 reference agrees with the checkpoint's far below float32 error: the
    # graph differs only by its float32 constants (epsilon 1e-5 is 1e-5 * (1 - 2.5e-9) in
    # float32, GELU's sqrt(2) is off by 1.7e-8 relative)
    for p in [p for p in report.pairs if p.actual == "float64 reference"]:
        out = report.runs[0].outputs[p.probe]["logits"]
        assert p.passed and p.max_abs < 1e-6 * max(1.0, float(np.abs(out).max()))
    assert len(report.folding) == 2
    for row in report.folding:
        assert not row.adds_error
        out = report.runs[0].outputs[row.probe]["logits"]
        assert row.folded_max_abs < 1e-4 * max(1.0, float(np.abs(out).max()))


@pytest.mark.parametrize("bn", ["pre", "post"])
@pytest.mark.parametrize("layer", ["blocks.0.linear", "blocks.1.linear", "head"])
def test_a_perturbed_weight_fails_and_locate_names_its_layer(tmp_path, bn, layer):
    ckpt, config, tensors, x, classes = dataset_checkpoint(tmp_path, "wine", bn=bn, hidden=(12, 8))
    unfolded, folded = write_pair(tmp_path, config, tensors, classes)
    tampered = perturb(folded, f"{layer}.w", tmp_path / "tampered.onnx", delta=0.5)
    report = verify.verify(
        [unfolded, tampered], checkpoint=ckpt, inputs=x, provider="cpu", locate=True
    )
    assert not report.passed and report.exit_code == 1
    failed = {(p.probe, p.actual, p.expected) for p in report.pairs if not p.passed}
    for probe in ("data", "random"):
        assert (probe, "tampered.onnx [cpu]", "float64 checkpoint") in failed
        assert (probe, "tampered.onnx [cpu]", "model.onnx [cpu]") in failed
    # one location per failing run: by tensor name against the float64 reference of the
    # unfolded graph (which agrees with the checkpoint), naming the Gemm whose weight changed
    (loc,) = report.locations
    assert (loc.actual, loc.method) == ("tampered.onnx [cpu]", "tensor names")
    assert loc.first is not None and loc.first.node == f"{layer} (Gemm)", verify.render(report)
    assert f"{layer}.w" in loc.reads
    assert "first divergence" in verify.render(report)


def test_float64_reference_of_the_unfolded_graph_without_checkpoint(tmp_path):
    widths = [10, 16, 12, 4]
    u, f = tmp_path / "u.onnx", tmp_path / "f.onnx"
    onnx.save(graphs.build_mlp(widths, "unfolded", seed=7, bn="post"), u)
    onnx.save(graphs.build_mlp(widths, "folded", seed=7, bn="post"), f)
    # folded first: the reference must still come from the unfolded graph
    report = verify.verify([f, u], provider="cpu", rows=64, seed=3)
    assert report.runs[0].label == "float64 reference"
    assert report.runs[0].detail.startswith("u.onnx in float64")
    (probe,) = report.probes
    assert probe.kind == "random" and "seeded random" in probe.source and probe.rows == 64
    assert report.passed
    np.testing.assert_allclose(
        report.runs[0].outputs["random"]["logits"],
        graphs.mlp_reference(widths, probe.feeds[0]["input"], "unfolded", seed=7, bn="post"),
        rtol=1e-10,
        atol=1e-12,
    )


def test_dropping_a_bn_is_caught_without_a_checkpoint(tmp_path):
    widths = [10, 16, 4]
    u, n = tmp_path / "u.onnx", tmp_path / "n.onnx"
    onnx.save(graphs.build_mlp(widths, "unfolded", seed=1), u)
    onnx.save(graphs.build_mlp(widths, "no_bn", seed=1), n)
    report = verify.verify([u, n], provider="cpu", locate=True)
    assert not report
    (loc,) = report.locations
    # the BN's output is gone from the no-BN graph: the first shared value that differs is
    # the ReLU that now reads the raw Gemm output
    assert loc.first is not None and loc.first.name == "block0.relu", verify.render(report)
    assert loc.expected_node == "block0.relu (Relu)"


@pytest.mark.parametrize("bn", ["pre", "post", "none"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_taps_line_up_between_folded_and_unfolded(bn, activation):
    config = MLPConfig(in_features=4, out_features=3, hidden=(5, 6), bn=bn, activation=activation)
    from test_verify_models import make_tensors

    t = make_tensors(config, np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32))
    labels = [
        "block 0 pre-activation",
        "block 0 activation",
        "block 1 pre-activation",
        "block 1 activation",
        "output",
    ]
    for folded in (False, True):
        taps = verify.find_taps(build_onnx(config, t, folded=folded))
        assert [tap.label for tap in taps] == labels
        assert taps[-1].tensor == "logits"
        assert taps[1].tensor == "blocks.0.act.out"


def test_taps_values_match_the_checkpoint_forward():
    from onnx_forward_oracle import onnx_forward
    from test_verify_models import make_tensors

    from bn_onnx.checkpoint_forward import forward_tensors

    config = MLPConfig(in_features=4, out_features=3, hidden=(5, 6), bn="post", activation="gelu")
    x = np.random.default_rng(1).standard_normal((20, 4)).astype(np.float32)
    t = make_tensors(config, x)
    model = build_onnx(config, t, folded=True)
    taps = verify.find_taps(model)
    vals = onnx_forward(model, x, [tap.tensor for tap in taps])
    fwd = dict(forward_tensors(config, t, x).taps)
    for tap in taps:
        np.testing.assert_allclose(vals[tap.tensor], fwd[tap.label], rtol=1e-5, atol=1e-5)


def test_report_json_and_render(tmp_path):
    ckpt, config, tensors, x, classes = dataset_checkpoint(tmp_path, "iris")
    u, f = write_pair(tmp_path, config, tensors, classes)
    report = verify.verify([u, f], checkpoint=ckpt, provider="cpu")
    path = tmp_path / "r.json"
    verify.write_report(report, path)
    data = json.loads(path.read_text())
    assert data["passed"] is True
    assert data["tf32"].startswith("TF32: not applicable")
    assert [p["kind"] for p in data["probes"]] == ["random"]  # no dataset recipe: random only
    assert data["tolerances"] == [
        {
            "output": "logits",
            "dtype": "float64, of a float32 model",
            "atol": 1e-5,
            "rtol": 1e-4,
            "origin": "float32 default",
        },
        {
            "output": "logits",
            "dtype": "float32",
            "atol": 1e-5,
            "rtol": 1e-4,
            "origin": "float32 default",
        },
    ]
    assert {p["actual"] for p in data["pairs"]} >= {"float64 reference", "model.onnx [cpu]"}
    text = verify.render(report)
    assert "providers used: cpu" in text and text.endswith("within tolerance")
    assert "torch is not installed" in text  # no torch runner passed
    assert "logits (float32): atol 1e-05, rtol 0.0001 [float32 default]" in text


def test_checkpoint_test_split_is_the_default_input(tmp_path, monkeypatch):
    ckpt, config, tensors, x, classes = dataset_checkpoint(tmp_path, "iris")
    meta_path = ckpt / "config.json"
    meta = json.loads(meta_path.read_text())
    meta["dataset"] = {"name": "iris", "source": "sklearn", "seed": 0}
    meta_path.write_text(json.dumps(meta))
    u, f = write_pair(tmp_path, config, tensors, classes)

    class _Split:
        x_test = x[:17]

    import bn_onnx.data

    monkeypatch.setattr(bn_onnx.data, "load_split_from_checkpoint_meta", lambda m: _Split())
    report = verify.verify([u, f], checkpoint=ckpt, provider="cpu")
    data, random = report.probes
    assert data.rows == 17 and "test split (iris" in data.source
    assert random.kind == "random" and "input statistics" in random.source


def test_bad_inputs_raise_project_errors(tmp_path):
    u = tmp_path / "u.onnx"
    onnx.save(graphs.build_mlp([6, 4, 2], "unfolded"), u)
    with pytest.raises(InputDataError, match="expects 6"):
        verify.verify([u], inputs=np.zeros((3, 5), np.float32), provider="cpu")
    with pytest.raises(InputDataError, match="non-finite"):
        verify.verify([u], inputs=np.full((3, 6), np.nan, np.float32), provider="cpu")
    with pytest.raises(ProviderError):
        verify.verify([u], provider="cuda")
    other = tmp_path / "o.onnx"
    onnx.save(graphs.build_mlp([7, 4, 2], "unfolded"), other)
    with pytest.raises(UsageError, match="7 features"):
        verify.verify([u, other], provider="cpu")
    with pytest.raises(InputDataError, match="no data for input"):
        verify.verify([u], inputs={"x": np.zeros((3, 6), np.float32)}, provider="cpu")


def test_torch_free_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import bn_onnx.runtime, bn_onnx.verify, bn_onnx.compare, "
        "bn_onnx.arrays, bn_onnx.float64_kernels, bn_onnx.checkpoint_forward\n"
        "import bn_onnx.verify.float64, bn_onnx.verify.locate, bn_onnx.verify.oracles, "
        "bn_onnx.verify.probes, bn_onnx.verify.report, bn_onnx.verify.runs, "
        "bn_onnx.verify.signature, bn_onnx.verify.taps, bn_onnx.verify.engine, "
        "bn_onnx.verify.runners, bn_onnx.verify.evaluator_ops\n"
        "import bn_onnx.cli.run, bn_onnx.cli.verify, bn_onnx.cli.fold\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@settings(max_examples=12, deadline=None)
@given(
    widths=st.lists(st.integers(2, 24), min_size=3, max_size=5),
    bn=st.sampled_from(graphs.PLACEMENTS),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_any_mlp_folded_passes_and_any_tampered_layer_is_located(
    tmp_path_factory, widths, bn, seed, data
):
    tmp = tmp_path_factory.mktemp("prop")
    u, f, t = tmp / "u.onnx", tmp / "f.onnx", tmp / "t.onnx"
    onnx.save(graphs.build_mlp(widths, "unfolded", seed=seed, bn=bn), u)
    folded = graphs.build_mlp(widths, "folded", seed=seed, bn=bn)
    onnx.save(folded, f)
    assert verify.verify([u, f], provider="cpu", rows=32, seed=seed).passed
    k = data.draw(st.integers(0, len(widths) - 2), label="tampered block")
    arr = onnx.numpy_helper.to_array(
        next(i for i in folded.graph.initializer if i.name == f"block{k}.weight")
    ).copy()
    arr += np.float32(1.0)  # every weight of block k: the block's whole output moves
    for init in folded.graph.initializer:
        if init.name == f"block{k}.weight":
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(folded, t)
    report = verify.verify([u, t], provider="cpu", rows=32, seed=seed, locate=True)
    assert not report.passed
    # graphs.build_mlp's folded graph keeps the Gemm's output name for the Gemm+BN value:
    # locate must see through that and still name the Gemm whose weight changed
    expected = "head (Gemm)" if k == len(widths) - 2 else f"block{k}.gemm (Gemm)"
    (loc,) = report.locations
    assert loc.first is not None and loc.first.node == expected, verify.render(report)
    assert f"block{k}.weight" in loc.reads


def test_auto_skips_a_cuda_provider_that_does_not_start_and_says_so(tmp_path, monkeypatch):
    import onnxruntime as ort

    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    u = tmp_path / "u.onnx"
    onnx.save(graphs.build_mlp([6, 5, 3], "unfolded"), u)
    with warnings.catch_warnings():  # onnxruntime may note the missing provider itself
        warnings.simplefilter("ignore")
        report = verify.verify([u], provider="auto")
    assert report.passed
    assert [r.label for r in report.runs] == ["float64 reference", "u.onnx [cpu]"]
    assert report.runs[1].provider == "cpu"
    assert any(w.startswith("CUDA skipped") for w in report.warnings)
    with pytest.raises(ProviderError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verify.verify([u], provider="cuda")


@pytest.mark.parametrize("bn", ["pre", "post", "none"])
def test_torch_matching_points_agree_with_the_float64_ones(tmp_path, bn):
    pytest.importorskip("torch")
    from bn_onnx.checkpoint_forward import forward_tensors
    from bn_onnx.torch_eval import run_checkpoint_taps

    ckpt, config, tensors, x, _ = dataset_checkpoint(tmp_path, "wine", bn=bn, activation="silu")
    out, taps = run_checkpoint_taps(ckpt, x)
    fwd = forward_tensors(config, tensors, x)
    assert [label for label, _ in taps] == [label for label, _ in fwd.taps]
    for (label, got), (_, expected) in zip(taps, fwd.taps, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=label)
    np.testing.assert_array_equal(out, taps[-1][1])


def test_locate_names_the_layer_where_torch_diverges(tmp_path):
    pytest.importorskip("torch")
    from bn_onnx.torch_eval import run_checkpoint_taps

    ckpt, config, tensors, x, classes = dataset_checkpoint(tmp_path, "iris", bn="pre")
    u, _ = write_pair(tmp_path, config, tensors, classes)

    def broken_torch(path, rows):  # as if torch computed block 1's linear layer wrongly
        out, taps = run_checkpoint_taps(path, rows)
        taps = [
            (lab, v + 1.0 if lab.startswith("block 1") or lab == "output" else v) for lab, v in taps
        ]
        return taps[-1][1], taps

    report = verify.verify(
        [u], checkpoint=ckpt, inputs=x, provider="cpu", locate=True, torch_runner=broken_torch
    )
    assert not report.passed
    (loc,) = [loc for loc in report.locations if loc.actual == "torch eval"]
    assert loc.method == "MLP matching points"
    assert loc.first is not None and loc.first.name == "block 1 pre-activation"
    assert "blocks.1.linear" in loc.actual_nodes
    assert "block 1: its linear layer" in verify.render(report)
