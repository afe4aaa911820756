"""verify never passes when nothing was compared (fresh-user item 5).

A `--shape` with a 0 dim made every comparison "0/0 ok" and PASSed a tampered model; it is
now a usage error, and a report whose counted comparisons hold no element is a FAIL.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from bn_onnx import graphs
from bn_onnx.cli import main
from bn_onnx.compare import Comparison, compare_arrays
from bn_onnx.errors import UsageError
from bn_onnx.verify.report import Pair, VerifyReport, render
from bn_onnx.verify.signature import parse_shape


@pytest.mark.parametrize("text", ["input:0x6", "input:4x0", "x:0"])
def test_parse_shape_refuses_a_zero_dim(text):
    with pytest.raises(UsageError, match="dims must be >= 1"):
        parse_shape(text)


def test_verify_with_a_zero_dim_shape_exits_2(tmp_path, capsys):
    m = tmp_path / "m.onnx"
    proto = graphs.build_mlp((6, 5, 3), "unfolded", seed=2)
    onnx.save(proto, m)
    name = proto.graph.input[0].name
    with pytest.raises(SystemExit) as exc:  # parsed by argparse: a usage error
        main(["verify", str(m), "--shape", f"{name}:0x6"])
    rc = exc.value.code
    err = capsys.readouterr().err
    assert rc == 2 and "dims must be >= 1" in err and len(err.strip().splitlines()) == 1, err


def _pair(actual: np.ndarray, expected: np.ndarray) -> Pair:
    out = compare_arrays(actual, expected, name="y")
    return Pair("random", "b", "float64", Comparison("b", "float64", [out]))


def test_a_report_of_zero_element_comparisons_fails():
    empty = np.zeros((0, 3), np.float32)
    report = VerifyReport(pairs=[_pair(empty, empty), _pair(empty, empty)])
    assert all(p.passed for p in report.pairs)  # each alone: 0 of 0 outside tolerance
    assert not report.passed and report.exit_code == 1
    assert render(report).splitlines()[-1].startswith("FAIL: nothing compared")
    # one real element compared is enough to decide
    one = np.ones((1, 3), np.float32)
    ok = VerifyReport(pairs=[_pair(empty, empty), _pair(one, one.astype(np.float64))])
    assert ok.passed and ok.exit_code == 0
