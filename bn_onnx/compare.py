"""The tolerance policy and per-output error statistics used by `verify` and the tests.

An element fails only where BOTH tolerances are exceeded, i.e. where
`|actual - expected| > atol + rtol * |expected|` (numpy's `isclose` rule, with the expected
value as the reference). NaN matches nothing (not even NaN) unless `equal_nan`; equal infinities
match. An expected value beyond the range of the actual values' dtype is the infinity it rounds
to there (a float16 model whose exact result is 1e5 overflows correctly to inf). Integer, bool
and string outputs must be equal.

Tolerances default per dtype of the values under test (`DEFAULT_TOLERANCES`, as
torch.testing does) and can be overridden for every output or per output name
(`TolerancePolicy`, like Polygraphy's per-output `--atol name:value`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bn_onnx.errors import UsageError

# (atol, rtol) per dtype of the values under test. float32 per DESIGN.md. float16 and bfloat16
# are compared with a float64 reference over a whole network, not one op: a few roundings of
# half an ulp each (2**-11 and 2**-8 relative) add up along the layers, so their bounds are
# about ten ulps of the unit value (measured on the fold tests' models: docs/runtime.md).
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
    "float32": (1e-5, 1e-4),
    "float64": (1e-7, 1e-7),
}
# Integers, bools and strings (class labels, indices, masks) must be equal.
EXACT = (0.0, 0.0)
# A raised default atol stops here: a model whose own float error is larger than this fails
# against its float64 reference, saying so, rather than widening every comparison.
FLOOR_CAP = 100.0


# Float types by precision (mantissa bits), lowest first; ml_dtypes' bfloat16 is numpy kind "V".
FLOAT_PRECISION = {"bfloat16": 8, "float16": 11, "float32": 24, "float64": 53}


def is_float_dtype(dtype: Any) -> bool:
    """numpy floats and ml_dtypes' (bfloat16, float8 ...), whose numpy kind is "V"."""
    dt = np.dtype(dtype)
    return dt.kind == "f" or dt.name in FLOAT_PRECISION or dt.name.startswith("float8")


def lowest_precision(*dtypes: Any) -> str | None:
    """The float dtype name of least precision among `dtypes` (None and non-floats skipped)."""
    names = [d if isinstance(d, str) else dtype_name(d) for d in dtypes if d is not None]
    floats = [n for n in names if n in FLOAT_PRECISION]
    return min(floats, key=FLOAT_PRECISION.__getitem__) if floats else None


def dtype_name(dtype: Any) -> str:
    """numpy's name for a dtype (`float32`, `bfloat16`, `int64`, `str` for strings)."""
    dt = np.dtype(dtype)
    return "str" if dt.kind in "USO" else dt.name


def default_tolerance(dtype: Any) -> tuple[float, float]:
    """The default (atol, rtol) for comparing values of `dtype`.

    Floats: `DEFAULT_TOLERANCES` (another float type gets float32's); integers, bools and
    strings: exact.
    """
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    if name in DEFAULT_TOLERANCES:
        return DEFAULT_TOLERANCES[name]
    kind = np.dtype(dtype).kind if not isinstance(dtype, str) else ""
    if kind in "biuUSO" and kind:
        return EXACT
    return DEFAULT_TOLERANCES["float32"]


@dataclass(frozen=True)
class Tolerance:
    """The tolerance one comparison used, and where it came from (for the report)."""

    atol: float
    rtol: float
    origin: str

    def __str__(self) -> str:
        return f"atol {self.atol:.3g}, rtol {self.rtol:.3g} [{self.origin}]"


def _given(
    name: str, per_output: Mapping[str, float], every: float | None, flag: str, default: float
) -> tuple[float, str | None]:
    """A user's tolerance for output `name` (`flag NAME=`, else `flag` for all) and where it
    came from, else `default` and None."""
    if name in per_output:
        return per_output[name], f"{flag} {name}="
    if every is not None:
        return every, flag
    return default, None


@dataclass
class TolerancePolicy:
    """Which tolerance each output gets: per-dtype defaults, overridden for all or by name.

    `atol`/`rtol` override every output; `output_atol`/`output_rtol` (output name -> value)
    override single outputs and win over the global override. `scale` multiplies the *defaults*
    only (a pair of two float32 runs, each within tolerance of the truth, may be twice as far
    apart); values the user gave are used as given.
    """

    atol: float | None = None
    rtol: float | None = None
    output_atol: dict[str, float] = field(default_factory=dict)
    output_rtol: dict[str, float] = field(default_factory=dict)
    # output name -> (atol, why): raises the default atol (never a user's value), up to
    # FLOOR_CAP times the default; `bn_onnx.verify.pairs.calibrate` sets it
    atol_floor: dict[str, tuple[float, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for v in [self.atol, *self.output_atol.values()]:
            if v is not None:
                _check_tol(float(v), 0.0)
        for v in [self.rtol, *self.output_rtol.values()]:
            if v is not None:
                _check_tol(0.0, float(v))

    @classmethod
    def from_values(
        cls,
        atol: float | Mapping[str, float] | None = None,
        rtol: float | Mapping[str, float] | None = None,
    ) -> TolerancePolicy:
        """A policy from a number (all outputs) or a mapping (output name -> value; the key
        `"*"` means all outputs) for each of atol and rtol."""

        def split(v: float | Mapping[str, float] | None) -> tuple[float | None, dict[str, float]]:
            if v is None or isinstance(v, (int, float)):
                return (None if v is None else float(v)), {}
            per = {str(k): float(x) for k, x in v.items()}
            return per.pop("*", None), per

        a, pa = split(atol)
        r, pr = split(rtol)
        return cls(a, r, pa, pr)

    def unknown_outputs(self, names: list[str]) -> list[str]:
        """Output names given an override that the model does not have."""
        return sorted((set(self.output_atol) | set(self.output_rtol)) - set(names))

    def resolve(self, name: str, dtype: Any, *, scale: float = 1.0, what: str = "") -> Tolerance:
        """The tolerance for output `name` whose values under test have `dtype`."""
        d_atol, d_rtol = default_tolerance(dtype)
        dname = dtype if isinstance(dtype, str) else dtype_name(dtype)
        default = f"{dname} default" + (f" x{scale:g} ({what})" if scale != 1.0 else "")
        atol, rtol = d_atol * scale, d_rtol * scale
        if name in self.atol_floor and self.atol_floor[name][0] > d_atol:
            floor, why = self.atol_floor[name]
            capped = floor > FLOOR_CAP * d_atol
            atol = min(floor, FLOOR_CAP * d_atol) * scale
            default = f"{dname} default raised to {why}" + (
                f", capped at {FLOOR_CAP:g}x the default" if capped else ""
            )
            default += f" x{scale:g} ({what})" if scale != 1.0 else ""
        atol, by_atol = _given(name, self.output_atol, self.atol, "--atol", atol)
        rtol, by_rtol = _given(name, self.output_rtol, self.rtol, "--rtol", rtol)
        origins = [o for o in (by_atol, by_rtol) if o]
        if len(origins) < 2:
            origins.append(default)
        return Tolerance(float(atol), float(rtol), ", ".join(origins))


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
    origin: str | None = None  # where atol/rtol came from, e.g. "float16 default"
    # Elements outside atol/rtol that a further judgment accepted (verify: no further from
    # float64 than the original model is), not counted in n_mismatched, and why.
    n_forgiven: int = 0
    forgiven: str | None = None

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
            "tolerance_origin": self.origin,
            "n_forgiven": self.n_forgiven,
            "forgiven": self.forgiven,
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
    d_atol, d_rtol = default_tolerance(a_raw.dtype)
    atol = d_atol if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)
    _check_tol(atol, rtol)
    result = OutputComparison(name=name, shape=tuple(b_raw.shape), atol=atol, rtol=rtol)
    if a_raw.shape != b_raw.shape:
        result.note = f"shape {tuple(a_raw.shape)} vs expected {tuple(b_raw.shape)}"
        return result
    result.n_total = int(a_raw.size)
    if a_raw.size == 0:
        return result
    if a_raw.dtype.kind in "USO" or b_raw.dtype.kind in "USO":
        return _compare_exact(a_raw, b_raw, result)
    a = a_raw.astype(np.float64)
    b = b_raw.astype(np.float64)
    if is_float_dtype(a_raw.dtype) and a_raw.dtype.itemsize < 8:
        with np.errstate(over="ignore"):
            rounded = b.astype(a_raw.dtype).astype(np.float64)
        b = np.where(np.isinf(rounded) & np.isfinite(b), rounded, b)
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


def _compare_exact(a: np.ndarray, b: np.ndarray, result: OutputComparison) -> OutputComparison:
    """Strings (and other non-numbers): equal or not; the first unequal element is the worst."""
    bad = np.asarray(a.astype(str) != b.astype(str))
    result.n_mismatched = int(bad.sum())
    if result.n_mismatched:
        worst = np.unravel_index(int(np.argmax(bad)), bad.shape)
        result.worst_index = tuple(int(i) for i in worst)
        result.max_abs = result.max_rel = float("inf")
        result.median_abs = float("inf") if result.n_mismatched * 2 > bad.size else 0.0
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
    actual: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    atol: float | None = None,
    rtol: float | None = None,
    classifier: bool = False,
    actual_label: str = "actual",
    expected_label: str = "expected",
    policy: TolerancePolicy | None = None,
    scale: float = 1.0,
    scale_reason: str = "",
    equal_nan: bool = False,
    tolerance_dtypes: Mapping[str, Any] | None = None,
) -> Comparison:
    """Compare every output present in `expected` by name (a missing one fails).

    Tolerances come from `policy` (per output name and dtype of the actual values; `scale`
    multiplies its defaults, `scale_reason` says why) or, without one, from `atol`/`rtol`
    (None: the dtype's default). `tolerance_dtypes` (output name -> dtype) picks the policy's
    default by another dtype than the actual values' (a float32 output of a model that
    computes in float16 inside gets float16's).
    """
    comp = Comparison(actual_label, expected_label)
    for name, exp in expected.items():
        got = actual.get(name)
        if policy is not None:
            dtype = np.asarray(got if got is not None else exp).dtype
            if tolerance_dtypes and tolerance_dtypes.get(name) is not None:
                dtype = tolerance_dtypes[name]
            tol = policy.resolve(name, dtype, scale=scale, what=scale_reason)
            a_tol, r_tol, origin = tol.atol, tol.rtol, tol.origin
        else:
            a_tol, r_tol, origin = atol, rtol, None
        if got is None:
            oc = OutputComparison(name, tuple(np.shape(exp)), a_tol or 0.0, r_tol or 0.0)
            oc.note = f"output {name!r} missing"
            oc.origin = origin
            comp.outputs.append(oc)
            continue
        oc = compare_arrays(
            got,
            exp,
            atol=a_tol,
            rtol=r_tol,
            name=name,
            classifier=classifier,
            equal_nan=equal_nan,
        )
        oc.origin = origin
        comp.outputs.append(oc)
    return comp
