"""The tolerance policy and per-output error statistics used by `verify` and the tests.

An element fails only where BOTH tolerances are exceeded, i.e. where
`|actual - expected| > atol + rtol * |expected|` (numpy's `isclose` rule, with the expected
value as the reference). NaN matches nothing (not even NaN) unless `equal_nan`; equal infinities
match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bn_onnx.errors import UsageError

# (atol, rtol) per dtype: float32 per DESIGN.md; float16 and float64 scaled to their precision.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float16": (1e-3, 1e-3),
    "bfloat16": (1e-2, 1.6e-2),
    "float32": (1e-5, 1e-4),
    "float64": (1e-7, 1e-7),
}


def default_tolerance(dtype: Any) -> tuple[float, float]:
    """The default (atol, rtol) for comparing arrays of `dtype` (float32's for non-floats)."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    return DEFAULT_TOLERANCES.get(name, DEFAULT_TOLERANCES["float32"])


@dataclass
class OutputComparison:
    """How one output of a run differs from the expected one.

    `bool(comparison)` is True when every element is within tolerance and the shapes agree.
    Errors are measured in float64. `worst_index` is where `|actual - expected|` is largest.
    `argmax_agreement` is the share of rows whose argmax agrees (classifiers only, else None).
    """

    name: str
    shape: tuple[int, ...]
    atol: float
    rtol: float
    max_abs: float = 0.0
    median_abs: float = 0.0
    max_rel: float = 0.0
    worst_index: tuple[int, ...] | None = None
    worst_actual: float | None = None
    worst_expected: float | None = None
    n_mismatched: int = 0
    n_total: int = 0
    argmax_agreement: float | None = None
    note: str | None = None

    @property
    def passed(self) -> bool:
        """No element outside tolerance and no structural problem (shape, etc.)."""
        return self.n_mismatched == 0 and self.note is None

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> str:
        """One line: pass/fail, the error figures and where the worst element is."""
        if self.note is not None:
            return f"{self.name}: FAIL ({self.note})"
        status = "ok" if self.passed else "FAIL"
        text = (
            f"{self.name}: {status}, max abs {self.max_abs:.3g}, median abs "
            f"{self.median_abs:.3g}, max rel {self.max_rel:.3g}"
        )
        if self.worst_index is not None:
            text += (
                f", worst at {list(self.worst_index)} ({self.worst_actual:.7g} vs "
                f"{self.worst_expected:.7g})"
            )
        if self.n_mismatched:
            text += f", {self.n_mismatched} of {self.n_total} elements outside tolerance"
        if self.argmax_agreement is not None:
            text += f", argmax agrees on {100 * self.argmax_agreement:.2f}% of rows"
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for reports (infinities as strings)."""

        def num(v: float | None) -> float | str | None:
            if v is None:
                return None
            return float(v) if np.isfinite(v) else str(v)

        return {
            "name": self.name,
            "shape": list(self.shape),
            "atol": self.atol,
            "rtol": self.rtol,
            "passed": self.passed,
            "max_abs": num(self.max_abs),
            "median_abs": num(self.median_abs),
            "max_rel": num(self.max_rel),
            "worst_index": list(self.worst_index) if self.worst_index is not None else None,
            "worst_actual": num(self.worst_actual),
            "worst_expected": num(self.worst_expected),
            "n_mismatched": self.n_mismatched,
            "n_total": self.n_total,
            "argmax_agreement": self.argmax_agreement,
            "note": self.note,
        }


def _check_tol(atol: float, rtol: float) -> None:
    for name, v in (("atol", atol), ("rtol", rtol)):
        if not (np.isfinite(v) and v >= 0):
            raise UsageError(f"{name} must be a finite number >= 0, got {v}")


def mismatch_mask(
    actual: np.ndarray, expected: np.ndarray, atol: float, rtol: float, equal_nan: bool = False
) -> np.ndarray:
    """Boolean mask of elements outside tolerance (both atol and rtol exceeded)."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    return ~np.isclose(a, b, atol=atol, rtol=rtol, equal_nan=equal_nan)


def compare_arrays(
    actual: Any,
    expected: Any,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    name: str = "output",
    classifier: bool = False,
    equal_nan: bool = False,
) -> OutputComparison:
    """Compare one output against its expected value with the project's tolerance policy.

    Args:
        actual: the values under test.
        expected: the reference values (relative error is measured against these).
        atol, rtol: tolerances; None takes the default for `actual`'s dtype.
        name: the output's name, for messages.
        classifier: also report argmax agreement along the last axis.
        equal_nan: count NaN == NaN as a match.
    """
    a_raw = np.asarray(actual)
    b_raw = np.asarray(expected)
    d_atol, d_rtol = default_tolerance(a_raw.dtype if a_raw.dtype.kind == "f" else np.float32)
    atol = d_atol if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)
    _check_tol(atol, rtol)
    result = OutputComparison(name=name, shape=tuple(b_raw.shape), atol=atol, rtol=rtol)
    if a_raw.shape != b_raw.shape:
        result.note = f"shape {tuple(a_raw.shape)} vs expected {tuple(b_raw.shape)}"
        return result
    a = a_raw.astype(np.float64)
    b = b_raw.astype(np.float64)
    result.n_total = int(a.size)
    if a.size == 0:
        return result
    bad = mismatch_mask(a, b, atol, rtol, equal_nan)
    result.n_mismatched = int(bad.sum())
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a - b)
    # Equal infinities give inf - inf = nan; they match, so their error is 0.
    same = (a == b) | (equal_nan & np.isnan(a) & np.isnan(b))
    diff = np.where(same, 0.0, diff)
    diff = np.where(np.isnan(diff), np.inf, diff)
    result.max_abs = float(diff.max())
    result.median_abs = float(np.median(diff))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rel = np.where(diff == 0, 0.0, diff / np.abs(b))
    rel = np.where(np.isnan(rel), np.inf, rel)
    result.max_rel = float(rel.max())
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    result.worst_index = tuple(int(i) for i in worst)
    result.worst_actual = float(a[worst])
    result.worst_expected = float(b[worst])
    if classifier and a.ndim >= 2 and a.shape[-1] > 1:
        agree = np.argmax(a, axis=-1) == np.argmax(b, axis=-1)
        result.argmax_agreement = float(agree.mean())
    return result


@dataclass
class Comparison:
    """Several outputs of one run against another; truthy when all of them pass."""

    actual: str
    expected: str
    outputs: list[OutputComparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """All outputs within tolerance."""
        return all(o.passed for o in self.outputs)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for reports."""
        return {
            "actual": self.actual,
            "expected": self.expected,
            "passed": self.passed,
            "outputs": [o.to_dict() for o in self.outputs],
        }


def compare_outputs(
    actual: dict[str, Any],
    expected: dict[str, Any],
    *,
    atol: float | None = None,
    rtol: float | None = None,
    classifier: bool = False,
    actual_label: str = "actual",
    expected_label: str = "expected",
) -> Comparison:
    """Compare every output present in `expected` by name (a missing one fails)."""
    comp = Comparison(actual_label, expected_label)
    for name, exp in expected.items():
        if name not in actual:
            oc = OutputComparison(name, tuple(np.shape(exp)), atol or 0.0, rtol or 0.0)
            oc.note = f"output {name!r} missing"
            comp.outputs.append(oc)
            continue
        comp.outputs.append(
            compare_arrays(
                actual[name], exp, atol=atol, rtol=rtol, name=name, classifier=classifier
            )
        )
    return comp
