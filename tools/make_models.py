"""Regenerate the shipped models under `models/` deterministically.

    python tools/make_models.py                    # train + export + samples + card, both models
    python tools/make_models.py --from-checkpoint  # keep each models/*/checkpoint, redo the rest
    python tools/make_models.py --model tabular    # one model only
    python tools/make_models.py --out /tmp/models  # anywhere else (tests use this)

`models/digits/`: a 64-128-64-10 MLP (input normalization, BN before each ReLU) trained on
scikit-learn's digits. `models/tabular/`: a model of raw table columns (categories, empty
cells) trained on the synthetic `people.csv` (`people_rows`) with `bn-onnx train`'s defaults.
Both train with seed 0 on one CPU thread, each in a fresh Python (`--train-only DIR --model
NAME`) under `PORTABLE_KERNELS` (ATen's baseline kernels, `ATEN_CPU_CAPABILITY=default`, and
oneMKL's `MKL_CBWR=COMPATIBLE` branch), which keep the bits the same across ATen capabilities
and oneMKL's instruction sets on one machine; the kernels, thread count and CPU it ran under are
printed and recorded in `config.json["reproducibility"]`. Bit-identical covers the same machine
and build (CPU model and flags, torch build, ATen CPU capability, intra-op thread count, oneMKL
branch), nothing wider: on another CPU, an AMD EPYC against the Intel Xeon that made the shipped
checkpoints, the same settings give other bits of about the same accuracy (docs/training.md).
`model.onnx` keeps its 3 BatchNormalization nodes, `model.folded.onnx` has none (export and
fold regenerate the same bytes from a checkpoint on any CPU). Digits also ships
`model.int8.onnx`, `bn-onnx quantize` of model.onnx calibrated on the checkpoint's training
split; its bytes depend on the CPU (onnxruntime's calibration arithmetic, the kernels chosen).
Digits ships `sample_input.npy`, the first 16 rows of the test split (raw features, float32
[16, 64]); tabular ships `sample_rows.csv`, the same as CSV cells; `sample_output.npy` holds
the folded model's logits for them (onnxruntime, CPU); `MODEL_CARD.md` describes all of it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DIGITS_SETTINGS: dict[str, Any] = {
    "dataset": "digits",
    "hidden": (128, 64),
    "bn": "pre",
    "input_norm": True,
    "activation": "relu",
    "optimizer": "adam",
    "lr": 1e-3,
    "epochs": 40,
    "batch_size": 64,
    "patience": 15,
    "seed": 0,
    "device": "cpu",
    "threads": 1,
}
N_SAMPLES = 16
# Kernels whose bits do not move with ATen's capability or oneMKL's instruction set on one
# machine: ATen's baseline (no AVX) kernels and oneMKL's COMPATIBLE branch. They do move with
# the CPU: an AMD EPYC gives other bits than the Intel Xeon that made the shipped checkpoints.
PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
# The environment variables that choose torch's CPU kernels (bn_onnx.train records the MKL ones).
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS")
# /proc/cpuinfo flags ATen checks before it picks each capability on its own
# (aten/src/ATen/native/DispatchStub.cpp); ATEN_CPU_CAPABILITY is obeyed unchecked, so a
# capability the CPU lacks would crash with an illegal instruction.
CAPABILITY_FLAGS = {
    "DEFAULT": set(),
    "AVX2": {"avx2", "fma"},
    "AVX512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"},
}


def describe_kernels(record: dict[str, Any]) -> str:
    """One line naming what a `config.json["reproducibility"]` record says the bits depend on.

    The CPU is always part of it: oneMKL's branches, COMPATIBLE included, differ by vendor.
    """
    mkl = record.get("mkl") or {}
    parts = [f"{k}={v}" for k, v in mkl.items()] or ["oneMKL as it picks"]
    mkl_text = ", ".join(parts)
    threads = record.get("intra_op_threads")
    return (
        f"torch {record.get('torch')} on {record.get('device')} ({record.get('cpu')}), ATen "
        f"CPU capability {record.get('aten_cpu_capability')}, {mkl_text}, {threads} intra-op "
        f"thread{'s' if threads != 1 else ''}"
    )


X86_64 = {"x86_64", "amd64"}


def _machine() -> str:
    import platform

    return platform.machine().lower()


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def kernel_env(record: dict[str, Any] | None) -> tuple[dict[str, str | None], str | None]:
    """The kernel environment a checkpoint's record names, if this machine can run it.

    Unlike `reproduction_env` this does not ask whether this is the machine that made the
    checkpoint: it is what two retrains here run under to be compared with each other.

    Args:
        record: The checkpoint's `config.json["reproducibility"]` (None for checkpoints written
            before bn-onnx recorded it).

    Returns:
        (env, None) with the values of `KERNEL_ENV` to run under (None: unset it), or
        ({}, reason): no record, another torch build, not a CPU run, not an x86-64 machine,
        or an ATen capability this CPU lacks (ATen obeys it unchecked and would crash).
    """
    import torch

    if not record:
        return {}, "the checkpoint records no kernels (written before config.json had them)"
    if record.get("torch") != torch.__version__:
        return {}, f"made with torch {record.get('torch')}, this is torch {torch.__version__}"
    if record.get("device") != "cpu":
        return {}, f"trained on {record.get('device')}, and only CPU runs are bit-reproducible"
    capability = str(record.get("aten_cpu_capability"))
    if capability not in CAPABILITY_FLAGS:
        return {}, f"ATen CPU capability {capability} is not an x86-64 one this test knows"
    # The capabilities above are x86-64 kernel sets (oneMKL is x86-only); the record does not
    # name the architecture, and another one's DEFAULT kernels are other code.
    machine = _machine()
    if machine not in X86_64:
        return {}, f"the recorded kernels are x86-64 ones, this machine is {machine}"
    missing = CAPABILITY_FLAGS[capability] - _cpu_flags()
    if missing:
        return {}, f"this CPU lacks {', '.join(sorted(missing))} for ATen's {capability} kernels"
    mkl = dict(record.get("mkl") or {})
    env = {"ATEN_CPU_CAPABILITY": capability.lower()}
    env.update({name: mkl.get(name) for name in KERNEL_ENV if name != "ATEN_CPU_CAPABILITY"})
    return env, None


def reproduction_env(record: dict[str, Any] | None) -> tuple[dict[str, str | None], str | None]:
    """The kernel environment that reproduces a checkpoint's bits here, or why none can.

    Bit-identity is promised on the same machine and build only: the same torch build, CPU
    (model name and feature flags), ATen CPU capability, intra-op thread count and oneMKL
    branch. oneMKL's `MKL_CBWR=COMPATIBLE` branch does not give an Intel CPU's bits on an AMD
    one (measured: every trained tensor of the shipped digits checkpoint differs), so the CPU
    must match whatever the MKL variables say.

    Args:
        record: The checkpoint's `config.json["reproducibility"]` (None for checkpoints written
            before bn-onnx recorded it).

    Returns:
        (env, None) as `kernel_env` gives it, or ({}, reason) when this machine cannot be
        shown to give the same bits: any of `kernel_env`'s reasons, another CPU model, other
        CPU flags, or no flags recorded.
    """
    from bn_onnx.train import cpu_flags, cpu_model_name

    env, reason = kernel_env(record)
    if reason:
        return {}, reason
    assert record is not None  # kernel_env refused a missing record
    here = cpu_model_name()
    if record.get("cpu") != here:
        return {}, f"made on a {record.get('cpu')!r} CPU, this CPU is {here!r}"
    if "cpu_flags" not in record:
        return {}, (
            f"the checkpoint records no CPU flags, so this {here!r} cannot be shown to be "
            "the same kind of CPU"
        )
    if record["cpu_flags"] != cpu_flags():
        diff = sorted(set(str(record["cpu_flags"]).split()) ^ set(cpu_flags().split()))
        shown = ", ".join(diff[:6]) + (", ..." if len(diff) > 6 else "")
        return {}, f"this CPU's flags differ from the recorded ones ({shown})"
    return env, None


MODELS = ("digits", "tabular")


def train_subprocess(
    model: str, ckpt_dir: Path, kernel_env: dict[str, str | None], threads: int
) -> subprocess.CompletedProcess[str]:
    """Run one shipped model's training step alone in a fresh Python under `kernel_env`.

    A fresh process because ATen and oneMKL read their variables once, at their first use.

    Args:
        model: "digits" or "tabular" (`MODELS`).
        ckpt_dir: The checkpoint directory to write.
        kernel_env: Values that replace the caller's environment (None unsets one), e.g.
            `PORTABLE_KERNELS` or what `reproduction_env` returns.
        threads: The intra-op thread count.

    Raises:
        ValueError: `model` is not one of `MODELS`.
        RuntimeError: the training process failed (its stderr tail is in the message).
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, not {model!r}")
    env = dict(os.environ)
    for name, value in kernel_env.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    cmd = [sys.executable, str(Path(__file__).resolve()), "--train-only", str(ckpt_dir)]
    cmd += ["--model", model, "--threads", str(threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"training step failed ({done.returncode}): {done.stderr[-3000:]}")
    return done


def _train_only(model: str, ckpt_dir: Path, threads: int) -> None:
    """The training step of `model` under this process's kernels (see `train_subprocess`)."""
    from bn_onnx.train import TrainSettings, train

    if model == "digits":
        train(TrainSettings(**{**DIGITS_SETTINGS, "threads": threads}), ckpt_dir)
        return
    import tempfile

    from bn_onnx.checkpoint import save_checkpoint

    # The table is made here from its seed, so this step needs nothing but the code; its
    # sha256 in config.json["dataset"] ties the checkpoint to the shipped people.csv.
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / TABULAR_CSV
        write_csv(csv_path, *people_rows())
        settings = TrainSettings(dataset=str(csv_path), **{**TABULAR_SETTINGS, "threads": threads})
        result = train(settings, None)
    # config.json records the data file's path as given; ship it relative to the repository,
    # so the bytes do not depend on where the table was written.
    shipped = f"models/tabular/{TABULAR_CSV}"
    meta = dict(result.meta)
    meta["dataset"] = {**meta["dataset"], "path": shipped}
    meta["training"] = {**meta["training"], "dataset": shipped}
    save_checkpoint(result.model, ckpt_dir, meta, result.metrics)


def _retrain(model: str, ckpt_dir: Path, threads: int, log: Any) -> None:
    kernels = ", ".join(f"{k}={v}" for k, v in PORTABLE_KERNELS.items())
    log(f"training {ckpt_dir} in a fresh process under {kernels} ...")
    train_subprocess(model, ckpt_dir, PORTABLE_KERNELS, threads)


def _log_kernels(meta: dict[str, Any], log: Any) -> None:
    record = meta.get("reproducibility")
    if record:
        log(f"checkpoint kernels: {describe_kernels(record)}")
    else:
        log("checkpoint kernels: not recorded (checkpoint written before bn-onnx recorded them)")


def _ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def quantize_digits(target: Path) -> None:
    """Write `target/model.int8.onnx`: `bn-onnx quantize model.onnx --checkpoint checkpoint`.

    It quantizes the unfolded model, so the quantization-aware fold keeps the input
    normalization in float (folding it forward costs 1.1 points of accuracy). Its weights are
    7-bit (reduce_range), the kernels `quantize` picks for a CPU without VNNI, so the file runs
    unsaturated on any x86-64 CPU. Its bytes depend on onnxruntime's calibration arithmetic,
    so tests check it by accuracy and top-1 agreement, never byte for byte. Raises BnOnnxError
    when the INT8 model is over `quantize`'s default accuracy budget (nothing is written then).
    """
    from bn_onnx.cli.quantize import quantize_file
    from bn_onnx.errors import BnOnnxError
    from bn_onnx.quantize import choose_kernels

    code = quantize_file(
        str(target / "model.onnx"),
        str(target / "model.int8.onnx"),
        calibrate=None,
        checkpoint=str(target / "checkpoint"),
        accurate=False,
        max_accuracy_drop=0.5,
        max_row_range_growth=None,
        calibration_rows=2048,
        quiet=True,
        # 7-bit weights: a shipped file runs on CPUs without VNNI too, where full-range u8s8
        # products saturate in AVX2's int16 sums; picked as for a CPU without VNNI
        kernels=choose_kernels(flags=()),
    )
    if code != 0:
        raise BnOnnxError(f"model.int8.onnx is over the accuracy budget (quantize exit {code})")


def make_digits(out_dir: Path, *, retrain: bool = True, log: Any = print) -> dict[str, Any]:
    """Build `out_dir/digits/` (created if needed); return the figures the model card quotes."""
    from bn_onnx.checkpoint import read_checkpoint
    from bn_onnx.checkpoint_forward import checkpoint_forward
    from bn_onnx.data import load_split_from_checkpoint_meta
    from bn_onnx.export import export_checkpoint
    from bn_onnx.files import atomic_output

    target = out_dir / "digits"
    target.mkdir(parents=True, exist_ok=True)
    ckpt_dir = target / "checkpoint"
    if retrain:
        _retrain("digits", ckpt_dir, DIGITS_SETTINGS["threads"], log)
    ckpt = read_checkpoint(ckpt_dir)
    _log_kernels(ckpt.meta, log)

    log("exporting model.onnx and model.folded.onnx ...")
    unfolded = export_checkpoint(ckpt_dir, target / "model.onnx")
    folded = export_checkpoint(ckpt_dir, target / "model.folded.onnx", fold=True)

    log("quantizing model.onnx to model.int8.onnx (calibrated on the training split) ...")
    quantize_digits(target)

    data = load_split_from_checkpoint_meta(ckpt.meta)
    x_test = np.ascontiguousarray(data.x_test, dtype=np.float32)
    sample_input = x_test[:N_SAMPLES].copy()
    sample_output = _ort_logits(folded.path, sample_input).astype(np.float32)
    for name, arr in (("sample_input.npy", sample_input), ("sample_output.npy", sample_output)):
        with atomic_output(target / name, suffix=".npy") as tmp, open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)

    exact = checkpoint_forward(ckpt, x_test).output
    y_unfolded = _ort_logits(unfolded.path, x_test)
    y_folded = _ort_logits(folded.path, x_test)
    figures = {
        "n_test": len(x_test),
        "acc_unfolded": float(np.mean(y_unfolded.argmax(1) == data.y_test)),
        "acc_folded": float(np.mean(y_folded.argmax(1) == data.y_test)),
        "argmax_agree": int(np.sum(y_unfolded.argmax(1) == y_folded.argmax(1))),
        "err_folded_unfolded": float(np.max(np.abs(y_folded - y_unfolded))),
        "err_unfolded_f64": float(np.max(np.abs(y_unfolded - exact))),
        "err_folded_f64": float(np.max(np.abs(y_folded - exact))),
        "unfolded_ops": unfolded.op_counts,
        "folded_ops": folded.op_counts,
        "fold_report": folded.fold_report,
    }
    card = model_card(target, ckpt, figures)
    with atomic_output(target / "MODEL_CARD.md", suffix=".md") as tmp:
        tmp.write_text(card, encoding="utf-8")
    log(f"wrote {target}")
    return figures


def _versions(recorded: dict[str, str]) -> str:
    """The card's versions line: the training run's (config.json) and this process's ONNX ones."""
    import onnx
    import onnxruntime

    names = [("bn-onnx", "bn_onnx"), ("torch", "torch"), ("numpy", "numpy")]
    names += [("scikit-learn", "scikit-learn"), ("Python", "python")]
    # checkpoints written before library_versions named it "scikit-learn" said "sklearn"
    recorded = {"scikit-learn": recorded.get("sklearn"), **recorded}
    parts = [f"{label} {recorded.get(key)}" for label, key in names]
    parts += [f"onnx {onnx.__version__}", f"onnxruntime {onnxruntime.__version__}"]
    return ", ".join(parts)


def _kernels_sentence(meta: dict[str, Any]) -> str:
    record = meta.get("reproducibility")
    if not record:
        return (
            "The CPU kernels it ran under were not recorded (it predates "
            '`config.json["reproducibility"]`), so its bits are reproducible only on the kind '
            "of CPU that made it; a retrain elsewhere gives another model of about the same "
            "accuracy."
        )
    return (
        f"Kernels: {describe_kernels(record)}; the same seed gives a bit-identical "
        "`model.safetensors` on the same machine and build, where all of these and the CPU's "
        'flags are the same (`config.json["reproducibility"]`); another CPU gives other bits '
        "of about the same accuracy."
    )


def _ops(counts: dict[str, int]) -> str:
    return ", ".join(f"{op} {n}" for op, n in counts.items())


def model_card(target: Path, ckpt: Any, fig: dict[str, Any]) -> str:
    """The model card's markdown: data, architecture, accuracy, files, how it was made."""
    metrics = ckpt.metrics or {}
    meta = ckpt.meta
    cfg = ckpt.config
    sizes = meta["dataset"].get("sizes", {})
    n_params = sum(int(np.prod(a.shape)) for k, a in ckpt.tensors.items() if "num_batches" not in k)
    training = meta.get("training", {})
    versions = meta.get("versions", {})
    files = [
        "checkpoint/config.json",
        "checkpoint/model.safetensors",
        "checkpoint/metrics.json",
        "model.onnx",
        "model.folded.onnx",
        "model.int8.onnx",
        "sample_input.npy",
        "sample_output.npy",
    ]

    # metrics.json records wall times, so its size differs from run to run; the card must not.
    # and model.int8.onnx's by a byte or so with the CPU that quantized it (its metadata)
    def size(f: str) -> str:
        if f.endswith("metrics.json"):
            return "varies (training timings)"
        n = (target / f).stat().st_size
        return f"about {n / 1000:.0f} kB (varies with the CPU)" if "int8" in f else f"{n:,}"

    file_rows = "\n".join(f"| `{f}` | {size(f)} |" for f in files)
    folds = "\n".join(
        f"  - `{e['node']}` -> `{e['target']}` ({e['direction']})" for e in fig["fold_report"]["bn"]
    )
    return f"""# Model card: digits MLP (bn-onnx)

A small classifier of 8x8 handwritten digits, shipped to show the bn-onnx chain end to end:
a PyTorch checkpoint, its ONNX export with the batch norm kept, and the same model with the
batch norm folded away. Regenerate everything with `python tools/make_models.py`.

## Data

scikit-learn's `load_digits`: {meta["dataset"].get("n_rows")} images of 8x8 pixels, each
pixel a count from 0 to 16, ten classes `0`-`9`. Split stratified with seed
{meta["dataset"].get("seed")}: {sizes.get("train")} train, {sizes.get("val")} validation,
{sizes.get("test")} test rows.

Input: the **raw** 64 pixel values as float32 `[batch, 64]` (row-major, `pixel_r_c`); the
normalization is inside the model. Output: `logits` float32 `[batch, 10]`; class `i` is digit
`i` (also in the metadata prop `bn_onnx.class_names`).

## Architecture

    input [batch, 64]
      -> input normalization  (BatchNorm, affine-free, frozen training-set mean/variance)
      -> Linear 64->128 -> BatchNorm -> ReLU
      -> Linear 128->64 -> BatchNorm -> ReLU
      -> Linear 64->10  -> logits

`MLPConfig`: hidden {list(cfg.hidden)}, bn `{cfg.bn}`, activation `{cfg.activation}`,
bn_eps {cfg.bn_eps}, input_norm {cfg.input_norm}, dropout {cfg.dropout};
{n_params:,} float32 values (parameters and BN statistics).

- `model.onnx` (unfolded): {_ops(fig["unfolded_ops"])}.
- `model.folded.onnx`: {_ops(fig["folded_ops"])}. Each BatchNormalization went into a Gemm:
{folds}

## Accuracy

| | test accuracy ({fig["n_test"]} rows) |
| --- | --- |
| checkpoint, torch eval (`metrics.json`) | {metrics.get("test_accuracy", float("nan")):.4f} |
| `model.onnx`, onnxruntime CPU | {fig["acc_unfolded"]:.4f} |
| `model.folded.onnx`, onnxruntime CPU | {fig["acc_folded"]:.4f} |

Validation accuracy {metrics.get("val_accuracy", float("nan")):.4f} at the best epoch
({metrics.get("best_epoch")} of {metrics.get("epochs_run")}). On the test split the folded
and unfolded models pick the same class for {fig["argmax_agree"]} of {fig["n_test"]} rows;
the largest logit difference between them is {fig["err_folded_unfolded"]:.2e}, and against a
float64 numpy forward of the checkpoint it is {fig["err_unfolded_f64"]:.2e} (unfolded) and
{fig["err_folded_f64"]:.2e} (folded): folding adds no measurable error.

## Files

| file | bytes |
| --- | --- |
{file_rows}

`model.int8.onnx` is `bn-onnx quantize model.onnx --checkpoint checkpoint`: QDQ, per-channel
int8 weights, calibrated on the training split. Its Gemms run in INT8; the input normalization
stays a float BatchNormalization, because folding it forward would widen the first weight's
range past what per-channel scales absorb. Its weights are 7-bit (`reduce_range`, what
`quantize` picks for a CPU without VNNI), so it runs without int16 saturation on any x86-64
CPU. Its values depend on onnxruntime's calibration arithmetic on the CPU that made it;
`quantize` wrote it only because its test accuracy is within 0.5 points of the float model's.

`sample_input.npy` holds the first {N_SAMPLES} rows of the test split (raw features);
`sample_output.npy` the folded model's logits for them (onnxruntime, CPU). Both are plain
`.npy` (no pickle).

```python
import numpy as np, onnxruntime as ort
sess = ort.InferenceSession("models/digits/model.folded.onnx")
x = np.load("models/digits/sample_input.npy")
logits = sess.run(None, {{"input": x}})[0]     # == np.load("models/digits/sample_output.npy")
```

## How it was made

`python tools/make_models.py`: `bn_onnx.train.train` with optimizer
`{training.get("optimizer")}` (lr {training.get("lr")}), batch size
{training.get("batch_size")}, up to {training.get("epochs")} epochs with patience
{training.get("patience")}, keeping the weights of the best validation loss; seed
{training.get("seed")}, CPU, {training.get("threads")} thread. {_kernels_sentence(meta)}
Then `bn-onnx export` (torch's dynamo exporter, `optimize=False`, opset 18) and
`bn-onnx export --fold`; these regenerate the same bytes on any CPU.

Versions: {_versions(versions)}.
"""


# ---------------------------------------------------------------------------------------------
# models/tabular: a model of raw table columns (categories, empty cells), on synthetic data

TABULAR_CSV = "people.csv"
TABULAR_ROWS = 2000
TABULAR_SETTINGS: dict[str, Any] = {
    # bn-onnx train's defaults, but for the device and the thread count that make it
    # reproducible
    "target": "label",
    "seed": 0,
    "device": "cpu",
    "threads": 1,
}
# Each city moves the score by this much; age and the "pro" plan by less. The label is
# "yes" when the score (with noise) is positive, so the city column decides most rows.
CITY_EFFECT = {
    "Busan": 2.0,
    "Daegu": 1.2,
    "Gwangju": 0.4,
    "Incheon": -0.4,
    "Seoul": -1.2,
    "Ulsan": -2.0,
}
PLANS = ("basic", "plus", "pro")
TABULAR_FILES = [
    "checkpoint/config.json",
    "checkpoint/model.safetensors",
    "checkpoint/metrics.json",
    "model.onnx",
    "model.folded.onnx",
    TABULAR_CSV,
    "sample_rows.csv",
    "sample_output.npy",
]


def people_rows(n_rows: int = TABULAR_ROWS, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """A seeded synthetic table where a categorical column decides the label, with gaps.

    Columns `age` (whole years, 10% empty), `income` (5% empty), `city` (six cities, 5%
    empty), `plan` (basic/plus/pro) and `label` ("yes"/"no"): label = score > 0 for
    score = CITY_EFFECT[city] + 0.06 (age - 42) + 0.8 [plan = pro] + N(0, 0.5), computed from
    the values before any cell is emptied. Income is noise. Returns the header and the rows
    as CSV text cells ("" = empty).
    """
    rng = np.random.default_rng(seed)
    cities = rng.choice(list(CITY_EFFECT), size=n_rows)
    plans = rng.choice(PLANS, size=n_rows, p=[0.5, 0.3, 0.2])
    age = rng.normal(42, 12, size=n_rows).clip(18, 90).round()
    income = rng.lognormal(8, 0.5, size=n_rows)
    score = (
        np.array([CITY_EFFECT[c] for c in cities])
        + 0.06 * (age - 42)
        + 0.8 * (plans == "pro")
        + rng.normal(0, 0.5, size=n_rows)
    )
    label = np.where(score > 0, "yes", "no")
    empty_age = rng.random(n_rows) < 0.10
    empty_income = rng.random(n_rows) < 0.05
    empty_city = rng.random(n_rows) < 0.05
    rows = [
        [
            "" if empty_age[i] else f"{age[i]:.0f}",
            "" if empty_income[i] else f"{income[i]:.2f}",
            "" if empty_city[i] else str(cities[i]),
            str(plans[i]),
            str(label[i]),
        ]
        for i in range(n_rows)
    ]
    return ["age", "income", "city", "plan", "label"], rows


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """Write a CSV file atomically (LF line ends, so the bytes do not depend on the platform)."""
    import csv

    from bn_onnx.files import atomic_output

    with atomic_output(path, suffix=".csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _number_text(value: float) -> str:
    return "" if np.isnan(value) else np.format_float_positional(np.float32(value), trim="-")


def _ort_feeds(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def make_tabular(out_dir: Path, *, retrain: bool = True, log: Any = print) -> dict[str, Any]:
    """Build `out_dir/tabular/` (created if needed); return the figures the model card quotes.

    Writes people.csv (`people_rows`), trains on it with `bn-onnx train`'s defaults (CPU, one
    thread, seed 0), exports model.onnx and model.folded.onnx, and writes the first 16 rows
    of the test split as sample_rows.csv with the folded model's outputs for them.
    """
    import json

    from bn_onnx.checkpoint import read_checkpoint
    from bn_onnx.checkpoint_forward import checkpoint_forward
    from bn_onnx.columns import feeds_from_columns, read_columns
    from bn_onnx.data import load_dataset
    from bn_onnx.export import export_checkpoint
    from bn_onnx.files import atomic_output
    from bn_onnx.onnx_meta import get_metadata

    target = out_dir / "tabular"
    target.mkdir(parents=True, exist_ok=True)
    csv_path = target / TABULAR_CSV
    ckpt_dir = target / "checkpoint"
    header, rows = people_rows()
    write_csv(csv_path, header, rows)
    if retrain:
        _retrain("tabular", ckpt_dir, TABULAR_SETTINGS["threads"], log)
    ckpt = read_checkpoint(ckpt_dir)
    _log_kernels(ckpt.meta, log)

    log("exporting model.onnx and model.folded.onnx ...")
    unfolded = export_checkpoint(ckpt_dir, target / "model.onnx")
    folded = export_checkpoint(ckpt_dir, target / "model.folded.onnx", fold=True)

    spec = ckpt.meta["dataset"]
    data = load_dataset(
        csv_path,
        target="label",
        seed=spec["seed"],
        val_fraction=spec["val_fraction"],
        test_fraction=spec["test_fraction"],
    )
    feeds = data.feeds_test
    assert feeds is not None and data.tabular == ckpt.config.tabular.with_embedding_dropout(0.0)
    sample = {k: v[:N_SAMPLES] for k, v in feeds.items()}
    by_name: dict[str, list[str]] = {}
    for col in data.tabular.columns:
        values = sample[col.input][:, col.index]
        by_name[col.name] = [
            _number_text(v) if col.kind == "continuous" else str(v) for v in values
        ]
    labels = [ckpt.class_names[i] for i in data.y_test[:N_SAMPLES]]
    sample_rows = [[by_name[h][i] for h in header[:-1]] + [labels[i]] for i in range(N_SAMPLES)]
    write_csv(target / "sample_rows.csv", header, sample_rows)
    # the sample rows as an app reads them back: through the model's own column schema
    schema = read_columns(get_metadata(_onnx_load(folded.path)))
    assert schema is not None
    again = feeds_from_columns(
        schema, {h: [r[j] for r in sample_rows] for j, h in enumerate(header)}
    )
    sample_output = _ort_feeds(folded.path, again).astype(np.float32)
    with atomic_output(target / "sample_output.npy", suffix=".npy") as tmp, open(tmp, "wb") as f:
        np.save(f, sample_output, allow_pickle=False)

    exact = checkpoint_forward(ckpt, feeds).output
    y_unfolded = _ort_feeds(unfolded.path, feeds)
    y_folded = _ort_feeds(folded.path, feeds)
    city = [c.index for c in data.tabular.columns if c.name == "city"][0]
    no_city = feeds["categorical"][:, city] == ""
    right = y_folded.argmax(1) == data.y_test
    blanked = {k: v.copy() for k, v in feeds.items()}
    blanked["categorical"][:, city] = ""
    y_blanked = _ort_feeds(folded.path, blanked)
    figures = {
        "n_test": len(data.y_test),
        "acc_unfolded": float(np.mean(y_unfolded.argmax(1) == data.y_test)),
        "acc_folded": float(np.mean(right)),
        "acc_city_known": float(np.mean(right[~no_city])),
        "acc_city_missing": float(np.mean(right[no_city])) if no_city.any() else float("nan"),
        "n_city_missing": int(no_city.sum()),
        "acc_city_blanked": float(np.mean(y_blanked.argmax(1) == data.y_test)),
        "argmax_agree": int(np.sum(y_unfolded.argmax(1) == y_folded.argmax(1))),
        "err_folded_unfolded": float(np.max(np.abs(y_folded - y_unfolded))),
        "err_unfolded_f64": float(np.max(np.abs(y_unfolded - exact))),
        "err_folded_f64": float(np.max(np.abs(y_folded - exact))),
        "unfolded_ops": unfolded.op_counts,
        "folded_ops": folded.op_counts,
        "fold_report": folded.fold_report,
        "columns": json.loads(ckpt.config.tabular.columns_json()),
    }
    card = tabular_model_card(target, ckpt, figures)
    with atomic_output(target / "MODEL_CARD.md", suffix=".md") as tmp:
        tmp.write_text(card, encoding="utf-8")
    log(f"wrote {target}")
    return figures


def _onnx_load(path: Path) -> Any:
    import onnx

    return onnx.load(path)


def tabular_model_card(target: Path, ckpt: Any, fig: dict[str, Any]) -> str:
    """The tabular model card's markdown: data, columns, architecture, accuracy, files."""
    metrics = ckpt.metrics or {}
    meta = ckpt.meta
    cfg = ckpt.config
    spec = cfg.tabular
    sizes = meta["dataset"].get("sizes", {})
    n_params = sum(int(np.prod(a.shape)) for k, a in ckpt.tensors.items() if "num_batches" not in k)
    versions = meta.get("versions", {})
    file_rows = "\n".join(
        f"| `{f}` | "
        + ("varies (training timings)" if f.endswith("metrics.json") else "")
        + (f"{(target / f).stat().st_size:,}" if not f.endswith("metrics.json") else "")
        + " |"
        for f in TABULAR_FILES
    )

    def treatment(c: dict[str, Any]) -> str:
        if c["kind"] == "continuous":
            extra = ", was-missing indicator" if c["name"] in spec.indicators else ""
            return f"fill {c['fill']:g}{extra}"
        vocab = ", ".join(c["vocabulary"])
        width = spec.embedding_dims[c["index"]]
        return f"{len(c['vocabulary'])} values ({vocab}), embedding width {width}"

    column_rows = "\n".join(
        f"| `{c['name']}` | {c['kind']} | `{c['input']}[:, {c['index']}]` | {treatment(c)} |"
        for c in fig["columns"]
    )
    folds = "\n".join(
        f"  - `{e['node']}` -> `{e['target']}` ({e['direction']})" for e in fig["fold_report"]["bn"]
    )
    widths = " -> ".join(str(w) for w in (cfg.in_features, *cfg.hidden, cfg.out_features))
    n_num, n_cat = spec.n_numeric, spec.n_categorical
    return f"""# Model card: tabular MLP on raw columns (bn-onnx)

A small classifier of table rows with a categorical column, missing values and a number
column that does not matter, shipped to show that one ONNX file can take the raw columns:
the fill of missing values, the was-missing indicators, the category lookup, the embeddings
and the normalization are all inside the graph, and `--fold` still removes every
BatchNormalization. Regenerate everything with `python tools/make_models.py`.

## Data

`{TABULAR_CSV}`: {meta["dataset"].get("n_rows")} synthetic rows from
`tools/make_models.py:people_rows` (seed 0). The label is "yes" when
`CITY_EFFECT[city] + 0.06 (age - 42) + 0.8 [plan = pro] + N(0, 0.5)` is positive (city
effects from -2.0 for Ulsan to +2.0 for Busan), so the city decides most rows; `income` is
noise. 10% of the ages, 5% of the incomes and 5% of the cities are empty cells. Split
stratified with seed {meta["dataset"].get("seed")}: {sizes.get("train")} train,
{sizes.get("val")} validation, {sizes.get("test")} test rows. Fills, indicators and
vocabularies come from the training rows only.

## Inputs and columns

Inputs: `continuous` float32 `[batch, {spec.n_continuous}]` (raw values, NaN = missing) and
`categorical` string `[batch, {spec.n_categorical}]` (the cell text, "" = missing; a city not
in the vocabulary maps to the "unknown" code). Output: `logits` float32 `[batch, 2]`, classes
{", ".join(f"`{n}`" for n in ckpt.class_names)}. The metadata prop `bn_onnx.columns` lists:

| column | kind | input | preprocessing in the graph |
| --- | --- | --- | --- |
{column_rows}

## Architecture

    continuous -> IsNaN -> Where(fill), Cast(indicators) -> Concat = numeric [batch, {n_num}]
    categorical -> Split -> LabelEncoder per column -> Concat      = codes [batch, {n_cat}]
    Concat(Gather(embeddings, codes), numeric)                      [batch, {cfg.in_features}]
      -> input normalization (BatchNorm, frozen training statistics)
      -> Linear -> BatchNorm -> ReLU (x{len(cfg.hidden)}) -> Linear -> logits

Widths {widths}; `MLPConfig`: bn `{cfg.bn}`, activation `{cfg.activation}`, bn_eps
{cfg.bn_eps}, dropout {cfg.dropout}; {n_params:,} float32 values (parameters, embeddings and
BN statistics).

- `model.onnx` (unfolded): {_ops(fig["unfolded_ops"])}.
- `model.folded.onnx`: {_ops(fig["folded_ops"])}. Each BatchNormalization went into a Gemm:
{folds}

## Accuracy

| | test accuracy ({fig["n_test"]} rows) |
| --- | --- |
| checkpoint, torch eval (`metrics.json`) | {metrics.get("test_accuracy", float("nan")):.4f} |
| `model.onnx`, onnxruntime CPU, raw columns | {fig["acc_unfolded"]:.4f} |
| `model.folded.onnx`, onnxruntime CPU, raw columns | {fig["acc_folded"]:.4f} |

The folded model is right on {fig["acc_city_known"]:.4f} of the test rows with a city and
{fig["acc_city_missing"]:.4f} of the {fig["n_city_missing"]} rows whose city is empty; with
every test row's city emptied, it scores {fig["acc_city_blanked"]:.4f}: the categorical
column carries most of the signal. Folded
and unfolded pick the same class for {fig["argmax_agree"]} of {fig["n_test"]} rows; the
largest logit difference between them is {fig["err_folded_unfolded"]:.2e}, and against a
float64 numpy forward of the checkpoint (the same fill, lookup and embeddings in numpy) it is
{fig["err_unfolded_f64"]:.2e} (unfolded) and {fig["err_folded_f64"]:.2e} (folded).

## Files

| file | bytes |
| --- | --- |
{file_rows}

`sample_rows.csv` holds the first {N_SAMPLES} rows of the test split as CSV cells (the
`label` column is the truth; the model ignores it); `sample_output.npy` the folded model's
logits for them (onnxruntime, CPU).

```python
import csv, numpy as np, onnx, onnxruntime as ort
from bn_onnx.columns import feeds_from_columns, read_columns

path = "models/tabular/model.folded.onnx"
columns = read_columns({{p.key: p.value for p in onnx.load(path).metadata_props}})
rows = list(csv.DictReader(open("models/tabular/sample_rows.csv")))
feeds = feeds_from_columns(columns, {{k: [r[k] for r in rows] for k in rows[0]}})
logits = ort.InferenceSession(path).run(None, feeds)[0]  # == sample_output.npy
```

## How it was made

`python tools/make_models.py`: `bn_onnx.train.train` with `bn-onnx train`'s defaults
(`bn-onnx train --dataset {TABULAR_CSV} --target label`: hidden {list(cfg.hidden)}, adam,
batch size 64, up to 60 epochs with patience 15) on one CPU thread with seed 0, in a fresh
process; the best validation epoch was {metrics.get("best_epoch")} of
{metrics.get("epochs_run")}.
{_kernels_sentence(meta)}
Then `bn-onnx export` and `bn-onnx export --fold`; these regenerate the same bytes on any CPU.
`checkpoint/config.json` records the data file as `models/tabular/{TABULAR_CSV}` (relative to
the repository).

Versions: {_versions(versions)}.
"""


def main(argv: list[str] | None = None) -> int:
    """Command line: regenerate models/ (or `--out`)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "models", help="models folder")
    ap.add_argument(
        "--from-checkpoint",
        action="store_true",
        help="keep the existing checkpoint; redo the ONNX files, samples and card",
    )
    ap.add_argument(
        "--model",
        choices=MODELS,
        help="only this model (default: all); with --train-only, the one to train",
    )
    ap.add_argument(
        "--train-only",
        type=Path,
        metavar="DIR",
        help="only the training step of --model, into DIR, under this process's kernels "
        "(make_models runs it in a fresh process under PORTABLE_KERNELS)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of --train-only (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    from bn_onnx.errors import BnOnnxError

    try:
        if args.train_only is not None:
            if args.model is None:
                ap.error("--train-only needs --model")
            _train_only(args.model, args.train_only, args.threads)
            return 0
        makers = {"digits": make_digits, "tabular": make_tabular}
        for name in MODELS if args.model is None else (args.model,):
            makers[name](args.out, retrain=not args.from_checkpoint)
    except BnOnnxError as exc:
        print(f"make_models: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
