"""No output lands on an input; a command's outputs appear together or not at all (issue 19).

Every clash exits 2 with one line naming both paths and leaves every input byte-identical.
Write failures (read-only folder, no space, EIO) are simulated by patching the os functions
bn_onnx.files calls (the tests run as root, which chmod does not stop); a `kill -9` is real.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from bn_onnx import files, graphs
from bn_onnx.cli import main

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = (6, 5, 3)


def _digests(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file under `folder` (symlinks as their target text)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _one_error_line(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _model(folder: Path, name: str = "m.onnx", data: str | None = None) -> Path:
    """An MLP with BN; with `data`, its tensors in that external-data file."""
    path = folder / name
    proto = graphs.build_mlp(WIDTHS, "unfolded", seed=2)
    if data is None:
        onnx.save(proto, path)
    else:
        onnx.save(proto, path, save_as_external_data=True, location=data, size_threshold=0)
    return path


@pytest.fixture
def ext(tmp_path):
    """m.onnx with its weights in m.onnx.data."""
    return _model(tmp_path, data="m.onnx.data")


def _check_clash(tmp_path, capsys, argv, *needles):
    before = _digests(tmp_path)
    rc = main(argv)
    _one_error_line(capsys, rc, *needles)
    assert _digests(tmp_path) == before  # inputs byte-identical, nothing new written


# --- 1. no output lands on an input ---------------------------------------------------------


def test_fold_report_onto_the_model_or_its_data_file_exits_2(tmp_path, capsys, ext):
    out = str(tmp_path / "o.onnx")
    data = str(tmp_path / "m.onnx.data")
    _check_clash(
        tmp_path, capsys, ["fold", str(ext), "-o", out, "--report", str(ext)], "--report", "model"
    )
    _check_clash(
        tmp_path,
        capsys,
        ["fold", str(ext), "-o", out, "--report", data],
        f"--report {data} is the external data of m.onnx",
    )


def test_fold_external_data_onto_the_inputs_data_file_exits_2(tmp_path, capsys):
    src = _model(tmp_path, data="out.onnx.data")  # the input's data has the output's name
    out = tmp_path / "out.onnx"
    _check_clash(
        tmp_path,
        capsys,
        ["fold", str(src), "-o", str(out), "--external-data"],
        "the output's external data",
        "out.onnx.data",
    )
    # written as one file the output does not touch out.onnx.data: allowed
    assert main(["fold", str(src), "-o", str(out), "-q"]) == 0
    assert onnx.load(src).graph.initializer  # the input still loads, with its data


def test_fold_two_outputs_on_one_file_exit_2(tmp_path, capsys, ext):
    out = tmp_path / "o.onnx"
    link = tmp_path / "link.json"
    link.symlink_to("o.onnx")
    _check_clash(
        tmp_path,
        capsys,
        ["fold", str(ext), "-o", str(out), "--report", str(link)],
        "are the same file",
    )


@pytest.mark.parametrize("how", ["symlink", "hardlink", "relative", "dotted", "linked_folder"])
def test_fold_output_onto_the_model_by_another_name_exits_2(tmp_path, capsys, monkeypatch, how):
    src = _model(tmp_path)
    other = tmp_path / "other.onnx"
    if how == "symlink":
        other.symlink_to(src)
    elif how == "hardlink":
        os.link(src, other)
    elif how == "linked_folder":
        (tmp_path / "lnk").symlink_to(tmp_path)
    monkeypatch.chdir(tmp_path)
    out = {
        "symlink": str(other),
        "hardlink": str(other),
        "relative": "m.onnx",
        "dotted": f"../{tmp_path.name}/./m.onnx",
        "linked_folder": str(tmp_path / "lnk" / "m.onnx"),
    }[how]
    _check_clash(tmp_path, capsys, ["fold", str(src.resolve()), "-o", out], "is the input model")


def test_fold_report_onto_a_hard_link_of_the_data_file_exits_2(tmp_path, capsys, ext):
    # (the fold refuses to read a data file with two links; verify reads it, so it counts)
    os.link(tmp_path / "m.onnx.data", tmp_path / "r.json")
    _check_clash(
        tmp_path,
        capsys,
        ["verify", str(ext), "--report", str(tmp_path / "r.json")],
        "is the external data of m.onnx",
    )


def test_verify_report_onto_the_model_or_its_data_exits_2(tmp_path, capsys, ext):
    for target in (ext, tmp_path / "m.onnx.data"):
        _check_clash(
            tmp_path, capsys, ["verify", str(ext), "--report", str(target)], f"--report {target}"
        )


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
def test_run_output_onto_the_input_exits_2(tmp_path, capsys, how):
    model = _model(tmp_path)
    x = tmp_path / "x.npy"
    np.save(x, np.ones((3, WIDTHS[0]), np.float32))
    out = tmp_path / "y.npy"
    if how == "same":
        out = x
    elif how == "symlink":
        out.symlink_to(x)
    else:
        os.link(x, out)
    argv = ["run", str(model), "-i", str(x), "-o", str(out)]
    _check_clash(tmp_path, capsys, argv, "is the input file")


def test_run_output_onto_the_models_data_file_exits_2(tmp_path, capsys, ext):
    x = tmp_path / "x.npy"
    np.save(x, np.ones((3, WIDTHS[0]), np.float32))
    link = tmp_path / "y.npy"
    link.symlink_to("m.onnx.data")
    argv = ["run", str(ext), "-i", str(x), "-o", str(link)]
    _check_clash(tmp_path, capsys, argv, "is the external data of m.onnx")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "metrics.json"])
def test_export_output_onto_a_checkpoint_file_exits_2(tmp_path, capsys, name):
    ckpt = tmp_path / "ck"
    shutil.copytree(ROOT / "models" / "digits" / "checkpoint", ckpt)
    link = tmp_path / "m.onnx"
    link.symlink_to(ckpt / name)
    _check_clash(tmp_path, capsys, ["export", str(ckpt), "-o", str(link)], f"checkpoint's {name}")


def test_train_out_holding_the_dataset_file_exits_2(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    data = tmp_path / "d.csv"
    data.write_text("a,b,y\n1,2,0\n3,4,1\n")
    (out / "metrics.json").symlink_to(data)
    argv = ["train", "--dataset", str(data), "--target", "y", "--out", str(out)]
    _check_clash(tmp_path, capsys, argv, "--out's metrics.json", "the dataset file")


def test_bench_outputs_onto_the_model_or_each_other_exit_2(tmp_path, capsys, ext):
    link = tmp_path / "p.png"
    link.symlink_to("r.json")
    cases = [
        (["--json", str(tmp_path / "m.onnx.data")], "is the external data of m.onnx"),
        (["--plot", str(ext)], "is the input model"),
        (["--json", str(tmp_path / "r.json"), "--plot", str(link)], "are the same file"),
    ]
    for extra, needle in cases:
        _check_clash(tmp_path, capsys, ["bench", str(ext), "--batch-sizes", "1", *extra], needle)


def test_in_place_fold_may_replace_the_model_but_not_with_the_report(tmp_path, capsys):
    src = _model(tmp_path)
    rc = main(["fold", str(src), "-o", str(src), "--in-place", "--report", str(src)])
    _one_error_line(capsys, rc, "--report")
    assert main(["fold", str(src), "-o", str(src), "--in-place", "-q"]) == 0
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(src).graph.node)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_model_files_reads_locations_in_subgraphs_and_functions(tmp_path):
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 18, "f" : 1]>
        g (float[2] x, bool c) => (float[2] y) {
            y = If (c) <then_branch = t () => (float[2] a) {
                a = Constant <value = float[2] {1, 2}> ()
            }, else_branch = e () => (float[2] b) { b = f.Fn (x) }>
        }
        <domain: "f", opset_import: ["" : 18]>
        Fn (u) => (v) { k = Constant <value = float[2] {3, 4}> ()  v = Add (u, k) }
        """
    )
    branch = model.graph.node[0].attribute[0].g.node[0].attribute[0].t
    fn_const = model.functions[0].node[0].attribute[0].t
    for tensor, location in ((branch, "a.bin"), (fn_const, "sub/b.bin")):
        tensor.CopyFrom(onnx.numpy_helper.from_array(np.ones(2, np.float32)))
        onnx.external_data_helper.set_external_data(tensor, location)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
    (tmp_path / "g.onnx").write_bytes(model.SerializeToString())  # references only
    names = [(what, Path(p).name) for what, p in files.model_files(tmp_path / "g.onnx")]
    assert names == [
        ("the input model", "g.onnx"),
        ("the external data of g.onnx", "a.bin"),
        ("the external data of g.onnx", "b.bin"),
    ]


# --- 2. outputs written as a group ------------------------------------------------------------


@pytest.fixture(params=["unnamed", "named"])
def temporaries(request, monkeypatch):
    """Both kinds of temporary file: O_TMPFILE where linkable, and the named fallback."""
    if request.param == "named":
        monkeypatch.setattr(files, "_open_unnamed", lambda folder: None)
    return request.param


def _files_in(*folders: Path) -> list[str]:
    return sorted(str(p) for f in folders for p in f.iterdir())


class _RefuseIn:
    """os.open / os.mkdir that fail with `code` for entries of `folder` (a read-only mount)."""

    def __init__(self, monkeypatch, folder: Path, code: int) -> None:
        self.folder = os.path.realpath(folder)
        self.code = code
        real_open, real_mkdir = os.open, os.mkdir

        def fake_open(path, flags, *args, **kwargs):
            tmpfile = flags & getattr(os, "O_TMPFILE", 0) == getattr(os, "O_TMPFILE", -1)
            self._gate(path, path if tmpfile else os.path.dirname(os.fspath(path)))
            return real_open(path, flags, *args, **kwargs)

        def fake_mkdir(path, *args, **kwargs):
            self._gate(path, os.path.dirname(os.fspath(path)))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(files.os, "open", fake_open)
        monkeypatch.setattr(files.os, "mkdir", fake_mkdir)

    def _gate(self, path, folder) -> None:
        if os.path.realpath(folder) == self.folder:
            raise OSError(self.code, os.strerror(self.code), os.fspath(path))


def test_read_only_report_folder_leaves_no_model_behind(tmp_path, capsys, monkeypatch, temporaries):
    src = _model(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    _RefuseIn(monkeypatch, ro, errno.EROFS)
    before = _digests(tmp_path)
    rc = main(["fold", str(src), "-o", str(tmp_path / "ok.onnx"), "--report", str(ro / "r.json")])
    _one_error_line(capsys, rc, f"cannot write {ro / 'r.json'}", "Read-only file system")
    assert _digests(tmp_path) == before
    assert _files_in(tmp_path, ro) == [str(src), str(ro)]  # no output, no temporary


def test_unwritable_output_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    src = _model(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        files.os, "access", lambda p, m: False if Path(p) == ro else real_access(p, m)
    )
    for argv in (
        ["fold", str(src), "-o", str(ro / "f.onnx")],
        ["verify", str(src), "--report", str(ro / "r.json")],
    ):
        _one_error_line(capsys, main(argv), "not writable")
    assert list(ro.iterdir()) == []


class _FullDisk:
    """File objects from os.fdopen that take `room` bytes in all, then raise ENOSPC."""

    def __init__(self, monkeypatch, room: int, code: int = errno.ENOSPC) -> None:
        self.room = room
        self.code = code
        real_fdopen = os.fdopen
        monkeypatch.setattr(
            files.os, "fdopen", lambda *a, **k: _Limited(real_fdopen(*a, **k), self)
        )


class _Limited:
    def __init__(self, f, disk: _FullDisk) -> None:
        self._f = f
        self._disk = disk

    def write(self, data):
        n = len(data) if isinstance(data, str) else memoryview(data).nbytes
        if n > self._disk.room:
            raise OSError(self._disk.code, os.strerror(self._disk.code))
        self._disk.room -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("out", ["y.npy", "y.csv"])
def test_run_out_of_space_mid_write_is_one_line_and_leaves_nothing(
    tmp_path, capsys, monkeypatch, out, temporaries
):
    model = _model(tmp_path)
    x = tmp_path / "x.npy"
    np.save(x, np.ones((5000, WIDTHS[0]), np.float32))
    before = _digests(tmp_path)
    _FullDisk(monkeypatch, room=20_000)
    argv = ["run", str(model), "-i", str(x), "-o", str(tmp_path / out), "--batch-size", "100"]
    _one_error_line(capsys, main(argv), f"cannot write {tmp_path / out}", "No space left")
    assert _digests(tmp_path) == before
    assert _files_in(tmp_path) == sorted([str(model), str(x)])


def test_run_past_a_real_file_size_limit_is_one_line_not_a_signal(tmp_path):
    # RLIMIT_FSIZE makes the kernel refuse the write (EFBIG) as a full disk refuses it
    # (ENOSPC): through a memory map either kills the process (SIGBUS/SIGXFSZ).
    import resource

    model = _model(tmp_path)
    x = tmp_path / "x.npy"
    np.save(x, np.ones((20_000, WIDTHS[0]), np.float32))  # the output needs 240 kB

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bn_onnx",
            "run",
            str(model),
            "-i",
            str(x),
            "-o",
            str(tmp_path / "y.npy"),
            "--quiet",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=limit,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"bn-onnx run: error: cannot write {tmp_path / 'y.npy'}: File too large"
    )
    assert _files_in(tmp_path) == sorted([str(model), str(x)])


def test_fold_io_error_mid_write_leaves_nothing(tmp_path, capsys, monkeypatch, temporaries):
    src = _model(tmp_path)
    before = _digests(tmp_path)
    _FullDisk(monkeypatch, room=100, code=errno.EIO)
    argv = ["fold", str(src), "-o", str(tmp_path / "f.onnx"), "--report", str(tmp_path / "r.json")]
    _one_error_line(capsys, main(argv), "cannot write", "Input/output error")
    assert _digests(tmp_path) == before


def test_rename_failure_at_commit_leaves_no_temporary(tmp_path, capsys, monkeypatch, temporaries):
    src = _model(tmp_path)

    def failing_replace(a, b):
        raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(a))

    monkeypatch.setattr(files.os, "replace", failing_replace)
    rc = main(["fold", str(src), "-o", str(tmp_path / "f.onnx"), "--external-data"])
    _one_error_line(capsys, rc, f"cannot write {tmp_path / 'f.onnx'}", "Input/output error")
    assert _files_in(tmp_path) == [str(src)]


def test_external_data_is_renamed_before_its_model(tmp_path, ext, monkeypatch):
    order = []
    real_replace = os.replace
    monkeypatch.setattr(
        files.os,
        "replace",
        lambda a, b: (
            Path(b).parent == tmp_path and order.append(Path(b).name),
            real_replace(a, b),
        ),
    )
    out = tmp_path / "f.onnx"
    assert (
        main(
            [
                "fold",
                str(ext),
                "-o",
                str(out),
                "--external-data",
                "--report",
                str(tmp_path / "r.json"),
                "-q",
            ]
        )
        == 0
    )
    assert order == ["f.onnx.data", "f.onnx", "r.json"]
    assert onnx.load(out).graph.initializer  # loads with its data


_KILLED_WRITER = """
import os, signal, sys
from bn_onnx import files
group = files.OutputGroup()
group.__enter__()
if sys.argv[2] == "unnamed":
    f = group.open(os.path.join(sys.argv[1], "big.onnx"))
    f.write(b"x" * (1 << 20)); f.flush()
else:
    d = group.folder(os.path.join(sys.argv[1], "big.onnx"))
    with open(os.path.join(d, "big.onnx.data"), "wb") as g:
        g.write(b"x" * (1 << 20))
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_writer(folder: Path, how: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(folder), how], env=env)
    assert proc.returncode == -signal.SIGKILL


def test_killed_writer_leaves_no_name_with_an_unnamed_temporary(tmp_path):
    unnamed = files._open_unnamed(str(tmp_path))
    if unnamed is None:
        pytest.skip("this file system has no linkable O_TMPFILE")
    os.close(unnamed[0])
    _killed_writer(tmp_path, "unnamed")
    assert list(tmp_path.iterdir()) == []


def test_killed_writers_temporary_is_removed_by_the_next_run(tmp_path, capsys):
    _killed_writer(tmp_path, "named")
    (left,) = tmp_path.iterdir()
    assert files.TEMP_MARK in left.name and left.is_dir()
    # a live writer's temporary (this process's) is kept
    live = files.temp_name(tmp_path / "x.json", ".tmp")
    live.write_text("{}")
    src = _model(tmp_path)
    files._swept.discard(os.path.realpath(tmp_path))
    assert main(["fold", str(src), "-o", str(tmp_path / "f.onnx"), "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "f.onnx", "m.onnx"])


def test_group_of_three_outputs_commits_all_or_none(tmp_path, temporaries):
    with files.OutputGroup() as group:
        with group.open(tmp_path / "a.json", "w") as f:
            f.write("{}")
        group.open(tmp_path / "b.bin").write(b"b")
        (group.folder(tmp_path / "m.onnx") / "m.onnx").write_bytes(b"m")
        assert list(tmp_path.iterdir()) == [] or all(
            files.TEMP_MARK in p.name for p in tmp_path.iterdir()
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "m.onnx"]
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == files.FILE_MODE
    with pytest.raises(ValueError), files.OutputGroup() as group:
        group.open(tmp_path / "c.json", "w").write("c")
        (group.folder(tmp_path / "n.onnx") / "n.onnx").write_bytes(b"n")
        raise ValueError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "m.onnx"]
