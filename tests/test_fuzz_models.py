"""Fuzzing every command with broken model files: one clean line or a correct result.

`fuzz_models.py` mutates the digits MLP, a Conv+BN model and a model with external data (bit
flips, truncation, dims, data types, op types, attributes, input names, opsets, outputs,
external-data entries and files) and runs inspect, fold, verify and run on each mutant, each
command in a watched child as on the command line. No traceback, no exit code outside 0/1/2,
exit 2 is one line, no input changes, no output is left by a failed command, and every fold
that succeeds passes the full checker, loads in onnxruntime and computes what its input does.
CI runs a small fixed budget; set BN_ONNX_FUZZ_EXAMPLES (e.g. 2000) for a longer run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from fuzz_models import KINDS, bases, mutant

from bn_onnx.cli import main

EXAMPLES = int(os.environ.get("BN_ONNX_FUZZ_EXAMPLES", "150"))
ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the campaign forks")


def _campaign(tmp_path: Path, n: int, seed: int) -> dict:
    report = tmp_path / "fuzz.json"
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    proc = subprocess.run(
        [sys.executable, str(HERE / "fuzz_models.py"), str(n), str(seed), str(work), str(report)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120 + n,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(report.read_text())


def test_mutated_models_give_one_line_errors_or_correct_results(tmp_path):
    result = _campaign(tmp_path, EXAMPLES, seed=19)
    assert result["failures"] == []
    codes = result["exit_codes"]
    for cmd in ("inspect", "fold", "verify", "run"):
        assert sum(codes[cmd].values()) == EXAMPLES
        assert set(codes[cmd]) <= {"0", "1", "2"}
    # The campaign reaches both outcomes: refusals and folds that are checked.
    assert codes["fold"].get("2", 0) > 0 and codes["folds"]["ok"] > 0


def test_mutator_is_seeded_and_covers_every_kind(tmp_path):
    kinds = set()
    for i in range(60):
        a = mutant(7, i, tmp_path / f"a{i}")
        b = mutant(7, i, tmp_path / f"b{i}")
        assert a == b
        assert (tmp_path / f"a{i}" / "model.onnx").read_bytes() == (
            tmp_path / f"b{i}" / "model.onnx"
        ).read_bytes()
        kinds.update(a[1].split("+"))
    assert kinds == set(KINDS)


@pytest.mark.parametrize("name", ["digits", "conv_bn", "external"])
def test_unmutated_bases_fold_cleanly(tmp_path, capsys, name):
    model, files = next((m, f) for n, m, f in bases() if n == name)
    onnx.save(model, tmp_path / "m.onnx")
    for fname, data in files.items():
        (tmp_path / fname).write_bytes(data)
    rc = main(["fold", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx")])
    assert rc == 0, capsys.readouterr().err
    folded = onnx.load(str(tmp_path / "o.onnx"))
    onnx.checker.check_model(folded, full_check=True)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
