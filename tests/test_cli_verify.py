"""`bn-onnx verify` and `bn-onnx fold --verify`: the table, exit 0 / 1 / 2, --locate, --report,
--shape, per-output tolerances, .npz inputs, a real subprocess; the shipped digits model with a
changed weight in the column of a pixel that is 0 in all its data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_verify_models import dataset_checkpoint, perturb, write_pair

from bn_onnx.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cliverify")
    ckpt, config, tensors, x, classes = dataset_checkpoint(tmp, "digits", bn="pre", hidden=(32, 16))
    u, f = write_pair(tmp, config, tensors, classes)
    np.save(tmp / "x.npy", x[:100])
    return tmp, ckpt, u, f


def test_verify_with_checkpoint_prints_the_table_and_exits_0(trained, capsys):
    tmp, ckpt, u, f = trained
    rc = main(["verify", str(u), str(f), "--checkpoint", str(ckpt), "--provider", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for text in (
        "float64 reference",
        "float64 checkpoint",
        "random  ",
        "torch eval",
        "model.folded.onnx [cpu]",
        "max abs",
        "median abs",
        "argmax",
        "folding vs float64",
        "no added error",
        "TF32: not applicable",
        "PASS",
    ):
        assert text in out


def test_tampered_model_exits_1_and_locate_names_the_layer(trained, tmp_path, capsys):
    _, ckpt, u, f = trained
    bad = perturb(f, "blocks.1.linear.w", tmp_path / "bad.onnx", delta=1.0)
    report = tmp_path / "r.json"
    rc = main(
        [
            "verify",
            str(u),
            str(bad),
            "--checkpoint",
            str(ckpt),
            "--provider",
            "cpu",
            "--locate",
            "--report",
            str(report),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL" in out
    assert "first divergence: blocks.1.linear.out, computed by blocks.1.linear (Gemm)" in out
    data = json.loads(report.read_text())
    assert data["passed"] is False
    assert {loc["node"] for loc in data["locations"]} == {"blocks.1.linear (Gemm)"}
    assert all("blocks.1.linear.w" in loc["reads"] for loc in data["locations"])


def test_input_file_and_tolerance_options(trained, tmp_path, capsys):
    tmp, _, u, f = trained
    rc = main(
        ["verify", str(u), str(f), "--input", str(tmp / "x.npy"), "--atol", "0", "--rtol", "0"]
    )
    out = capsys.readouterr().out
    assert rc == 1  # float32 rounding differs somewhere at zero tolerance
    assert "from " in out and "atol 0, rtol 0" in out
    rc = main(["verify", str(u), str(f), "--input", str(tmp / "x.npy"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and out.strip().startswith("PASS")


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--input", "missing.npy"], "not found"),
        (["--provider", "cuda"], "onnxruntime-gpu"),
        (["--checkpoint", "no_such_dir"], "checkpoint"),
        (["--atol", "-1"], None),
    ],
)
def test_bad_input_exits_2(trained, tmp_path, capsys, extra, match):
    _, _, u, _ = trained
    extra = [str(tmp_path / e) if e.endswith((".npy", "_dir")) else e for e in extra]
    try:
        rc = main(["verify", str(u), *extra])
    except SystemExit as exc:  # argparse rejects malformed option values itself
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2
    if match:
        assert match in err and err.count("\n") == 1


def test_wrong_width_input_exits_2(trained, tmp_path, capsys):
    _, _, u, _ = trained
    np.save(tmp_path / "w.npy", np.zeros((3, 7), np.float32))
    rc = main(["verify", str(u), "--input", str(tmp_path / "w.npy")])
    assert rc == 2 and "expects 64" in capsys.readouterr().err


def test_subprocess_verify(trained, tmp_path):
    tmp, ckpt, u, f = trained
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bn_onnx",
            "verify",
            str(u),
            str(f),
            "--input",
            str(tmp / "x.npy"),
            "--provider",
            "cpu",
            "--report",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True


@pytest.mark.slow
def test_trained_digits_model_exported_both_ways_passes_and_tampered_fails(
    make_checkpoint, tmp_path, capsys
):
    """The issue's acceptance check, end to end: train, export (unfolded and folded), verify."""
    from bn_onnx.export import export_checkpoint

    ckpt = make_checkpoint(dataset="digits", bn="pre", hidden=(32, 16), epochs=2)
    u, f = tmp_path / "digits.onnx", tmp_path / "digits.folded.onnx"
    export_checkpoint(ckpt, u)
    export_checkpoint(ckpt, f, fold=True)
    rc = main(["verify", str(u), str(f), "--checkpoint", str(ckpt), "--provider", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "the checkpoint's test split (digits" in out and "torch eval" in out
    # the exporter's graphs line up point for point, folded or not
    from bn_onnx.verify import find_taps

    labels = [[t.label for t in find_taps(onnx.load(p))] for p in (u, f)]
    assert labels[0] == labels[1] and len(labels[0]) == 5
    bad = perturb(f, _first_weight(f, rows=16), tmp_path / "tampered.onnx", delta=0.5)
    rc = main(["verify", str(u), str(bad), "--checkpoint", str(ckpt), "--locate"])
    out = capsys.readouterr().out
    assert rc == 1 and "first divergence:" in out and "computed by node_linear_1 (Gemm)" in out


def _first_weight(path, rows):
    model = onnx.load(path)
    return next(t.name for t in model.graph.initializer if len(t.dims) == 2 and t.dims[0] == rows)


@pytest.mark.parametrize("damage", ["config", "weights", "empty"])
def test_corrupt_checkpoint_exits_2(trained, tmp_path, capsys, damage):
    import shutil

    _, ckpt, u, _ = trained
    bad = tmp_path / "bad_ckpt"
    if damage == "empty":
        bad.mkdir()
    else:
        shutil.copytree(ckpt, bad)
        name = "config.json" if damage == "config" else "model.safetensors"
        (bad / name).write_bytes(b"{not json or safetensors")
    rc = main(["verify", str(u), "--checkpoint", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("bn-onnx verify: error:") and err.count("\n") == 1


@pytest.mark.cpu_sensitive
def test_shipped_digits_models_verify_against_their_checkpoint(capsys):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "models" / "digits"
    if not (root / "model.folded.onnx").exists():
        pytest.skip("models/digits not generated (tools/make_models.py)")
    rc = main(
        [
            "verify",
            str(root / "model.onnx"),
            str(root / "model.folded.onnx"),
            "--checkpoint",
            str(root / "checkpoint"),
            "--provider",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "no added error" in out


@pytest.mark.parametrize(
    "content, match",
    [(None, "not found"), (b"", "empty"), (b"\x08\x07garbage", "ONNX")],
    ids=["missing", "empty", "garbage"],
)
def test_bad_model_files_exit_2(trained, tmp_path, capsys, content, match):
    _, _, u, _ = trained
    path = tmp_path / "other.onnx"
    if content is not None:
        path.write_bytes(content)
    rc = main(["verify", str(u), str(path), "--report", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and err.count("\n") == 1
    assert not (tmp_path / "r.json").exists()


def _digits_pixel0_tampered(tmp_path):
    """The shipped digits model, folded, with one weight of the first Gemm changed by 0.5 in
    the column of pixel 0, which is 0 in every row of the digits data."""
    root = Path(__file__).resolve().parents[1] / "models" / "digits"
    if not (root / "model.folded.onnx").exists():
        pytest.skip("models/digits not generated (tools/make_models.py)")
    model = onnx.load(root / "model.folded.onnx")
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    for t in model.graph.initializer:
        if t.name == gemm.input[1]:
            w = onnx.numpy_helper.to_array(t).copy()
            w[5, 0] += 0.5  # Gemm transB=1: weight [out, in], column 0 is pixel 0
            t.CopyFrom(onnx.numpy_helper.from_array(w, t.name))
    bad = tmp_path / "pixel0.onnx"
    onnx.save(model, bad)
    return root, bad, gemm.name


def test_a_weight_of_an_always_zero_pixel_changed_fails_even_with_the_checkpoint(tmp_path, capsys):
    root, bad, gemm = _digits_pixel0_tampered(tmp_path)
    report = tmp_path / "r.json"
    rc = main(
        [
            "verify",
            str(root / "model.onnx"),
            str(bad),
            "--checkpoint",
            str(root / "checkpoint"),
            "--provider",
            "cpu",
            "--locate",
            "--report",
            str(report),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1, out
    data = json.loads(report.read_text())
    (split,) = [p for p in data["probes"] if p["kind"] == "data"]
    assert "test split (digits" in split["source"]
    pairs = [p for p in data["pairs"] if p["counted"] and p["actual"] == "pixel0.onnx [cpu]"]
    # the test split never sees the change (pixel 0 is always 0); the random probe does
    assert {p["probe"]: p["passed"] for p in pairs} == {"data": True, "random": False}
    assert f"computed by {gemm} (Gemm)" in out
    assert {loc["node"] for loc in data["locations"]} == {f"{gemm} (Gemm)"}


def test_the_same_change_fails_on_given_data_alone(tmp_path, capsys):
    root, bad, gemm = _digits_pixel0_tampered(tmp_path)
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)
    assert not x[:, 0].any()
    np.save(tmp_path / "x.npy", x)
    rc = main(["verify", str(root / "model.onnx"), str(bad), "--input", str(tmp_path / "x.npy")])
    out = capsys.readouterr().out
    assert rc == 1, out
    # the input BatchNormalization of the unfolded graph sets the random probe's range
    assert "input's BatchNormalization in the graph" in out


def test_npz_inputs_shapes_and_per_output_tolerances(tmp_path, capsys):
    from test_verify_any_model import multi_io, pair, sequence_model

    u, f = pair(multi_io(), tmp_path)
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "x.npz",
        x=rng.normal(size=(6, 4)).astype(np.float32),
        idx=np.arange(6),
        flag=np.ones((6, 1), bool),
    )
    rc = main(
        [
            "verify",
            str(u),
            str(f),
            "--input",
            str(tmp_path / "x.npz"),
            "--atol",
            "total=0.5",
            "--rtol",
            "1e-3",
            "--provider",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "data    6 rows: from " in out
    assert "total (float32): atol 0.5, rtol 0.001 [--atol total=, --rtol]" in out
    assert "y (float32): atol 1e-05, rtol 0.001 [--rtol, float32 default]" in out
    u, f = pair(sequence_model(), tmp_path, "seq")
    rc = main(["verify", str(u), str(f), "--shape", "x:2x4x7", "--rows", "4"])
    out = capsys.readouterr().out
    assert rc == 0 and "random  4 rows in 2 runs" in out


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--shape", "x-1x2"], "NAME:DIMS"),
        (["--shape", "x:1xa"], "whole numbers"),
        (["--atol", "y=abc"], "NAME=VALUE"),
        (["--atol", "=1"], "NAME=VALUE"),
        (["--rtol", "inf"], "finite"),
    ],
)
def test_bad_shape_and_tolerance_options_exit_2(trained, capsys, extra, match):
    _, _, u, _ = trained
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(u), *extra])
    assert exc.value.code == 2 and match in capsys.readouterr().err


def test_fold_report_renamed_mapping_guides_locate(tmp_path, capsys):
    from fold_testing import model_from_text

    head = '<ir_version: 8, opset_import: ["" : 18]>'
    w = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    text = """{head}
        g (float[N, 4] x) => (float[N, 4] y) {{
          {m} = MatMul (x, W)
          {a} = Add ({m}, B)
          y = Relu ({a})
        }}"""
    inits = {"W": w, "B": np.ones(4, np.float32)}
    original = model_from_text(text.format(head=head, m="m", a="a"), inits)
    bad_w = w.copy()
    bad_w[1, 2] += 1.0
    renamed = model_from_text(text.format(head=head, m="m2", a="a2"), {**inits, "W": bad_w})
    onnx.save(original, tmp_path / "o.onnx")
    onnx.save(renamed, tmp_path / "r.onnx")
    args = ["verify", str(tmp_path / "o.onnx"), str(tmp_path / "r.onnx"), "--locate"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "first divergence: y, computed by Relu -> y" in out  # only the output is shared
    (tmp_path / "fold.json").write_text(json.dumps({"renamed": {"m": "m2", "a": "a2"}}))
    assert main([*args, "--fold-report", str(tmp_path / "fold.json")]) == 1
    out = capsys.readouterr().out
    assert "first divergence: m2, computed by MatMul -> m2" in out


def test_fold_verify_writes_the_folded_model_only_when_the_proof_passes(
    tmp_path, capsys, monkeypatch
):
    from fold_testing import mlp_with_probe

    import bn_onnx.fold

    src = tmp_path / "m.onnx"
    onnx.save(mlp_with_probe(), src)
    out, rep = tmp_path / "f.onnx", tmp_path / "r.json"
    assert main(["fold", str(src), "-o", str(out), "--verify", "--report", str(rep)]) == 0
    text = capsys.readouterr().out
    assert "folded 1 of 2" in text and "verified: PASS" in text
    assert out.exists() and json.loads(rep.read_text())["n_folded"] == 1
    out.unlink()
    rep.unlink()

    real = bn_onnx.fold.fold_file

    def broken_fold(in_path, out_path, **kwargs):  # a fold bug: one weight off after folding
        report = real(in_path, out_path, **kwargs)
        staged = kwargs["group"].staged(out_path)  # the folded file, before the rename
        perturb(staged, _first_weight(staged, rows=4), staged, delta=0.5)
        return report

    monkeypatch.setattr(bn_onnx.fold, "fold_file", broken_fold)
    rc = main(["fold", str(src), "-o", str(out), "--verify", "--report", str(rep)])
    text = capsys.readouterr().out
    assert rc == 1 and "FAIL" in text and "first divergence" in text and "not written" in text
    assert not out.exists() and not rep.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary left
