#!/usr/bin/env bash
# One command on the GPU machine (device tool): install the GPU kit, run the GPU tests, then
# the full-size memory check. Logs and metrics go to $OUT. Carry [".gpu_kit"] (shared/device/pack.sh).
#   bash scripts/gpu_check.sh [pytest args...]
set -uo pipefail
OUT="${OUT:-/tmp/te-llama-out}"; mkdir -p "$OUT"
source .gpu_kit/setup.sh
export PYTHONPATH="$PWD/src:$PYTHONPATH"  # the package itself, without pip (no network there)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, transformers, transformer_engine as te; print('torch', torch.__version__, 'transformers', transformers.__version__, 'TE', te.__version__)" 2>&1 | grep -v -i warn | tee -a "$OUT/env.txt"
rm -f "$OUT/metrics.jsonl"
TE_LLAMA_METRICS="$OUT/metrics.jsonl" python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu "$@" 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
