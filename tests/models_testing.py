"""Helpers for the tests of the shipped models (tests/test_models_shipped.py, digits, and
tests/test_models_tabular.py): regenerating their files with tools/make_models.py and
comparing them with the shipped ones in ways that hold on any x86-64 CPU, and comparing bits
only where they are promised: between two runs on this machine, or with the shipped checkpoint
on the machine it records."""

from __future__ import annotations

import importlib.util
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest

from bn_onnx.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
# The keys of metrics.json that record wall times, which differ from run to run.
TIMING_METRICS = {"train_seconds", "history"}


def make_models_module() -> ModuleType:
    """tools/make_models.py as a module (tools/ is not a package), loaded afresh."""
    spec = importlib.util.spec_from_file_location("make_models", ROOT / "tools" / "make_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def initializer_diffs(a_path: Path, b_path: Path) -> list[str]:
    """Names of the initializers that differ, with the largest difference (for messages)."""
    a, b = onnx.load(a_path), onnx.load(b_path)
    b_init = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    out = []
    for t in a.graph.initializer:
        value = onnx.numpy_helper.to_array(t)
        other = b_init.get(t.name)
        if other is None or other.shape != value.shape:
            out.append(f"{t.name}: missing or reshaped")
        elif value.dtype.kind != "f":
            if not np.array_equal(other, value):
                out.append(f"{t.name}: differs")
        elif not np.array_equal(other, value):
            out.append(f"{t.name}: max abs {np.max(np.abs(other - value)):.3g}")
    return out


def assert_same_onnx_bytes(shipped: Path, new: Path) -> None:
    """model.onnx and model.folded.onnx in `new` are the shipped files byte for byte."""
    for name in ("model.onnx", "model.folded.onnx"):
        assert (new / name).read_bytes() == (shipped / name).read_bytes(), (
            name,
            initializer_diffs(shipped / name, new / name) or "same initializers; graph differs",
        )


# A card's error figures are onnxruntime results: its kernels (picked by CPU) may move the last
# digits, so they are compared as numbers, not text.
_FIGURE = re.compile(r"\b\d\.\d+e-\d+\b")


def card_lines_and_figures(path: Path) -> tuple[list[str], list[float]]:
    """The card's lines without its versions line, with the error figures cut out; the figures."""
    text = path.read_text(encoding="utf-8")
    figures = [float(v) for v in _FIGURE.findall(text)]
    lines = _FIGURE.sub("<figure>", text).splitlines()
    return [line for line in lines if not line.startswith("Versions:")], figures


def retrain_twice_gives_the_same_bits(model: str, tmp: Path) -> None:
    """Run make_models' training step of `model` twice, each in a fresh process under the
    kernels and thread count its shipped checkpoint records, and assert the two checkpoints are
    the same bytes: the promise bit-identity makes (same machine, build, seed and settings).

    The two processes run at once; each must record this machine's own CPU, so a record that
    missed the CPU would show here. Skips, saying why, only where this machine cannot run the
    recorded kernels at all (`kernel_env`)."""
    from bn_onnx.train import cpu_flags, cpu_model_name

    make_models = make_models_module()
    record = read_checkpoint(MODELS / model / "checkpoint").meta.get("reproducibility")
    env, reason = make_models.kernel_env(record)
    if reason:
        pytest.skip(f"cannot run the shipped {model} checkpoint's kernels here: {reason}")
    dirs = [tmp / "a", tmp / "b"]
    with ThreadPoolExecutor(2) as pool:
        runs = [
            pool.submit(make_models.train_subprocess, model, d, env, record["intra_op_threads"])
            for d in dirs
        ]
        for run in runs:
            run.result()
    a, b = (read_checkpoint(d) for d in dirs)
    for ckpt in (a, b):
        assert ckpt.meta["reproducibility"]["cpu"] == cpu_model_name()
        assert ckpt.meta["reproducibility"]["cpu_flags"] == cpu_flags()
        for key in ("torch", "device", "aten_cpu_capability", "intra_op_threads", "mkl"):
            assert ckpt.meta["reproducibility"][key] == record[key], key
    for name, value in a.tensors.items():
        differ = int(np.sum(b.tensors[name] != value))
        assert differ == 0, f"{name}: {differ} / {value.size} elements differ between two runs"
    assert (dirs[0] / "model.safetensors").read_bytes() == (
        dirs[1] / "model.safetensors"
    ).read_bytes()
    assert {k: v for k, v in a.metrics.items() if k not in TIMING_METRICS} == {
        k: v for k, v in b.metrics.items() if k not in TIMING_METRICS
    }


def retrain_under_the_recorded_kernels(model: str, out: Path) -> None:
    """Rerun make_models' training step of `model` under the kernels its shipped checkpoint
    records and assert the same checkpoint, bit for bit; skip, saying why, unless this machine
    is the one the checkpoint records (CPU model and flags, torch build, kernels: see
    `reproduction_env`), since other CPUs give other bits under the same settings."""
    make_models = make_models_module()
    shipped_dir = MODELS / model / "checkpoint"
    shipped = read_checkpoint(shipped_dir)
    record = shipped.meta.get("reproducibility")
    env, reason = make_models.reproduction_env(record)
    if reason:
        pytest.skip(f"not the machine that made the shipped {model} checkpoint: {reason}")
    make_models.train_subprocess(model, out, env, record["intra_op_threads"])
    new = read_checkpoint(out)
    # the subprocess really ran the recorded kernels (a wrong env would fall back silently)
    for key in ("torch", "device", "aten_cpu_capability", "intra_op_threads", "mkl"):
        assert new.meta["reproducibility"][key] == record[key], key
    assert new.tensors.keys() == shipped.tensors.keys()
    for name, value in shipped.tensors.items():
        differ = int(np.sum(new.tensors[name] != value))
        assert differ == 0, f"{name}: {differ} / {value.size} elements differ"
    assert (out / "model.safetensors").read_bytes() == (
        shipped_dir / "model.safetensors"
    ).read_bytes()
    for key in ("model", "dataset", "preprocessing", "class_names", "training"):
        assert new.meta[key] == shipped.meta[key], key
    assert {k: v for k, v in new.metrics.items() if k not in TIMING_METRICS} == {
        k: v for k, v in shipped.metrics.items() if k not in TIMING_METRICS
    }
