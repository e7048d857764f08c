#!/usr/bin/env bash
# A real `gymtrl train` on the lent GPU machine (no network), with a random-weight model of Qwen2.5-0.5B's
# shape, from CONFIG (default configs/gpu-2x.yaml: vLLM on GPU 1, the trainer on GPU 0, NCCL sync;
# configs/gpu-1x.yaml: both on GPU 0, CUDA IPC sync). Every step's sync is checked by gymtrl's logprob
# probe. Device calls, back to back (/tmp lives only while the machine stays warm, 30 s after a call):
#   run [kind=nvidia-h100-x2|nvidia-h100-x1] carry=[.gpu-bundle/p1, .gpu-bundle/p3, .gpu-extra]
#                                            command: bash bench/device/device_train.sh prep
#   run carry=[.gpu-bundle/p2] timeout_s=600 command: [CONFIG=configs/gpu-1x.yaml] bash bench/device/device_train.sh run 420 [key=value ...]
# prep: stashes the carried bundle parts, unpacks gymtrl's extra wheels (.gpu-extra) to /tmp/extra,
#       builds the model in /tmp/model-0.5b (about 20 s).
# run LIMIT [key=value ...]: finishes the install, stops whatever an earlier call left running
#       (gymtrl starts its servers with setsid, so they outlive a command that was cut off: GPU
#       processes, the servers, anything on ports 8000/11000), runs `gymtrl train` for at most LIMIT
#       seconds (then SIGINT, SIGKILL 20 s later), prints one line per step, and always copies small
#       logs to $OUT (7 files): gpus.txt (GPUs, versions, leftovers, a progress line every 15 s
#       with the GPUs' memory), train.log, metrics.jsonl, profile.jsonl (TRL's timed blocks,
#       sync_weights among them: TRL's profiler reports them to wandb only, so a wrapper writes them
#       here too), vllm.log, gym.log, gym-servers.log. Keep LIMIT about 150 s under timeout_s.
# controls LIMIT: instead of `run`, two runs of at most LIMIT s each (use 220 with timeout_s=600)
#       that show what the sync check tells apart: "stale" (sync.strategy=none, lr 1e-2: the check
#       must stop it) and "fresh" (the config's sync, lr 1e-2, 20 steps: must pass); $OUT gets gpus.txt,
#       stale.tgz, fresh.tgz.
# syncs LIMIT [key=value ...]: two runs of at most LIMIT s each (use 220 with timeout_s=600), the config
#       with sync.strategy=nccl (TRL's) and then =broadcast (gymtrl's own); $OUT gets nccl.tgz, broadcast.tgz.
# sync1 LIMIT: bench/weight_sync_one_gpu.py on GPU 0 for the 0.5B and 1.5B shapes (builds the 1.5B
#       model first): ipc and reload against one device copy of the same bytes -> $OUT/weight_sync_one_gpu.md.
# PATCH=file.diff before any: apply a proposed src/ change to the device's copy first.
# Seen 2026-11-26 on 2x H200: run 420 took 149 s (vLLM start about 110 s, 20 steps 17 s).
# Results: bench/results/gpu-2x/, bench/results/gpu-1x/.
set -uo pipefail
mode=${1:-run}; shift || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CONFIG=${CONFIG:-configs/gpu-2x.yaml}
note() { echo "[device_train $(date +%T)] $*" | tee -a "$OUT/gpus.txt"; }
# shellcheck source=bench/device/device_lib.sh
. bench/device/device_lib.sh

if [ "$mode" = prep ]; then
  inst=$(first_file .gpu-bundle/p*/install.sh)
  bash "$inst" 2>&1 | tail -3
  unpack_extra
  make_model 0.5b & p1=$!
  make_model 1.5b & p2=$!  # for sync1
  wait $p1; wait $p2
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  exit 0
fi

# ---- run LIMIT [key=value ...] | syncs LIMIT [key=value ...] | controls LIMIT | sync1 LIMIT ----------------
limit=${1:-420}; shift || true
: > "$OUT/gpus.txt"
inst=$(first_file .gpu-bundle/p*/install.sh)
if [ -n "$inst" ]; then
  bash "$inst" --need-all > /tmp/install.log 2>&1 || { tail -5 /tmp/install.log; exit 3; }
elif [ ! -f /tmp/site/env.sh ]; then
  echo "bundle not installed and no part carried (the machine went cold?)"; exit 3
fi
# /tmp/site/env.sh is written on the device by the bundle's install.sh: nothing to follow here.
# shellcheck source=/dev/null
. /tmp/site/env.sh
unpack_extra || exit 3
make_model 0.5b || exit 4
for m in /tmp/model-0.5b /tmp/model-1.5b; do trl_template "$m" || exit 4; done
export PYTHONPATH="$PWD/src:$PYTHONPATH:/tmp/extra"  # the bundle's versions win over the extras
# PATCH=file.diff: a proposed change to src/, applied to the device's copy of the tree only.
if [ -n "${PATCH:-}" ]; then
  if (patch -p1 --forward < "$PATCH" || git apply "$PATCH") > /tmp/patch.log 2>&1; then
    note "applied $PATCH: $(grep -c '^+++' "$PATCH") files"
  else
    cat /tmp/patch.log; exit 6
  fi
fi

launcher_dirs

{
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  python3 - <<'EOF'
import importlib.metadata as m
print("versions:", ", ".join(f"{d} {m.version(d)}" for d in ("vllm", "trl", "transformers", "torch", "accelerate", "datasets", "gymtrl-vllm-plugin")))
EOF
  PYTHONPATH=$GYM_PYTHONPATH python3 -c 'import importlib.metadata as m; print("nemo-gym", m.version("nemo-gym"))' 2>&1 | tail -1
  git log -1 --format='gymtrl commit %h %cd' 2>/dev/null; echo "working tree: $(git status --short 2>/dev/null | wc -l) changed files"
} >> "$OUT/gpus.txt" 2>&1

kill_leftovers
for port in 8000 11000; do port_busy $port && { note "port $port still taken"; pgrep -af 'python|vllm' | cut -c1-200 >> "$OUT/gpus.txt"; exit 5; }; done
note "ports 8000 and 11000 free; GPU processes: $(nvidia-smi --query-compute-apps=pid --format=csv,noheader | wc -l)"

# TRL's profiler (sync_weights is one of its blocks) reports to wandb/mlflow/trackio only: write
# its timings to a file as well, then run gymtrl's own CLI.
cat > /tmp/gymtrl_device_main.py <<'EOF'
import json, os, sys, time
import trl.extras.profiling as profiling
_log_metrics = profiling.ProfilingContext._log_metrics
def _log_to_file(self, duration):
    if self.is_main_process:
        with open(os.environ["GYMTRL_PROFILE_JSONL"], "a") as f:
            f.write(json.dumps({"name": self.name, "step": self.step, "seconds": round(duration, 6), "t": round(time.time(), 3)}) + "\n")
    return _log_metrics(self, duration)
profiling.ProfilingContext._log_metrics = _log_to_file
# Where TRL's NCCL sync spends its time: each call of these, timed, into the same file.
def _timed(owner, attr, label):
    def write(seconds):
        with open(os.environ["GYMTRL_PROFILE_JSONL"], "a") as f:
            f.write(json.dumps({"name": label, "seconds": round(seconds, 6), "t": round(time.time(), 3)}) + "\n")
    time_calls(owner, attr, write)
try:
    sys.path.insert(0, "bench")
    from call_timer import time_calls
    from trl.generation.vllm_client import VLLMClient
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine
    for name in ("_start_weight_update", "_finish_weight_update", "update_named_params", "reset_prefix_cache"):
        _timed(VLLMClient, name, f"vllm_client.{name}")
    _timed(NCCLWeightTransferEngine, "trainer_send_weights", "nccl.trainer_send_weights")
except Exception as e:
    print(f"gymtrl_device_main: sync timers not installed: {e}", file=sys.stderr)
from gymtrl.cli import app
sys.argv[0] = "gymtrl"
app()
EOF

summary() {  # one line per step: what the final report needs
  python3 - "$1" <<'EOF' 2>&1 | tail -45
import json, os, sys
run = sys.argv[1]
sync = {}  # TRL syncs at the start of each generation; profile step N = weights after optimizer step N
if os.path.exists(f"{run}/profile.jsonl"):
    for line in open(f"{run}/profile.jsonl"):
        r = json.loads(line)
        if r["name"].endswith("sync_weights"):
            sync[r["step"]] = r["seconds"]
nan = float("nan")
print(f"{run}: step reward verify_diff sync_s(before_step) step_time_s rollout_s")
for line in open(f"{run}/metrics.jsonl") if os.path.exists(f"{run}/metrics.jsonl") else []:
    r = json.loads(line)
    if "reward" not in r:
        continue
    g = lambda k: nan if r.get(k) is None else r[k]
    synced = r["sync/seconds"] if r.get("sync/seconds") else sync.get(r["step"] - 1, nan)  # gymtrl's own syncs, else TRL's
    print(f'{r["step"]:4d} {g("reward"):.4f} {g("sync/verify_max_logprob_diff"):.4g} {synced:.3f} '
          f'{g("step_time"):.2f} {g("rollout/batch_seconds"):.2f}')
EOF
}

collect() {  # $1: run dir, $2: where the small logs go (the device returns at most 8 files)
  local run=$1 dest=$2; mkdir -p "$dest"
  cp "$run/metrics.jsonl" "$run/profile.jsonl" "$dest/" 2>/dev/null
  tail -c 60000 "$run.train.log" > "$dest/train.log" 2>/dev/null
  { head -c 15000 "$run/logs/vllm.log"; echo; echo "[... middle cut ...]"; tail -c 25000 "$run/logs/vllm.log"; } > "$dest/vllm.log" 2>/dev/null
  tail -c 20000 "$run/logs/gym.log" > "$dest/gym.log" 2>/dev/null
  for f in "$run"/logs/gym/*.log; do echo "== $f"; tail -c 4000 "$f"; done > "$dest/gym-servers.log" 2>/dev/null
}

# run_gymtrl TAG LIMIT [key=value ...]: one `gymtrl train` in /tmp/run-TAG, at most LIMIT seconds.
run_gymtrl() {
  local tag=$1 limit=$2; shift 2
  local run=/tmp/run-$tag t0=$SECONDS rc
  rm -rf "$run" "$run.train.log"; touch "$run.train.log"
  ( while sleep 15; do
      echo "$(date +%T) $tag steps=$(wc -l 2>/dev/null < "$run/metrics.jsonl" || echo 0) gpu_mem_MiB=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | paste -sd/) | $(tail -c 300 "$run.train.log" | tr '\r\n' '  ' | tail -c 160)"
    done >> /tmp/progress.log ) &
  mon=$!
  note "gymtrl train [$tag]: $CONFIG, limit ${limit} s, overrides: $*"
  CUDA_VISIBLE_DEVICES=0 PYTHONUNBUFFERED=1 GYMTRL_PROFILE_JSONL=$run/profile.jsonl \
    timeout -s INT -k 20 "$limit" python3 /tmp/gymtrl_device_main.py train --config "$CONFIG" \
    model.name_or_path=/tmp/model-0.5b "gym.launch.env.PYTHONPATH=$GYM_PYTHONPATH" "output.dir=$run" \
    vllm.launch.startup_timeout_s=300 gym.launch.startup_timeout_s=180 rollout.timeout_s=60 "$@" > "$run.train.log" 2>&1
  rc=$?
  kill "$mon" 2>/dev/null; mon=
  note "gymtrl train [$tag] exited $rc after $((SECONDS - t0)) s; steps logged: $(grep -c '"reward"' "$run/metrics.jsonl" 2>/dev/null || echo 0)"
  tail -c 600 "$run.train.log" | tr '\r' '\n' | tail -3
  summary "$run"
  kill_leftovers
  return $rc
}

rm -f /tmp/progress.log
finish() {
  kill "${mon:-}" 2>/dev/null
  if [ "$mode" = run ]; then
    collect /tmp/run-main "$OUT"
  else
    for run in /tmp/run-*/; do
      [ -d "$run" ] || continue
      run=${run%/}; tag=${run#/tmp/run-}
      collect "$run" "/tmp/pack/$tag" && tar czf "$OUT/$tag.tgz" -C /tmp/pack "$tag"
    done
  fi
  cat /tmp/progress.log >> "$OUT/gpus.txt" 2>/dev/null
  kill_leftovers
  note "collected"
}
trap finish EXIT
rm -rf /tmp/run-* /tmp/pack
if [ "$mode" = run ]; then
  run_gymtrl main "$limit" "$@"
  exit $?
fi
if [ "$mode" = sync1 ]; then
  make_model 1.5b || exit 4
  CUDA_VISIBLE_DEVICES=0 PYTHONUNBUFFERED=1 timeout -s INT -k 20 "$limit" python3 bench/weight_sync_one_gpu.py \
    --vllm-venv /tmp/vllm-venv --model 0.5b=/tmp/model-0.5b --model 1.5b=/tmp/model-1.5b 2>&1 | tee "$OUT/sync1.log"
  rc=${PIPESTATUS[0]}
  for f in /tmp/sync1gpu-*/vllm-*.log; do echo "== $f"; tail -c 4000 "$f"; done >> "$OUT/sync1.log" 2>/dev/null
  exit "$rc"
fi
if [ "$mode" = syncs ]; then  # the two-GPU syncs side by side: TRL's (nccl), then gymtrl's own (broadcast)
  run_gymtrl nccl "$limit" sync.strategy=nccl "$@"
  run_gymtrl broadcast "$limit" sync.strategy=broadcast "$@"
  exit $?
fi
# controls LIMIT: two short runs that show what the sync check can tell apart, same model and config.
#  stale: sync.strategy=none (vLLM never gets new weights), learning rate x1000 (1e-2): the check must
#         stop the run after the first step that moves the weights.
#  fresh: the same learning rate with NCCL sync: the check must pass every step.
run_gymtrl stale "$limit" sync.strategy=none grpo.learning_rate=1.0e-2 grpo.max_steps=5
run_gymtrl fresh "$limit" grpo.learning_rate=1.0e-2 grpo.max_steps=20
