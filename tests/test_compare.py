"""The tolerance policy (fail only where both atol and rtol are exceeded) and error statistics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bn_onnx.compare import compare_arrays, compare_outputs, default_tolerance, mismatch_mask
from bn_onnx.errors import UsageError


def test_float32_defaults_are_the_designs():
    assert default_tolerance(np.float32) == (1e-5, 1e-4)
    r = compare_arrays(np.zeros(3, np.float32), np.zeros(3))
    assert (r.atol, r.rtol) == (1e-5, 1e-4)


def test_element_fails_only_where_both_tolerances_are_exceeded():
    expected = np.array([0.0, 0.0, 1000.0, 1000.0])
    # over atol but under rtol*|b| (0.1); under atol; over both; over both
    actual = expected + np.array([5e-5, 5e-6, 0.05, 0.2])
    r = compare_arrays(actual, expected, atol=1e-5, rtol=1e-4)
    assert r.n_mismatched == 2 and not r
    assert mismatch_mask(actual, expected, 1e-5, 1e-4).tolist() == [True, False, False, True]


finite = st.floats(-1e6, 1e6, allow_nan=False, width=64)


@settings(max_examples=100, deadline=None)
@given(
    b=hnp.arrays(np.float64, st.integers(1, 20), elements=finite),
    noise=st.floats(-1e-2, 1e-2),
    atol=st.floats(0, 1e-3),
    rtol=st.floats(0, 1e-3),
)
def test_mismatch_count_matches_the_written_rule(b, noise, atol, rtol):
    a = b + noise * np.arange(b.size)
    r = compare_arrays(a, b, atol=atol, rtol=rtol)
    expected_bad = np.abs(a - b) > atol + rtol * np.abs(b)
    assert r.n_mismatched == int(expected_bad.sum())
    assert bool(r) == (not expected_bad.any())
    diff = np.abs(a - b)
    assert r.max_abs == pytest.approx(diff.max())
    assert r.median_abs == pytest.approx(np.median(diff))
    assert diff[r.worst_index] == pytest.approx(diff.max())


def test_statistics_and_worst_element():
    expected = np.array([[1.0, 2.0, 4.0], [8.0, -1.0, 0.5]])
    actual = expected.copy()
    actual[1, 1] += 0.3  # the largest error
    actual[0, 2] += 0.01
    r = compare_arrays(actual, expected, atol=1e-5, rtol=1e-4, name="logits")
    assert r.worst_index == (1, 1)
    assert r.worst_actual == pytest.approx(-0.7) and r.worst_expected == -1.0
    assert r.max_abs == pytest.approx(0.3)
    assert r.max_rel == pytest.approx(0.3)
    assert r.median_abs == 0.0
    assert r.n_mismatched == 2 and r.n_total == 6
    assert "2 of 6" in r.summary() and "[1, 1]" in r.summary()


def test_argmax_agreement_for_classifiers():
    expected = np.array([[0.0, 1.0], [1.0, 0.0], [0.2, 0.1], [0.0, 3.0]])
    actual = expected.copy()
    actual[2] = [0.1, 0.2]  # flips row 2
    r = compare_arrays(actual, expected, classifier=True)
    assert r.argmax_agreement == 0.75
    assert compare_arrays(actual, expected).argmax_agreement is None


def test_nan_never_matches_unless_asked_and_equal_infinities_do():
    a = np.array([np.nan, np.inf, 1.0])
    b = np.array([np.nan, np.inf, 1.0])
    r = compare_arrays(a, b)
    assert r.n_mismatched == 1 and r.max_abs == np.inf
    r2 = compare_arrays(a, b, equal_nan=True)
    assert r2 and r2.max_abs == 0.0
    assert not compare_arrays(np.array([np.inf]), np.array([-np.inf]))


def test_shape_mismatch_fails_with_a_note():
    r = compare_arrays(np.zeros((2, 3)), np.zeros((3, 2)))
    assert not r and "shape" in r.note
    assert r.to_dict()["passed"] is False


def test_tolerances_must_be_finite_and_non_negative():
    with pytest.raises(UsageError):
        compare_arrays(np.zeros(2), np.zeros(2), atol=-1.0)
    with pytest.raises(UsageError):
        compare_arrays(np.zeros(2), np.zeros(2), rtol=float("nan"))


def test_compare_outputs_by_name_and_missing_output_fails():
    exp = {"logits": np.ones((2, 2)), "extra": np.zeros(3)}
    comp = compare_outputs({"logits": np.ones((2, 2))}, exp)
    assert not comp
    assert [o.passed for o in comp.outputs] == [True, False]
    assert comp.to_dict()["outputs"][1]["note"] == "output 'extra' missing"


def test_to_dict_is_json_safe_with_infinities():
    import json

    r = compare_arrays(np.array([np.inf, 0.0]), np.array([1.0, 0.0]))
    json.dumps(r.to_dict(), allow_nan=False)


def test_tolerance_defaults_per_dtype_and_exact_for_integers_and_strings():
    import ml_dtypes

    assert default_tolerance(np.float16) == (1e-2, 1e-2)
    assert default_tolerance(ml_dtypes.bfloat16) == (5e-2, 5e-2)
    assert default_tolerance(np.float64) == (1e-7, 1e-7)
    assert default_tolerance(np.int64) == (0.0, 0.0) == default_tolerance(np.bool_)
    r = compare_arrays(np.array([1, 2, 3]), np.array([1, 2, 4]))
    assert r.n_mismatched == 1 and r.worst_index == (2,)
    s = compare_arrays(np.array(["a", "b"], dtype=object), np.array(["a", "c"], dtype=object))
    assert not s and s.n_mismatched == 1 and s.worst_index == (1,)
    assert compare_arrays(np.array(["a"], dtype=object), np.array(["a"]))


def test_tolerance_policy_overrides_by_output_and_says_where_each_value_came_from():
    from bn_onnx.compare import TolerancePolicy

    policy = TolerancePolicy.from_values({"*": 1e-3, "probs": 0.5}, None)
    assert (
        str(policy.resolve("logits", np.float32))
        == "atol 0.001, rtol 0.0001 [--atol, float32 default]"
    )
    t = policy.resolve("probs", np.float16)
    assert (t.atol, t.rtol, t.origin) == (0.5, 1e-2, "--atol probs=, float16 default")
    t = TolerancePolicy().resolve("y", np.float32, scale=2.0, what="two float runs")
    assert (t.atol, t.rtol) == (2e-5, 2e-4) and t.origin == "float32 default x2 (two float runs)"
    # a value given by the user is used as given, never scaled
    t = TolerancePolicy(atol=1e-6, rtol=1e-6).resolve("y", np.float32, scale=2.0)
    assert (t.atol, t.rtol, t.origin) == (1e-6, 1e-6, "--atol, --rtol")
    assert policy.unknown_outputs(["logits"]) == ["probs"]
    with pytest.raises(UsageError, match="rtol"):
        TolerancePolicy(output_rtol={"y": -1.0})


def test_compare_outputs_uses_the_policy_and_the_models_inner_dtype():
    from bn_onnx.compare import TolerancePolicy

    exp = {"y": np.zeros(4)}
    got = {"y": np.full(4, 5e-3, np.float32)}
    assert not compare_outputs(got, exp, policy=TolerancePolicy())
    comp = compare_outputs(got, exp, policy=TolerancePolicy(), tolerance_dtypes={"y": "float16"})
    assert comp and comp.outputs[0].origin == "float16 default"


def test_float_dtype_helpers_know_ml_dtypes():
    import ml_dtypes

    from bn_onnx.compare import is_float_dtype, lowest_precision

    assert is_float_dtype(ml_dtypes.bfloat16) and is_float_dtype(np.float16)
    assert not is_float_dtype(np.int32) and not is_float_dtype(object)
    assert lowest_precision(np.float32, "float16", None) == "float16"
    assert lowest_precision(np.float32, ml_dtypes.bfloat16) == "bfloat16"
    assert lowest_precision(np.int64) is None
