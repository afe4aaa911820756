"""Outputs that are not regular files, and symlinked outputs (fresh-user items 1 and 18).

A rename onto a device, FIFO or socket would replace the node itself (as root it took
/dev/null): every command that writes refuses such a path before any work, exit 2, one line.
A symlinked output is written through the link: the target gets the contents, the link stays.
The nodes are private ones made in tmp_path, never a real device.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest

from bn_onnx import graphs
from bn_onnx.cli import main

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = (6, 5, 3)


def _model(folder: Path) -> Path:
    path = folder / "m.onnx"
    onnx.save(graphs.build_mlp(WIDTHS, "unfolded", seed=2), path)
    return path


def _node(path: Path, kind: str) -> Path:
    if kind == "fifo":
        os.mkfifo(path)
    else:
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except (OSError, AttributeError) as exc:
            pytest.skip(f"cannot make a private character device here: {exc}")
    return path


def _argvs(tmp_path: Path, node: str) -> list[list[str]]:
    """Every writing command with `node` + its extension as one output."""
    src = _model(tmp_path)
    x = tmp_path / "x.npy"
    np.save(x, np.ones((4, WIDTHS[0]), np.float32))
    ckpt = tmp_path / "ck"
    if not ckpt.exists():
        shutil.copytree(ROOT / "models" / "digits" / "checkpoint", ckpt)
    q = str(tmp_path / "q.onnx")
    return [
        ["fold", str(src), "-o", node + ".onnx"],
        ["fold", str(src), "-o", str(tmp_path / "f.onnx"), "--report", node + ".json"],
        ["export", str(ckpt), "-o", node + ".onnx"],
        ["run", str(src), "-i", str(x), "-o", node + ".npy"],
        ["verify", str(src), "--report", node + ".json"],
        ["bench", str(src), "--batch-sizes", "1", "--json", node + ".json"],
        ["quantize", str(src), "-o", node + ".onnx", "--calibrate", str(x)],
        ["quantize", str(src), "-o", q, "--calibrate", str(x), "--report", node + ".json"],
    ]


@pytest.mark.parametrize("kind", ["chardev", "fifo"])
def test_every_writer_refuses_a_node_before_any_work(tmp_path, capsys, kind):
    nodes = [_node(tmp_path / f"node{ext}", kind) for ext in (".onnx", ".npy", ".json")]
    for ext in (".onnx", ".npy", ".json"):
        (tmp_path / f"via-link{ext}").symlink_to(f"node{ext}")
    for stem in ("node", "via-link"):
        for argv in _argvs(tmp_path, str(tmp_path / stem)):
            before = sorted(p.name for p in tmp_path.iterdir())
            rc = main(argv)
            err = capsys.readouterr().err
            assert rc == 2, (argv, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in err, (argv, err)
            assert f"{tmp_path / stem}." in lines[0], lines[0]
            assert "is not a regular file (a device, FIFO or socket)" in lines[0], lines[0]
            assert sorted(p.name for p in tmp_path.iterdir()) == before, argv
    for node in nodes:
        mode = os.lstat(node).st_mode
        assert stat.S_ISCHR(mode) if kind == "chardev" else stat.S_ISFIFO(mode)


def test_output_group_refuses_a_node_itself(tmp_path):
    from bn_onnx.errors import UsageError
    from bn_onnx.files import OutputGroup

    node = _node(tmp_path / "n", "fifo")
    with pytest.raises(UsageError, match="not a regular file"), OutputGroup() as g:
        g.open(node).write(b"x")
    assert stat.S_ISFIFO(os.lstat(node).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["n"]


@pytest.mark.parametrize("command", ["fold", "run", "verify"])
def test_symlinked_output_writes_the_target_and_keeps_the_link(tmp_path, capsys, command):
    src = _model(tmp_path)
    x = tmp_path / "x.npy"
    np.save(x, np.ones((4, WIDTHS[0]), np.float32))
    real = tmp_path / "t"
    real.mkdir()
    target = real / ("target.npy" if command == "run" else "target.onnx")
    target.write_bytes(b"old")
    sl = tmp_path / "sl"
    sl.mkdir()
    link = sl / ("out.npy" if command == "run" else "out.onnx")
    link.symlink_to(target)
    argv = {
        "fold": ["fold", str(src), "-o", str(link), "-q"],
        "run": ["run", str(src), "-i", str(x), "-o", str(link)],
        "verify": ["verify", str(src), "--report", str(link)],
    }[command]
    rc = main(argv)
    assert rc == 0, capsys.readouterr().err
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() != b"old"
    if command == "fold":
        onnx.checker.check_model(onnx.load(target))
    elif command == "run":
        assert np.load(target).shape == (4, WIDTHS[-1])
    assert sorted(p.name for p in sl.iterdir()) == ["out.npy" if command == "run" else "out.onnx"]
    assert [p.name for p in real.iterdir()] == [target.name]  # no temporary left


def test_symlinked_output_onto_an_input_is_still_refused(tmp_path, capsys):
    src = _model(tmp_path)
    link = tmp_path / "sl.onnx"
    link.symlink_to(src)
    assert main(["fold", str(src), "-o", str(link)]) == 2
    assert "is the input model" in capsys.readouterr().err
    assert link.is_symlink()


def test_symlinked_output_with_external_data_is_refused_before_any_work(tmp_path, capsys):
    """onnx finds NAME.data beside the path it loads: through a link into another folder one
    of the two paths would load a model without its data, so the link is refused."""
    src = _model(tmp_path)
    real = tmp_path / "t"
    real.mkdir()
    target = real / "target.onnx"
    target.write_bytes(b"old")
    sl = tmp_path / "sl"
    sl.mkdir()
    link = sl / "out.onnx"
    link.symlink_to(target)
    rc = main(["fold", str(src), "-o", str(link), "--external-data", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "is a symbolic link" in err, err
    assert target.read_bytes() == b"old" and link.is_symlink()
    assert sorted(p.name for p in sl.iterdir()) == ["out.onnx"]
    assert [p.name for p in real.iterdir()] == ["target.onnx"]
    # the link's target itself is a fine output: model and data side by side
    assert main(["fold", str(src), "-o", str(target), "--external-data", "-q"]) == 0
    onnx.checker.check_model(onnx.load(target))
    assert (real / "target.onnx.data").exists()
