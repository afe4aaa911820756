"""Property: on random MLP-shaped graphs the fold removes every BN and changes no output."""

from __future__ import annotations

import numpy as np
from fold_testing import fold_and_compare, op_count, random_mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fold_random_mlps_removes_every_bn_and_keeps_outputs(data):
    model, n_in = random_mlp(
        lambda lo, hi: data.draw(st.integers(lo, hi)),
        lambda lo, hi: data.draw(st.sampled_from([lo, 1.0, hi, (lo + hi) / 3])),
        lambda: data.draw(st.booleans()),
    )
    x = np.random.default_rng(0).normal(size=(5, n_in)).astype(np.float32)
    result = fold_and_compare(model, {"x": x})  # every BN folded, outputs within 1e-5 + 1e-4
    assert op_count(result.model, "BatchNormalization") == 0
    assert result.report.left == []
    # nothing the fold made unused is left behind
    used = {i for n in result.model.graph.node for i in n.input}
    assert all(t.name in used for t in result.model.graph.initializer)
    assert all(n.op_type != "Constant" for n in result.model.graph.node)
