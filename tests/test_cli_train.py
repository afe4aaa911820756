"""`bn-onnx train`: outputs, progress, --help, exit codes and one-line errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from bn_onnx.checkpoint import read_checkpoint
from bn_onnx.cli import build_parser, main

FAST = ["--dataset", "iris", "--hidden", "8", "--epochs", "2"]


def test_train_writes_checkpoint_and_prints_summary(tmp_path, capsys):
    out = tmp_path / "runs" / "iris"
    rc = main(["train", *FAST, "--bn", "post", "--no-input-norm", "--seed", "4", "--out", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iris: test accuracy ")
    assert str(out) in lines[0]
    # not a TTY: one plain progress line per epoch on stderr
    epochs = [ln for ln in captured.err.splitlines() if ln.startswith("epoch ")]
    assert [ln.split()[1] for ln in epochs] == ["1/2", "2/2"]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "metrics.json",
        "model.safetensors",
    ]
    ck = read_checkpoint(out)
    assert ck.config.bn == "post" and ck.config.input_norm is False and ck.config.hidden == (8,)
    assert ck.meta["training"]["seed"] == 4
    reported = float(lines[0].split("test accuracy ")[1].split()[0])
    assert reported == pytest.approx(ck.metrics["test_accuracy"], abs=5e-5)


def test_test_fraction_0_trains_on_all_but_the_validation_split_and_says_so(tmp_path, capsys):
    out = tmp_path / "whole"
    rc = main(
        ["train", *FAST, "--test-fraction", "0", "--valid-fraction", "0.2", "--out", str(out)]
    )
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("iris: validation accuracy ")
    assert "rows: 120 train, 30 validation, 0 test" in line
    ck = read_checkpoint(out)
    assert ck.meta["dataset"]["sizes"] == {"train": 120, "val": 30, "test": 0}
    assert ck.metrics["n_test"] == 0 and ck.metrics["test_accuracy"] is None
    assert ck.metrics["n_val"] == 30 and ck.metrics["val_accuracy"] is not None


def test_quiet_prints_nothing(tmp_path, capsys):
    assert main(["train", *FAST, "--quiet", "--out", str(tmp_path / "q")]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert (tmp_path / "q" / "model.safetensors").is_file()


def test_synthetic_regression_from_cli(tmp_path, capsys):
    args = ["train", "--dataset", "synthetic", "--task", "regression", "--samples", "200"]
    args += ["--features", "4", "--hidden", "8", "--epochs", "2", "--out", str(tmp_path / "r")]
    assert main(args) == 0
    assert "test rmse" in capsys.readouterr().out
    assert "test_rmse" in json.loads((tmp_path / "r" / "metrics.json").read_text())


BAD_OPTIONS = [
    (["--bn", "foo"], "invalid choice: 'foo'"),
    (["--hidden", "0"], "--hidden"),
    (["--hidden", "a,b"], "--hidden"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "x"], "--batch-size"),
    (["--dropout", "1"], "--dropout"),
    (["--optimizer", "lbfgs"], "--optimizer"),
    (["--activation", "swish"], "--activation"),
    (["--val-fraction", "0.6"], "--val-fraction"),
    (["--valid-fraction", "0"], "--valid-fraction"),
    (["--test-fraction", "-0.1"], "--test-fraction"),
    (["--patience", "-2"], "--patience"),
    (["--bn-momentum", "2"], "--bn-momentum"),
]


@pytest.mark.parametrize(("extra", "fragment"), BAD_OPTIONS)
def test_bad_option_exits_2_with_one_line(tmp_path, capsys, extra, fragment):
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(tmp_path / "o"), *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("bn-onnx train: error: ") and fragment in err
    assert not (tmp_path / "o").exists()


def test_unknown_option_exits_2_without_traceback(tmp_path, capsys):
    # Reported by the top-level parser (bn_onnx/cli/__init__.py): usage line + error line.
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(tmp_path / "o"), "--no-such-option"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --no-such-option" in err and "Traceback" not in err


def test_missing_out_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--dataset", "iris"])
    assert info.value.code == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--dataset", "mnist"], "unknown dataset 'mnist': choose from digits, wine"),
        (["--dataset", "nothere.csv", "--target", "y"], "dataset file not found"),
        (["--dataset", "nothere.npz", "--nproc", "2"], "dataset file not found"),
        (["--dataset", "iris", "--task", "regression"], "classification dataset"),
        (["--dataset", "iris", "--batch-size", "1"], "batch size of at least 2"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, fragment):
    rc = main(["train", *extra, "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bn-onnx train: error: ") and fragment in err
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file_exits_2(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    assert main(["train", *FAST, "--out", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_nproc_checks_the_data_before_launching_workers(tmp_path, capsys, monkeypatch):
    import bn_onnx.cli.train as cli_train

    monkeypatch.setattr(cli_train, "_launch", lambda *a: pytest.fail("workers launched"))
    path = tmp_path / "d.csv"
    path.write_text("a,y\n1,x\n2,\n")
    rc = main(["train", "--nproc", "2", "--dataset", str(path), "--target", "y", "--out", "o"])
    assert rc == 2
    assert "target column 'y' has empty cells" in capsys.readouterr().err


def test_csv_without_target_exits_2(tmp_path, capsys):
    path = tmp_path / "d.csv"
    path.write_text("a,b\n1,2\n3,4\n")
    assert main(["train", "--dataset", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "needs --target COLUMN (columns: a, b)" in capsys.readouterr().err


def test_empty_or_corrupt_checkpoint_exits_2_in_export(tmp_path, capsys):
    pytest.importorskip("bn_onnx.cli.export")
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    for ck in (empty, corrupt):
        rc = main(["export", str(ck), "-o", str(tmp_path / "m.onnx")])
        assert rc == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "checkpoint" in err
    assert not (tmp_path / "m.onnx").exists()


def test_help_explains_every_option(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train_parser = sub.choices["train"]
    for action in train_parser._actions:
        assert action.help and len(action.help) > 10, action.dest
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--dataset", "--target", "--hidden", "--bn", "--input-norm", "--no-input-norm",
        "--activation", "--dropout", "--optimizer", "--lr", "--weight-decay", "--epochs",
        "--batch-size", "--patience", "--seed", "--quiet", "--out", "--nproc",
    ):  # fmt: skip
        assert option in text
    assert "bn-onnx train --dataset digits --out runs/digits" in text


def test_rich_progress_on_a_tty(monkeypatch, capsys):
    from bn_onnx.cli.train import _Reporter
    from bn_onnx.train import EpochStats, ProgressEvent

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    reporter = _Reporter(quiet=False)
    reporter(ProgressEvent("start", 0, 2, "accuracy"))
    assert reporter.progress is not None
    stats = EpochStats(1, 0.5, 0.8, 0.6, 0.75, 0.01, True)
    reporter(ProgressEvent("epoch", 1, 2, "accuracy", stats=stats))
    reporter(ProgressEvent("done", 1, 2, "accuracy", metrics={}))
    assert reporter.progress is None
    err = capsys.readouterr().err
    assert "val_acc 0.7500" in err
    assert "epoch 1/2" not in err  # the bar, not plain lines


def test_subprocess_train_and_bad_option(tmp_path):
    out = tmp_path / "s"
    ok = subprocess.run(
        [sys.executable, "-m", "bn_onnx", "train", *FAST, "--quiet", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert ok.returncode == 0, ok.stderr
    assert read_checkpoint(out).config.hidden == (8,)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "bn_onnx",
            "train",
            "--dataset",
            "mnist",
            "--out",
            str(tmp_path / "b"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("bn-onnx train: error: unknown dataset 'mnist'")
