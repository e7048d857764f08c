#!/usr/bin/env bash
# The prefix-correction benchmark on the lent GPU machine (vLLM 0.26 from the offline bundle),
# in one device call after part 1 of the bundle was installed by the call before it:
#   run carry=[.gpu-bundle/p1]  command: bash .gpu-bundle/p1/install.sh
#   run carry=[.gpu-bundle/p2, .gpu-bundle/p3, .gpu-extra, .bench-data]
#       command: bash bench/device/device_prefix_correction.sh
# .bench-data/rows/<env>/example.jsonl: NeMo Gym's example rows of workplace_assistant and
# example_multi_step (the bundle's Gym layer ships without data). .gpu-extra/: wheels gymtrl needs
# that the image and bundle lack (omegaconf, typer, httpx, ...).
# Model: a random Qwen2.5-0.5B-shaped model (the bundle's make_tiny_qwen.py) taught the Hermes
# tool-call format on the GPU for a few hundred steps, so that its episodes have several turns.
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
inst=  # the last carried part's install.sh (any carried part can finish the install)
for f in .gpu-bundle/p*/install.sh; do if [ -e "$f" ]; then inst=$f; fi; done
bash "$inst" --need-all > "$out/install.log" 2>&1 || { tail -5 "$out/install.log"; exit 3; }
# /tmp/site/env.sh is written on the device by the bundle's install.sh: nothing to follow here.
# shellcheck source=/dev/null
. /tmp/site/env.sh
python3 -m pip install -q --no-deps --no-index --target /tmp/extra .gpu-extra/*.whl > /dev/null 2>&1
export PYTHONPATH="$PWD/src:$PYTHONPATH:/tmp/extra"   # the bundle's versions win over the extras
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt"

# The plugin into the bundle's site (what `gymtrl vllm-plugin install` does for a venv), and
# venv-shaped folders for gymtrl's launcher: the bundle is a site dir run by the image's python3.
wheel=$(python3 -c 'from pathlib import Path; from gymtrl.vllm_plugin.install import build_wheel; print(build_wheel(Path("/tmp")))')
python3 -m pip install -q --no-deps --no-index --target /tmp/site "$wheel" > /dev/null 2>&1
for v in vllm-venv gym-venv; do
  mkdir -p /tmp/$v/bin && printf '#!/bin/sh\nexec python3 "$@"\n' > /tmp/$v/bin/python && chmod +x /tmp/$v/bin/python
done
ln -sf /tmp/site/bin/vllm /tmp/vllm-venv/bin/vllm

t0=$(date +%s)
[ -d /tmp/model ] || python3 "$GPU_BUNDLE_TOOLS/make_tiny_qwen.py" /tmp/model --shape 0.5b > "$out/model.log" 2>&1
rows=.bench-data/rows
[ -f /tmp/taught/model.safetensors ] || python3 tests/teach_tool_calls.py /tmp/model /tmp/taught --device cuda \
  --rows $rows/example_multi_step/example.jsonl --rows $rows/workplace_assistant/example.jsonl \
  --steps "${TEACH_STEPS:-800}" --lr "${TEACH_LR:-5e-4}" --target-loss 0.02 > "$out/teach.log" 2>&1 || { tail -20 "$out/teach.log"; exit 4; }
echo "model + teaching: $(( $(date +%s) - t0 )) s"; grep '^step' "$out/teach.log" | tail -3

# TEMPLATE=reordered: serve a chat template that re-renders tool calls in another key order than
# the model writes them (tests/chat_templates.py), which makes every tool turn's history mismatch.
template_args=()
if [ "${TEMPLATE:-model}" = reordered ]; then
  python3 -c 'import sys; sys.path.insert(0, "tests"); from pathlib import Path; from chat_templates import write_reordered_template as w; w(Path("/tmp/taught"), Path("/tmp/reordered.jinja"))'
  template_args=(--vllm-arg=--chat-template --vllm-arg=/tmp/reordered.jinja
                 --template-label "tool calls re-rendered in another key order (tests/chat_templates.py)")
fi
python3 bench/prefix_correction.py --model /tmp/taught "${template_args[@]}" --vllm-venv /tmp/vllm-venv --gym-venv /tmp/gym-venv \
  --gym-env PYTHONPATH "$GYM_PYTHONPATH" --rows-dir $rows --episodes-per-row "${EPISODES_PER_ROW:-16}" \
  --dtype bfloat16 --device-label "$(head -1 "$out/gpu.txt")" --out "$out/prefix_correction.md" \
  --vllm-arg=--gpu-memory-utilization --vllm-arg=0.3 --vllm-arg=--enforce-eager 2>&1 | tail -40
status=${PIPESTATUS[0]}
for s in on off; do tail -c 20000 /tmp/gymtrl-bench-prefix/$s/logs/vllm.log > "$out/vllm-$s.log" 2>/dev/null; done
exit "$status"
