"""What a checkpoint's bits depend on: `config.json["reproducibility"]`, and retraining under it.

The same seed gives the same bits only under the same torch build, ATen CPU capability,
intra-op thread count and oneMKL branch on CPU (docs/training.md). Each checkpoint records
these; `tools/make_models.py`'s `reproduction_env` turns a record into the environment that
reruns those kernels here, or says why this machine cannot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from models_testing import make_models_module

from bn_onnx.checkpoint import load_model, read_checkpoint
from bn_onnx.train import TrainSettings, cpu_flags, cpu_model_name, train

pytestmark = pytest.mark.cpu_sensitive

TINY = {"dataset": "iris", "hidden": (16, 8), "epochs": 8, "patience": 0, "threads": 1}
CLI_TINY = ["--dataset", "iris", "--hidden", "16,8", "--epochs", "8", "--patience", "0"]


def _record(**changes: object) -> dict:
    """A record of this process's own kernels, with `changes` applied."""
    record = {
        "torch": torch.__version__,
        "device": "cpu",
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "intra_op_threads": 1,
        "mkl": {},
        "cpu": cpu_model_name(),
        "cpu_flags": cpu_flags(),
    }
    record.update(changes)
    return record


@pytest.mark.parametrize("threads", [1, 2])
def test_checkpoint_records_torch_capability_threads_and_mkl(tmp_path, threads):
    # oneMKL reads its variables once, at its first call: setting one here would change the
    # kernels of every later test in this process, so the MKL field is checked as it stands.
    train(TrainSettings(**{**TINY, "epochs": 1, "threads": threads}), tmp_path / "c")
    record = json.loads((tmp_path / "c" / "config.json").read_text())["reproducibility"]
    mkl = {k: os.environ[k] for k in ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS") if os.environ.get(k)}
    assert record == {
        "torch": torch.__version__,
        "device": "cpu",
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "intra_op_threads": threads,
        "mkl": mkl,
        "cpu": cpu_model_name(),
        "cpu_flags": cpu_flags(),
    }
    assert record["aten_cpu_capability"] in {"DEFAULT", "AVX2", "AVX512"}
    assert record["cpu"]


def test_checkpoint_without_the_record_still_reads_and_loads(tmp_path, make_checkpoint):
    src = make_checkpoint()
    dst = tmp_path / "old"
    dst.mkdir()
    for name in ("model.safetensors", "metrics.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    meta = json.loads((src / "config.json").read_text())
    assert meta.pop("reproducibility")
    (dst / "config.json").write_text(json.dumps(meta))
    ckpt = read_checkpoint(dst)
    assert "reproducibility" not in ckpt.meta
    model, _ = load_model(dst)
    assert not model.training
    for name, value in read_checkpoint(src).tensors.items():
        np.testing.assert_array_equal(ckpt.tensors[name], value)


def test_reproduction_env_for_this_cpu_names_the_recorded_kernels():
    make_models = make_models_module()
    capability = torch.backends.cpu.get_cpu_capability()
    env, reason = make_models.reproduction_env(_record())
    assert reason is None
    assert env == {
        "ATEN_CPU_CAPABILITY": capability.lower(),
        "MKL_CBWR": None,  # unset: oneMKL picks by CPU, as it did
        "MKL_ENABLE_INSTRUCTIONS": None,
    }
    env, reason = make_models.reproduction_env(
        _record(aten_cpu_capability="DEFAULT", mkl={"MKL_CBWR": "COMPATIBLE"})
    )
    assert reason is None
    assert env["ATEN_CPU_CAPABILITY"] == "default" and env["MKL_CBWR"] == "COMPATIBLE"


def test_reproduction_env_needs_this_very_cpu_even_under_mkl_compatible():
    """oneMKL's COMPATIBLE branch gave other bits on an AMD EPYC than on the Intel Xeon that
    made the shipped checkpoints, so no MKL setting stands in for the same CPU."""
    make_models = make_models_module()
    portable = {"aten_cpu_capability": "DEFAULT", "mkl": {"MKL_CBWR": "COMPATIBLE"}}
    env, reason = make_models.reproduction_env(_record(**portable, cpu="Other CPU"))
    assert env == {} and "made on a 'Other CPU' CPU" in reason
    flags = cpu_flags().split()
    env, reason = make_models.reproduction_env(
        _record(**portable, cpu_flags=" ".join(sorted([*flags[1:], "madeupflag"])))
    )
    assert env == {} and "flags differ" in reason and "madeupflag" in reason
    no_flags = _record(**portable)
    del no_flags["cpu_flags"]
    env, reason = make_models.reproduction_env(no_flags)
    assert env == {} and "records no CPU flags" in reason
    # the kernels alone can still be run here, for two retrains compared with each other
    env, reason = make_models.kernel_env(_record(**portable, cpu="Other CPU"))
    assert reason is None and env["MKL_CBWR"] == "COMPATIBLE"


@pytest.mark.parametrize(
    ("record", "words"),
    [
        (None, "records no kernels"),
        ({}, "records no kernels"),
        ({"torch": "0.0.1"}, "made with torch 0.0.1"),
        ({"device": "cuda"}, "trained on cuda"),
        ({"aten_cpu_capability": "SVE256"}, "SVE256 is not an x86-64 one"),
        ({"cpu": "Some Other CPU"}, "made on a 'Some Other CPU' CPU"),
        ({"cpu": "Some Other CPU", "mkl": {"MKL_CBWR": "AVX2"}}, "made on a"),
    ],
)
def test_reproduction_env_says_why_this_machine_cannot(record, words):
    make_models = make_models_module()
    full = None if record is None else (_record(**record) if record else {})
    env, reason = make_models.reproduction_env(full)
    assert env == {} and reason is not None and words in reason


def test_reproduction_env_refuses_a_capability_this_cpu_lacks(monkeypatch):
    make_models = make_models_module()
    # ATen obeys ATEN_CPU_CAPABILITY unchecked: running AVX-512 kernels here would crash.
    monkeypatch.setattr(make_models, "_cpu_flags", lambda: {"sse4_2", "avx2", "fma"})
    env, reason = make_models.reproduction_env(_record(aten_cpu_capability="AVX512"))
    assert env == {} and "lacks avx512bw, avx512dq, avx512f, avx512vl" in reason
    env, reason = make_models.reproduction_env(_record(aten_cpu_capability="AVX2"))
    assert reason is None and env["ATEN_CPU_CAPABILITY"] == "avx2"


def test_reproduction_env_refuses_another_architecture(monkeypatch):
    make_models = make_models_module()
    # ATen's DEFAULT kernels on aarch64 are other code than on x86-64, and there is no oneMKL
    monkeypatch.setattr(make_models, "_machine", lambda: "aarch64")
    env, reason = make_models.reproduction_env(
        _record(aten_cpu_capability="DEFAULT", mkl={"MKL_CBWR": "COMPATIBLE"})
    )
    assert env == {} and reason == "the recorded kernels are x86-64 ones, this machine is aarch64"


def _other_capability(make_models, capability: str) -> str | None:
    """A capability this CPU runs other than `capability`, as ATEN_CPU_CAPABILITY spells it."""
    flags = make_models._cpu_flags()
    for other in ("AVX2", "DEFAULT", "AVX512"):
        if other != capability and make_models.CAPABILITY_FLAGS[other] <= flags:
            return other.lower()
    return None


@pytest.mark.slow
def test_retraining_under_the_record_reproduces_the_bits_even_from_other_kernels(tmp_path):
    """Train here, then rerun the CLI in a fresh process started under *other* kernels with
    the record's environment applied on top: the same `model.safetensors`, byte for byte.

    The fresh process starts from another ATen capability, which alone changes these bits
    (measured: default vs avx2 differ after 8 iris epochs), so a record that missed what the
    bits depend on, or an environment that failed to apply it, would fail here.
    """
    make_models = make_models_module()
    train(TrainSettings(**TINY), tmp_path / "a")
    record = read_checkpoint(tmp_path / "a").meta["reproducibility"]
    env_changes, reason = make_models.reproduction_env(record)
    assert reason is None
    env = dict(os.environ)
    other = _other_capability(make_models, record["aten_cpu_capability"])
    if other is not None:
        env["ATEN_CPU_CAPABILITY"] = other
    for name, value in env_changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    cmd = [sys.executable, "-m", "bn_onnx", "train", *CLI_TINY, "--threads", "1", "--quiet"]
    done = subprocess.run(
        [*cmd, "--out", str(tmp_path / "b")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    again = read_checkpoint(tmp_path / "b").meta["reproducibility"]
    assert again == record
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == a
