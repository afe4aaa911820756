#!/usr/bin/env bash
# The CUDA checks of bn-onnx, in one run on a GPU machine (the H200 device machine: Python 3.12,
# torch 2.11 built for CUDA 13, the CPU onnxruntime; no network).
#
#   1. onnxruntime-gpu 1.31.1 (CUDA 13, cp312 wheel, 255 MB) goes first on PYTHONPATH
#      (`pip install --no-deps --target`), shadowing the image's CPU onnxruntime;
#   2. the CUDA tests (pytest -m cuda: sessions, Predictor, verify with TF32 off);
#   3. `bn-onnx verify --provider cpu,cuda` on the shipped digits pair and on a Conv fold case
#      (CUDA sessions are created with use_tf32=0; the report says "TF32: off");
#   4. `bn-onnx bench --provider cuda` (IOBinding) on the digits pair;
#   5. training with `--device cuda` under torchrun with one process (nccl, SyncBatchNorm),
#      then export, fold and verify of that checkpoint on CUDA.
# Every step's output goes to $OUT/gpu_check/ (or .gpu/out/ without $OUT); the script stops at
# the first failure with its exit code.
#
# Getting the wheel there (the machine cannot reach PyPI; a `run` call carries at most 64 MiB):
#
#   here:  pip download onnxruntime-gpu==1.31.1 --no-deps --only-binary=:all: \
#              --python-version 3.12 --platform manylinux_2_28_x86_64 -d .gpu/
#          (cd .gpu && sha256sum onnxruntime_gpu-*.whl > wheel.sha256 \
#              && split -b 60M onnxruntime_gpu-*.whl wheel.part. && ls wheel.part.*)
#          .gpu/ is git-ignored (add it to .git/info/exclude), so it only travels when carried.
#   there: carry one part per `run` call while the machine stays warm (ignored paths already
#          there are kept between calls):
#              run carry=[".gpu/wheel.part.aa", ".gpu/wheel.sha256"] command="ls -l .gpu"
#              run carry=[".gpu/wheel.part.ab"] command="ls -l .gpu"   ... up to .ae
#          then the last call runs this script, which joins the parts, checks the sha256 and
#          installs the wheel:  run command="bash tools/gpu_check.sh" timeout_s=540
#   The parts must all arrive within one lease: a machine that went idle starts bare.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
GPU_DIR=${GPU_DIR:-$ROOT/.gpu}
LOG=${OUT:-$GPU_DIR/out}/gpu_check
mkdir -p "$GPU_DIR" "$LOG"

step() { echo; echo "== $*" | tee -a "$LOG/steps.txt"; }

# -- 1. onnxruntime-gpu first on PYTHONPATH ---------------------------------------------------
step "1. onnxruntime-gpu 1.31.1 on PYTHONPATH"
wheel=$(ls "$GPU_DIR"/onnxruntime_gpu-1.31.1-*.whl 2>/dev/null | head -1 || true)
if [[ -z "$wheel" ]] && ls "$GPU_DIR"/wheel.part.* >/dev/null 2>&1; then
    name=$(awk '{print $2}' "$GPU_DIR/wheel.sha256")
    cat "$GPU_DIR"/wheel.part.* > "$GPU_DIR/$name"
    (cd "$GPU_DIR" && sha256sum -c wheel.sha256)
    wheel="$GPU_DIR/$name"
fi
if [[ ! -d "$GPU_DIR/site/onnxruntime" ]]; then
    if [[ -z "$wheel" ]]; then
        echo "no onnxruntime-gpu wheel in $GPU_DIR (see the header of this script)" >&2
        exit 2
    fi
    python -m pip install --no-deps --no-index --target "$GPU_DIR/site" "$wheel" > "$LOG/pip.txt"
fi
export PYTHONPATH="$GPU_DIR/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
python - <<'EOF' | tee "$LOG/providers.txt"
import importlib, sys
import onnxruntime as ort
print("python", sys.version.split()[0], "onnxruntime", ort.__version__, ort.__file__)
print("providers", ort.get_available_providers())
missing = [m for m in ("numpy", "onnx", "safetensors", "rich", "torch", "sklearn", "pytest",
                       "hypothesis", "ml_dtypes") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing on this machine: {', '.join(missing)}")
if "CUDAExecutionProvider" not in ort.get_available_providers():
    sys.exit("the CUDA execution provider is not available: check the CUDA 13 / cuDNN libraries")
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOG/nvidia-smi.txt"

# -- 2. the CUDA tests -----------------------------------------------------------------------
step "2. pytest -m cuda"
python -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$LOG/pytest_cuda.txt"

# -- 3. verify on CUDA, TF32 off -------------------------------------------------------------
step "3. bn-onnx verify --provider cpu,cuda"
D=models/digits
python -m bn_onnx verify "$D/model.onnx" "$D/model.folded.onnx" --checkpoint "$D/checkpoint" \
    --provider cpu,cuda --report "$LOG/verify_digits.json" 2>&1 | tee "$LOG/verify_digits.txt"
grep -q "TF32: off on every CUDA session" "$LOG/verify_digits.txt"
case=tests/data/fold_cases/depthwise_bias_bn.onnx
python -m bn_onnx fold "$case" -o "$GPU_DIR/depthwise.folded.onnx" -q
python -m bn_onnx verify "$case" "$GPU_DIR/depthwise.folded.onnx" --provider cuda --locate \
    2>&1 | tee "$LOG/verify_conv.txt"

# -- 4. bench on CUDA --------------------------------------------------------------------------
step "4. bn-onnx bench --provider cuda"
python -m bn_onnx bench "$D/model.onnx" "$D/model.folded.onnx" --provider cuda \
    --batch-sizes 1,32,1024 --repeats 30 --json "$LOG/bench_cuda.json" 2>&1 \
    | tee "$LOG/bench_cuda.txt"

# -- 5. training on CUDA: torchrun, one process, nccl and SyncBatchNorm ----------------------
step "5. train --device cuda (torchrun, 1 process: nccl, SyncBatchNorm)"
RUN=$GPU_DIR/run_cuda
rm -rf "$RUN"
python -m torch.distributed.run --standalone --nproc_per_node=1 -m bn_onnx train \
    --dataset digits --device cuda --epochs 5 --out "$RUN" 2>&1 | tee "$LOG/train_cuda.txt"
python - "$RUN" <<'EOF' | tee -a "$LOG/train_cuda.txt"
import json, sys
meta = json.load(open(f"{sys.argv[1]}/config.json"))
print("training:", json.dumps(meta.get("training", {}).get("distributed", meta.get("training")))[:400])
EOF
python -m bn_onnx export "$RUN" -o "$RUN/model.onnx" 2>&1 | tee -a "$LOG/train_cuda.txt"
python -m bn_onnx fold "$RUN/model.onnx" -o "$RUN/model.folded.onnx" --verify 2>&1 \
    | tee -a "$LOG/train_cuda.txt"
python -m bn_onnx verify "$RUN/model.onnx" "$RUN/model.folded.onnx" --checkpoint "$RUN" \
    --provider cpu,cuda 2>&1 | tee -a "$LOG/train_cuda.txt"

step "done: every CUDA check passed; logs in $LOG"
