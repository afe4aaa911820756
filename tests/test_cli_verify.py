"""`bn-onnx verify`: the table, exit 0 / 1 / 2, --locate, --report, a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

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
    assert "FAIL" in out and "first divergence: block 1: its linear layer" in out
    data = json.loads(report.read_text())
    assert data["passed"] is False
    firsts = {loc["first"] for loc in data["locations"] if loc["first"]}
    assert firsts == {"block 1 pre-activation"}


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
    assert rc == 1 and "first divergence: block 1" in out


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
