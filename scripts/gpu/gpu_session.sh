#!/usr/bin/env bash
# Every GPU check in one device call (a lent GPU's time is short): the benchmark against TRL
# (scripts/gpu/gpu_bench.sh, step 3), the engines with the native loop (scripts/gpu/gpu_check.sh:
# ZeRO-3 and FSDP2, one process), then, while time is left (DEADLINE seconds from the start),
# rlhf_ppo again with generation.backend=transformers. Wheels in .whl/ as for gpu_bench.sh, plus
# deepspeed's (deepspeed hjson pydantic pydantic_core annotated_types typing_inspection).
# Usage, from the repository root of a GPU machine:
#   [DEADLINE=570] [SCRATCH=DIR] bash scripts/gpu/gpu_session.sh
set -uo pipefail
T0=$(date +%s)
export SCRATCH=${SCRATCH:-${TMPDIR:-/tmp}}  # scratch folder, shared with gpu_bench.sh
DEADLINE=${DEADLINE:-570}
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
export PYTHONUNBUFFERED=1
STEP4=none timeout $(( $(left) - 150 )) bash scripts/gpu/gpu_bench.sh
echo "== bench done at $(( $(date +%s) - T0 )) s"
ds=()
for name in deepspeed hjson pydantic pydantic_core annotated_types typing_inspection; do
    for f in .whl/"$name"-[0-9]*.whl; do [ -e "$f" ] && ds+=("$f"); done
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SCRATCH/site_ds" \
    "${ds[@]}" || echo "deepspeed wheels: install failed"
PYTHONPATH=$SCRATCH/site_ds:$SCRATCH/site:$PWD HF_HUB_OFFLINE=1 ONLY="deepspeed_zero3 fsdp" \
    timeout $(( $(left) - 10 )) bash scripts/gpu/gpu_check.sh "$SCRATCH/gpu_check"
echo "== engines done at $(( $(date +%s) - T0 )) s"
if [ "$(left)" -gt 100 ]; then
    COMPARE=0 STEP4=backend timeout $(( $(left) - 5 )) bash scripts/gpu/gpu_bench.sh
else
    echo "skipped the transformers-backend run: $(left) s left"
fi
echo "== total $(( $(date +%s) - T0 )) s"
