#!/usr/bin/env bash
# The whole pipeline on your data: SFT -> reward model -> PPO -> evaluation report.
#
# Usage: [VAR=value ...] bash scripts/pipeline.sh [OUT_DIR] [key=value ...]
#   OUT_DIR (default runs/pipeline) gets sft/, reward/, ppo/ and eval/.
#   key=value overrides go to the PPO stage; prefix one with sft:, reward: or evaluate: to send
#   it to that stage instead, e.g. sft:train.epochs=5 evaluate:num_prompts=32 iterations=100.
# Inputs (the defaults: the tiny configs and example data in configs/, offline, a few minutes
# on a laptop CPU):
#   BASE_MODEL      model to fine-tune: hub id or folder (default: the SFT config's, builtin:tiny)
#                   builtin:tiny knows only 72 lowercase words (docs/data.md, "The built-in tiny
#                   vocabulary"): other words become <unk> (a warning says how many); for your
#                   own data set BASE_MODEL to a pretrained model
#   SFT_DATA        .jsonl with prompt, response          (configs/data/sft_tiny.jsonl)
#   PAIRS_DATA      .jsonl with prompt, chosen, rejected  (configs/data/pairs_tiny.jsonl)
#   PROMPTS         PPO and evaluation prompts: .jsonl with prompt, or builtin:tiny (builtin:tiny)
#   MAX_NEW_TOKENS  response length in PPO and evaluation (16)
#   SFT_CONFIG, REWARD_CONFIG, PPO_CONFIG: the stage configs (configs/{sft_tiny,reward_tiny,tiny}.yaml)
#   RLHF_PPO        the command (default rlhf-ppo; e.g. "python -m rlhf_ppo")
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-runs/pipeline}
[ $# -gt 0 ] && shift
SFT_CONFIG=${SFT_CONFIG:-$ROOT/configs/sft_tiny.yaml}
REWARD_CONFIG=${REWARD_CONFIG:-$ROOT/configs/reward_tiny.yaml}
PPO_CONFIG=${PPO_CONFIG:-$ROOT/configs/tiny.yaml}
SFT_DATA=${SFT_DATA:-$ROOT/configs/data/sft_tiny.jsonl}
PAIRS_DATA=${PAIRS_DATA:-$ROOT/configs/data/pairs_tiny.jsonl}
PROMPTS=${PROMPTS:-builtin:tiny}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-16}
read -r -a CLI <<< "${RLHF_PPO:-rlhf-ppo}"

# Split the overrides by stage (the stage prefix is looked for before the first "=").
sft_args=() reward_args=() ppo_args=() eval_args=()
for arg in "$@"; do
    case "${arg%%=*}" in
        sft:*) sft_args+=("${arg#sft:}") ;;
        reward:*) reward_args+=("${arg#reward:}") ;;
        evaluate:*) eval_args+=("${arg#evaluate:}") ;;
        *) ppo_args+=("${arg#train:}") ;;
    esac
done
SFT=$OUT/sft/final RM=$OUT/reward/final POLICY=$OUT/ppo/final

echo "== 1/4 SFT -> $SFT"
"${CLI[@]}" sft --config "$SFT_CONFIG" output_dir="$OUT/sft" overwrite=true \
    data.path="$SFT_DATA" ${BASE_MODEL:+model.name_or_path="$BASE_MODEL"} ${sft_args[@]+"${sft_args[@]}"}

echo "== 2/4 reward model, started from the SFT model -> $RM"
"${CLI[@]}" reward --config "$REWARD_CONFIG" output_dir="$OUT/reward" overwrite=true \
    model.name_or_path="$SFT" data.path="$PAIRS_DATA" ${reward_args[@]+"${reward_args[@]}"}

# The SFT model is the policy's start and the reference (a frozen copy); the reward model is the
# reward source. The critic is the PPO config's (tiny.yaml: a value head on the policy); to start
# a separate critic from the reward model, add model.critic=separate model.critic_init=reward.
echo "== 3/4 PPO -> $POLICY"
"${CLI[@]}" train --config "$PPO_CONFIG" output_dir="$OUT/ppo" overwrite=true \
    model.name_or_path="$SFT" "reward.sources=[{model: '$RM'}]" \
    data.path="$PROMPTS" generation.max_new_tokens="$MAX_NEW_TOKENS" ${ppo_args[@]+"${ppo_args[@]}"}

echo "== 4/4 evaluate the PPO policy against the SFT model -> $OUT/eval"
"${CLI[@]}" evaluate output_dir="$OUT/eval" policy="$POLICY" reference="$SFT" \
    "reward.sources=[{model: '$RM'}]" data.path="$PROMPTS" \
    generation.max_new_tokens="$MAX_NEW_TOKENS" ${eval_args[@]+"${eval_args[@]}"}

echo "done: $OUT/eval/report.html (summary.json, samples.jsonl); policy $POLICY"
