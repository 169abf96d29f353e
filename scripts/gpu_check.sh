#!/usr/bin/env bash
# The GPU test suite (pytest -m gpu, tests/gpu) on a CUDA machine, from any folder:
#   bash scripts/gpu_check.sh [pytest args...]
# Needs an NVIDIA GPU, torch with CUDA and Transformer Engine (pip install -e ".[te]").
# On a machine without network, a prepared TE install in .gpu_kit/ (its setup.sh) is sourced
# first when present. Writes env.txt, pytest_gpu.log and metrics.jsonl (each test's measured
# errors) to $OUT (default /tmp/te-llama-out). Exit status: pytest's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/te-llama-out}"; mkdir -p "$OUT"
if [ -f .gpu_kit/setup.sh ]; then
  # shellcheck disable=SC1091
  source .gpu_kit/setup.sh
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, installed or not
if ! python3 -c "import transformer_engine.pytorch" >/dev/null 2>&1; then
  echo "gpu_check: Transformer Engine does not import here; install it with: pip install -e \".[te]\"" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, transformers, transformer_engine as te; print('torch', torch.__version__, 'transformers', transformers.__version__, 'TE', te.__version__)" 2>&1 | grep -v -i warn | tee -a "$OUT/env.txt"
rm -f "$OUT/metrics.jsonl"
TE_LLAMA_METRICS="$OUT/metrics.jsonl" python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu "$@" 2>&1 \
  | tee "$OUT/pytest_gpu.log" | tail -40
exit "${PIPESTATUS[0]}"
