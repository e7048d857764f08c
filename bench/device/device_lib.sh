# Shared by the device scripts (bench/device/device_train.sh, device_bench.sh, device_real.sh), sourced from the
# repository root on the lent GPU machine. The caller defines note().
# shellcheck shell=bash

first_file() { local f; for f in "$@"; do if [ -e "$f" ]; then echo "$f"; return 0; fi; done; return 1; }

unpack_extra() {  # gymtrl's pure-Python extra wheels (.gpu-extra) into /tmp/extra: a wheel is a zip, no pip needed
  [ -d /tmp/extra ] && return 0
  ls .gpu-extra/*.whl > /dev/null 2>&1 || { note "no /tmp/extra and no .gpu-extra carried"; return 1; }
  local wheels=(.gpu-extra/*.whl)
  python3 -c 'import glob, zipfile; [zipfile.ZipFile(w).extractall("/tmp/extra.tmp") for w in glob.glob(".gpu-extra/*.whl")]' \
    && mv /tmp/extra.tmp /tmp/extra && note "unpacked ${#wheels[@]} wheels into /tmp/extra"
}

make_model() {  # SHAPE (0.5b|1.5b): a random-weight model of Qwen2.5's shape in /tmp/model-SHAPE (no hub)
  local dir=/tmp/model-$1 t0=$SECONDS
  [ -f "$dir/config.json" ] && return 0
  local tool; tool=$(first_file .gpu-bundle/p*/make_tiny_qwen.py /tmp/site/gpu-bundle-tools/make_tiny_qwen.py)
  if ! { python3 "$tool" "$dir.tmp" --shape "$1" --seed 0 > "/tmp/model-$1.log" 2>&1 && mv "$dir.tmp" "$dir"; }; then
    note "make_tiny_qwen $1 failed:"; tail -5 "/tmp/model-$1.log"; return 1
  fi
  note "model $dir built in $((SECONDS - t0)) s"
}

trl_template() {  # DIR: TRL's Qwen2.5 chat template on a model that make_model built before TRL was installed
  # (prep runs before the bundle's second part lands, so make_tiny_qwen.py fell back to a minimal template
  # that drops the tools and renders tool calls as plain text: a tool environment's prompts were 30x short)
  local dir=$1
  [ -f "$dir/config.json" ] || return 0
  [ -f "$dir/.trl-template" ] && return 0
  python3 - "$dir" <<'PY' || { note "TRL's chat template could not be set on $dir"; return 1; }
import sys
from pathlib import Path

import trl
from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained(sys.argv[1])
tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
tok.save_pretrained(sys.argv[1])
PY
  touch "$dir/.trl-template" && note "$dir: TRL's Qwen2.5 chat template set"
}

launcher_dirs() {  # venv-shaped folders for gymtrl's launcher, and the prefix-correction plugin in the bundle
  # The bundle is a site dir run by the image's python3: give gymtrl's launcher venv-shaped folders,
  # and put the prefix-correction plugin where vLLM (PYTHONPATH=/tmp/site) finds its entry point
  # (what `gymtrl vllm-plugin install` does in a real venv; gymtrl then finds it current).
  for v in vllm-venv gym-venv; do
    mkdir -p /tmp/$v/bin && printf '#!/bin/sh\nexec python3 "$@"\n' > /tmp/$v/bin/python && chmod +x /tmp/$v/bin/python
  done
  ln -sf /tmp/site/bin/vllm /tmp/vllm-venv/bin/vllm
  rm -rf /tmp/site/gymtrl_vllm_plugin /tmp/site/gymtrl_vllm_plugin-*.dist-info
  python3 -c 'import zipfile, tempfile; from pathlib import Path; from gymtrl.vllm_plugin.install import build_wheel; zipfile.ZipFile(build_wheel(Path(tempfile.mkdtemp()))).extractall("/tmp/site")' \
    || note "plugin unpack failed"
  export GYMTRL_GYM_VENV=/tmp/gym-venv GYMTRL_VLLM_VENV=/tmp/vllm-venv
}

# kill_leftovers: leftovers of an earlier call on this warm machine: GPU processes, the servers gymtrl launches,
# anything listening on 8000/11000. (Everything on this lent machine is ours.)
port_busy() { ! python3 -c "import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', $1))" 2>/dev/null; }
kill_leftovers() {
  local pids p
  pids="$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null)
$(pgrep -f '/tmp/(site|vllm-venv)/bin/vllm|gym_launcher\.py|VLLM::|gymtrl_device_main|gymtrl\.cli train|python3? app\.py')"
  for p in $(echo "$pids" | sort -u); do
    [ "$p" = $$ ] || [ "$p" = "$PPID" ] && continue
    ps -o pid=,args= -p "$p" 2>/dev/null | cut -c1-150 | sed 's/^/  killing leftover: /' >> "$OUT/gpus.txt"
    kill -9 "$p" 2>/dev/null
  done
  for _ in $(seq 30); do port_busy 8000 || port_busy 11000 || break; sleep 1; done
}
