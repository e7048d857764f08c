#!/usr/bin/env bash
# On the lent two-GPU machine (no network), after the offline bundle's first part was installed
# (see shared/offline-gpu-bundle/README.md): finish the install, then run configs/gpu-2x.yaml with
# a random-weight model of Qwen2.5-0.5B's shape. Small logs and metrics are copied to $OUT.
#   bash scripts/device_gpu_2x.sh [SECONDS] [key=value ...]
# Status (2026-11-25): not yet run to completion. On 2x H200 the bundle installed and vLLM came up
# (NCCL weight-transfer flags on), then two runs passed their time limits with no logs returned;
# the second may have met the first one's still-running servers on ports 8000/11000. Next try:
# kill leftovers first, a short gym-only smoke, then the training run.
set -uo pipefail
limit=${1:-400}; shift || true
bash .gpu-bundle/p2/install.sh --need-all >/dev/null || exit 3
. /tmp/site/env.sh
# gymtrl's own pure-Python needs that the image and bundle lack (wheels carried in .gpu-extra/).
python3 -m pip install -q --upgrade --no-deps --no-index --target /tmp/extra .gpu-extra/*.whl 2>/dev/null
export PYTHONPATH="$PWD/src:$PYTHONPATH:/tmp/extra"  # bundle versions win
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
[ -d /tmp/model ] || python3 "$GPU_BUNDLE_TOOLS/make_tiny_qwen.py" /tmp/model --shape 0.5b > /tmp/model.log 2>&1
# The bundle is a site dir, not a venv: give gymtrl the bin/ layout it expects.
mkdir -p /tmp/gym-venv/bin && printf '#!/bin/sh\nexec python3 "$@"\n' > /tmp/gym-venv/bin/python
chmod +x /tmp/gym-venv/bin/python
export GYMTRL_GYM_VENV=/tmp/gym-venv GYMTRL_VLLM_VENV=/tmp/site
rm -rf /tmp/run
collect() {  # small files only: the device returns at most 8
  cp /tmp/run/metrics.jsonl "$OUT/" 2>/dev/null
  tail -c 60000 /tmp/train.log > "$OUT/train.log" 2>/dev/null
  tail -c 30000 /tmp/run/logs/vllm.log > "$OUT/vllm.log" 2>/dev/null
  tail -c 20000 /tmp/run/logs/gym.log > "$OUT/gym.log" 2>/dev/null
  for f in /tmp/run/logs/gym/*.log; do echo "== $f"; tail -c 4000 "$f"; done > "$OUT/gym-servers.log" 2>/dev/null
}
trap collect EXIT
CUDA_VISIBLE_DEVICES=0 timeout -s INT "$limit" python3 -m gymtrl.cli train --config configs/gpu-2x.yaml \
  model.name_or_path=/tmp/model "gym.launch.env.PYTHONPATH=$GYM_PYTHONPATH" \
  rollout.timeout_s=60 output.dir=/tmp/run "$@" > /tmp/train.log 2>&1
