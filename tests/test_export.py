"""`bn_onnx.export` and `bn-onnx export`: BN kept or folded, same numbers as torch, conventions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from export_testing import ATOL, RTOL, bn_count, random_checkpoint, run_ort

torch = pytest.importorskip("torch")

from bn_onnx import onnx_meta  # noqa: E402
from bn_onnx.checkpoint import load_model  # noqa: E402
from bn_onnx.checkpoint_forward import checkpoint_forward  # noqa: E402
from bn_onnx.cli import main  # noqa: E402
from bn_onnx.errors import UnsupportedModelError, UsageError  # noqa: E402
from bn_onnx.export import (  # noqa: E402
    check_inference_bn,
    export_checkpoint,
    fold_exported,
    to_onnx,
)
from bn_onnx.onnx_io import save_model  # noqa: E402

# Every BN placement with and without input normalization; activation, task and dropout vary
# along so that the same few exports also cover gelu/silu/tanh/sigmoid, regression outputs
# and a BN folded through Dropout.
CONFIGS = [
    {"bn": "pre", "input_norm": True, "activation": "relu", "task": "classification"},
    {"bn": "pre", "input_norm": False, "activation": "gelu", "task": "regression"},
    {"bn": "post", "input_norm": True, "activation": "silu", "task": "classification"},
    {
        "bn": "post",
        "input_norm": False,
        "activation": "tanh",
        "task": "classification",
        "dropout": 0.2,
    },  # eval-mode Dropout: an Identity between the BN and the next Gemm
    {"bn": "none", "input_norm": True, "activation": "sigmoid", "task": "regression"},
    {"bn": "none", "input_norm": False, "activation": "relu", "task": "classification"},
]
IN_FEATURES, OUT_FEATURES, HIDDEN = 7, 4, (12, 9)


def _id(cfg: dict) -> str:
    return f"{cfg['bn']}-{'inorm' if cfg['input_norm'] else 'noinorm'}-{cfg['task'][:5]}"


@dataclass
class Exported:
    cfg: dict
    ckpt: Path
    unfolded: Path
    folded: Path
    result_unfolded: object
    fold_report: dict


@pytest.fixture(scope="module", params=CONFIGS, ids=_id)
def exported(request, tmp_path_factory) -> Exported:
    cfg = request.param
    root = tmp_path_factory.mktemp(_id(cfg))
    ckpt = random_checkpoint(
        root / "ckpt",
        seed=CONFIGS.index(cfg),
        in_features=IN_FEATURES,
        out_features=OUT_FEATURES,
        hidden=HIDDEN,
        **cfg,
    )
    r_unfolded = export_checkpoint(ckpt, root / "model.onnx")
    # The fold step of `export_checkpoint(fold=True)` on the exported file; the whole
    # `fold=True` path is exercised by the CLI, external-data and failure tests below (a
    # second dynamo export per configuration would double this fixture's time).
    folded, report = fold_exported(onnx.load(r_unfolded.path))
    save_model(folded, root / "model.folded.onnx")
    return Exported(cfg, ckpt, r_unfolded.path, root / "model.folded.onnx", r_unfolded, report)


def _expected_bn(cfg: dict) -> int:
    return int(cfg["input_norm"]) + (len(HIDDEN) if cfg["bn"] != "none" else 0)


def test_unfolded_export_keeps_one_inference_bn_node_per_bn_layer(exported):
    model = onnx.load(exported.unfolded)
    nodes = onnx_meta.bn_nodes(model)
    assert len(nodes) == _expected_bn(exported.cfg)
    assert exported.result_unfolded.n_bn == len(nodes)
    inits = {t.name for t in model.graph.initializer}
    for node in nodes:
        assert onnx_meta.bn_training_mode(node) == 0
        assert len(node.output) == 1
        assert all(name in inits for name in node.input[1:])
    assert onnx_meta.op_counts(model)["Gemm"] == len(HIDDEN) + 1


def test_folded_export_has_no_bn_and_otherwise_the_same_ops(exported):
    model = onnx.load(exported.folded)
    assert bn_count(model) == 0
    counts = onnx_meta.op_counts(model)
    unfolded = onnx_meta.op_counts(onnx.load(exported.unfolded))
    unfolded.pop("BatchNormalization", None)
    plain, plain_report = fold_exported(onnx.load(exported.unfolded), cleanup=False)
    assert plain_report["cleanup"] is None
    # every BN went into an existing Gemm: no node was added, none other removed
    assert onnx_meta.op_counts(plain) == unfolded
    # the cleanup only lifts the exporter's Constant nodes (gelu's sqrt(2), 0.5 ...) into
    # initializers and drops the Identity of an eval-mode Dropout: the MLP export has no
    # other clutter
    clutter = {op: n for op, n in unfolded.items() if op in ("Constant", "Identity")}
    assert counts == {op: n for op, n in unfolded.items() if op not in clutter}
    assert exported.fold_report["cleanup"]["removed_ops"] == clutter
    report = exported.fold_report
    assert report["n_bn"] == report["n_folded"] == _expected_bn(exported.cfg)


@pytest.mark.parametrize("rows", [1, 37])
def test_unfolded_and_folded_match_torch_eval_and_float64(exported, rows):
    rng = np.random.default_rng(rows)
    x = rng.normal(0.5, 2.0, size=(rows, IN_FEATURES)).astype(np.float32)
    model, _ = load_model(exported.ckpt)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    exact = checkpoint_forward(exported.ckpt, x).output
    for path in (exported.unfolded, exported.folded):
        got = run_ort(path, x)
        assert got.shape == (rows, OUT_FEATURES)
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL, err_msg=str(path))
        np.testing.assert_allclose(got, exact, atol=ATOL, rtol=RTOL, err_msg=str(path))


def test_exported_files_hold_no_source_paths_of_the_build_machine(exported):
    import bn_onnx

    checkout = str(Path(bn_onnx.__file__).resolve().parent.parent)
    for path in (exported.unfolded, exported.folded):
        data = path.read_bytes()
        assert checkout.encode() not in data, path
        assert b"stack_trace" not in data, path


def test_input_output_names_and_symbolic_batch(exported):
    for path in (exported.unfolded, exported.folded):
        model = onnx.load(path)
        (inp,) = model.graph.input
        (out,) = model.graph.output
        assert inp.name == "input"
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        batch, features = inp.type.tensor_type.shape.dim
        assert batch.dim_param and not batch.HasField("dim_value")
        assert features.dim_value == IN_FEATURES
        want = "logits" if exported.cfg["task"] == "classification" else "prediction"
        assert out.name == want
        out_dims = out.type.tensor_type.shape.dim
        assert out_dims[0].dim_param == batch.dim_param
        assert out_dims[1].dim_value == OUT_FEATURES


def test_metadata_describes_model_and_fold_state(exported):
    for path, folded in ((exported.unfolded, "false"), (exported.folded, "true")):
        meta = onnx_meta.get_metadata(onnx.load(path))
        assert set(onnx_meta.METADATA_KEYS) <= set(meta)
        assert meta[onnx_meta.FOLDED] == folded
        assert meta[onnx_meta.TASK] == exported.cfg["task"]
        config = json.loads(meta[onnx_meta.CONFIG])
        assert {k: config[k] for k in exported.cfg} == exported.cfg
        assert config["hidden"] == list(HIDDEN)
        ckpt_meta = json.loads((exported.ckpt / "config.json").read_text())
        assert json.loads(meta[onnx_meta.CLASS_NAMES]) == ckpt_meta["class_names"]
        assert json.loads(meta[onnx_meta.PREPROCESSING]) == ckpt_meta["preprocessing"]


def test_written_files_pass_full_checker_and_are_single_files(exported):
    for path in (exported.unfolded, exported.folded):
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(path, load_external_data=False)
        assert not any(
            t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
        )
        assert not Path(str(path) + ".data").exists()
        opsets = {o.domain: o.version for o in model.opset_import}
        assert opsets.get("", opsets.get("ai.onnx")) == 18
    leftovers = [p.name for p in exported.unfolded.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


# ---------------------------------------------------------------------------------------------
# The guarantees behind the unfolded file, shown on real and hand-made failures


def _small_model(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    ckpt = random_checkpoint(tmp_path / "ckpt", seed=3, in_features=5, out_features=3, hidden=(6,))
    model, _ = load_model(ckpt)
    return model, ckpt


def test_export_refuses_when_torch_optimizer_fuses_the_bn(tmp_path, monkeypatch):
    # optimize=True (torch's default) fuses the hidden BN into its Gemm: exactly the silent
    # fold the unfolded export must never write.
    model, _ = _small_model(tmp_path)
    real_export = torch.onnx.export

    def optimizing_export(*args, **kwargs):
        kwargs["optimize"] = True
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", optimizing_export)
    with pytest.raises(UnsupportedModelError, match="BatchNormalization"):
        to_onnx(model, 5)


def _bn_graph(attrs: str = "", param_input: bool = False) -> onnx.ModelProto:
    extra_in = ", float[2] s" if param_input else ""
    text = f"""
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[N, 2] x{extra_in}) => (float[N, 2] y) {{
        y = BatchNormalization{attrs} (x, s, b, m, v)
    }}
    """
    model = onnx.parser.parse_model(text)
    names = ["b", "m", "v"] if param_input else ["s", "b", "m", "v"]
    for name in names:
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(2, np.float32), name))
    return model


def test_check_inference_bn_accepts_plain_bn_and_refuses_the_rest():
    check_inference_bn(_bn_graph(), 1)
    with pytest.raises(UnsupportedModelError, match="1 BatchNormalization node.*for 2"):
        check_inference_bn(_bn_graph(), 2)
    with pytest.raises(UnsupportedModelError, match="training form"):
        check_inference_bn(_bn_graph("<training_mode: int = 1>"), 1)
    with pytest.raises(UnsupportedModelError, match="'s' is not an initializer"):
        check_inference_bn(_bn_graph(param_input=True), 1)


def test_sync_batchnorm_from_distributed_training_exports_as_plain_bn(tmp_path):
    # DDP on CUDA converts BN layers to SyncBatchNorm; the export turns them back.
    model, _ = _small_model(tmp_path)
    x = np.random.default_rng(5).normal(size=(4, 5)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    proto = to_onnx(synced, 5)
    assert bn_count(proto) == 2
    np.testing.assert_allclose(run_ort(proto, x), expected, atol=ATOL, rtol=RTOL)


def test_torchlib_registry_reuse_gives_identical_bytes(tmp_path, monkeypatch):
    import contextlib

    import bn_onnx.export as export_mod

    model, _ = _small_model(tmp_path)
    reused = to_onnx(model, 5).SerializeToString()
    monkeypatch.setattr(export_mod, "_reuse_torchlib_registry", contextlib.nullcontext)
    fresh = to_onnx(model, 5).SerializeToString()
    assert reused == fresh


def test_large_model_path_writes_external_data_that_loads(tmp_path, monkeypatch):
    import bn_onnx.onnx_io as onnx_io

    # hidden 64: the 5x64 weight (1280 bytes) is above onnx's 1 KB inline threshold
    ckpt = random_checkpoint(tmp_path / "ckpt", seed=4, in_features=5, out_features=3, hidden=(64,))
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 64)  # "2 GB" for this test
    result = export_checkpoint(ckpt, tmp_path / "big.onnx", fold=True)
    assert result.files == [tmp_path / "big.onnx", tmp_path / "big.onnx.data"]
    assert all(f.is_file() for f in result.files)
    onnx.checker.check_model(str(result.path), full_check=True)
    x = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    model, _ = load_model(ckpt)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_ort(result.path, x), expected, atol=ATOL, rtol=RTOL)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_failure_during_fold_leaves_no_file(tmp_path, monkeypatch):
    import bn_onnx.fold

    _, ckpt = _small_model(tmp_path)
    out = tmp_path / "out"
    out.mkdir()

    def broken_fold(model, **kwargs):
        raise UnsupportedModelError("simulated fold failure")

    monkeypatch.setattr(bn_onnx.fold, "fold_model", broken_fold)
    rc = main(["export", str(ckpt), "-o", str(out / "m.onnx"), "--fold", "-q"])
    assert rc == 2
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_export_prints_summary_and_writes_folded_file(tmp_path, capsys):
    _, ckpt = _small_model(tmp_path)
    out = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), "-o", str(out), "--fold"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text
    assert "2 exported, 2 folded, 0 left" in text
    assert bn_count(onnx.load(out)) == 0
    cleanup = [line for line in text.splitlines() if line.startswith("cleanup: ")]
    assert len(cleanup) == 1  # the cleanup ran after the fold
    plain = tmp_path / "plain.onnx"
    assert main(["export", str(ckpt), "-o", str(plain), "--fold", "--no-cleanup"]) == 0
    text = capsys.readouterr().out
    assert "2 exported, 2 folded, 0 left" in text and "cleanup" not in text


def test_cli_export_opset_option(tmp_path):
    _, ckpt = _small_model(tmp_path)
    out = tmp_path / "m20.onnx"
    assert main(["export", str(ckpt), "-o", str(out), "--opset", "20", "-q"]) == 0
    model = onnx.load(out)
    assert {o.version for o in model.opset_import if o.domain == ""} == {20}
    assert bn_count(model) == 2


def _corrupt_weights(ckpt: Path) -> None:
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])


def _config_not_json(ckpt: Path) -> None:
    (ckpt / "config.json").write_text("{not json")


def _no_weights(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()


@pytest.mark.parametrize("damage", [_corrupt_weights, _config_not_json, _no_weights])
def test_cli_export_refuses_broken_checkpoint_with_exit_2(tmp_path, capsys, damage):
    _, ckpt = _small_model(tmp_path)
    damage(ckpt)
    out = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bn-onnx export: error:") and "checkpoint" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_export_bad_paths_exit_2_and_leave_checkpoint_unchanged(tmp_path, capsys):
    _, ckpt = _small_model(tmp_path)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    cases = [
        (str(tmp_path / "missing-ckpt"), str(tmp_path / "m.onnx"), "checkpoint not found"),
        (str(ckpt), str(tmp_path / "no" / "m.onnx"), "output folder does not exist"),
        (str(ckpt), str(ckpt), "is a directory"),
        (str(ckpt), str(ckpt / "model.safetensors"), "must be a .onnx file"),
        (str(ckpt), str(tmp_path / "m.onnx") + " --opset 5", "opset"),
    ]
    for ckpt_arg, out_arg, message in cases:
        argv = ["export", ckpt_arg, "-o", *out_arg.split(" ")]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_subprocess_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bn_onnx", "export", str(tmp_path / "nope"), "-o", "x.onnx"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("bn-onnx export: error: checkpoint")
    assert "Traceback" not in proc.stderr


def test_cli_export_options_without_their_mode_are_usage_errors(tmp_path, capsys):
    _, ckpt = _small_model(tmp_path)
    out = str(tmp_path / "e.onnx")
    cases = [
        (["-o", out, "--accurate"], "--accurate needs --quantize"),
        (["-o", out, "--no-cleanup"], "--no-cleanup needs --fold"),
        (["-o", str(tmp_path / "e.npy")], "must be a .onnx file (got '.npy')"),
        (["-o", str(tmp_path / "e")], "must be a .onnx file (got 'no extension')"),
    ]
    for extra, message in cases:
        assert main(["export", str(ckpt), *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (extra, err)
    assert not list(tmp_path.glob("e*"))
    # The library still refuses an output inside the checkpoint, whatever its name.
    with pytest.raises(UsageError, match="checkpoint's model.safetensors"):
        export_checkpoint(ckpt, ckpt / "model.safetensors")
