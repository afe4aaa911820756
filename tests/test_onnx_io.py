"""Loading ONNX files safely (external data kept in the model folder) and saving atomically."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bn_onnx.errors import InputFileError
from bn_onnx.onnx_io import load_model, save_model


def _model(n: int = 64) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(n * n, dtype=np.float32).reshape(n, n), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", n])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", n])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_save_and_load_single_file_round_trip(tmp_path):
    path = tmp_path / "m.onnx"
    assert save_model(_model(), path) == [path]
    loaded = load_model(path)
    np.testing.assert_array_equal(
        numpy_helper.to_array(loaded.graph.initializer[0]),
        numpy_helper.to_array(_model().graph.initializer[0]),
    )


def test_save_with_external_data_round_trip(tmp_path):
    path = tmp_path / "m.onnx"
    written = save_model(_model(), path, external_data=True)
    assert [p.name for p in written] == ["m.onnx", "m.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    loaded = load_model(path)
    np.testing.assert_array_equal(
        numpy_helper.to_array(loaded.graph.initializer[0]),
        numpy_helper.to_array(_model().graph.initializer[0]),
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty"), (b"this is not a model at all", "not"), (b"\x08\x07\x12", "not")],
)
def test_load_refuses_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(InputFileError, match=message):
        load_model(path)


def test_load_refuses_truncated_file(tmp_path):
    path = tmp_path / "m.onnx"
    save_model(_model(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError):
        load_model(path)


def test_load_refuses_external_data_outside_folder(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    save_model(_model(), inner / "m.onnx", external_data=True)
    model = onnx.load(str(inner / "m.onnx"), load_external_data=False)
    (tmp_path / "secret.bin").write_bytes((inner / "m.onnx.data").read_bytes())
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.bin"
    onnx.save(model, str(inner / "evil.onnx"))
    with pytest.raises(InputFileError, match="outside"):
        load_model(inner / "evil.onnx")


def test_load_refuses_missing_and_truncated_external_data(tmp_path):
    path = tmp_path / "m.onnx"
    save_model(_model(), path, external_data=True)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(InputFileError, match="truncated"):
        load_model(path)
    data.unlink()
    with pytest.raises(InputFileError, match="missing"):
        load_model(path)


def test_tensor_bytes_counts_weights_from_their_shape():
    from bn_onnx.onnx_io import tensor_bytes

    w = np.zeros((7, 9), np.float16)
    b = np.zeros(5, np.int64)
    graph = helper.make_graph(
        [], "g", [], [], [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    )
    assert tensor_bytes(helper.make_model(graph)) == w.nbytes + b.nbytes
    assert tensor_bytes(_model(8)) == 8 * 8 * 4
