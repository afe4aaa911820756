"""The top-level command line: help, version, exit codes, no torch on the light paths."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bn_onnx.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "COMMAND" in capsys.readouterr().out


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_unknown_command_is_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err
    assert len(err.strip().splitlines()) == 1


def test_help_does_not_import_torch_or_onnxruntime():
    code = (
        "import sys\n"
        "from bn_onnx.cli import build_parser\n"
        "build_parser()\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'sklearn') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_python_dash_m_runs():
    out = subprocess.run(
        [sys.executable, "-m", "bn_onnx", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("bn-onnx ")


@pytest.mark.parametrize(
    "argv",
    [["fold"], ["train", "--epochs", "-3"], ["run", "m.onnx"], ["verify", "--atol", "x", "m.onnx"]],
)
def test_usage_errors_of_every_command_are_one_line(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "error:" in err


def _command_names() -> list[str]:
    from bn_onnx.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)


@pytest.mark.parametrize("command", _command_names())
def test_a_mistyped_option_is_named_before_missing_required_ones(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--inptu", "X"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"bn-onnx {command}: error: unrecognized arguments: --inptu" in err, err
    assert "required" not in err and len(err.strip().splitlines()) == 1


def test_a_mistyped_option_names_the_closest_one_and_known_abbreviations_still_work(capsys):
    with pytest.raises(SystemExit):
        main(["run", "m.onnx", "--inptu", "X", "-o", "y.npy"])
    assert "unrecognized arguments: --inptu (did you mean --input?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --inp is argparse's abbreviation of --input: not unknown
        main(["run", "--inp", "x.npy", "--lr", "-1"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --lr (" in err and "--inp" not in err.split("(")[0]
