"""Running ONNX models with onnxruntime: providers, sessions and a `Predictor` for apps.

No torch here: an app that only runs models needs numpy and onnxruntime.

onnxruntime quietly falls back to the CPU when the CUDA provider cannot start, so every
session is checked after creation: `session.get_providers()` must contain what was asked.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bn_onnx import crash
from bn_onnx.column_kinds import NAN_KINDS
from bn_onnx.columns import (
    NUMBER,
    Column,
    RecordReader,
    feeds_from_columns,
    read_columns,
    read_na_values,
)
from bn_onnx.errors import (
    BnOnnxError,
    CellError,
    InputDataError,
    InputFileError,
    NonFiniteError,
    ProviderError,
    UnsupportedModelError,
    UsageError,
)
from bn_onnx.onnx_check import check_feed_bytes, with_detail

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
SHORT_NAMES = {"cpu": CPU, "cuda": CUDA}
DEFAULT_BATCH_SIZE = 8192

_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "none": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

# onnxruntime's tensor type strings -> numpy dtypes for the inputs Predictor accepts.
_ORT_FLOAT_TYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
}


# Every tensor type a model input may have -> the numpy dtype its feed gets (strings: object).
_ORT_TYPES = {
    **_ORT_FLOAT_TYPES,
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(string)": np.dtype(object),
}

_FLOAT32 = np.dtype(np.float32)


class ProviderWarning(UserWarning):
    """onnxruntime did not use the provider that `auto` preferred."""


def short_name(provider: str) -> str:
    """`CUDAExecutionProvider` -> `cuda`; names without a short form are returned unchanged."""
    for short, full in SHORT_NAMES.items():
        if provider == full:
            return short
    return provider


def installed_onnxruntime_packages() -> list[str]:
    """The onnxruntime distributions installed (they share one `onnxruntime` module)."""
    import importlib.metadata  # only for error messages: ~30 ms of start-up otherwise

    found = []
    for name in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"):
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def cuda_missing_message(available: Sequence[str] | None = None) -> str:
    """Explain, in one line, why the CUDA provider is not there and how to get it."""
    available = list(ort.get_available_providers() if available is None else available)
    packages = installed_onnxruntime_packages()
    have = ", ".join(available) or "none"
    if "onnxruntime-gpu" in packages and "onnxruntime" in packages:
        return (
            "CUDA execution provider not available: both onnxruntime and onnxruntime-gpu are "
            "installed and the CPU-only one shadows the GPU one; run `pip uninstall -y "
            f"onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu` (available: {have})"
        )
    if "onnxruntime-gpu" in packages:
        return (
            "CUDA execution provider not available although onnxruntime-gpu is installed; "
            f"check the CUDA and cuDNN libraries it needs (available: {have})"
        )
    return (
        "CUDA execution provider not available: it needs the onnxruntime-gpu package instead "
        "of onnxruntime (`pip uninstall -y onnxruntime && pip install onnxruntime-gpu`) and an "
        f"NVIDIA GPU (available: {have})"
    )


def _full_name(name: str, available: Sequence[str]) -> str:
    full = SHORT_NAMES.get(name.strip().lower(), name.strip())
    if full == CUDA and CUDA not in available:
        raise ProviderError(cuda_missing_message(available))
    if full not in available:
        known = ", ".join(["auto", "cpu", "cuda", *available])
        raise ProviderError(
            f"unknown or unavailable execution provider {name!r} (choose from {known})"
        )
    return full


def resolve_providers(spec: str | Sequence[str] = "auto") -> list[str]:
    """Turn a provider choice into onnxruntime provider names, most preferred first.

    `auto` is CUDA (then CPU) where the CUDA provider exists, else CPU. `cpu` and `cuda` are
    strict: `cuda` without the CUDA provider is a `ProviderError` that says how to get it. A list
    (or a comma-separated string) of short or full names is taken in that order. CPU is always
    appended as the last resort, as onnxruntime needs it for nodes other providers lack.
    """
    available = list(ort.get_available_providers())
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key == "auto":
            return [CUDA, CPU] if CUDA in available else [CPU]
        names = [p for p in spec.split(",") if p.strip()]
    else:
        names = list(spec)
    if not names:
        raise ProviderError("no execution provider given (choose from auto, cpu, cuda)")
    resolved: list[str] = []
    for name in names:
        full = _full_name(name, available)
        if full not in resolved:
            resolved.append(full)
    if CPU not in resolved:
        resolved.append(CPU)
    return resolved


def _is_auto(spec: str | Sequence[str]) -> bool:
    return isinstance(spec, str) and spec.strip().lower() == "auto"


@dataclass
class SessionInfo:
    """An onnxruntime session and what it actually runs on.

    Attributes:
        session: the `onnxruntime.InferenceSession`.
        requested: provider names asked for, most preferred first.
        providers: provider names the session actually uses (`session.get_providers()`).
        tf32: for CUDA sessions whether TF32 math was allowed; None when CUDA is not used.
        device_id: the CUDA device, when CUDA is used.
        warnings: things the caller should show (a fallback under `auto`).
    """

    session: ort.InferenceSession
    requested: list[str]
    providers: list[str]
    tf32: bool | None = None
    device_id: int | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def main_provider(self) -> str:
        """The short name of the provider doing the work (`cuda` or `cpu`)."""
        return short_name(self.providers[0]) if self.providers else "none"

    def describe(self) -> str:
        """One line for reports: `cuda (device 0, TF32 off)` or `cpu`."""
        if CUDA in self.providers:
            tf32 = "on" if self.tf32 else "off"
            return f"cuda (device {self.device_id}, TF32 {tf32})"
        return ", ".join(short_name(p) for p in self.providers)


def session_options(
    threads: int | None = None, graph_optimization_level: str = "all"
) -> ort.SessionOptions:
    """Session options with the thread count and graph optimization level set."""
    so = ort.SessionOptions()
    level = _OPT_LEVELS.get(str(graph_optimization_level).lower())
    if level is None:
        raise UsageError(
            f"unknown graph optimization level {graph_optimization_level!r} "
            f"(choose from {', '.join(_OPT_LEVELS)})"
        )
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if threads is not None:
        if threads < 1:
            raise UsageError(f"threads must be >= 1, got {threads}")
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    # We report provider fallbacks and errors ourselves (one line each); onnxruntime's own
    # log lines go to stderr unasked, an error's several times over.
    so.log_severity_level = 4
    return so


def _ort_error_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


def _check_model_file(path: Path) -> None:
    # The one loader's checks (as fold and inspect run them) before onnxruntime reads the file:
    # one-line errors for malformed models, external data kept inside the model's folder.
    from bn_onnx.onnx_io import open_model

    open_model(path)


def _unsupported_reason(text: str) -> str | None:
    """A short reason when onnxruntime's load error means an op or opset it does not have."""
    m = re.search(r"Fatal error: (\S+?)\(-?\d+\) is not a registered function/op", text)
    if m:
        return f"no op {m.group(1)}"
    m = re.search(r"No Op registered for (\S+) with domain_version of (\d+)", text)
    if m:
        return f"no op {m.group(1)} in opset {m.group(2)}"
    m = re.search(
        r"Opset (\d+) is under development.*?support for domain (\S+) is till opset (\d+)",
        text,
        re.S,
    )
    if m:
        return f"opset {m.group(1)} is newer than it supports ({m.group(2)} up to {m.group(3)})"
    return None


def _new_session(
    model: str | bytes, so: ort.SessionOptions, providers: list[str], options: list[dict]
) -> ort.InferenceSession:
    try:
        with warnings.catch_warnings():
            # onnxruntime warns about a missing provider itself; create_session reports it.
            warnings.filterwarnings("ignore", message=".*[Pp]rovider", category=UserWarning)
            return ort.InferenceSession(
                model, sess_options=so, providers=providers, provider_options=options
            )
    except BnOnnxError:
        raise
    except Exception as exc:
        name = type(exc).__name__
        line = _ort_error_line(exc)
        unsupported = _unsupported_reason(str(exc))
        if unsupported:
            raise UnsupportedModelError(
                f"onnxruntime cannot run this model: {unsupported}"
            ) from None
        if name in ("NotImplemented",) or "NOT_IMPLEMENTED" in line:
            raise UnsupportedModelError(f"onnxruntime cannot run this model: {line}") from None
        if CUDA in providers and ("CUDA" in line or "cuda" in line or "cudnn" in line.lower()):
            raise ProviderError(f"the CUDA execution provider failed to start: {line}") from None
        raise with_detail(
            InputFileError(f"onnxruntime cannot load the model: {line}"), exc
        ) from None


def create_session(
    model: str | os.PathLike[str] | bytes,
    provider: str | Sequence[str] = "auto",
    threads: int | None = None,
    graph_optimization_level: str = "all",
    use_tf32: bool = True,
    device_id: int = 0,
) -> SessionInfo:
    """Create an onnxruntime session and check that it runs where it was asked to.

    Args:
        model: path of an ONNX file, or its serialized bytes.
        provider: `auto`, `cpu`, `cuda`, or a list of provider names (see `resolve_providers`).
        threads: intra-op threads (None: onnxruntime's default, one per core).
        graph_optimization_level: `disable`, `basic`, `extended` or `all`.
        use_tf32: allow TF32 matmuls on CUDA; pass False when verifying numerics.
        device_id: the CUDA device to use.

    Raises:
        ProviderError: CUDA was asked for strictly (not `auto`) and the session does not use it.
    """
    requested = resolve_providers(provider)
    so = session_options(threads, graph_optimization_level)
    options = [
        {"device_id": str(int(device_id)), "use_tf32": "1" if use_tf32 else "0"}
        if p == CUDA
        else {}
        for p in requested
    ]
    if isinstance(model, (bytes, bytearray)):
        source: str | bytes = bytes(model)
    else:
        path = Path(model)
        _check_model_file(path)
        source = str(path)
        crash.note(source)
    notes: list[str] = []
    strict = not _is_auto(provider)
    try:
        session = _new_session(source, so, requested, options)
    except ProviderError as exc:
        if strict or CUDA not in requested:
            raise
        # auto: CUDA was only a preference; run on the CPU and say so.
        notes.append(f"{exc}; using the CPU")
        warnings.warn(notes[-1], ProviderWarning, stacklevel=2)
        requested = [CPU]
        options = [{}]
        session = _new_session(source, so, requested, options)
    used = list(session.get_providers())
    missing = [p for p in requested if p not in used]
    if missing and missing != [CPU]:
        text = (
            f"asked for {', '.join(short_name(p) for p in requested)} but onnxruntime uses "
            f"{', '.join(short_name(p) for p in used)}"
        )
        if CUDA in missing:
            text += f" ({cuda_missing_message()})"
        if strict:
            raise ProviderError(text)
        notes.append(text)
        warnings.warn(text, ProviderWarning, stacklevel=2)
    cuda_used = CUDA in used
    return SessionInfo(
        session=session,
        requested=requested,
        providers=used,
        tf32=bool(use_tf32) if cuda_used else None,
        device_id=int(device_id) if cuda_used else None,
        warnings=notes,
    )


def _nonfinite_message(X: np.ndarray, row_offset: int = 0) -> str:
    bad = ~np.isfinite(X)
    count = int(bad.sum())
    pos = [int(i) for i in np.argwhere(bad)[0]]
    pos[0] += row_offset
    where = f"row {pos[0]}, column {pos[1]}" if len(pos) == 2 else f"index {pos}"
    return (
        f"input has {count} non-finite value{'s' if count != 1 else ''} (NaN or Inf), the first "
        f"at {where}; clean the data"
    )


# Below this many elements a Python-float sum is the cheapest finiteness test (no ufunc call).
_SMALL = 1024


_BLAS_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_INFINITIES = {math.inf, -math.inf}


def _all_finite(X: np.ndarray) -> bool:
    # A sum of floats is finite iff every term is, unless it overflows: impossible for
    # float32/float16 terms held as Python floats; a float64 overflow gets the exact test.
    if X.size <= _SMALL:
        if math.isfinite(sum(X.ravel().tolist())):
            return True
    elif X.dtype in _BLAS_FLOATS and X.flags.c_contiguous:
        # Likewise the sum of squares: NaN and Inf propagate through it, and only an overflow
        # (then the exact test) makes it non-finite otherwise. One BLAS pass, no temporary
        # array: about 0.6x the time of isfinite().all() on large chunks.
        flat = X.reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is not the user's
            total = float(np.dot(flat, flat))
        if math.isfinite(total):
            return True
    return bool(np.isfinite(X).all())


def check_input(
    X: Any,
    n_features: int | None,
    dtype: np.dtype = _FLOAT32,
    allow_nonfinite: bool = False,
    row_offset: int = 0,
) -> np.ndarray:
    """Return `X` as a C-contiguous 2-D array of `dtype`, or raise a one-line `InputDataError`.

    An array that already has the right dtype and layout is returned as is, not copied.
    `row_offset` is added to row numbers in messages (for chunks of a larger input).
    """
    if not isinstance(X, np.ndarray):
        try:
            X = np.asarray(X)
        except Exception as exc:
            raise InputDataError(
                f"input cannot be read as an array: {_ort_error_line(exc)}"
            ) from None
    if X.ndim != 2:
        hint = "; for one example use X.reshape(1, -1)" if X.ndim == 1 else ""
        raise InputDataError(
            f"input must be 2-D [rows, features], got {X.ndim}-D shape {tuple(X.shape)}{hint}"
        )
    if n_features is not None and X.shape[1] != n_features:
        raise InputDataError(
            f"input has {X.shape[1]} features (columns), the model expects {n_features}"
        )
    if X.dtype != dtype:
        kind = X.dtype.kind
        if kind in "biuf":
            with np.errstate(over="ignore"):  # an overflow becomes Inf, reported just below
                X = X.astype(dtype)
        elif kind in "USO":  # text or objects: numbers written as strings convert
            try:
                X = X.astype(dtype)
            except (TypeError, ValueError) as exc:
                raise InputDataError(
                    f"input of dtype {X.dtype} cannot be converted to {dtype}: "
                    f"{_ort_error_line(exc)}"
                ) from None
        else:
            raise InputDataError(f"input of dtype {X.dtype} cannot be converted to {dtype}")
    if not X.flags.c_contiguous:
        X = np.ascontiguousarray(X)
    if not allow_nonfinite and X.size and not _all_finite(X):
        message = _nonfinite_message(X, row_offset)
        if X.ndim != 2:
            raise InputDataError(message)
        row, col = (int(i) for i in np.argwhere(~np.isfinite(X))[0])
        raise NonFiniteError(message, row + row_offset, col, float(X[row, col]))
    return X


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits, in the logits' dtype."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


@dataclass(frozen=True)
class InputSpec:
    """One input of a model as `Predictor` feeds it.

    Attributes:
        name: the input's name in the graph.
        type: onnxruntime's type string, e.g. `tensor(float)` or `tensor(string)`.
        dtype: the numpy dtype of its feed (object, holding `str`, for string inputs).
        shape: the declared shape; symbolic dimensions are strings or None.
    """

    name: str
    type: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    def describe(self) -> str:
        """`continuous (float32 [batch, 2])`, for messages."""
        kind = "string" if self.dtype == object else str(self.dtype)
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name} ({kind} [{dims}])"


def _is_arrow(X: Any) -> bool:
    # Duck-typed so that runtime never imports pyarrow for callers who do not use it.
    return type(X).__module__.startswith("pyarrow") and hasattr(X, "schema")


def arrow_columns(table: Any, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The columns of a pyarrow Table or RecordBatch as numpy arrays, by name.

    Nulls become NaN in numeric columns and None in others; dictionary-encoded columns (pandas
    categoricals) are decoded to their values and decimals read as float64.

    Args:
        table: a `pyarrow.Table` or `pyarrow.RecordBatch`.
        names: the columns wanted (those absent from `table` are left out), or None for all.

    Raises:
        InputDataError: a wanted column of a nested type (list, struct, map), naming it.
    """
    import pyarrow as pa  # the caller holds a pyarrow object, so pyarrow is there

    have = table.schema.names
    out: dict[str, np.ndarray] = {}
    for name in have if names is None else names:
        if name not in have:
            continue
        col = table.column(name)
        t = col.type
        if pa.types.is_dictionary(t):
            col = col.cast(t.value_type)
            t = t.value_type
        if pa.types.is_decimal(t):
            col = col.cast(pa.float64())
        elif pa.types.is_nested(t):
            raise InputDataError(f"column {name!r} has type {t}; expected numbers or text")
        out[name] = col.to_numpy(zero_copy_only=False)
    return out


class Predictor:
    """A loaded model for apps: `predict(X)` with input checks, chunking and class labels.

    `X` is what the model takes:
    - a model with one 2-D float input: an array-like [rows, features] (the fast path), by
      position; one trained from a CSV or Parquet file also names its features (metadata
      `bn_onnx.columns`, columns of kind "number") and takes rows by name as below, extra
      columns ignored;
    - a tabular model (metadata `bn_onnx.columns`, see `bn_onnx.columns`): rows by column name,
      as a mapping column -> values, a list of row objects (`{"age": 31, "city": "Busan"}`) or
      a pyarrow Table / RecordBatch; an unseen category maps to "unknown" inside the model;
    - any model: a dict input name -> array (every input, one batch dimension first).

    Built once, then safe to call from several threads: onnxruntime's `run` is thread-safe and
    the predictor keeps no mutable state between calls.

    Example:
        >>> p = Predictor("model.folded.onnx", provider="auto")
        >>> p.predict_labels(X[:3])
        ['0', '7', '3']
        >>> t = Predictor("tabular.folded.onnx")
        >>> t.predict([{"age": 31, "city": "Busan", "income": None}])
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | bytes,
        provider: str | Sequence[str] = "auto",
        threads: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        *,
        allow_nonfinite: bool = False,
        graph_optimization_level: str = "all",
        use_tf32: bool = True,
        device_id: int = 0,
    ) -> None:
        if int(batch_size) < 1:
            raise UsageError(f"batch size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.allow_nonfinite = bool(allow_nonfinite)
        self.info = create_session(
            path,
            provider,
            threads=threads,
            graph_optimization_level=graph_optimization_level,
            use_tf32=use_tf32,
            device_id=device_id,
        )
        session = self.info.session
        specs = []
        for inp in session.get_inputs():
            dtype = _ORT_TYPES.get(inp.type)
            if dtype is None:
                raise UnsupportedModelError(
                    f"Predictor cannot feed input {inp.name!r} of type {inp.type}"
                )
            specs.append(InputSpec(inp.name, inp.type, dtype, tuple(inp.shape)))
        if not specs:
            raise UnsupportedModelError("Predictor needs a model with at least one input")
        self.inputs: list[InputSpec] = specs
        self.input_names: list[str] = [s.name for s in specs]
        self._specs = {s.name: s for s in specs}
        meta = session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, str] = dict(meta)
        self.columns: list[Column] | None = read_columns(meta)
        self._check_columns()
        self.na_values: tuple[str, ...] = read_na_values(meta)
        self._records = (
            RecordReader(self.columns, self.na_values) if self.columns is not None else None
        )
        first = specs[0]
        array_input = len(specs) == 1 and first.type in _ORT_FLOAT_TYPES and len(first.shape) == 2
        # A plain model whose schema only names its features (`feature_columns`): named rows
        # are read by name, arrays keep position.
        self.positional: bool = array_input and (
            self.columns is None
            or all(c.input == first.name and c.kind == NUMBER for c in self.columns)
        )
        # The fast path: one 2-D float input fed from an array, checked by `check_input`.
        self._plain = self.positional
        self.array_input: bool = self._plain
        self.input_name: str = first.name
        self.input_dtype: np.dtype = first.dtype
        self.n_features: int | None = (
            first.shape[1] if self._plain and isinstance(first.shape[1], int) else None
        )
        # A model exported with a fixed batch size runs in chunks of exactly that size, the
        # last one padded (zeros, "" for strings).
        batch = first.shape[0] if first.shape else None
        self.fixed_batch: int | None = batch if isinstance(batch, int) and batch > 0 else None
        if self.fixed_batch is not None:
            self.batch_size = self.fixed_batch
            row = math.prod(d for d in first.shape[1:] if isinstance(d, int) and d > 0)
            check_feed_bytes(
                f"input {first.name!r} (a fixed batch, padded)",
                (self.fixed_batch, row),
                first.dtype.itemsize,
                "export the model with a symbolic batch dim",
            )
        outputs = session.get_outputs()
        self.output_names: list[str] = [o.name for o in outputs]
        self._first_output = self.output_names[:1]
        self.class_names: list[str] | None = _json_list(meta.get("bn_onnx.class_names"))
        task = meta.get("bn_onnx.task")
        if task is None:
            task = "classification" if self.class_names else None
        self.task: str | None = task
        self._run: Callable[..., list[np.ndarray]] = session.run
        # The binding under `InferenceSession.run`: the wrapper's per-call input-name checks
        # cost about 10 us, a fifth of a small model's whole run. On any error we call the
        # public `run` again, which gives onnxruntime's own message and fallback.
        self._fast: Callable[..., list[np.ndarray]] | None = getattr(
            getattr(session, "_sess", None), "run", None
        )

    def _check_columns(self) -> None:
        """Check the column schema against the graph's inputs; index continuous columns."""
        # Inputs whose NaN means "missing" (the model fills them), and the column at each place.
        self._nan_inputs: set[str] = set()
        self._column_at: dict[tuple[str, int], str] = {}
        if self.columns is None:
            return
        from bn_onnx.columns import COLUMNS_KEY

        widths: dict[str, int] = {}
        for c in self.columns:
            spec = self._specs.get(c.input)
            if spec is None or len(spec.shape) != 2:
                raise UnsupportedModelError(
                    f"model metadata {COLUMNS_KEY}: column {c.name!r} is in input {c.input!r}, "
                    f"which is not a 2-D input of the model "
                    f"({', '.join(s.describe() for s in self.inputs)})"
                )
            widths[c.input] = max(widths.get(c.input, 0), c.index + 1)
            self._column_at[(c.input, c.index)] = c.name
            if c.kind in NAN_KINDS:  # the model fills it
                self._nan_inputs.add(c.input)
        for spec in self.inputs:
            width = spec.shape[1] if len(spec.shape) == 2 else None
            if spec.name not in widths or (isinstance(width, int) and width != widths[spec.name]):
                raise UnsupportedModelError(
                    f"model metadata {COLUMNS_KEY} does not cover input {spec.describe()}"
                )

    @property
    def providers(self) -> list[str]:
        """Providers the session actually uses, most preferred first."""
        return list(self.info.providers)

    @property
    def session(self) -> ort.InferenceSession:
        """The underlying onnxruntime session."""
        return self.info.session

    def check(self, X: Any) -> np.ndarray | dict[str, np.ndarray]:
        """Validate and convert `X` the way `predict` does; return what the model gets.

        For a model with one 2-D float input given an array, the array; otherwise the feeds
        dict (input name -> array) that `feeds` returns.
        """
        if self._plain and (type(X) is np.ndarray or not _named(X)):
            return check_input(X, self.n_features, self.input_dtype, self.allow_nonfinite)
        return self.feeds(X)

    def predict(self, X: Any, *, row_offset: int = 0) -> np.ndarray:
        """The model's first output (logits or prediction) for the rows of `X`.

        `X`: an array [rows, features] for a model with one 2-D float input; rows by column
        name for a tabular model; a dict input name -> array for any model (see the class).
        Rows are run in chunks of `batch_size`; an array X is not copied when it is already a
        C-contiguous array of the model's dtype. `row_offset` is added to row numbers in error
        messages, for an `X` that is a chunk of a larger input.

        Raises:
            InputDataError: one line naming what is wrong (the column, the input, the row).
        """
        if self._plain and (type(X) is np.ndarray or not _named(X)):
            X = check_input(X, self.n_features, self.input_dtype, self.allow_nonfinite, row_offset)
            n = X.shape[0]
            if n <= self.batch_size and n:
                return self._run_one(X)
            return self._predict_chunked(X)
        return self.run_feeds(self.feeds(X, row_offset=row_offset))

    def feeds(self, X: Any, *, row_offset: int = 0) -> dict[str, np.ndarray]:
        """The checked input arrays (input name -> array) that `predict` runs for `X`.

        Named columns (a mapping column -> values, a list of row objects, a pyarrow Table or
        RecordBatch) go through `bn_onnx.columns.feeds_from_columns`; a mapping whose keys are
        the model's input names is taken as the feeds themselves; an array is the feed of a
        single-input model.

        Raises:
            InputDataError: a missing or wrongly typed column or input, rows that disagree,
                a non-finite value where the model does not take one.
        """
        columns = self.columns
        if isinstance(X, Mapping):
            if columns is None or (
                all(n in X for n in self.input_names) and not all(c.name in X for c in columns)
            ):
                return self._check_feeds(X, row_offset)
            data = X
        elif _is_arrow(X):
            if columns is None:
                if not (len(self.inputs) == 1 and len(self.inputs[0].shape) == 2):
                    raise InputDataError(self.describe_inputs())
                # No schema: the table's columns, in order, are the features.
                arrays = arrow_columns(X)
                table = np.column_stack(list(arrays.values())) if arrays else np.empty((0, 0))
                return self._check_feeds({self.input_name: table}, row_offset)
            data = arrow_columns(X, [c.name for c in columns])
        elif isinstance(X, (list, tuple)) and X and isinstance(X[0], Mapping):
            if columns is None:
                raise InputDataError(
                    "rows as objects by column name need a model with a column schema "
                    f"(metadata bn_onnx.columns); {self.describe_inputs()}"
                )
            return self._named_feeds(self._records.feeds(X, row_offset=row_offset), row_offset)
        elif len(self.inputs) == 1:
            return self._check_feeds({self.input_name: X}, row_offset)
        else:
            raise InputDataError(self.describe_inputs())
        return self._named_feeds(
            feeds_from_columns(columns, data, row_offset=row_offset, na_values=self.na_values),
            row_offset,
        )

    def _named_feeds(self, feeds: dict[str, np.ndarray], row_offset: int) -> dict[str, np.ndarray]:
        """Feeds built from named columns, checked as the model needs them."""
        if self._plain:  # a plain model's features by name: checked as an array would be
            return self._check_feeds(feeds, row_offset)
        return self._refuse_infinity(feeds, row_offset)

    def describe_inputs(self) -> str:
        """One line saying what `predict` takes for this model (for messages)."""
        if self.columns is not None:
            names = ", ".join(c.name for c in self.columns)
            arrays = f", or an array [rows, {len(self.columns)}]" if self._plain else ""
            return (
                f"this model takes named columns ({names}): a mapping column -> values, a list "
                f"of row objects or a pyarrow Table{arrays}"
            )
        inputs = ", ".join(s.describe() for s in self.inputs)
        return f"this model takes a dict input name -> array for its inputs: {inputs}"

    def _check_feeds(self, feeds: Mapping[str, Any], row_offset: int) -> dict[str, np.ndarray]:
        unknown = [k for k in feeds if k not in self._specs]
        missing = [n for n in self.input_names if n not in feeds]
        if unknown or missing:
            what = "unknown input" if unknown else "missing input"
            names = unknown or missing
            raise InputDataError(
                f"{what}{'s' if len(names) > 1 else ''} {', '.join(repr(n) for n in names)} "
                f"(the model's inputs: {', '.join(s.describe() for s in self.inputs)})"
            )
        out: dict[str, np.ndarray] = {}
        rows = first = None
        for spec in self.inputs:
            arr = self._check_feed(spec, feeds[spec.name], row_offset)
            if rows is None:
                rows, first = arr.shape[0], spec.name
            elif arr.shape[0] != rows:
                raise InputDataError(
                    f"input {spec.name!r} has {arr.shape[0]} rows, input {first!r} has {rows}"
                )
            out[spec.name] = arr
        return out

    def _check_feed(self, spec: InputSpec, value: Any, row_offset: int) -> np.ndarray:
        name = spec.name
        if spec.dtype == object:
            arr = value if isinstance(value, np.ndarray) else np.asarray(value, dtype=object)
            if arr.dtype.kind in "US":
                arr = arr.astype(str).astype(object)
            elif arr.dtype != object or not all(type(v) is str for v in arr.flat):
                raise InputDataError(f"input {name!r} must hold text (str); it holds {arr.dtype}")
        else:
            if spec.dtype.kind == "f" and len(spec.shape) == 2 and name not in self._nan_inputs:
                width = spec.shape[1] if isinstance(spec.shape[1], int) else None
                return _named_input(
                    name,
                    lambda: check_input(value, width, spec.dtype, self.allow_nonfinite, row_offset),
                )
            arr = _named_input(name, lambda: _as_dtype(value, spec.dtype))
        if arr.ndim != len(spec.shape):
            raise InputDataError(
                f"input {name!r} must be {len(spec.shape)}-D {list(spec.shape)}, got "
                f"{arr.ndim}-D shape {tuple(arr.shape)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, arr.shape, strict=True)):
            if axis and isinstance(want, int) and want != got:
                raise InputDataError(
                    f"input {name!r} has {got} values along axis {axis}, the model expects {want}"
                )
        if name in self._nan_inputs:
            self._refuse_infinity({name: arr}, row_offset)
        elif (
            not self.allow_nonfinite and arr.dtype.kind == "f" and arr.size and not _all_finite(arr)
        ):
            raise InputDataError(f"input {name!r}: {_nonfinite_message(arr, row_offset)}")
        return np.ascontiguousarray(arr)

    def _refuse_infinity(
        self, feeds: dict[str, np.ndarray], row_offset: int
    ) -> dict[str, np.ndarray]:
        """`feeds`, after checking that the inputs where NaN means missing hold no infinity.

        The column schema's conversions (`bn_onnx.columns`) give well-formed arrays; only an
        infinite number (a CSV cell "inf", JSON 1e400, beyond float32) is left to refuse.
        """
        for name in self._nan_inputs:
            arr = feeds.get(name)
            if arr is None or not arr.size:
                continue
            if arr.size <= _SMALL:
                if _INFINITIES.isdisjoint(arr.ravel().tolist()):
                    continue
            elif not np.isinf(arr).any():
                continue
            row, col = (int(i) for i in np.argwhere(np.isinf(arr))[0])
            where = self._column_at.get((name, col), f"{name}[{col}]")
            raise CellError(
                where,
                row + row_offset,
                f"not a finite number: {float(arr[row, col])!r} (leave a missing value empty "
                "or null)",
            )
        return feeds

    def run_feeds(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """The first output for feeds already checked by `feeds` (they are not checked again).

        Rows are run in chunks of `batch_size`.
        """
        n = next(iter(feeds.values())).shape[0]
        if 0 < n <= self.batch_size:
            return self._run_one_feeds(feeds)
        out: np.ndarray | None = None
        for start in range(0, max(n, 1), self.batch_size):
            part = {k: v[start : start + self.batch_size] for k, v in feeds.items()}
            y = self._run_one_feeds(part)
            if out is None:
                out = np.empty((n, *y.shape[1:]), dtype=y.dtype)
            out[start : start + len(y)] = y
        assert out is not None
        return out

    def _run_one_feeds(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        fixed = self.fixed_batch
        n = next(iter(feeds.values())).shape[0]
        if fixed is not None and n != fixed:
            padded = {}
            for k, v in feeds.items():
                p = np.full((fixed, *v.shape[1:]), "" if v.dtype == object else 0, v.dtype)
                p[:n] = v
                padded[k] = p
            return self._call_feeds(padded)[:n]
        return self._call_feeds(feeds)

    def _call_feeds(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        if self._fast is not None:
            try:
                return self._fast(self._first_output, feeds, None)[0]
            except Exception:
                pass
        return self._run_public(dict(feeds))

    def _run_one(self, X: np.ndarray) -> np.ndarray:
        fixed = self.fixed_batch
        if fixed is not None and X.shape[0] != fixed:
            padded = np.zeros((fixed, *X.shape[1:]), dtype=X.dtype)
            padded[: X.shape[0]] = X
            return self._call(padded)[: X.shape[0]]
        return self._call(X)

    def _call(self, X: np.ndarray) -> np.ndarray:
        if self._fast is not None:
            try:
                return self._fast(self._first_output, {self.input_name: X}, None)[0]
            except Exception:
                pass
        return self._run_public({self.input_name: X})

    def _run_public(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """`InferenceSession.run`, its error one line (a model that passed every check can
        still fail on its input: a Gemm bias that does not broadcast)."""
        try:
            return self._run(self._first_output, feeds)[0]
        except Exception as exc:
            raise with_detail(
                InputDataError(f"onnxruntime failed to run the model: {_ort_error_line(exc)}"),
                exc,
            ) from None

    def _predict_chunked(self, X: np.ndarray) -> np.ndarray:
        out: np.ndarray | None = None
        for start in range(0, max(X.shape[0], 1), self.batch_size):
            y = self._run_one(X[start : start + self.batch_size])
            if out is None:
                out = np.empty((X.shape[0], *y.shape[1:]), dtype=y.dtype)
            out[start : start + len(y)] = y
        assert out is not None
        return out

    def predict_into(
        self,
        X: np.ndarray,
        out: np.ndarray | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Run `X` (for example a read-only memmap) chunk by chunk into `out`.

        Each chunk is checked and converted on its own, so an input larger than memory is never
        loaded whole. `progress(rows_done)` is called after every chunk. For models with one
        2-D float input; named columns stream with `predict(chunk, row_offset=...)` per chunk.
        """
        if not self._plain:
            raise UsageError(
                f"predict_into needs a model with one 2-D float input; {self.describe_inputs()}"
            )
        n = X.shape[0] if X.ndim >= 1 else 0
        if X.ndim != 2:
            check_input(X, self.n_features, self.input_dtype, self.allow_nonfinite)
        for start in range(0, n, self.batch_size):
            raw = X[start : start + self.batch_size]
            chunk = check_input(
                raw, self.n_features, self.input_dtype, self.allow_nonfinite, row_offset=start
            )
            y = self._run_one(chunk)
            if out is None:
                out = np.empty((n, *y.shape[1:]), dtype=y.dtype)
            out[start : start + len(y)] = y
            if progress is not None:
                progress(start + len(y))
        if out is None:
            out = self.predict(X)
        return out

    def output_shape(self) -> tuple[int | str | None, ...]:
        """The declared shape of the first output (batch dimension symbolic)."""
        return tuple(self.info.session.get_outputs()[0].shape)

    def _need_classifier(self, what: str) -> None:
        if self.task not in ("classification", None):
            raise UsageError(f"{what} needs a classifier; this model's task is {self.task}")

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities: the softmax of the logits (or the output, if already softmax)."""
        self._need_classifier("predict_proba")
        return self.proba_of(self.predict(X))

    def proba_of(self, y: np.ndarray) -> np.ndarray:
        """Class probabilities from the model's first output `y` (see `predict_proba`)."""
        if "prob" in self._first_output[0].lower():
            return y
        return softmax(y.astype(np.float32, copy=False))

    def predict_labels(self, X: Any) -> list[str] | np.ndarray:
        """The predicted class per row: its name from the model's metadata, else its index."""
        self._need_classifier("predict_labels")
        return self.labels_of(self.predict(X))

    def labels_of(self, y: np.ndarray) -> list[str] | np.ndarray:
        """The class per row of the model's first output `y` (see `predict_labels`)."""
        idx = np.argmax(y, axis=1)
        if self.class_names:
            names = self.class_names
            return [str(names[i]) for i in idx]
        return idx


def _named(X: Any) -> bool:
    """True for inputs by name (a mapping, rows as objects, a pyarrow table): not arrays."""
    return (
        isinstance(X, Mapping)
        or _is_arrow(X)
        or (isinstance(X, (list, tuple)) and bool(X) and isinstance(X[0], Mapping))
    )


def _named_input(name: str, convert: Callable[[], np.ndarray]) -> np.ndarray:
    """Run `convert`; prefix its `InputDataError` with the input's name."""
    try:
        return convert()
    except InputDataError as exc:
        text = str(exc)
        if text.startswith("input "):  # "input has 4 features" -> "input 'a' has 4 features"
            raise InputDataError(f"input {name!r} {text[len('input ') :]}") from None
        raise InputDataError(f"input {name!r}: {text}") from None


def _as_dtype(value: Any, dtype: np.dtype) -> np.ndarray:
    try:
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    except Exception as exc:
        raise InputDataError(f"cannot be read as an array: {_ort_error_line(exc)}") from None
    if arr.dtype == dtype:
        return arr
    if arr.dtype.kind in "fc" and dtype.kind in "iub":
        with np.errstate(invalid="ignore"):
            integral = np.isfinite(arr) & (arr == np.trunc(arr))
        if not integral.all():
            pos = tuple(int(i) for i in np.argwhere(~integral)[0])
            raise InputDataError(f"{arr[pos]!r} at {list(pos)} is not an integer ({dtype})")
    if arr.dtype.kind in "biufUSO":
        try:
            return arr.astype(dtype)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InputDataError(
                f"dtype {arr.dtype} cannot be converted to {dtype}: {_ort_error_line(exc)}"
            ) from None
    raise InputDataError(f"dtype {arr.dtype} cannot be converted to {dtype}")


def _json_list(text: str | None) -> list[str] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, list) and value:
        return [str(v) for v in value]
    return None
