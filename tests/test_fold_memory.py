"""fold_model's copy without weights (for big models) gives the very same model as a full copy."""

from __future__ import annotations

import numpy as np
import pytest
from fold_testing import fold_and_compare, random_mlp

import bn_onnx.fold


@pytest.mark.parametrize("seed", range(12))
def test_copy_without_weights_gives_the_same_model(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    model, n_in = random_mlp(
        lambda lo, hi: int(rng.integers(lo, hi + 1)),
        lambda lo, hi: float(rng.choice([lo, 1.0, hi])),
        lambda: bool(rng.integers(0, 2)),
    )
    x = rng.normal(size=(3, n_in)).astype(np.float32)
    full = fold_and_compare(model, {"x": x})
    monkeypatch.setattr(bn_onnx.fold, "SPLIT_COPY_BYTES", 0)
    split = fold_and_compare(model, {"x": x})
    assert split.model.SerializeToString() == full.model.SerializeToString()
    assert split.report.to_dict() == full.report.to_dict()
