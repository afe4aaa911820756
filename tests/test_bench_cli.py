"""`bn-onnx bench`: the table, JSON and plot outputs, and exit code 2 for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bn_onnx import graphs, onnx_io
from bn_onnx.cli import main


@pytest.fixture
def models(tmp_path):
    out = {}
    for v in ("unfolded", "folded"):
        out[v] = tmp_path / f"{v}.onnx"
        onnx_io.save_model(graphs.build_mlp([5, 7, 2], v), out[v])
    out["wide"] = tmp_path / "wide.onnx"
    onnx_io.save_model(graphs.build_mlp([9, 7, 2], "folded"), out["wide"])
    return out


def test_bench_prints_table_and_writes_json_and_plot(models, tmp_path, capsys):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(
        [
            "bench",
            str(models["unfolded"]),
            str(models["folded"]),
            "--batch-sizes",
            "1,3",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--json",
            str(js),
            "--plot",
            str(png),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    table = [ln for ln in out.splitlines() if ln.startswith(("unfolded.onnx ", "folded.onnx "))]
    assert len(table) == 4
    assert "created in" in out and "first run" in out
    data = json.loads(js.read_text())
    assert [(r["subject"], r["batch"]) for r in data["rows"]] == [
        ("unfolded.onnx", 1),
        ("folded.onnx", 1),
        ("unfolded.onnx", 3),
        ("folded.onnx", 3),
    ]
    assert data["settings"]["threads"] == 1 and data["settings"]["provider"] == "cpu"
    assert all(r["ratio"] == 1.0 for r in data["rows"] if r["subject"] == "unfolded.onnx")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cpu_time_adds_columns_and_json_fields(models, tmp_path, capsys):
    js = tmp_path / "c.json"
    args = ["bench", str(models["unfolded"]), str(models["folded"]), "--threads", "1"]
    rc = main(
        [*args, "--batch-sizes", "2", "--repeats", "3", "--cpu-time", "-q", "--json", str(js)]
    )
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and "CPU ratio" in out[0]
    rows = json.loads(js.read_text())["rows"]
    assert all(r["cpu_median_ms"] > 0 and len(r["cpu_times_ms"]) == 3 for r in rows)
    assert rows[0]["cpu_ratio"] == 1.0


def test_bench_quiet_prints_only_the_table(models, capsys):
    rc = main(["bench", str(models["folded"]), "--batch-sizes", "2", "--repeats", "1", "-q"])
    captured = capsys.readouterr()
    assert rc == 0 and captured.err == ""
    assert len(captured.out.strip().splitlines()) == 3  # header, rule, one row


def test_same_file_name_twice_gets_distinct_labels(models, capsys):
    p = str(models["folded"])
    assert main(["bench", p, p, "--batch-sizes", "1", "--repeats", "1", "-q"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len({r.split()[0] for r in rows}) == 2


@pytest.mark.parametrize(
    "extra",
    [
        ["--batch-sizes", "0"],
        ["--batch-sizes", "one"],
        ["--repeats", "0"],
        ["--threads", "-1"],
        ["--graph-opt", "max"],
        ["--order", "random"],
    ],
)
def test_bad_options_exit_2(models, extra, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", str(models["folded"]), *extra])
    assert exc.value.code == 2


def test_bad_inputs_exit_2_with_one_line(models, tmp_path, capsys):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    cases = [
        [str(tmp_path / "missing.onnx")],
        [str(junk)],
        [str(models["folded"]), str(models["wide"])],
        [str(models["folded"]), "--provider", "tpu"],
        [str(models["folded"]), "--json", str(tmp_path / "nodir" / "x.json")],
        [str(models["folded"]), "--checkpoint", str(tmp_path / "nockpt")],
    ]
    for args in cases:
        rc = main(["bench", *args, "--repeats", "1", "--batch-sizes", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, args
        assert err[-1].startswith("bn-onnx bench: error: "), (args, err)
        assert "Traceback" not in "\n".join(err)


def test_bench_runs_as_a_process(models):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bn_onnx",
            "bench",
            str(models["unfolded"]),
            "--batch-sizes",
            "1",
            "--repeats",
            "2",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "unfolded.onnx" in proc.stdout and "ratio" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "bn_onnx", "bench", "no-such.onnx"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
