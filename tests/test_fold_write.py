"""fold_file writes folded weights straight into the file: the bytes must be onnx.save's."""

from __future__ import annotations

import onnx
import pytest
from fold_testing import random_mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bn_onnx import onnx_meta
from bn_onnx.fold import fold_file, fold_model
from bn_onnx.graphs import build_mlp
from bn_onnx.onnx_meta import bn_nodes


def _assert_same_bytes_as_fold_model(model: onnx.ModelProto, tmp_path) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    report = fold_file(src, out)
    expected = fold_model(onnx.load(str(src)))
    assert report.to_dict() == expected.report.to_dict()
    assert out.read_bytes() == expected.model.SerializeToString()


@pytest.mark.parametrize("bn", ["pre", "post"])
@pytest.mark.parametrize("widths", [[8, 16, 4], [64, 256, 256, 10], [300, 5, 300, 7]])
def test_fold_file_bytes_equal_serialized_fold_model(tmp_path, bn, widths):
    model = build_mlp(widths, "unfolded", bn=bn, seed=len(widths))
    _assert_same_bytes_as_fold_model(model, tmp_path)
    assert not bn_nodes(onnx.load(str(tmp_path / "out.onnx")))


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.data())
def test_fold_file_bytes_equal_serialized_fold_model_on_random_graphs(tmp_path, data):
    model, _ = random_mlp(
        lambda lo, hi: data.draw(st.integers(lo, hi)),
        lambda lo, hi: data.draw(st.sampled_from([lo, 1.0, hi, (lo + hi) / 3])),
        lambda: data.draw(st.booleans()),
    )
    _assert_same_bytes_as_fold_model(model, tmp_path)


def _with_flag(model: onnx.ModelProto, value: str) -> onnx.ModelProto:
    onnx_meta.set_metadata(model, {onnx_meta.FOLDED: value, "other": "kept"})
    return model


def test_folded_flag_becomes_true_when_no_bn_is_left():
    out = fold_model(_with_flag(build_mlp([8, 16, 4], "unfolded"), "false")).model
    meta = onnx_meta.get_metadata(out)
    assert (meta[onnx_meta.FOLDED], meta["other"]) == ("true", "kept")


def test_folded_flag_stays_false_when_a_bn_is_left():
    from fold_testing import mlp_with_probe

    model = mlp_with_probe()
    result = fold_model(_with_flag(model, "false"))
    assert bn_nodes(result.model)
    assert onnx_meta.get_metadata(result.model)[onnx_meta.FOLDED] == "false"


def test_files_without_the_flag_get_it():
    """verify labels a model "(folded)" from the flag, so every folded file carries it."""
    model = build_mlp([8, 16, 4], "unfolded")
    del model.metadata_props[:]
    out = fold_model(model).model
    assert onnx_meta.get_metadata(out) == {onnx_meta.FOLDED: "true"}
    assert onnx_meta.get_metadata(model) == {}  # the input is not changed
