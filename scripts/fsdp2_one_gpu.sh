#!/usr/bin/env bash
# Issue 7 on one GPU (device tool): te-llama finetune with TE layers under torch FSDP2
# (torchrun, 1 process) in BF16 and FP8, against the same run without FSDP2. Built-in model
# and sample data; logs under $OUT/fsdp2. Needs the GPU kit sourced and PYTHONPATH=src.
set -uo pipefail
OUT="${OUT:-/tmp/te-llama-out}/fsdp2"; mkdir -p "$OUT"
common=(--backend te --max-steps 30 --eval-fraction 0 --save-every 10 --no-tensorboard --no-cuda-graphs)
run() {  # name (also the run folder, up to a "."), command...
  local name=$1; shift
  "$@" "${common[@]}" --output-dir "$OUT/${name%.*}" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(grep -E '^done:' "$OUT/$name.log" | cut -c1-90)"
  grep -E "Error|error:" "$OUT/$name.log" | tail -3
}
if [ "${1:-all}" != "resume" ]; then  # `bash scripts/fsdp2_one_gpu.sh resume`: only the resume pair
run single-bf16 python3 -m te_llama finetune --precision bf16
run fsdp2-bf16 torchrun --standalone --nproc_per_node 1 -m te_llama finetune --parallel fsdp2 --precision bf16
run fsdp2-fp8 torchrun --standalone --nproc_per_node 1 -m te_llama finetune --parallel fsdp2 --precision fp8
run single-fp8 python3 -m te_llama finetune --precision fp8
fi
# resume of the sharded checkpoint: 20 steps, then continue to 30
run fsdp2-bf16-resume.a torchrun --standalone --nproc_per_node 1 -m te_llama finetune --parallel fsdp2 --precision bf16 --stop-after-steps 20
run fsdp2-bf16-resume.b torchrun --standalone --nproc_per_node 1 -m te_llama finetune --parallel fsdp2 --precision bf16 --resume
