"""`bn-onnx run`: outputs equal a bare onnxruntime session's; bad input exits 2 with no output."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from serve_testing import bare_tabular

from bn_onnx import graphs
from bn_onnx.cli import main

WIDTHS = [12, 16, 5]


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(graphs.build_mlp(WIDTHS, "unfolded", seed=2), path)
    return path


def _bare(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def _x(n, width=WIDTHS[0], seed=0):
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("batch", [4, 8192])
def test_npy_output_equals_a_bare_session(tmp_path, model, capsys, batch):
    x = _x(50)
    np.save(tmp_path / "x.npy", x)
    rc = main(
        [
            "run",
            str(model),
            "--input",
            str(tmp_path / "x.npy"),
            "-o",
            str(tmp_path / "y.npy"),
            "--provider",
            "cpu",
            "--batch-size",
            str(batch),
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    y = np.load(tmp_path / "y.npy")
    assert y.dtype == np.float32 and y.shape == (50, 5)
    np.testing.assert_allclose(y, _bare(model, x), rtol=1e-6, atol=1e-6)
    if batch > 50:
        np.testing.assert_array_equal(y, _bare(model, x))
    assert "wrote" in capsys.readouterr().out


def test_csv_in_and_out_with_a_header(tmp_path, model):
    x = _x(7)
    header = ",".join(f"f{i}" for i in range(WIDTHS[0]))
    np.savetxt(tmp_path / "x.csv", x, delimiter=",", header=header, comments="", fmt="%.9g")
    rc = main(
        [
            "run",
            str(model),
            "--input",
            str(tmp_path / "x.csv"),
            "-o",
            str(tmp_path / "y.csv"),
            "--quiet",
        ]
    )
    assert rc == 0
    y = np.loadtxt(tmp_path / "y.csv", delimiter=",", ndmin=2)
    np.testing.assert_allclose(y, _bare(model, x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("header", [True, False])
def test_a_text_cell_in_a_csv_is_named_by_its_line_and_column(tmp_path, model, capsys, header):
    rows = [",".join(["1"] * WIDTHS[0])] * 3
    rows[1] = ",".join(["1", "zz"] + ["1"] * (WIDTHS[0] - 2))
    lines = ([",".join(f"f{i}" for i in range(WIDTHS[0]))] if header else []) + rows
    (tmp_path / "x.csv").write_text("\n".join(lines) + "\n")
    rc = main(
        ["run", str(model), "--input", str(tmp_path / "x.csv"), "-o", str(tmp_path / "y.npy")]
    )
    assert rc == 2 and not (tmp_path / "y.npy").exists()
    err = capsys.readouterr().err.strip().splitlines()
    where = f"x.csv line {3 if header else 2}, column 2{' (' + repr('f1') + ')' if header else ''}"
    assert err == [
        f"bn-onnx run: error: {where}: 'zz' is not a number; this model takes numbers only"
    ]


def test_a_float64_beyond_float32_is_one_line_without_a_numpy_warning(tmp_path, model, capsys):
    x = _x(3).astype(np.float64)
    x[1, 0] = 1e300
    np.save(tmp_path / "x.npy", x)
    assert (
        main(["run", str(model), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row 1, column 0" in err[0] and "allow_nonfinite" not in err[0]


def test_int_npy_is_converted(tmp_path, model):
    x = np.arange(3 * WIDTHS[0], dtype=np.int64).reshape(3, -1) % 5
    np.save(tmp_path / "x.npy", x)
    assert (
        main(
            ["run", str(model), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"), "-q"]
        )
        == 0
    )
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), _bare(model, x.astype(np.float32)))


def test_plain_progress_lines_when_not_a_terminal(tmp_path, model, capsys, monkeypatch):
    import bn_onnx.cli.run as run_cmd

    monkeypatch.setattr(run_cmd, "PROGRESS_MIN_ROWS", 10)
    np.save(tmp_path / "x.npy", _x(100))
    rc = main(
        [
            "run",
            str(model),
            "-i",
            str(tmp_path / "x.npy"),
            "-o",
            str(tmp_path / "y.npy"),
            "--batch-size",
            "10",
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "100/100 rows (100%)" in err and "10/100 rows (10%)" in err
    rc = main(
        [
            "run",
            str(model),
            "-i",
            str(tmp_path / "x.npy"),
            "-o",
            str(tmp_path / "z.npy"),
            "--batch-size",
            "10",
            "--quiet",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0 and captured.err == "" and captured.out == ""


def _bad(tmp_path, name, array=None, raw=None):
    path = tmp_path / name
    if array is not None:
        np.save(path, array)
    if raw is not None:
        path.write_bytes(raw)
    return path


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: _bad(d, "x.npy", np.zeros((4, 11), np.float32)), "11 features"),
        (lambda d: _bad(d, "x.npy", np.zeros(12, np.float32)), "2-D"),
        (lambda d: _bad(d, "x.npy", np.zeros((2, 3, 12), np.float32)), "2-D"),
        (lambda d: _bad(d, "x.npy", np.array([["a"] * 12])), "dtype"),
        (lambda d: _bad(d, "x.npy", np.zeros((2, 12), np.complex64)), "dtype"),
        (lambda d: _bad(d, "x.npy", raw=b"\x93NUMPY garbage"), "not a readable .npy"),
        (lambda d: _bad(d, "x.txt", raw=b"1,2,3\n"), "must be a .npy, .csv or .parquet"),
        (lambda d: _bad(d, "x.csv", raw=b"1,2,3\n4,x,6\n"), "x.csv line 2, column 2: 'x'"),
        (lambda d: d / "missing.npy", "not found"),
        (lambda d: _bad(d, "x.csv", raw=b"a,b,c\n"), "no data rows"),
    ],
    ids=[
        "width",
        "rank1",
        "rank3",
        "strings",
        "complex",
        "corrupt",
        "txt",
        "csv-text",
        "missing",
        "csv-header-only",
    ],
)
def test_bad_inputs_exit_2_with_one_line_and_no_output(tmp_path, model, capsys, make, match):
    x = make(tmp_path)
    before = _files(tmp_path)
    rc = main(["run", str(model), "--input", str(x), "-o", str(tmp_path / "y.npy")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("bn-onnx run: error:") and err.count("\n") == 1
    assert match in err
    assert _files(tmp_path) == before  # no output, no temp file


def test_nan_midway_leaves_no_partial_output(tmp_path, model, capsys):
    x = _x(40)
    x[35, 3] = np.nan
    np.save(tmp_path / "x.npy", x)
    before = _files(tmp_path)
    rc = main(
        [
            "run",
            str(model),
            "-i",
            str(tmp_path / "x.npy"),
            "-o",
            str(tmp_path / "y.npy"),
            "--batch-size",
            "8",
        ]
    )
    assert rc == 2 and "row 35, column 3" in capsys.readouterr().err
    assert _files(tmp_path) == before


def test_existing_output_is_replaced_only_on_success(tmp_path, model):
    np.save(tmp_path / "x.npy", np.zeros((2, 11), np.float32))
    (tmp_path / "y.npy").write_bytes(b"old")
    assert (
        main(["run", str(model), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")]) == 2
    )
    assert (tmp_path / "y.npy").read_bytes() == b"old"


@pytest.mark.parametrize(
    "out, match",
    [
        ("x.npy", "is the input file"),
        ("nope/y.npy", "folder does not exist"),
        ("y.json", ".npy or .csv"),
    ],
)
def test_bad_outputs_exit_2(tmp_path, model, capsys, out, match):
    x = _x(3)
    np.save(tmp_path / "x.npy", x)
    rc = main(["run", str(model), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / out)])
    err = capsys.readouterr().err
    assert rc == 2 and match in err
    assert "--in-place" not in err  # run has no such option
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), x)


def test_model_errors_exit_2(tmp_path, capsys):
    np.save(tmp_path / "x.npy", _x(2))
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    rc = main(
        [
            "run",
            str(tmp_path / "bad.onnx"),
            "-i",
            str(tmp_path / "x.npy"),
            "-o",
            str(tmp_path / "y.npy"),
        ]
    )
    assert rc == 2 and "ONNX" in capsys.readouterr().err
    assert not (tmp_path / "y.npy").exists()


def test_bad_provider_exits_2(tmp_path, model, capsys):
    np.save(tmp_path / "x.npy", _x(2))
    rc = main(
        [
            "run",
            str(model),
            "-i",
            str(tmp_path / "x.npy"),
            "-o",
            str(tmp_path / "y.npy"),
            "--provider",
            "nonesuch",
        ]
    )
    assert rc == 2 and "provider" in capsys.readouterr().err


def test_subprocess_run(tmp_path, model):
    x = _x(9)
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bn_onnx",
            "run",
            str(model),
            "--input",
            str(tmp_path / "x.npy"),
            "-o",
            str(tmp_path / "y.npy"),
            "--provider",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), _bare(model, x))
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "bn_onnx",
            "run",
            str(model),
            "--input",
            str(tmp_path / "x.npy"),
            "-o",
            str(tmp_path / "x.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", ["<f4", ">f8", "<i2"])
def test_chunks_of_a_memmapped_npy_equal_its_rows(tmp_path, order, dtype):
    from bn_onnx.arrays import iter_chunks, read_array

    x = np.asarray(np.arange(23 * 4).reshape(23, 4), dtype=dtype, order=order)
    np.save(tmp_path / "x.npy", x)
    mm = read_array(tmp_path / "x.npy")
    assert isinstance(mm, np.memmap)
    chunks = list(iter_chunks(mm, 5))
    assert [start for start, _ in chunks] == [0, 5, 10, 15, 20]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), x)


@pytest.fixture(params=["mapped", "read", "read-reused"])
def chunk_path(request, monkeypatch):
    """Each way iter_chunks reads a memmapped .npy: released mapping, file reads (+ one buffer)."""
    from bn_onnx import arrays

    if request.param != "mapped":
        monkeypatch.setattr(arrays, "_MADV_DONTNEED", None)
    return request.param == "read-reused"


@pytest.mark.parametrize("rows", [1, 4, 5, 7, 23, 24, 100])
def test_every_chunk_reader_returns_the_rows_of_np_load(tmp_path, chunk_path, rows):
    from bn_onnx.arrays import iter_chunks, read_array

    x = _x(23, width=7, seed=rows)
    np.save(tmp_path / "x.npy", x)
    mm = read_array(tmp_path / "x.npy")
    got = [(start, chunk.copy()) for start, chunk in iter_chunks(mm, rows, reuse=chunk_path)]
    assert [start for start, _ in got] == list(range(0, 23, rows))
    assert all(len(c) == min(rows, 23 - s) for s, c in got)
    np.testing.assert_array_equal(np.concatenate([c for _, c in got]), np.load(tmp_path / "x.npy"))


def test_reused_buffer_is_one_array_per_call(tmp_path, chunk_path):
    from bn_onnx.arrays import iter_chunks, read_array

    np.save(tmp_path / "x.npy", _x(20))
    mm = read_array(tmp_path / "x.npy")
    first, second = iter_chunks(mm, 8, reuse=chunk_path), iter_chunks(mm, 8, reuse=chunk_path)
    (_, a0), (_, b0) = next(first), next(second)
    assert not np.shares_memory(a0, b0)  # two calls (threads) never share a buffer
    (_, a1) = next(first)
    assert np.shares_memory(a0, a1) == (chunk_path is True)


@pytest.mark.parametrize("cut_at", ["start", "middle"])
def test_npy_cut_short_while_open_is_an_input_file_error(tmp_path, chunk_path, cut_at):
    from bn_onnx.arrays import iter_chunks, read_array
    from bn_onnx.errors import InputFileError

    np.save(tmp_path / "x.npy", _x(4000))
    mm = read_array(tmp_path / "x.npy")
    chunks = iter_chunks(mm, 1000, reuse=chunk_path)
    if cut_at == "middle":
        start, chunk = next(chunks)
        np.testing.assert_array_equal(chunk, _x(4000)[:1000])
    os.truncate(tmp_path / "x.npy", mm.offset + 2500 * mm.shape[1] * 4)
    with pytest.raises(InputFileError, match="x.npy is truncated"):
        list(chunks)


def test_truncated_npy_is_refused(tmp_path, model, capsys):
    np.save(tmp_path / "x.npy", _x(40))
    data = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "x.npy").write_bytes(data[:-100])
    rc = main(["run", str(model), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")])
    assert rc == 2 and "x.npy" in capsys.readouterr().err
    assert not (tmp_path / "y.npy").exists()


def test_external_data_outside_the_model_folder_is_refused(tmp_path, capsys):
    inner = tmp_path / "models"
    inner.mkdir()
    path = inner / "ext.onnx"
    graphs.write_mlp_external(path, WIDTHS, "folded")
    (inner / "ext.onnx.data").rename(tmp_path / "secret.data")
    model = onnx.load(path, load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../secret.data"
    onnx.save(model, path)
    np.save(tmp_path / "x.npy", _x(2))
    rc = main(["run", str(path), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")])
    assert rc == 2 and "outside" in capsys.readouterr().err
    assert not (tmp_path / "y.npy").exists()


def test_external_data_model_runs_like_the_in_file_one(tmp_path):
    ext = tmp_path / "ext.onnx"
    graphs.write_mlp_external(ext, WIDTHS, "unfolded", seed=2)
    x = _x(5)
    np.save(tmp_path / "x.npy", x)
    assert (
        main(["run", str(ext), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"), "-q"])
        == 0
    )
    inline = tmp_path / "inline.onnx"
    onnx.save(graphs.build_mlp(WIDTHS, "unfolded", seed=2), inline)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), _bare(inline, x))


def test_rich_progress_bar_on_a_terminal(monkeypatch):
    import bn_onnx.cli.run as run_cmd

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = run_cmd._Progress(run_cmd.PROGRESS_MIN_ROWS, enabled=True)
    try:
        assert bar.bar is not None
        bar(run_cmd.PROGRESS_MIN_ROWS // 2)
        assert bar.bar.tasks[0].completed == run_cmd.PROGRESS_MIN_ROWS // 2
    finally:
        bar.close()
    assert run_cmd._Progress(10, enabled=True).enabled is False  # small inputs: no bar


def test_auto_fallback_is_one_plain_warning_line(tmp_path, model, capsys, monkeypatch):
    import warnings

    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    x = _x(4)
    np.save(tmp_path / "x.npy", x)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error", category=__import__("bn_onnx.runtime").runtime.ProviderWarning
        )
        rc = main(["run", str(model), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")])
    err = capsys.readouterr().err
    assert rc == 0
    assert "bn-onnx run: warning: asked for cuda, cpu but onnxruntime uses cpu" in err
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), _bare(model, x))


def _one_node_model(node, opset=18, extra_opsets=()):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    model.ir_version = 10
    return model


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda h: _one_node_model(
                h.make_node("Foo", ["input"], ["y"], domain="custom.x"),
                extra_opsets=[h.make_opsetid("custom.x", 1)],
            ),
            "no op custom.x:Foo",
        ),
        (lambda h: _one_node_model(h.make_node("NotAnOp", ["input"], ["y"])), "no op NotAnOp"),
        (lambda h: _one_node_model(h.make_node("Relu", ["input"], ["y"]), opset=99), "opset 99"),
    ],
    ids=["custom-op", "unknown-op", "future-opset"],
)
def test_unsupported_ops_and_opsets_exit_2_naming_them(tmp_path, capsys, make, match):
    from onnx import helper

    path = tmp_path / "u.onnx"
    onnx.save(make(helper), path)
    np.save(tmp_path / "x.npy", np.zeros((2, 4), np.float32))
    rc = main(["run", str(path), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and err.count("\n") == 1
    assert not (tmp_path / "y.npy").exists()


@pytest.mark.parametrize(
    "content, match",
    [(None, "not found"), (b"", "empty"), (b"\x08\x07garbage", "ONNX"), ("dir", "directory")],
    ids=["missing", "empty", "garbage", "directory"],
)
def test_bad_model_files_exit_2(tmp_path, capsys, content, match):
    path = tmp_path / "model.onnx"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    np.save(tmp_path / "x.npy", _x(2))
    rc = main(["run", str(path), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and err.count("\n") == 1
    assert not (tmp_path / "y.npy").exists()


@pytest.mark.parametrize("batch", ["7", "50"])
def test_run_output_is_the_same_with_every_chunk_reader(tmp_path, model, chunk_path, batch, capsys):
    x = _x(50, seed=9)
    np.save(tmp_path / "x.npy", x)
    args = ["run", str(model), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")]
    assert main([*args, "--batch-size", batch, "--quiet"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), _bare(model, x))
    x[43, 2] = -np.inf
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "y.npy").unlink()
    assert main([*args, "--batch-size", batch]) == 2
    err = capsys.readouterr().err
    assert "1 non-finite value (NaN or Inf), the first at row 43, column 2" in err
    assert not (tmp_path / "y.npy").exists()


# ---- rows by column name: tabular models, CSV with a header and Parquet ---------------------


@pytest.fixture(scope="module")
def tabular(tmp_path_factory):
    from serve_testing import make_tabular

    path = tmp_path_factory.mktemp("tab") / "tab.onnx"
    return path, make_tabular(path)


def _records(n, seed=0):
    from serve_testing import tabular_records

    return tabular_records(n, seed)


def _write_csv(path, records, header=("grade", "id", "city", "income", "age")):
    """Columns in another order than the model's, an extra column, empty cells for None."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, r in enumerate(records):
            w.writerow(["" if r.get(h, i) is None else r.get(h, i) for h in header])
    return path


def _write_parquet(path, records, row_group_size=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"id": i, **r} for i, r in enumerate(records)])
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def _run(*args):
    return main(["run", *map(str, args), "--provider", "cpu", "--threads", "1"])


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("batch", [7, 8192])
def test_named_columns_from_csv_and_parquet_equal_a_bare_session(tmp_path, tabular, fmt, batch):
    from serve_testing import tabular_forward

    path, w = tabular
    records = _records(40, seed=2)
    write = _write_csv if fmt == "csv" else _write_parquet
    src = write(tmp_path / f"rows.{fmt}", records)
    assert _run(path, "-i", src, "-o", tmp_path / "y.npy", "--batch-size", batch, "-q") == 0
    y = np.load(tmp_path / "y.npy")
    np.testing.assert_allclose(y, bare_tabular(path, records), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, tabular_forward(w, records), rtol=1e-4, atol=1e-5)


def test_parquet_streamed_in_batches_equals_all_at_once(tmp_path, tabular):
    src = _write_parquet(tmp_path / "rows.parquet", _records(301, seed=4), row_group_size=50)
    assert _run(tabular[0], "-i", src, "-o", tmp_path / "a.npy", "--batch-size", 16, "-q") == 0
    assert _run(tabular[0], "-i", src, "-o", tmp_path / "b.npy", "--batch-size", 1000, "-q") == 0
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (301, 3)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_parquet_batches_are_read_one_at_a_time(tmp_path):
    from bn_onnx.arrays import ParquetColumns

    src = _write_parquet(tmp_path / "rows.parquet", _records(100, seed=1), row_group_size=30)
    reader = ParquetColumns(src)
    assert reader.rows == 100 and "city" in reader.header
    chunks = list(reader.chunks(16, ["age", "city", "nonesuch"]))
    assert [lo for lo, _ in chunks] == list(range(0, 100, 16))
    assert all(b.num_rows <= 16 for _, b in chunks)
    assert chunks[0][1].schema.names == ["age", "city"]  # only the columns asked for


def test_labels_csv_has_a_header_the_class_and_probabilities(tmp_path, tabular):
    path, w = tabular
    records = _records(12, seed=6)
    src = _write_csv(tmp_path / "rows.csv", records)
    assert _run(path, "-i", src, "-o", tmp_path / "out.csv", "--labels", "-q") == 0
    lines = (tmp_path / "out.csv").read_text().splitlines()
    names = w["names"]
    assert lines[0] == "label," + ",".join(f"proba_{n}" for n in names)
    logits = bare_tabular(path, records)
    proba = np.exp(logits - logits.max(1, keepdims=True))
    proba /= proba.sum(1, keepdims=True)
    rows = [line.split(",") for line in lines[1:]]
    assert [r[0] for r in rows] == [names[i] for i in logits.argmax(1)]
    np.testing.assert_allclose(np.array([r[1:] for r in rows], float), proba, rtol=1e-5)


def test_labels_need_a_csv_output_and_a_classifier(tmp_path, tabular, capsys):
    src = _write_csv(tmp_path / "rows.csv", _records(3))
    assert _run(tabular[0], "-i", src, "-o", tmp_path / "y.npy", "--labels") == 2
    assert "--labels writes a .csv table" in capsys.readouterr().err
    reg = tmp_path / "reg.onnx"
    onnx.save(graphs.build_mlp([4, 3, 2], "folded", seed=1), reg)
    model = onnx.load(reg)
    onnx.helper.set_model_props(model, {"bn_onnx.task": "regression"})
    onnx.save(model, reg)
    np.save(tmp_path / "x.npy", _x(2, width=4))
    assert _run(reg, "-i", tmp_path / "x.npy", "-o", tmp_path / "y.csv", "--labels") == 2
    assert "needs a classifier" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda d: _write_csv(d / "x.csv", _records(3), header=("age", "income", "grade")),
            "missing column 'city' (the model reads: age, city, income, grade)",
        ),
        (
            lambda d: _write_csv(d / "x.csv", _records(30) + [{"age": "abc"}] + _records(3)),
            "x.csv line 32: column 'age': not a number: 'abc'",  # rows 0-29 on lines 2-31
        ),
        (
            lambda d: _write_parquet(d / "x.parquet", _records(20) + [{"age": 1e39}]),
            "column 'age' row 20: not a finite number: inf",
        ),
        (lambda d: _bad(d, "x.npy", np.zeros((3, 4), np.float32)), "named columns (age, city"),
        (lambda d: _bad(d, "x.csv", raw=b"age,city,income,grade\n"), "no data rows"),
        (lambda d: _bad(d, "x.csv", raw=b"age,city,income,grade\n1,a,2\n"), "line 2: 3 cells"),
        (
            lambda d: _bad(d, "x.csv", raw=b"age,age,city,income,grade\n1,2,a,3,4\n"),
            "appears 2 times",
        ),
        (lambda d: _bad(d, "x.parquet", raw=b"PAR1 not parquet"), "not a readable Parquet"),
    ],
    ids=["missing", "csv-text", "parquet-inf", "npy", "empty", "short-row", "dup", "corrupt"],
)
def test_bad_named_inputs_exit_2_with_one_line_and_no_output(
    tmp_path, tabular, capsys, make, match
):
    src = make(tmp_path)
    before = _files(tmp_path)
    rc = _run(tabular[0], "-i", src, "-o", tmp_path / "y.npy", "--batch-size", 8)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("bn-onnx run: error:") and err.count("\n") == 1
    assert match in err
    assert _files(tmp_path) == before


def test_parquet_without_pyarrow_is_a_one_line_error(tmp_path, tabular, capsys, monkeypatch):
    src = _write_parquet(tmp_path / "rows.parquet", _records(3))
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert _run(tabular[0], "-i", src, "-o", tmp_path / "y.npy") == 2
    err = capsys.readouterr().err
    assert err.startswith("bn-onnx run: error: reading Parquet needs pyarrow: pip install")
    assert err.count("\n") == 1


def test_numeric_parquet_columns_are_the_features_of_a_plain_model(tmp_path, model, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = _x(25)
    pq.write_table(pa.table({f"f{i}": x[:, i] for i in range(x.shape[1])}), tmp_path / "x.pq")
    assert (
        main(["run", str(model), "-i", str(tmp_path / "x.pq"), "-o", str(tmp_path / "y.npy")]) == 0
    )
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), _bare(model, x))
    pq.write_table(pa.table({"a": x[:, 0]}), tmp_path / "narrow.parquet")
    rc = main(
        ["run", str(model), "-i", str(tmp_path / "narrow.parquet"), "-o", str(tmp_path / "z.npy")]
    )
    assert rc == 2 and "has 1 columns, the model expects 12 features" in capsys.readouterr().err


@pytest.mark.parametrize(
    "line3, message",
    [
        ("abc,Busan,3.2,2", "line 3: column 'age': not a number: 'abc'"),
        (
            "1e39,Busan,3.2,2",
            "line 3: column 'age': not a finite number: inf (leave a missing value empty or null)",
        ),
        ("31,Busan,3.2", "line 3: 3 cells, the header has 4"),
    ],
    ids=["text", "inf", "short"],
)
@pytest.mark.parametrize("batch", [1, 8192])
def test_a_bad_csv_row_is_named_by_its_file_line_whatever_is_wrong(
    tmp_path, tabular, capsys, line3, message, batch
):
    # the header is line 1, a blank line 4 is skipped: the bad row on line 5 is data row 2
    text = f"age,city,income,grade\n31,Busan,3.2,2\n\n{line3}\n"
    (tmp_path / "x.csv").write_text(text.replace("\n\n", "\n31,Seoul,1.0,1\n\n"))
    assert (
        _run(tabular[0], "-i", tmp_path / "x.csv", "-o", tmp_path / "y.npy", "--batch-size", batch)
        == 2
    )
    line5 = message.replace("line 3", "line 5")
    assert capsys.readouterr().err == f"bn-onnx run: error: x.csv {line5}\n"


@pytest.mark.parametrize("value, shown", [("nan", "nan"), ("-inf", "-inf")])
def test_a_non_finite_csv_cell_is_named_by_its_file_line_and_column(
    tmp_path, model, capsys, value, shown
):
    # header line 1, data on 2, a blank line 3 and a comment line 4 (numpy skips both), bad
    # cell on line 5 in column 3 (numbered from 1, as the parse errors number them)
    row = [str(i) for i in range(WIDTHS[0])]
    bad = row[:2] + [value] + row[3:]
    header = ",".join(f"f{i}" for i in range(WIDTHS[0]))
    text = f"{header}\n{','.join(row)}\n\n# a note\n{','.join(bad)}\n"
    (tmp_path / "x.csv").write_text(text)
    out = tmp_path / "y.npy"
    assert main(["run", str(model), "-i", str(tmp_path / "x.csv"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"bn-onnx run: error: x.csv line 5, column 3: {shown} is not a finite number; "
        "clean the data\n"
    )
    assert not out.exists()
