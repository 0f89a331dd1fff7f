#!/usr/bin/env bash
# GPU checks on one CUDA device: the built-in tiny PPO run in one process, plain, with bf16
# autocast, and under DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 (accelerate launch --num_processes 1).
# Prints each run's exit code, seconds and its "done:" line (score first -> last iteration).
# Usage: [ONLY="plain bf16 deepspeed_zero2 deepspeed_zero3 fsdp"] bash scripts/gpu/gpu_check.sh [OUTPUT_FOLDER]
set -uo pipefail
out=${1:-${TMPDIR:-/tmp}/gpu_check}
mkdir -p "$out"
ONLY=${ONLY:-plain bf16 deepspeed_zero2 deepspeed_zero3 fsdp}
run() {
  local name=$1; shift
  [[ " $ONLY " == *" $name "* ]] || return 0
  local start; start=$(date +%s)
  timeout 75 "$@" output_dir="$out/$name" iterations=20 overwrite=true >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc, $(( $(date +%s) - start )) s"
  grep -h "^done:" "$out/$name.log" || tail -n 8 "$out/$name.log"
}
cfg=(train --config configs/tiny.yaml)
run plain python3 -m rlhf_ppo "${cfg[@]}"
run bf16 python3 -m rlhf_ppo "${cfg[@]}" mixed_precision=bf16
for engine in deepspeed_zero2 deepspeed_zero3 fsdp; do
  run "$engine" python3 -m accelerate.commands.launch --config_file "configs/accelerate/$engine.yaml" --num_processes 1 \
    -m rlhf_ppo "${cfg[@]}"
done
