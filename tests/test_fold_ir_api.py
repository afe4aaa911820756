"""The fold as an onnx-ir pass: on an `ir.Model` it gives what `fold_model` gives a ModelProto."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from fold_testing import fold_and_compare, mlp_with_probe, random_mlp

from bn_onnx.errors import UnsupportedModelError
from bn_onnx.fold import (
    FoldBatchNormPass,
    FoldPassResult,
    fold_in_place,
    fold_model,
    inspect_model,
)


def _random(seed: int) -> tuple[onnx.ModelProto, int]:
    rng = np.random.default_rng(seed)
    return random_mlp(
        lambda lo, hi: int(rng.integers(lo, hi + 1)),
        lambda lo, hi: float(rng.choice([lo, 1.0, hi])),
        lambda: bool(rng.integers(0, 2)),
    )


@pytest.mark.parametrize("seed", range(12))
def test_pass_on_ir_model_equals_fold_model_on_proto(seed):
    model, n_in = _random(seed)
    x = np.random.default_rng(seed).normal(size=(3, n_in)).astype(np.float32)
    via_proto = fold_and_compare(model, {"x": x})
    plain = fold_model(model, cleanup=False, guard=False)  # the pass alone
    ir_model = ir.serde.deserialize_model(model)
    result = FoldBatchNormPass()(ir_model)
    assert isinstance(result, FoldPassResult) and result.model is ir_model  # in place
    assert result.modified == (result.report.n_folded > 0)
    assert result.report.to_dict() == plain.report.to_dict()
    folded = ir.serde.serialize_model(ir_model)
    assert folded.SerializeToString() == plain.model.SerializeToString()
    # the pass and then the cleanup, in place: what fold_model gives by default
    ir_model = ir.serde.deserialize_model(model)
    report = fold_in_place(ir_model)
    assert report.to_dict() == via_proto.report.to_dict()
    assert report.cleanup is not None and plain.report.cleanup is None
    folded = ir.serde.serialize_model(ir_model)
    assert folded.SerializeToString() == via_proto.model.SerializeToString()


def test_fold_model_accepts_an_ir_model_and_leaves_it_unchanged():
    proto = mlp_with_probe()
    ir_model = ir.serde.deserialize_model(proto)
    before = ir.serde.serialize_model(ir_model).SerializeToString()
    result = fold_model(ir_model)
    assert isinstance(result.model, ir.Model) and result.model is not ir_model
    assert ir.serde.serialize_model(ir_model).SerializeToString() == before
    assert (result.report.n_bn, result.report.n_folded) == (2, 1)
    ops = [n.op_type for n in result.model.graph]
    assert ops.count("BatchNormalization") == 1
    assert [i.foldable for i in inspect_model(ir_model)] == [True, False]


def test_invalid_model_is_a_precondition_error_and_a_user_error():
    model = mlp_with_probe()
    del model.graph.initializer[0]  # W1 missing
    ir_model = ir.serde.deserialize_model(model)
    with pytest.raises(ir.passes.PreconditionError, match="invalid ONNX model"):
        FoldBatchNormPass()(ir_model)
    with pytest.raises(UnsupportedModelError, match="invalid ONNX model"):
        fold_model(model)
