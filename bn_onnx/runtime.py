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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bn_onnx.errors import (
    BnOnnxError,
    InputDataError,
    InputFileError,
    ProviderError,
    UnsupportedModelError,
    UsageError,
)

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
    # We report provider fallbacks ourselves; onnxruntime's own warnings go to stderr unasked.
    so.log_severity_level = 3
    return so


def _ort_error_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


def _check_model_file(path: Path) -> None:
    # onnx_io gives one-line errors for non-ONNX files and checks that external data stays in
    # the model's folder before onnxruntime reads any of it.
    from onnx import external_data_helper

    from bn_onnx.onnx_io import check_external_data, load_model

    model = load_model(path, load_external_data=False)
    if any(
        external_data_helper.uses_external_data(t)
        for t in external_data_helper._get_all_tensors(model)
    ):
        check_external_data(model, path.parent)


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
        raise InputFileError(f"onnxruntime cannot load the model: {line}") from None


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
    row, col = (int(i) for i in np.argwhere(bad)[0])
    row += row_offset
    return (
        f"input has {count} non-finite value{'s' if count != 1 else ''} (NaN or Inf), the first "
        f"at row {row}, column {col}; clean the data or pass allow_nonfinite=True"
    )


# Below this many elements a Python-float sum is the cheapest finiteness test (no ufunc call).
_SMALL = 1024


_BLAS_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


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
        raise InputDataError(_nonfinite_message(X, row_offset))
    return X


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits, in the logits' dtype."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


class Predictor:
    """A loaded model for apps: `predict(X)` with input checks, chunking and class labels.

    Built once, then safe to call from several threads: onnxruntime's `run` is thread-safe and
    the predictor keeps no mutable state between calls.

    Example:
        >>> p = Predictor("model.folded.onnx", provider="auto")
        >>> p.predict_labels(X[:3])
        ['0', '7', '3']
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
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise UnsupportedModelError(
                f"Predictor needs a model with one input, this one has {len(inputs)}: "
                f"{', '.join(i.name for i in inputs)}"
            )
        inp = inputs[0]
        if inp.type not in _ORT_FLOAT_TYPES or len(inp.shape) != 2:
            raise UnsupportedModelError(
                f"Predictor needs a 2-D float input [batch, features]; input {inp.name!r} is "
                f"{inp.type} with shape {inp.shape}"
            )
        self.input_name: str = inp.name
        self.input_dtype: np.dtype = _ORT_FLOAT_TYPES[inp.type]
        self.n_features: int | None = inp.shape[1] if isinstance(inp.shape[1], int) else None
        # A model exported with a fixed batch size runs in chunks of exactly that size, the
        # last one padded with zero rows.
        first = inp.shape[0]
        self.fixed_batch: int | None = first if isinstance(first, int) and first > 0 else None
        if self.fixed_batch is not None:
            self.batch_size = self.fixed_batch
        outputs = session.get_outputs()
        self.output_names: list[str] = [o.name for o in outputs]
        self._first_output = self.output_names[:1]
        meta = session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, str] = dict(meta)
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

    @property
    def providers(self) -> list[str]:
        """Providers the session actually uses, most preferred first."""
        return list(self.info.providers)

    @property
    def session(self) -> ort.InferenceSession:
        """The underlying onnxruntime session."""
        return self.info.session

    def check(self, X: Any) -> np.ndarray:
        """Validate and convert `X` the way `predict` does; return the array the model gets."""
        return check_input(X, self.n_features, self.input_dtype, self.allow_nonfinite)

    def predict(self, X: Any, *, row_offset: int = 0) -> np.ndarray:
        """The model's first output (logits or prediction) for the rows of `X`.

        Rows are run in chunks of `batch_size`; X is not copied when it is already a
        C-contiguous array of the model's dtype. `row_offset` is added to row numbers in error
        messages, for an `X` that is a chunk of a larger input.
        """
        X = check_input(X, self.n_features, self.input_dtype, self.allow_nonfinite, row_offset)
        n = X.shape[0]
        if n <= self.batch_size and n:
            return self._run_one(X)
        return self._predict_chunked(X)

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
        return self._run(self._first_output, {self.input_name: X})[0]

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
        loaded whole. `progress(rows_done)` is called after every chunk.
        """
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
        y = self.predict(X)
        if "prob" in self._first_output[0].lower():
            return y
        return softmax(y.astype(np.float32, copy=False))

    def predict_labels(self, X: Any) -> list[str] | np.ndarray:
        """The predicted class per row: its name from the model's metadata, else its index."""
        self._need_classifier("predict_labels")
        idx = np.argmax(self.predict(X), axis=1)
        if self.class_names:
            names = self.class_names
            return [str(names[i]) for i in idx]
        return idx


def _json_list(text: str | None) -> list[str] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, list) and value:
        return [str(v) for v in value]
    return None
