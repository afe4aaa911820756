"""Checkpoint directories: `config.json`, `model.safetensors`, `metrics.json`.

Reading (`read_checkpoint`) is numpy-only and never unpickles: JSON and safetensors, every
tensor checked by name, shape and dtype against the config. torch is imported only by
`save_checkpoint` and `load_model`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bn_onnx import __version__
from bn_onnx.errors import BnOnnxError, CheckpointError, OutputFileError, one_line
from bn_onnx.files import DIR_MODE, make_temp_dir
from bn_onnx.model_config import MLPConfig, expected_tensor_dtype, expected_tensor_shapes

if TYPE_CHECKING:
    from bn_onnx.model import MLP

FORMAT = "bn-onnx-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
# What a checkpoint is made of (other files in its folder are kept, never read).
CHECKPOINT_FILES = (CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE)
# A config.json or metrics.json larger than this is not one we wrote.
MAX_JSON_BYTES = 64 * 1024 * 1024


@dataclass
class Checkpoint:
    """A checkpoint read from disk.

    Attributes:
        path: The checkpoint directory.
        config: The model configuration.
        meta: The whole `config.json` (dataset, preprocessing, class names, training, versions).
        tensors: The state_dict as numpy arrays, keyed by the MLP's parameter names.
        metrics: `metrics.json` (history and final metrics), or None when the file is absent.
    """

    path: Path
    config: MLPConfig
    meta: dict[str, Any]
    tensors: dict[str, np.ndarray]
    metrics: dict[str, Any] | None = None

    @property
    def class_names(self) -> list[str] | None:
        """Class names for classifiers (index = output column), None for regression."""
        names = self.meta.get("class_names")
        return list(names) if names is not None else None

    @property
    def preprocessing(self) -> dict[str, Any]:
        """How raw inputs relate to the model (see `config.json["preprocessing"]`)."""
        return dict(self.meta.get("preprocessing") or {})


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"incomplete checkpoint: {what} missing: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"corrupt checkpoint: {what} is empty: {path}")
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"corrupt checkpoint: {what} is too large ({size} bytes): {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:  # json's C decoder recurses once per level of nesting
        raise CheckpointError(
            f"corrupt checkpoint: {what} is nested too deeply to be a checkpoint config: {path}"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = one_line(exc)
        raise CheckpointError(
            f"corrupt checkpoint: {what} is not valid JSON ({msg}): {path}"
        ) from None


def check_tensors(config: MLPConfig, tensors: dict[str, np.ndarray]) -> None:
    """Refuse tensors whose names, shapes or dtypes disagree with `config`, naming the tensor."""
    expected = expected_tensor_shapes(config)
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise CheckpointError(
            f"checkpoint tensor {missing[0]!r} is missing (config expects it"
            + (f"; {len(missing) - 1} more missing)" if len(missing) > 1 else ")")
        )
    extra = sorted(k for k in tensors if k not in expected)
    if extra:
        raise CheckpointError(f"checkpoint tensor {extra[0]!r} is not part of the configured model")
    for name, shape in expected.items():
        arr = tensors[name]
        if tuple(arr.shape) != shape:
            raise CheckpointError(
                f"checkpoint tensor {name!r} has shape {list(arr.shape)}, "
                f"config expects {list(shape)}"
            )
        want = expected_tensor_dtype(name)
        if arr.dtype != np.dtype(want):
            raise CheckpointError(
                f"checkpoint tensor {name!r} has dtype {arr.dtype}, expected {want}"
            )
        if want == "float32" and not np.isfinite(arr).all():
            raise CheckpointError(f"checkpoint tensor {name!r} holds non-finite values")
        if name.endswith("running_var") and (arr < 0).any():
            raise CheckpointError(f"checkpoint tensor {name!r} holds negative variances")


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and check a checkpoint directory with numpy only (no torch, no pickle).

    Raises:
        CheckpointError: the directory is missing, incomplete or corrupt, or its tensors
            disagree with its config.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"checkpoint not found: {root}")
    if not root.is_dir():
        raise CheckpointError(f"checkpoint must be a directory holding {CONFIG_FILE}: {root}")
    if not (root / CONFIG_FILE).is_file():
        inner = sorted(str(p.parent) for p in root.glob(f"*/{CONFIG_FILE}"))
        if inner:  # the folder of a shipped model, say, not its checkpoint folder
            some = inner[0] if len(inner) == 1 else f"{inner[0]} (or {', '.join(inner[1:])})"
            raise CheckpointError(
                f"no checkpoint in {root} ({CONFIG_FILE} missing); the checkpoint is its "
                f"subfolder {some}"
            )
    meta = _read_json(root / CONFIG_FILE, CONFIG_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"not a bn-onnx checkpoint ({CONFIG_FILE} lacks format {FORMAT!r}): {root}"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"unsupported checkpoint format_version {meta.get('format_version')!r} "
            f"(this bn-onnx reads {FORMAT_VERSION}): {root}"
        )
    spec = meta.get("dataset")
    # a relative dataset path is relative to where it was trained: find it
    recorded = spec.get("path") if isinstance(spec, dict) else None
    if isinstance(recorded, str) and recorded and not os.path.isabs(recorded):
        from bn_onnx.data import resolve_dataset_path

        spec["path"] = resolve_dataset_path(recorded, root)  # type: ignore[index]
    try:
        config = MLPConfig.from_dict(meta.get("model"))
    except BnOnnxError as exc:
        raise CheckpointError(f"corrupt checkpoint {CONFIG_FILE}: {exc}") from None
    except TypeError as exc:
        raise CheckpointError(f"corrupt checkpoint {CONFIG_FILE}: model config: {exc}") from None

    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"incomplete checkpoint: {WEIGHTS_FILE} missing: {weights}")
    if weights.stat().st_size == 0:
        raise CheckpointError(f"corrupt checkpoint: {WEIGHTS_FILE} is empty: {weights}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        msg = one_line(exc)
        raise CheckpointError(
            f"corrupt checkpoint: cannot read {WEIGHTS_FILE} ({msg}): {weights}"
        ) from None
    check_tensors(config, tensors)

    metrics = None
    if (root / METRICS_FILE).exists():
        metrics = _read_json(root / METRICS_FILE, METRICS_FILE)
        if not isinstance(metrics, dict):
            raise CheckpointError(f"corrupt checkpoint: {METRICS_FILE} is not a JSON object")
    return Checkpoint(path=root, config=config, meta=meta, tensors=tensors, metrics=metrics)


def library_versions() -> dict[str, str]:
    """Versions recorded in `config.json["versions"]` (installed distributions, not imports)."""
    from importlib import metadata

    versions = {"bn_onnx": __version__, "python": platform.python_version()}
    for dist in ("numpy", "torch", "scikit-learn", "safetensors"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n").encode("utf-8")


def write_checkpoint_files(
    out_dir: str | os.PathLike[str],
    config: MLPConfig,
    tensors: dict[str, np.ndarray],
    meta: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint from numpy tensors, atomically; return the directory.

    A new directory is filled under a temporary name and renamed into place. An existing one
    gets its `config.json` removed first, then each file is replaced and `config.json` written
    last, so a reader sees either a complete checkpoint or a refused, incomplete one; other
    files in it (an exported model, say) are kept.
    """
    from safetensors.numpy import save

    check_tensors(config, tensors)
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"checkpoint output is a file, not a directory: {root}")
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict()}
    for key, value in (meta or {}).items():
        if key not in body:
            body[key] = value
    body.setdefault("versions", library_versions())
    ordered = {name: np.array(tensors[name], order="C") for name in expected_tensor_shapes(config)}
    payload = {
        WEIGHTS_FILE: save(ordered, metadata={"format": FORMAT}),
        METRICS_FILE: _json_bytes(metrics or {}),
        CONFIG_FILE: _json_bytes(body),
    }
    tmp: Path | None = None
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(root)  # a name a later run removes if this one is killed
        os.chmod(tmp, DIR_MODE)  # mkdir's 0700 would make the renamed checkpoint owner-only
        for name, data in payload.items():
            (tmp / name).write_bytes(data)
        if not root.exists():
            try:
                os.rename(tmp, root)
                return root
            except OSError:
                if not root.is_dir():
                    raise
        with contextlib.suppress(FileNotFoundError):
            (root / CONFIG_FILE).unlink()
        for name in (WEIGHTS_FILE, METRICS_FILE, CONFIG_FILE):
            os.replace(tmp / name, root / name)
        return root
    except OSError as exc:  # read-only folder, no space, EIO
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise OutputFileError(f"cannot write checkpoint {root}: {reason}") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def state_dict_to_numpy(model: MLP) -> dict[str, np.ndarray]:
    """The model's state_dict as numpy copies, with the plain MLP names (no `module.` prefix)."""
    out: dict[str, np.ndarray] = {}
    for name, value in model.state_dict().items():
        if name.startswith("module."):
            name = name[len("module.") :]
        out[name] = value.detach().cpu().numpy().copy()
    return out


def save_checkpoint(
    model: MLP,
    out_dir: str | os.PathLike[str],
    meta: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Save a trained `MLP` with its metadata and metrics as a checkpoint directory (atomic).

    Args:
        model: The model; its `config` goes to `config.json["model"]`.
        out_dir: The checkpoint directory (created with its parents if needed).
        meta: Extra top-level `config.json` entries: dataset, preprocessing, class_names,
            training, versions.
        metrics: Contents of `metrics.json`.
    """
    return write_checkpoint_files(out_dir, model.config, state_dict_to_numpy(model), meta, metrics)


def load_model(path: str | os.PathLike[str]) -> tuple[MLP, Checkpoint]:
    """Load a checkpoint into an `MLP` (a `TabularMLP` for tabular columns) in eval mode; also
    return the `Checkpoint` read."""
    import torch

    from bn_onnx.model import build_network

    ckpt = read_checkpoint(path)
    model = build_network(ckpt.config)
    state = {name: torch.from_numpy(np.array(arr)) for name, arr in ckpt.tensors.items()}
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, ckpt
