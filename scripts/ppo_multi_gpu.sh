#!/usr/bin/env bash
# PPO on N GPUs of one machine under accelerate launch, with one of the engines in
# configs/accelerate/: multi_gpu (DDP, the fastest when the model fits on each GPU),
# deepspeed_zero2, deepspeed_zero3, fsdp (shard optimizer state / parameters: docs/distributed.md).
#
# Usage: bash scripts/ppo_multi_gpu.sh [N] [ENGINE] [PPO_CONFIG] [key=value ...]
#   N           processes, one per GPU (default: the GPUs nvidia-smi lists)
#   ENGINE      a name in configs/accelerate/ or a launch config .yaml (default multi_gpu)
#   PPO_CONFIG  the rlhf_ppo config (default configs/tiny.yaml); key=value overrides follow it,
#               e.g. bash scripts/ppo_multi_gpu.sh 8 deepspeed_zero3 my.yaml output_dir=runs/big
#   LAUNCH_ARGS extra accelerate launch flags, e.g. LAUNCH_ARGS="--machine_rank 1" (two_machines)
# ppo.batch_size counts responses over all processes: each samples ppo.batch_size / N. Writes, as
# a one-process run: output_dir/metrics.jsonl, checkpoint-*/ and final/ (from the main process).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ $# -gt 0 ] && [[ $1 != *=* ]]; then N=$1; shift; else
    N=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
ENGINE=multi_gpu
if [ $# -gt 0 ] && [[ $1 != *=* ]]; then ENGINE=$1; shift; fi
PPO_CONFIG=$ROOT/configs/tiny.yaml
if [ $# -gt 0 ] && [[ $1 != *=* ]]; then PPO_CONFIG=$1; shift; fi

if ! [[ $N =~ ^[1-9][0-9]*$ ]]; then
    echo "N: expected a number of processes >= 1, got '${N}' (no GPU found by nvidia-smi?)" >&2
    exit 2
fi
LAUNCH_CONFIG=$ENGINE
[ -f "$LAUNCH_CONFIG" ] || LAUNCH_CONFIG=$ROOT/configs/accelerate/$ENGINE.yaml
if [ ! -f "$LAUNCH_CONFIG" ]; then
    echo "ENGINE: no launch config '$ENGINE'; expected a .yaml file or one of:" \
        "$(cd "$ROOT/configs/accelerate" && ls -- *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
    exit 2
fi
read -r -a launch_args <<< "${LAUNCH_ARGS:-}"

# --num_processes overrides the launch config's (8 there); the rest of the line is the usual
# rlhf-ppo train command line, run once per process.
set -x
accelerate launch --num_processes "$N" --config_file "$LAUNCH_CONFIG" \
    ${launch_args[@]+"${launch_args[@]}"} -m rlhf_ppo train --config "$PPO_CONFIG" "$@"
