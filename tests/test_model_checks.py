"""One validation for every command (issue 19): each malformed model is exit 2 and one line,
the same line in inspect, fold, verify, run, bench and serve; a native crash is contained."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bn_onnx import crash
from bn_onnx.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits" / "model.onnx"
SAMPLE = ROOT / "models" / "digits" / "sample_input.npy"


def _digits() -> onnx.ModelProto:
    return onnx.load(str(DIGITS))


def _init(m: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in m.graph.initializer if t.name == name)


def _save(folder: Path, model: onnx.ModelProto | bytes, files: dict | None = None) -> Path:
    folder.mkdir()
    path = folder / "model.onnx"
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    for name, data in (files or {}).items():
        (folder / name).write_bytes(data)
    return path


def _init_dims(folder: Path) -> Path:
    m = _digits()
    _init(m, "blocks.0.linear.weight").dims[0] = 127
    return _save(folder, m)


def _bn_127(folder: Path) -> Path:
    m = _digits()
    t = _init(m, "blocks.0.bn.weight")
    t.raw_data = numpy_helper.to_array(t)[:127].tobytes()
    return _save(folder, m)


def _undefined_dtype(folder: Path) -> Path:
    m = _digits()
    _init(m, "head.bias").data_type = TensorProto.UNDEFINED  # a fuzz mutant's: fold crashed
    return _save(folder, m)


def _recursion(folder: Path) -> Path:
    m = _digits()
    call = helper.make_node("Rec", ["x"], ["y"], domain="local")
    m.functions.append(
        helper.make_function("local", "Rec", ["x"], ["y"], [call], [helper.make_opsetid("", 18)])
    )
    m.opset_import.append(helper.make_opsetid("local", 1))
    last = m.graph.node[-1]
    out, last.output[0] = last.output[0], "pre"
    m.graph.node.append(helper.make_node("Rec", ["pre"], [out], domain="local"))
    return _save(folder, m)


def _input_dim(value: int, index: int = 0) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        m = _digits()
        m.graph.input[0].type.tensor_type.shape.dim[index].dim_value = value
        return _save(folder, m)

    return make


def _rank3(folder: Path) -> Path:
    m = _digits()
    m.graph.input[0].type.tensor_type.shape.dim.add().dim_value = 5
    return _save(folder, m)


def _no_outputs(folder: Path) -> Path:
    m = _digits()
    del m.graph.output[:]
    return _save(folder, m)


def _external(key: str, value: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        m = _digits()
        t = _init(m, "blocks.0.linear.weight")
        raw = t.raw_data
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        entries = {"location": "w.bin", "offset": "0", "length": str(len(raw)), key: value}
        for k, v in entries.items():
            e = t.external_data.add()
            e.key, e.value = k, v
        return _save(folder, m, {"w.bin": raw})

    return make


def _not_utf8(field: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        m = _digits()
        if field == "producer":
            m.producer_name = "QQQQ"
        else:
            m.graph.node[0].name = "QQQQ"
        return _save(folder, m.SerializeToString().replace(b"QQQQ", b"\xc3\x28QQ"))

    return make


CASES = {
    "initializer dims disagree with data": (_init_dims, "32768 bytes of data for shape [127, 64]"),
    "initializer of undefined data type": (_undefined_dtype, "has an undefined data type"),
    "function calls itself": (_recursion, "Cycle detected in model-local function"),
    "input dim 2**40": (_input_dim(2**40), "256 TiB: no run can feed it"),
    "negative input dim": (_input_dim(-3), "input 'input' has a negative dim -3"),
    "BN parameter of 127 floats": (_bn_127, "508 bytes of data for shape [128]"),
    "input rank the graph does not broadcast": (_rank3, "[ShapeInferenceError]"),
    "no graph outputs": (_no_outputs, "the graph has no outputs"),
    "external offset ''": (_external("offset", ""), "offset '' is not a whole number"),
    "external offset 1e3": (_external("offset", "1e3"), "offset '1e3' is not a whole number"),
    "external length 0x10": (_external("length", "0x10"), "length '0x10' is not a whole"),
    "external length -8": (_external("length", "-8"), "length '-8' is not a whole number"),
    "external location with NUL": (_external("location", "w\x00.bin"), "holds a NUL byte"),
    "node name not UTF-8": (_not_utf8("node"), "graph.node[0].name is not UTF-8"),
    "producer not UTF-8": (_not_utf8("producer"), "model.producer_name is not UTF-8"),
}


def _argv(cmd: str, model: Path, out: Path) -> list[str]:
    return {
        "inspect": ["inspect", str(model)],
        "fold": ["fold", str(model), "-o", str(out / "o.onnx")],
        "verify": ["verify", str(model), "--rows", "8"],
        "run": ["run", str(model), "-i", str(SAMPLE), "-o", str(out / "y.npy")],
        "bench": ["bench", str(model), "--batch-sizes", "1", "--repeats", "1", "-q"],
        "serve": ["serve", str(model), "--port", "0"],
    }[cmd]


@pytest.mark.parametrize("case", list(CASES))
def test_every_command_refuses_a_malformed_model_with_the_same_line(tmp_path, capsys, case):
    make, words = CASES[case]
    model = make(tmp_path / "model")
    before = {p.name: p.read_bytes() for p in model.parent.iterdir()}
    lines = {}
    for cmd in ("inspect", "fold", "verify", "run", "bench", "serve"):
        out = tmp_path / f"out_{cmd}"
        out.mkdir()
        rc = main(_argv(cmd, model, out))
        err = capsys.readouterr().err
        assert rc == 2, (cmd, err)
        assert err.count("\n") == 1 and words in err, (cmd, err)
        assert "Traceback" not in err and list(out.iterdir()) == []
        lines[cmd] = err.split(": error: ", 1)[1]
    assert len(set(lines.values())) == 1, lines  # the same words from every command
    assert {p.name: p.read_bytes() for p in model.parent.iterdir()} == before


def test_onnx_errors_show_their_first_line_and_debug_shows_the_rest(tmp_path, capsys):
    m = _digits()
    m.graph.node[1].op_type = "Foo"  # the checker's message has a second part, its context
    model = _save(tmp_path / "model", m)
    assert main(["verify", str(model)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no op Foo in opset 18" in err and "Context" not in err
    with pytest.raises(Exception, match="no op Foo"):
        main(["--debug", "verify", str(model)])
    assert "==> Context: Bad node spec" in capsys.readouterr().err


def test_deep_checkpoint_config_is_one_line(tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(ROOT / "models" / "digits" / "checkpoint", ckpt)
    (ckpt / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    assert main(["verify", str(DIGITS), "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nested too deeply" in err


def test_probe_over_the_budget_suggests_shape(capsys):
    assert main(["verify", str(DIGITS), "--shape", "input:100000000x64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "over the 4 GiB budget" in err and "--shape" in err


@pytest.mark.skipif(not hasattr(os, "fork"), reason="containment forks")
def test_a_child_killed_by_a_signal_is_one_line_naming_the_model(capsys):
    def work() -> int:
        crash.note("models/x.onnx")
        os.kill(os.getpid(), signal.SIGSEGV)
        return 0

    assert crash.run_watched("verify", ["a.onnx", "b.onnx"], work) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "onnxruntime crashed (SIGSEGV) on models/x.onnx" in err
    assert crash.run_watched("run", ["m.onnx"], lambda: 3) == 3


@pytest.mark.skipif(not hasattr(os, "fork"), reason="containment forks")
def test_verify_of_bn9_with_empty_optional_outputs_does_not_crash(tmp_path):
    # onnxruntime 1.32 segfaults on this model (a shape from its own fusion tests).
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 3, 4, 4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 3, 4, 4])
    inits = [numpy_helper.from_array(np.ones(3, np.float32), n) for n in ("s", "b", "m", "v")]
    node = helper.make_node("BatchNormalization", ["X", "s", "b", "m", "v"], ["Y", "", "", "", ""])
    model = helper.make_model(
        helper.make_graph([node], "bn9", [x], [y], inits),
        opset_imports=[helper.make_opsetid("", 9)],
    )
    model.ir_version = 7
    path = tmp_path / "bn9.onnx"
    onnx.save(model, path)
    proc = subprocess.run(
        [sys.executable, "-m", "bn_onnx", "verify", str(path)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=120,
    )
    assert proc.returncode in (0, 1, 2), proc.stderr
    if proc.returncode == 2:
        assert proc.stderr.count("\n") == 1 and "bn9.onnx" in proc.stderr, proc.stderr


def test_a_multi_line_error_prints_its_first_line(monkeypatch, capsys):
    from bn_onnx.errors import UnsupportedModelError

    def fails(args: object) -> int:
        raise UnsupportedModelError("what is wrong\n\n==> Context: where")

    monkeypatch.setattr("bn_onnx.cli.inspect.run", fails)
    assert main(["inspect", "m.onnx"]) == 2
    assert capsys.readouterr().err == "bn-onnx inspect: error: what is wrong\n"
