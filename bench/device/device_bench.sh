#!/usr/bin/env bash
# Issue 6's GPU benchmarks on the lent two-GPU machine (kind nvidia-h100-x2; no network), modelled on
# bench/device/device_train.sh. Device calls, back to back (/tmp lives only while the machine stays warm,
# 30 s after a call):
#   run kind=nvidia-h100-x2 carry=[.gpu-bundle/p1, .gpu-bundle/p3, .gpu-extra, .bench-data]
#       command: bash bench/device/device_bench.sh prep
#   run carry=[.gpu-bundle/p2, .bench-data] timeout_s=600  command: bash bench/device/device_bench.sh run 560 gen05,gen15,collect
#   (or, after its own prep on a fresh machine)       command: bash bench/device/device_bench.sh run 490 pairs,stop
# bench-data (here, once, after `source scripts/env.sh`): builds .bench-data from the CPU NeMo Gym venv.
# gpu-extra (here, once, after `source scripts/env.sh`): builds .gpu-extra, the wheels of gymtrl's needs that
#       neither the image nor the bundle has (omegaconf and antlr4-python3-runtime).
# prep: stashes the bundle parts, unpacks gymtrl's extra wheels (.gpu-extra) to /tmp/extra, copies
#       .bench-data (NeMo Gym's legacy_agent relay and devtools for ng_collect_rollouts, which the
#       bundle's pruned Gym lacks) to /tmp/bench-data, builds random-weight models of Qwen2.5-0.5B's and
#       1.5B's shapes in /tmp/model-0.5b and /tmp/model-1.5b (make_tiny_qwen.py, no hub).
# run BUDGET STAGES: finishes the install, starts the servers a stage needs if they are not up
#       (bench/gpu_servers.py under setsid, so they stay up for the next call, as `gymtrl train`
#       launches them), then runs the stages in order while BUDGET seconds last:
#   gen05    bench/gpu_generation.py --parts gen, 256 x 256, 0.5B on GPU 1 (:8000/:11000) -> $OUT/generation.md
#   gen05-64 the same servers and paths at 64 x 128 (the step comparison's shape) -> $OUT/generation-64x128.md
#   gen15    the same on a 1.5B server on GPU 0 (:8001/:11001), then stops it        -> $OUT/generation.md
#   collect  bench/collector_relay.py + bench/gpu_generation.py --parts collect (gymtrl vs ng_collect_rollouts) on
#            servers of its own with the defaults (:8002/:11002, GPU 1), stopped after     -> $OUT/collect.md
#   GEN_PARTS=gen,inflight (gen05): also the gymtrl path with at most C rollouts in flight (--inflight, GEN_INFLIGHT);
#            GEN_TIMEOUT=S: gen05's limit (default 150 s)
#   GEN_OVERRIDES="key=value ..." (gen05, gen15): settings of those servers, e.g.
#            'vllm.launch.extra_args=[--gpu-memory-utilization,"0.85",--api-server-count,"2"]' gym.launch.copies=4
#   pairs    gymtrl train vs TRL GRPOTrainer (bench/gpu_step_vs_trl.py) at 64x128, collect, then 256x128:
#            every trainer run on a fresh vLLM of its own (a second trainer's NCCL init on a vLLM 0.26
#            server that had served one hung; six vLLMs started at once on one GPU failed their KV-cache
#            check), gymtrl's vLLM on GPU 1 with its trainer on GPU 0, TRL's the other way round, each
#            vLLM at 0.5 of its GPU -> $OUT/step.md, collect.md, scaling.md
#   pairs-api2  the same pairs with configs/gpu-1x.yaml's generation settings on both sides (vLLM
#            --api-server-count 2; gymtrl's Gym 4 copies), no collect -> $OUT/step-api2.md, scaling-api2.md
#   pair64-api2, pair64-api2-tokenize  pairs-api2's 64 x 128 pair only; -tokenize with gym.launch.prompt_ids=tokenize
#            on gymtrl's side (NeMo Gym's default: a /tokenize per model call) -> $OUT/step-api2.md, step-api2-tokenize.md
#   one-gpu-apiN[-copiesC]  one GPU: the gen05 measurement on GPU 0 with vLLM --api-server-count N and
#            gym.launch.copies C (servers started, measured, stopped; one variant after another) -> $OUT/generation.md
#   turns    bench/turns_scaling.py --vllm: the rollout phase vs turns per rollout (TURNS, default "1 2 3"; TURNS_ROLLOUTS
#            rollouts, default 128) on workplace_assistant with real generation, vLLM on GPU 0 at 0.3 of it (:8012)
#            -> $OUT/turns.md
#   step-turns  gymtrl's full GRPO step vs turns per rollout (bench/gpu_step_vs_trl.py turns): workplace_assistant, every
#            model call held to one tool call, STEP_TURNS_TOOLS of the 27 tool schemas (default 1: the prompts stay short
#            enough to train 64 at a step), STEP_TURNS_POINT (default 64x128); one fresh vLLM + Gym per T on GPU 1
#            (:8021../:11021.., 0.25 of it each, started one after another from the start of the call), the trainer
#            on GPU 0 -> $OUT/step-turns.md
#   stop     stops every server this script started
# One-GPU stages (kind nvidia-h200; with .bench-src carried they run that snapshot's src/ and bench/):
#   stamp    bench/weight_sync_one_gpu.py --stamp: the exact weight check's cost on ipc pushes (0.5B, 1.5B;
#            STAMP_REPEATS rounds, default 7) and the lr 1e-6 premise -> $OUT/sync_stamp.md, sync_stamp.json
#   iscorr   gymtrl's step (bench/gpu_step_vs_trl.py run, 64 x 128, IS_STEPS steps, default 10, 2 warm-up) with
#            grpo.vllm_importance_sampling_correction true then false (IS_ORDER), the same servers (:8030/:11030,
#            vLLM at 0.3 of GPU 0, --api-server-count 2, Gym 4 copies, ipc) -> $OUT/iscorr-*.json, iscorr-*-metrics.jsonl
#   gen1     bench/gpu_generation.py --parts gen on those servers (GEN_ROUNDS, default 5; GEN_SHAPE, default
#            256x256), then they stop and bench/gpu_generation_offline.py runs vLLM's offline engine on the same
#            prompts -> $OUT/generation.md, generation.json, generation-offline.json
# snapshot (here): git archive HEAD src bench configs into .bench-src (ignored), carried with the run calls.
# STEP_OVERRIDES="key=value ..." (pairs, pairs-api2): gymtrl-side settings for its servers and trainer, e.g.
#            sync.strategy=broadcast (bench-gpu.yaml names TRL's nccl, so both sides sync alike by default);
#            RUN_TIMEOUT_256=S: the 256 x 128 runs' limit (default 100 s).
# $OUT always gets device.log (this script's notes and every stage's output), the stage files above
# and logs.tgz (server logs, each trainer run's log, the collector's logs), at most 8 files.
set -uo pipefail
mode=${1:-run}; shift || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG=$OUT/device.log
note() { echo "[device_bench $(date +%T) +${SECONDS}s] $*" | tee -a "$LOG"; }
# shellcheck source=bench/device/device_lib.sh
. bench/device/device_lib.sh

if [ "$mode" = bench-data ]; then  # here, not on the device: what the bundle's pruned NeMo Gym lacks for ng_collect_rollouts
  site=${GYMTRL_GYM_SITE:?source scripts/env.sh first}
  rm -rf .bench-data/gym-extra .bench-data/legacy_agent .bench-data/rows && mkdir -p .bench-data/gym-extra .bench-data/rows/workplace_assistant
  cp -r "$site"/environment_servers/legacy_agent .bench-data/legacy_agent && rm -rf .bench-data/legacy_agent/tests
  cp "$site"/resources_servers/workplace_assistant/data/example.jsonl .bench-data/rows/workplace_assistant/  # the pruned Gym has no data
  for d in devtools asttokens executing; do cp -r "$site"/$d "$site"/$d-*.dist-info .bench-data/gym-extra/; done
  find .bench-data -name __pycache__ -prune -exec rm -rf {} +
  grep -qx '/.bench-data/' .git/info/exclude || echo '/.bench-data/' >> .git/info/exclude
  du -sh .bench-data; exit 0
fi

if [ "$mode" = snapshot ]; then  # here: the committed src/, bench/ and configs/ that the one-GPU stages run
  rm -rf .bench-src && mkdir -p .bench-src && git archive HEAD src bench configs | tar x -C .bench-src || exit 1
  git rev-parse HEAD > .bench-src/COMMIT
  grep -qx '/.bench-src/' .git/info/exclude || echo '/.bench-src/' >> .git/info/exclude
  du -sh .bench-src; cat .bench-src/COMMIT; exit 0
fi

if [ "$mode" = gpu-extra ]; then  # here: gymtrl's own pure-Python needs that the image and the bundle lack
  # (the image has typer, click, rich, pyyaml, httpx, tqdm; the bundle has trl, datasets, pydantic): omegaconf
  # and its parser runtime, whose 4.9.3 release is an sdist only, so it is built into a wheel here.
  py=${GYMTRL_TRAINER_VENV:?source scripts/env.sh first}/bin/python
  rm -rf .gpu-extra && mkdir -p .gpu-extra
  "$py" -m pip download -q --no-deps --only-binary=:all: --dest .gpu-extra 'omegaconf==2.3.0' || exit 1
  "$py" -m pip wheel -q --no-deps --wheel-dir .gpu-extra 'antlr4-python3-runtime==4.9.3' || exit 1
  grep -qx '/.gpu-extra/' .git/info/exclude || echo '/.gpu-extra/' >> .git/info/exclude
  ls .gpu-extra; exit 0
fi

if [ "$mode" = prep ]; then
  inst=$(first_file .gpu-bundle/p*/install.sh)
  bash "$inst" 2>&1 | tail -3
  unpack_extra
  [ -d .bench-data ] && rm -rf /tmp/bench-data && cp -r .bench-data /tmp/bench-data && note "copied .bench-data to /tmp/bench-data"
  t0=$SECONDS
  make_model 0.5b & p1=$!
  make_model 1.5b & p2=$!
  wait $p1; wait $p2
  models=""; for m in /tmp/model-*; do [ -e "$m" ] && models+="$m "; done
  note "models: $models in $((SECONDS - t0)) s"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
  exit 0
fi

# ---- run BUDGET STAGES ---------------------------------------------------------------------------
budget=${1:-560}; stages=${2:-gen05,gen15,step,collect}
left() { echo $((budget - SECONDS)); }
inst=$(first_file .gpu-bundle/p*/install.sh)
if [ -n "$inst" ]; then
  bash "$inst" --need-all > /tmp/install.log 2>&1 || { note "install incomplete (machine went cold?)"; tail -5 /tmp/install.log | tee -a "$LOG"; exit 3; }
elif [ ! -f /tmp/site/env.sh ]; then
  note "COLD: bundle not installed and no part carried (the machine went cold?)"; exit 3
fi
# /tmp/site/env.sh is written on the device by the bundle's install.sh: nothing to follow here.
# shellcheck source=/dev/null
. /tmp/site/env.sh
unpack_extra || exit 3
make_model 0.5b || exit 4
for m in /tmp/model-0.5b /tmp/model-1.5b; do trl_template "$m" || exit 4; done
# gymtrl: the src/ that travelled with this call (the device's git metadata may be older than the tree that
# was sent: it named the landed commit while the tree held later local commits), with a digest of it so a
# result can be matched to its code. GYMTRL_BENCH_SRC=head: src/ of the device's git HEAD instead.
if [ "${GYMTRL_BENCH_SRC:-}" = head ]; then
  rm -rf /tmp/gymtrl-head && mkdir -p /tmp/gymtrl-head && git archive HEAD src | tar x -C /tmp/gymtrl-head || exit 3
  export GYMTRL_BENCH_SRC=/tmp/gymtrl-head/src
fi
# .bench-src (a `git archive HEAD src bench configs` made here and carried): run that committed snapshot's
# src/ and bench/ scripts, whatever else the working tree that travelled holds (the one-GPU stages below).
BENCH=bench
if [ -d .bench-src/src ]; then
  export GYMTRL_BENCH_SRC=$PWD/.bench-src/src; BENCH=.bench-src/bench; note "snapshot .bench-src: commit $(cat .bench-src/COMMIT)"
fi
export GYMTRL_BENCH_SRC=${GYMTRL_BENCH_SRC:-$PWD/src}
note "gymtrl: $GYMTRL_BENCH_SRC, digest $(cd "$GYMTRL_BENCH_SRC" && find . -name '*.py' | sort | xargs cat | sha1sum | cut -c1-12) (device's git: $(git log -1 --format='%h' 2>/dev/null), $(git status --short src 2>/dev/null | wc -l) changed files under src/)"
export PYTHONPATH="$GYMTRL_BENCH_SRC:$PYTHONPATH:/tmp/extra"  # the bundle's versions win over the extras
for v in vllm-venv gym-venv; do
  mkdir -p /tmp/$v/bin && printf '#!/bin/sh\nexec python3 "$@"\n' > /tmp/$v/bin/python && chmod +x /tmp/$v/bin/python
done
ln -sf /tmp/site/bin/vllm /tmp/vllm-venv/bin/vllm
if [ ! -d /tmp/site/gymtrl_vllm_plugin ]; then  # what `gymtrl vllm-plugin install` does in a real venv
  python3 -c 'import sys, zipfile, tempfile; from pathlib import Path; from gymtrl.vllm_plugin.install import build_wheel
zipfile.ZipFile(build_wheel(Path(tempfile.mkdtemp()))).extractall("/tmp/site")' || note "plugin unpack failed"
fi
export GYMTRL_GYM_VENV=/tmp/gym-venv GYMTRL_VLLM_VENV=/tmp/vllm-venv PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  nvidia-smi topo -m 2>/dev/null | head -4
  python3 -c 'import importlib.metadata as m; print("versions:", ", ".join(f"{d} {m.version(d)}" for d in ("vllm", "trl", "transformers", "torch", "accelerate", "datasets", "httpx", "gymtrl-vllm-plugin")))'
  PYTHONPATH=$GYM_PYTHONPATH python3 -c 'import importlib.metadata as m; print("nemo-gym", m.version("nemo-gym"))' 2>&1 | tail -1
  git log -1 --format='gymtrl commit %h %cd' 2>/dev/null; echo "working tree: $(git status --short 2>/dev/null | wc -l) changed files"
  echo "cpus: $(nproc)"
} >> "$LOG" 2>&1

# servers: TAG MODEL GPU VLLM_PORT HEAD_PORT
start_servers() {  # TAG MODEL GPU VLLM_PORT HEAD_PORT [key=value ...]
  local tag=$1 model=$2 gpu=$3 vport=$4 hport=$5; shift 5
  if [ -f "/tmp/srv-$tag.json" ] && curl -sf "http://127.0.0.1:$vport/health" > /dev/null && curl -sf "http://127.0.0.1:$hport/readyz" > /dev/null; then
    note "servers $tag already up (kept from an earlier call)"; return 0
  fi
  if kill -0 "$(cat "/tmp/srv-$tag.pid" 2>/dev/null)" 2>/dev/null; then
    note "servers $tag already started (their holder is running)"; return 0
  fi
  [ -f "$model/config.json" ] || { note "no model in $model"; return 1; }
  rm -f "/tmp/srv-$tag.json"
  note "starting servers $tag: $model on GPU $gpu, vLLM :$vport, Gym head :$hport"
  setsid python3 "$BENCH/gpu_servers.py" --config configs/bench-gpu.yaml --ready-file "/tmp/srv-$tag.json" \
    "model.name_or_path=$model" "vllm.base_url=http://127.0.0.1:$vport" "gym.head_server_url=http://127.0.0.1:$hport" \
    "vllm.launch.env.CUDA_VISIBLE_DEVICES=\"$gpu\"" "gym.launch.env.PYTHONPATH=$GYM_PYTHONPATH" "output.dir=/tmp/srv-$tag" "$@" \
    > "/tmp/srv-$tag.log" 2>&1 < /dev/null &
  echo $! > "/tmp/srv-$tag.pid"
}
wait_servers() {  # TAG LIMIT
  local tag=$1 limit=$2 t0=$SECONDS
  while [ ! -f "/tmp/srv-$tag.json" ]; do
    if ! kill -0 "$(cat "/tmp/srv-$tag.pid" 2>/dev/null)" 2>/dev/null; then note "servers $tag died:"; tail -20 "/tmp/srv-$tag.log" | tee -a "$LOG"; return 1; fi
    [ $((SECONDS - t0)) -gt "$limit" ] && { note "servers $tag not up after $limit s"; tail -5 "/tmp/srv-$tag.log" | tee -a "$LOG"; return 1; }
    sleep 2
  done
  note "servers $tag ready: $(tr -d '\n ' < "/tmp/srv-$tag.json" | cut -c1-300)"
}
stop_servers() {
  local tag=$1 pid
  pid=$(cat "/tmp/srv-$tag.pid" 2>/dev/null) || return 0
  kill -TERM -- "-$pid" 2>/dev/null; for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$pid" 2>/dev/null; rm -f "/tmp/srv-$tag.json" "/tmp/srv-$tag.pid"
  note "stopped servers $tag"
}
start_relay() {  # HEAD_PORT: NeMo Gym's ng_collect_rollouts relay (bench/collector_relay.py) on :11100, in front of that head
  PYTHONPATH=/tmp/bench-data/gym-extra:$GYM_PYTHONPATH setsid python3 bench/collector_relay.py --head "http://127.0.0.1:$1" \
    --port 11100 --legacy-dir /tmp/bench-data/legacy_agent > /tmp/relay.out 2>&1 < /dev/null &
  echo $! > /tmp/relay.pid
  for _ in $(seq 60); do grep -q "RELAY READY" /tmp/relay.out 2>/dev/null && break; kill -0 "$(cat /tmp/relay.pid)" 2>/dev/null || break; sleep 1; done
  note "relay: $(tail -2 /tmp/relay.out | tr '\n' ' ' | cut -c1-300)"
}
stop_relay() { [ -f /tmp/relay.pid ] && kill -TERM -- "-$(cat /tmp/relay.pid)" 2>/dev/null; rm -f /tmp/relay.pid; }

collect_logs() {
  rm -rf /tmp/pack && mkdir -p /tmp/pack
  for tag in 05b 15b c05 tw i1 stamp u1 u2 u3 u4 g0 g1 g2 g3 t0 t1 A B C D E F G H I J; do
    [ -d /tmp/srv-$tag/logs ] || continue
    mkdir -p /tmp/pack/srv-$tag
    { head -c 12000 /tmp/srv-$tag/logs/vllm.log; echo; echo "[... middle cut ...]"; tail -c 12000 /tmp/srv-$tag/logs/vllm.log; } > /tmp/pack/srv-$tag/vllm.log 2>/dev/null
    tail -c 8000 /tmp/srv-$tag/logs/gym.log > /tmp/pack/srv-$tag/gym.log 2>/dev/null
    for f in "/tmp/srv-$tag"/logs/gym/*.log; do echo "== $f"; tail -c 3000 "$f"; done > /tmp/pack/srv-$tag/gym-servers.log 2>/dev/null
    tail -c 4000 /tmp/srv-$tag.log > /tmp/pack/srv-$tag/holder.log 2>/dev/null
  done
  for f in /tmp/bench-step/*.log /tmp/bench-step/*.json; do [ -f "$f" ] && tail -c 30000 "$f" > "/tmp/pack/step-$(basename "$f")"; done
  for f in /tmp/gymtrl-collect-*/collect*.log /tmp/gymtrl-collect-*/warm.log /tmp/collector_relay.log /tmp/relay.out; do
    [ -f "$f" ] && tail -c 8000 "$f" > "/tmp/pack/collect-$(basename "$(dirname "$f")")-$(basename "$f")"
  done
  cp /tmp/gen*.json /tmp/pack/ 2>/dev/null
  tar czf "$OUT/logs.tgz" -C /tmp/pack . 2>/dev/null
}
finish() {
  collect_logs
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader >> "$LOG" 2>&1
  note "done; GPU processes now: $(nvidia-smi --query-compute-apps=pid --format=csv,noheader | wc -l)"
}
trap finish EXIT

read -ra STEP_SO <<< "${STEP_OVERRIDES:-}"  # gymtrl-side key=value settings, as an array
read -ra GEN_SO <<< "${GEN_OVERRIDES:-}"  # settings of the gen05/gen15 servers (both sides of that comparison)
step_pair() {  # GYMTRL_TAG TRL_TAG VPORT POINT STEPS RUN_TIMEOUT OUTNAME VLLM_ARGS [gym key=value ...]
  # gymtrl's servers at VPORT (vLLM, GPU 1) and VPORT+3000 (Gym head); TRL's vLLM at VPORT+1 on GPU 0.
  local a=$1 b=$2 vp=$3 point=$4 steps=$5 rt=$6 name=$7 x=$8; shift 8
  start_servers "$a" /tmp/model-0.5b 1 "$vp" $((vp + 3000)) "$x" "$@" "${STEP_SO[@]}"
  start_servers "$b" /tmp/model-0.5b 0 $((vp + 1)) $((vp + 3000)) "$x" gym.launch.enabled=false
  wait_servers "$a" $(( $(left) - 100 )) && wait_servers "$b" $(( $(left) - 100 )) || return 1
  need 90 "$name" || return 1
  run_stage "$name" $(( $(left) - 20 < 200 ? $(left) - 20 : 200 )) python3 bench/gpu_step_vs_trl.py compare --points "$point" \
    --gym-servers "$vp:$((vp + 3000))" --plain-servers $((vp + 1)) --gymtrl-gpu 0 --trl-gpu 1 --steps "$steps" --warmup 2 \
    --run-timeout "$rt" --group-port $((51216 + vp - 8000)) --work /tmp/bench-step --out "$OUT/$name.md" \
    --json-out "$OUT/$name.json" model.name_or_path=/tmp/model-0.5b "${STEP_SO[@]}"
}
need() { [ "$(left)" -gt "$1" ] || { note "skipping $2: $(left) s left, it needs about $1"; return 1; }; }
run_stage() {  # NAME TIMEOUT cmd...
  local name=$1 t=$2; shift 2
  local lim=$(( $(left) - 25 )); [ $lim -lt "$t" ] && t=$lim
  note "stage $name (timeout ${t} s): $*"
  timeout -s INT -k 15 "$t" "$@" 2>&1 | tee -a "$LOG" | grep -E "^\||^  round|RESULT|^== |rc |warm-up|collect round|Error|error|Traceback|^\[[0-9.]+b\]" | cut -c1-300
  note "stage $name exit ${PIPESTATUS[0]}"
}

# collect runs on servers of its own with the defaults (one copy of each Gym server, as NeMo Gym runs them), on
# GPU 1; with both stages, gen05's servers start at the same time on GPU 0 (one vLLM starting per GPU: several
# starting at once on one GPU fail their KV-cache check), unless gen15's take GPU 0: then gen05's start on GPU 1
# once collect has stopped its own.
gen05_servers() { start_servers 05b /tmp/model-0.5b "${1:-1}" 8000 11000 "${GEN_SO[@]}"; }  # [GPU], default 1
case ",$stages," in
  *,collect,*gen15,*|*,gen15,*collect,*) start_servers c05 /tmp/model-0.5b 1 8002 11002;;
  *,collect,*) start_servers c05 /tmp/model-0.5b 1 8002 11002
               case ",$stages," in *,gen05,*) gen05_servers 0;; esac;;
  *,gen05,*) gen05_servers 1;;
esac
# turns and step-turns: workplace_assistant with every model call held to one tool call (see those stages)
read -ra turn_list <<< "${TURNS:-1 2 3}"
WORKPLACE='gym.launch.config_paths=[responses_api_models/vllm_model/configs/vllm_model_for_training.yaml,resources_servers/workplace_assistant/configs/workplace_assistant.yaml]'
tw_servers() { start_servers tw /tmp/model-0.5b 0 8012 11012 vllm.max_model_len=16384 'vllm.launch.extra_args=[--gpu-memory-utilization,"0.3"]'; }
turn_servers() {  # I: servers uI for the I-th of TURNS on GPU 1 (vLLM :802I, Gym :1102I), Gym's agent at max_steps = T
  local t=${turn_list[$(($1 - 1))]}
  start_servers "u$1" /tmp/model-0.5b 1 $((8020 + $1)) $((11020 + $1)) "$WORKPLACE" gym.launch.copies=4 \
    "gym.launch.overrides={workplace_assistant_simple_agent.responses_api_agents.simple_agent.max_steps: $t}" \
    'vllm.launch.extra_args=[--gpu-memory-utilization,"0.25"]' "${STEP_SO[@]}"
}
later_turn_servers() {  # u2, u3, ..: each started once the one before is up (several vLLMs starting at once on one
  # GPU fail their KV-cache check)
  local i
  for ((i = 2; i <= ${#turn_list[@]}; i++)); do
    wait_servers "u$((i - 1))" $(( $(left) - 60 )) && turn_servers "$i" || return 1
  done
}
case ",$stages," in *,turns,*) tw_servers;; esac  # on GPU 0, beside u1 on GPU 1
case ",$stages," in *,step-turns,*) turn_servers 1 && { later_turn_servers > /dev/null 2>&1 & };; esac
case ",$stages," in *,gen15,*) make_model 1.5b && start_servers 15b /tmp/model-1.5b 0 8001 11001 "${GEN_SO[@]}";; esac
GEN_LABEL=${GEN_OVERRIDES:+, $GEN_OVERRIDES}
GEN=(python3 bench/gpu_generation.py --rounds 3 --shape 256x256 --inflight "${GEN_INFLIGHT:-32,64,128}")
variant=0
export CUDA_VISIBLE_DEVICES_TRAINER=0
for st in ${stages//,/ }; do
  case $st in
    gen05)
      gen05_servers
      wait_servers 05b $(( $(left) - 60 )) || continue
      need 60 gen05 && run_stage gen05 "${GEN_TIMEOUT:-150}" "${GEN[@]}" --parts "${GEN_PARTS:-gen}" --vllm http://127.0.0.1:8000 --head http://127.0.0.1:11000 \
        --label "Qwen2.5-0.5B shape$GEN_LABEL" --out "$OUT/generation.md" --json-out /tmp/gen05.json ;;
    gen05-64)  # gen05's servers and paths at the 64 x 128 shape of the step comparison (gen part only)
      gen05_servers
      wait_servers 05b $(( $(left) - 40 )) || continue
      need 40 gen05-64 && run_stage gen05-64 90 python3 bench/gpu_generation.py --rounds 3 --shape 64x128 --parts gen \
        --vllm http://127.0.0.1:8000 --head http://127.0.0.1:11000 --label "Qwen2.5-0.5B shape$GEN_LABEL" \
        --out "$OUT/generation-64x128.md" --json-out /tmp/gen05-64.json ;;
    gen15)
      wait_servers 15b $(( $(left) - 60 )) || continue
      need 60 gen15 && run_stage gen15 150 "${GEN[@]}" --parts gen --vllm http://127.0.0.1:8001 --head http://127.0.0.1:11001 \
        --label "Qwen2.5-1.5B shape$GEN_LABEL" --out "$OUT/generation.md" --json-out /tmp/gen15.json
      stop_servers 15b ;;
    collect)
      wait_servers c05 $(( $(left) - 60 )) || continue
      need 60 collect || continue
      curl -sf http://127.0.0.1:11100/readyz > /dev/null || start_relay 11002
      run_stage collect 200 python3 bench/gpu_generation.py --parts collect --vllm http://127.0.0.1:8002 --head http://127.0.0.1:11002 \
        --collector-head http://127.0.0.1:11100 --collect-n 256 --collect-repeats 4 --collect-concurrency 256 --collect-tokens 64 \
        --collect-rounds 3 --gym-python python3 --gym-pythonpath "/tmp/bench-data/gym-extra:$GYM_PYTHONPATH" \
        --label "Qwen2.5-0.5B shape" --out "$OUT/collect.md" --json-out /tmp/gencollect.json
      stop_relay; stop_servers c05 ;;
    pairs|pairs-api2|pair64-api2*)  # gymtrl vs TRL, each on a fresh vLLM of its own (NCCL re-init hangs; several vLLMs starting
            # at once on one GPU fail their KV-cache check): gymtrl's vLLM on GPU 1 (trainer on GPU 0), TRL's on GPU 0
            # (trainer on GPU 1), each vLLM at 0.5 of its GPU so the other side's trainer fits beside it.
            # pairs-api2: both vLLMs with --api-server-count 2, gymtrl's Gym with 4 copies (configs/gpu-1x.yaml's
            # generation settings), without the collect stage.
      X='vllm.launch.extra_args=[--gpu-memory-utilization,"0.5"]'; G=(); sfx=""; t=(A B C D); p=8000
      if [ "$st" != pairs ]; then
        X='vllm.launch.extra_args=[--gpu-memory-utilization,"0.5",--api-server-count,"2"]'; G=(gym.launch.copies=4)
        sfx=-api2; t=(E F G H); p=8004
      fi
      if [ "$st" = pair64-api2-tokenize ]; then  # NeMo Gym's own prompt ids (a /tokenize per model call), other ports
        G+=(gym.launch.prompt_ids=tokenize); sfx=-api2-tokenize; t=(I J); p=8008
      fi
      step_pair "${t[0]}" "${t[1]}" $p 64x128 8 110 "step$sfx" "$X" "${G[@]}" || continue
      case $st in pair64-api2*) stop_servers "${t[0]}"; stop_servers "${t[1]}"; continue;; esac
      if [ "$st" = pairs ] && need 75 collect; then
        start_relay 11000
        run_stage collect 100 python3 bench/gpu_generation.py --parts collect --vllm http://127.0.0.1:8000 --head http://127.0.0.1:11000 \
          --collector-head http://127.0.0.1:11100 --collect-n 256 --collect-repeats 4 --collect-concurrency 256 --collect-tokens 64 \
          --collect-rounds 2 --gym-python python3 --gym-pythonpath "/tmp/bench-data/gym-extra:$GYM_PYTHONPATH" \
          --label "Qwen2.5-0.5B shape" --out "$OUT/collect.md" --json-out /tmp/gencollect.json
        stop_relay
      fi
      stop_servers "${t[0]}"; stop_servers "${t[1]}"
      need 200 "pair256$sfx" || continue
      step_pair "${t[2]}" "${t[3]}" $((p + 2)) 256x128 6 "${RUN_TIMEOUT_256:-100}" "scaling$sfx" "$X" "${G[@]}"
      stop_servers "${t[2]}"; stop_servers "${t[3]}" ;;
    one-gpu-api*)  # one GPU (kind nvidia-h100-x1): vLLM at 0.5 of GPU 0 with N API-server processes, NeMo Gym with
                   # C copies of every server (one-gpu-apiN or one-gpu-apiN-copiesC), generation measured, stopped
      v=${st#one-gpu-}; api=${v#api}; api=${api%%-*}; copies=1
      case $v in *-copies*) copies=${v##*-copies};; esac
      vport=$((8010 + variant)); hport=$((11010 + variant)); variant=$((variant + 1))
      start_servers "$v" /tmp/model-0.5b 0 $vport $hport gym.launch.copies="$copies" \
        "vllm.launch.extra_args=[--gpu-memory-utilization,\"0.5\",--api-server-count,\"$api\"]"
      wait_servers "$v" $(( $(left) - 100 )) || { stop_servers "$v"; continue; }
      need 100 "$st" && run_stage "$st" 150 "${GEN[@]}" --parts gen --vllm "http://127.0.0.1:$vport" --head "http://127.0.0.1:$hport" \
        --label "Qwen2.5-0.5B shape, one GPU, vLLM --api-server-count $api, gym.launch.copies $copies" \
        --out "$OUT/generation.md" --json-out "/tmp/gen-$v.json"
      stop_servers "$v" ;;
    turns)  # the rollout phase vs turns per rollout with real generation: workplace_assistant, every model call held to
            # a tool call, the agent's max_steps = T (bench/turns_scaling.py --vllm), Gym 4 copies, on a vLLM of its own
      tw_servers
      wait_servers tw $(( $(left) - 60 )) || continue
      need 60 turns && run_stage turns "${TURNS_TIMEOUT:-240}" python3 bench/turns_scaling.py --vllm http://127.0.0.1:8012 \
        --turns "${turn_list[@]}" --rollouts "${TURNS_ROLLOUTS:-128}" --repeats 3 --max-tokens 96 --copies 4 \
        --gym-pythonpath "$GYM_PYTHONPATH" --rows /tmp/bench-data/rows/workplace_assistant/example.jsonl --device "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" \
        --out "$OUT/turns.md"
      stop_servers tw ;;
    step-turns)  # gymtrl's full step vs turns per rollout (bench/gpu_step_vs_trl.py turns) on the u1.. servers that
                 # turn_servers and later_turn_servers started, the trainer on GPU 0
      specs=(); i=0
      for _ in "${turn_list[@]}"; do i=$((i + 1)); specs+=("$((8020 + i)):$((11020 + i))@0"); done
      wait_servers u1 $(( $(left) - 100 )) || continue
      need 100 step-turns && run_stage step-turns $(( $(left) - 20 )) python3 bench/gpu_step_vs_trl.py turns \
        --turns "${turn_list[@]}" --point "${STEP_TURNS_POINT:-64x128}" --tools "${STEP_TURNS_TOOLS:-1}" \
        --rows /tmp/bench-data/rows/workplace_assistant/example.jsonl --gym-servers "${specs[@]}" --steps 8 --warmup 2 \
        --run-timeout 150 --wait-s 240 --group-port 51300 --work /tmp/bench-step --out "$OUT/step-turns.md" --json-out "$OUT/step-turns.json" \
        model.name_or_path=/tmp/model-0.5b grpo.per_device_train_batch_size=16 grpo.gradient_accumulation_steps=4 \
        "${STEP_SO[@]}"
      i=0; for _ in "${turn_list[@]}"; do i=$((i + 1)); stop_servers "u$i"; done ;;
    stamp)  # one GPU: the exact weight check's cost on ipc pushes, 0.5B and 1.5B shapes, and the lr 1e-6 premise
            # (bench/weight_sync_one_gpu.py --stamp; its own vLLM on :8000 at 0.3 of GPU 0, one shape after the other)
      make_model 1.5b || continue
      need 150 stamp && run_stage stamp $(( $(left) - 20 )) env CUDA_VISIBLE_DEVICES=0 python3 "$BENCH/weight_sync_one_gpu.py" --stamp \
        --vllm-venv /tmp/vllm-venv --model 0.5b=/tmp/model-0.5b --model 1.5b=/tmp/model-1.5b --repeats "${STAMP_REPEATS:-7}" \
        --out "$OUT/sync_stamp.md" --json-out "$OUT/sync_stamp.json"
      mkdir -p /tmp/srv-stamp/logs && cat /tmp/sync1gpu-*/vllm-*.log > /tmp/srv-stamp/logs/vllm.log 2>/dev/null ;;
    iscorr)  # one GPU: gymtrl's step with TRL's importance-sampling correction on, then off, on the same servers
             # (vLLM at 0.3 of GPU 0 with gymtrl's worker extension, --api-server-count 2, Gym 4 copies; ipc sync)
      start_servers i1 /tmp/model-0.5b 0 8030 11030 sync.strategy=ipc gym.launch.copies=4 \
        'vllm.launch.extra_args=[--gpu-memory-utilization,"0.3",--api-server-count,"2"]'
      wait_servers i1 $(( $(left) - 150 )) || continue
      for isc in ${IS_ORDER:-true false}; do
        need 70 "iscorr-$isc" || break
        run_stage "iscorr-$isc" 200 env CUDA_VISIBLE_DEVICES=0 python3 "$BENCH/gpu_step_vs_trl.py" run --side gymtrl \
          --json-out "$OUT/iscorr-$isc.json" --out-dir "/tmp/bench-step/iscorr-$isc" --batch 64 --tokens 128 --steps "${IS_STEPS:-10}" \
          --warmup 2 model.name_or_path=/tmp/model-0.5b vllm.base_url=http://127.0.0.1:8030 gym.head_server_url=http://127.0.0.1:11030 \
          sync.strategy=ipc "grpo.vllm_importance_sampling_correction=$isc" "${STEP_SO[@]}"
        cp "/tmp/bench-step/iscorr-$isc/metrics.jsonl" "$OUT/iscorr-$isc-metrics.jsonl" 2>/dev/null
      done ;;
    gen1)  # one GPU, the generation paths like-for-like on the iscorr stage's servers (gymtrl's settings: vLLM
           # --api-server-count 2, Gym 4 copies), then those servers stopped and vLLM's offline engine on the same prompts
      start_servers i1 /tmp/model-0.5b 0 8030 11030 sync.strategy=ipc gym.launch.copies=4 \
        'vllm.launch.extra_args=[--gpu-memory-utilization,"0.3",--api-server-count,"2"]'
      wait_servers i1 $(( $(left) - 100 )) || continue
      need 60 gen1 && run_stage gen1 "${GEN_TIMEOUT:-150}" python3 "$BENCH/gpu_generation.py" --parts gen --rounds "${GEN_ROUNDS:-5}" \
        --shape "${GEN_SHAPE:-256x256}" --vllm http://127.0.0.1:8030 --head http://127.0.0.1:11030 \
        --label "Qwen2.5-0.5B shape, one GPU, vLLM at 0.3 of it, --api-server-count 2, gym.launch.copies 4" \
        --out "$OUT/generation.md" --json-out "$OUT/generation.json"
      stop_servers i1
      need 90 gen1-offline && run_stage gen1-offline $(( $(left) - 20 )) env CUDA_VISIBLE_DEVICES=0 python3 "$BENCH/gpu_generation_offline.py" \
        --model /tmp/model-0.5b --shape "${GEN_SHAPE:-256x256}" --rounds "${GEN_ROUNDS:-5}" --gpu-memory-utilization 0.3 \
        --json-out "$OUT/generation-offline.json" ;;
    stop)
      stop_relay; for tg in 15b 05b c05 tw i1 u1 u2 u3 u4 g0 g1 g2 g3 t0 t1 A B C D E F G H I J; do stop_servers $tg; done ;;
  esac
done
