#!/usr/bin/env bash
# On the lent two-GPU machine (no network), after the offline bundle's first part was installed
# (see shared/offline-gpu-bundle/README.md): finish the install, then run configs/gpu-2x.yaml with
# a random-weight model of Qwen2.5-0.5B's shape. Logs and metrics go to $OUT.
set -euo pipefail
bash .gpu-bundle/p2/install.sh --need-all
. /tmp/site/env.sh
# gymtrl's own pure-Python needs that the image and bundle lack (wheels carried in .gpu-extra/).
python3 -m pip install -q --no-deps --no-index --target /tmp/extra .gpu-extra/*.whl
export PYTHONPATH="$PWD/src:$PYTHONPATH:/tmp/extra"  # bundle versions win
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"
python3 "$GPU_BUNDLE_TOOLS/make_tiny_qwen.py" /tmp/model --shape 0.5b > "$OUT/model.log" 2>&1
# The bundle is a site dir, not a venv: give gymtrl the bin/ layout it expects.
mkdir -p /tmp/gym-venv/bin && ln -sf "$(command -v python3)" /tmp/gym-venv/bin/python
export GYMTRL_GYM_VENV=/tmp/gym-venv GYMTRL_VLLM_VENV=/tmp/site
CUDA_VISIBLE_DEVICES=0 python3 -m gymtrl.cli train --config configs/gpu-2x.yaml \
  model.name_or_path=/tmp/model "gym.launch.env.PYTHONPATH=$GYM_PYTHONPATH" \
  vllm.launch.extra_args='[--gpu-memory-utilization,"0.85",--max-num-seqs,"256"]' \
  output.dir="$OUT/run" "$@" > "$OUT/train.log" 2>&1 && status=0 || status=$?
rm -rf "$OUT/run/checkpoints" "$OUT/run/final" "$OUT/run/weight_sync"  # weights stay on the device
exit "$status"
