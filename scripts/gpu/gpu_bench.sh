#!/usr/bin/env bash
# GPU benchmark: rlhf_ppo vs TRL 1.12's PPO on a ~0.5B random-init Llama (Qwen2.5-0.5B's shape,
# vocab 151936), batch 64, 2 minibatches, 1 epoch, prompt 64, response 256, bf16 weights.
#
# Usage, from the repository root of a GPU machine (torch with CUDA, accelerate installed):
#   [OUT=DIR] [SCRATCH=DIR] [WHEELS=.whl] [TRL_PYTHON=python3] bash scripts/gpu/gpu_bench.sh
# Wheels found in $WHEELS (trl, datasets, dill, multiprocess, transformers, tokenizers, regex,
# peft; for a machine without network access) are installed into $SCRATCH/site first; TRL runs
# with $TRL_PYTHON (default: $RLHF_PPO_TRL_PYTHON, else python3 with those wheels).
# Budget: about 6 minutes (preflight 0.5, models 1, comparison ~3.5, static-cache runs only if
# time is left). Everything it prints also goes to $OUT (default $SCRATCH/gpu_bench_out).
set -uo pipefail
T0=$(date +%s)
SCRATCH=${SCRATCH:-${TMPDIR:-/tmp}}  # installed wheels, models and cache: a scratch folder
OUT=${OUT:-$SCRATCH/gpu_bench_out}
mkdir -p "$OUT"
elapsed() { echo $(( $(date +%s) - T0 )); }

# A CPU dry run of this script (no wheels, tiny model): WHEELS=none SIZE=tiny INIT_DEVICE=cpu \
#   SHAPE="--batch 8 --iters 2 --threads 2 --bare-repeats 1 --rounds 1" bash scripts/gpu/gpu_bench.sh
SIZE=${SIZE:-gpu-0.5b}
INIT_DEVICE=${INIT_DEVICE:-cuda}
# Only the wheels this benchmark needs are installed from .whl/, whatever else it holds (a
# deepspeed wheel there would make accelerate import deepspeed on every unwrap_model).
WHEELS=${WHEELS:-.whl}
NEEDED="trl datasets dill multiprocess transformers tokenizers regex peft"
files=()
for name in $NEEDED; do
    for f in "$WHEELS"/"$name"-[0-9]*.whl; do [ -e "$f" ] && files+=("$f"); done
done
if [ ${#files[@]} -gt 0 ]; then
    echo "installing: ${files[*]}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SCRATCH/site" "${files[@]}" || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH=$SCRATCH/site:$PWD HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 \
    PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RLHF_PPO_CACHE=${RLHF_PPO_CACHE:-$SCRATCH/rlhf_ppo_cache}

# 1. preflight (fails in seconds, not minutes): versions, the GPU, datasets' JSON path, TRL's PPO
{ nvidia-smi --query-gpu=name,memory.total --format=csv || echo "no nvidia-smi"; } | tee "$OUT/versions.txt"
python3 - <<'EOF' 2>&1 | tee -a "$OUT/versions.txt" || { echo "preflight failed (above): if \
'import datasets' broke on pyarrow, carry pyarrow==26.0.1 instead of transformers"; exit 1; }
import importlib, json, tempfile, os
mods = ["torch", "transformers", "accelerate", "datasets", "pyarrow", "fsspec", "trl", "peft",
        "tokenizers", "regex", "safetensors"]
print({m: getattr(importlib.import_module(m), "__version__", "?") for m in mods})
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
import datasets
path = os.path.join(tempfile.mkdtemp(), "p.jsonl")
open(path, "w").write(json.dumps({"prompt": "w1 w2"}) + "\n")
assert len(datasets.load_dataset("json", data_files={"train": path}, split="train")) == 1
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: F401
import rlhf_ppo.trainer  # noqa: F401
print("preflight ok")
EOF
echo "preflight done at $(elapsed) s"

# 2. the random-init 0.5B policy and reward model (bf16, built here: nothing is carried)
M="$SCRATCH/bench_models/$SIZE"
[ -f "$M/bench.json" ] || python3 scripts/bench/make_bench_models.py --out "$SCRATCH/bench_models" --sizes "$SIZE" \
    --dtype bfloat16 --device "$INIT_DEVICE" 2>&1 | grep -v "Writing\|Loading" | tee "$OUT/models.txt" || exit 1
echo "models done at $(elapsed) s"

TRL_PYTHON=${TRL_PYTHON:-${RLHF_PPO_TRL_PYTHON:-python3}}
read -r -a SHAPE <<< "--batch 64 --mini-batches 2 --epochs 1 --prompt-len 64 --response-len 256 \
--iters 3 --dtype bfloat16 --threads 8 --bare-repeats 1 --rounds 1 ${SHAPE:-}"  # later flags win

# 3. eager generation (transformers' default dynamic cache): rlhf_ppo shared, separate, then TRL
# (COMPARE=0 skips it: step 4 alone, its runs appended to an earlier call's runs.jsonl)
if [ "${COMPARE:-1}" = 1 ]; then
    timeout 300 python3 scripts/bench/benchmark.py --policy "$M/policy" --reward "$M/reward" "${SHAPE[@]}" \
        --critics ${CRITICS:-shared separate} --compare-trl "$TRL_PYTHON" > "$OUT/compare.txt" \
        2> "$OUT/compare_stderr.log"
    echo "comparison done at $(elapsed) s"
    grep '^|' "$OUT/compare.txt"
    grep -h '"variant"' "$OUT/compare_stderr.log" > "$OUT/runs.jsonl" || true
    grep -h '"error"' "$OUT/compare_stderr.log" | cut -c1-1500
fi

# 4. if time is left (STEP4=static|backend|none): static KV cache, so transformers compiles the
# decoding step (both sides); or rlhf_ppo's shared run again with generation.backend=transformers
# (model.generate), against the native loop of step 3
STEP4=${STEP4:-static}
if [ "$STEP4" != none ] && [ "$(elapsed)" -lt 300 ]; then
    if [ "$STEP4" = static ]; then extra=(--static-cache --compare-trl "$TRL_PYTHON"); else
        extra=(--backend transformers); fi
    timeout $(( 440 - $(elapsed) )) python3 scripts/bench/benchmark.py --policy "$M/policy" --reward "$M/reward" \
        "${SHAPE[@]}" --critics shared "${extra[@]}" > "$OUT/$STEP4.txt" 2> "$OUT/${STEP4}_stderr.log"
    grep '^|' "$OUT/$STEP4.txt"
    grep -h '"variant"' "$OUT/${STEP4}_stderr.log" >> "$OUT/runs.jsonl" || true
    # a single run (no TRL) prints its JSON line on stdout, without a variant name
    grep -h '^{' "$OUT/$STEP4.txt" | sed 's/^{/{"variant": "rlhf_ppo\/shared", /' >> "$OUT/runs.jsonl"
    grep -h '"error"' "$OUT/${STEP4}_stderr.log" | cut -c1-1500
else
    echo "skipped step 4 ($STEP4): $(elapsed) s used"
fi

# 5. the GPU figures per run: generation against the bandwidth bound, the update's MFU, memory
python3 - "$OUT/runs.jsonl" <<'EOF'
import json, sys
keys = ("s_per_iter", "rollout", "gen_tokens_per_s", "gen_bw_bound_tokens_per_s", "gen_bw_fraction",
        "ref_and_reward", "update", "update_tflops", "update_mfu", "peak_gpu_mb", "peak_rss_mb",
        "ppo_over_bare")
for line in open(sys.argv[1]):
    r = json.loads(line)
    name = r["variant"] + (" static" if r.get("static_cache") else "") + " " + r.get("backend", "")
    print(name, r.get("device", ""), {k: r[k] for k in keys if k in r}, r.get("bare", ""))
EOF
echo "total $(elapsed) s"
