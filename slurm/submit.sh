#!/usr/bin/env bash
# gymtrl on a Slurm cluster. The last node of the job runs the servers (`gymtrl serve`: vLLM, tensor
# parallel over that node's GPUs, and NeMo Gym on its CPUs); the other N-1 nodes train (`gymtrl
# train` under accelerate + DeepSpeed) and reach them over the network. A one-node job splits its
# node: VLLM_GPUS GPUs serve, the rest train.
#
#   sbatch slurm/submit.sh                          the #SBATCH defaults below
#   sbatch --nodes=4 -A my_account -p gpu slurm/submit.sh      sbatch's flags override them
#   NODES=4 ACCOUNT=my_account PARTITION=gpu bash slurm/submit.sh   so do these variables: run with
#                                                   bash (outside a job), the script submits itself
# Run from the repository root on a shared file system (every node reads the config and writes
# logs/<job id>/ and the run's output.dir). logs/ ships with the repository: Slurm does not create
# the directory of --output, and a job whose output path is missing fails without a word.
#
# Phases, each one line in logs/slurm-<job id>.out and logs/<job id>/job.log:
#   start -> servers starting -> servers ready -> training -> training finished -> servers stopped
# The job fails at once when either side dies (the other is stopped). At the time limit
# (--signal=B:TERM@...) or on `scancel --signal=TERM --batch <id>`, the trainer checkpoints at the
# end of its step, the servers stop, and the job requeues itself; every start runs
# `gymtrl train --resume auto`, so the requeued job goes on from that checkpoint.
# Secrets (WANDB_API_KEY, HF_TOKEN, vLLM/judge API keys) come from the environment you submit from
# (sbatch passes it on); never write them here.
#
#SBATCH --job-name=gymtrl
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:TERM@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/slurm-%j.out

# (The role functions below run through `srun bash -c NAME`, which shellcheck cannot follow.)
# shellcheck disable=SC2317
set -euo pipefail

# ---- settings; each can be set in the environment -------------------------------------------
# Resources, for `bash slurm/submit.sh` (with plain sbatch, pass sbatch's own flags instead).
NODES=${NODES:-}                 # e.g. 2: one training node + the server node
GPUS_PER_NODE=${GPUS_PER_NODE:-} # 0 on CPU-only nodes
ACCOUNT=${ACCOUNT:-}
PARTITION=${PARTITION:-}
TIME_LIMIT=${TIME_LIMIT:-}       # e.g. 04:00:00
# The run.
GYMTRL_HOME=${GYMTRL_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}       # the repository (shared file system)
LOG_ROOT=${LOG_ROOT:-$GYMTRL_HOME/logs}   # the job's logs go to $LOG_ROOT/<job id>/
GYMTRL_CONFIG=${GYMTRL_CONFIG:-configs/slurm.yaml}
GYMTRL_MODEL=${GYMTRL_MODEL:-}           # model.name_or_path (a hub id or a path every node sees)
GYMTRL_OVERRIDES=${GYMTRL_OVERRIDES:-}   # more key=value overrides, space-separated, for serve and train
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/zero3.yaml}
TRAIN_PROCS_PER_NODE=${TRAIN_PROCS_PER_NODE:-}  # default: one per training GPU (1 on CPU)
VLLM_GPUS=${VLLM_GPUS:-1}                # one-node jobs: GPUs for vLLM (a server node gives it all)
MASTER_PORT=${MASTER_PORT:-29500}
# Software: a venv to activate on every node (holding gymtrl, trl, accelerate, deepspeed, vllm's
# client), and the venvs the config's ${oc.env:...} entries name. Or a container (pyxis/enroot).
GYMTRL_VENV=${GYMTRL_VENV:-}
export GYMTRL_VLLM_VENV=${GYMTRL_VLLM_VENV:-}
export GYMTRL_GYM_VENV=${GYMTRL_GYM_VENV:-}
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-$GYMTRL_HOME:$GYMTRL_HOME}
STOP_TIMEOUT_S=${STOP_TIMEOUT_S:-120}    # how long each side gets to stop before it is killed

# ---- outside a job: submit this script with the settings above -------------------------------
if [[ -z ${SLURM_JOB_ID:-} ]]; then
    args=()
    [[ -n $NODES ]] && args+=("--nodes=$NODES")
    [[ -n $GPUS_PER_NODE ]] && args+=("--gpus-per-node=$GPUS_PER_NODE")
    [[ -n $ACCOUNT ]] && args+=("--account=$ACCOUNT")
    [[ -n $PARTITION ]] && args+=("--partition=$PARTITION")
    [[ -n $TIME_LIMIT ]] && args+=("--time=$TIME_LIMIT")
    cd "$GYMTRL_HOME"
    mkdir -p logs
    exec sbatch "${args[@]}" "$@" "$GYMTRL_HOME/slurm/submit.sh"
fi

# ---- inside the job ----------------------------------------------------------------------------
cd "$GYMTRL_HOME"
JOB=$SLURM_JOB_ID
LOG_DIR=$LOG_ROOT/$JOB
mkdir -p "$LOG_DIR"
READY_FILE=$LOG_DIR/servers.json   # written by gymtrl serve once every server is healthy
STOP_FILE=$LOG_DIR/STOP            # the trainer checkpoints and stops when it appears

say() {
    local line
    line="[submit.sh $(date '+%F %T')] $*"
    echo "$line"
    echo "$line" >>"$LOG_DIR/job.log"
}

mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
N=${#HOSTS[@]}
SERVER_NODE=${HOSTS[N - 1]}
if ((N > 1)); then
    TRAIN_HOSTS=("${HOSTS[@]:0:N-1}")
else
    TRAIN_HOSTS=("$SERVER_NODE")
fi
N_TRAIN=${#TRAIN_HOSTS[@]}
MASTER_ADDR=${TRAIN_HOSTS[0]}
NODE_GPUS=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
NODE_GPUS=${NODE_GPUS##*:}  # "a100:8" -> 8
SHARED_NODE=$((N == 1))  # one node plays both roles
if ((N > 1)); then
    SERVE_GPUS=$NODE_GPUS TRAIN_GPUS=$NODE_GPUS
else
    SERVE_GPUS=$((NODE_GPUS > 0 ? VLLM_GPUS : 0))
    TRAIN_GPUS=$((NODE_GPUS - SERVE_GPUS))
fi
if [[ -z $TRAIN_PROCS_PER_NODE ]]; then
    TRAIN_PROCS_PER_NODE=$((TRAIN_GPUS > 0 ? TRAIN_GPUS : 1))
fi
if ((NODE_GPUS > 0 && TRAIN_GPUS < 1)); then
    say "ERROR: a one-node job needs more GPUs than VLLM_GPUS=$VLLM_GPUS (it has $NODE_GPUS): none left to train on"
    exit 2
fi
OVERRIDES=()
[[ -n $GYMTRL_OVERRIDES ]] && read -ra OVERRIDES <<<"$GYMTRL_OVERRIDES"
[[ -n $GYMTRL_MODEL ]] && OVERRIDES+=("model.name_or_path=$GYMTRL_MODEL")
SERVE_OVERRIDES=("${OVERRIDES[@]}")
((SERVE_GPUS > 0)) && SERVE_OVERRIDES+=("vllm.tensor_parallel_size=$SERVE_GPUS")

# Everything the two roles need, for srun to carry to the nodes (arrays cannot be exported).
export GYMTRL_HOME GYMTRL_CONFIG GYMTRL_VENV ACCELERATE_CONFIG READY_FILE STOP_FILE MASTER_ADDR MASTER_PORT \
    N_TRAIN SHARED_NODE NODE_GPUS SERVE_GPUS TRAIN_GPUS TRAIN_PROCS_PER_NODE SERVER_NODE
export GYMTRL_SERVE_ARGS="${SERVE_OVERRIDES[*]}" GYMTRL_TRAIN_ARGS="${OVERRIDES[*]}"
export PYTHONUNBUFFERED=1

activate() {
    cd "$GYMTRL_HOME"
    # shellcheck source=/dev/null
    if [[ -n $GYMTRL_VENV ]]; then source "$GYMTRL_VENV/bin/activate"; fi
}

# GPUs of this node for a role, by position among those Slurm gave the step: on a one-node job
# vLLM takes the first SERVE_GPUS and training the rest.
use_gpus() {  # use_gpus FIRST COUNT
    local visible
    ((NODE_GPUS > 0)) || return 0
    IFS=, read -ra visible <<<"${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((NODE_GPUS - 1)))}"
    CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${visible[*]:$1:$2}")
    export CUDA_VISIBLE_DEVICES
}

serve_role() {
    activate
    use_gpus 0 "$SERVE_GPUS"
    local args
    read -ra args <<<"$GYMTRL_SERVE_ARGS"
    echo "serve on $(hostname) (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-none})"
    exec gymtrl serve --config "$GYMTRL_CONFIG" --host "$SERVER_NODE" --ready-file "$READY_FILE" "${args[@]}"
}

train_role() {
    activate
    if ((SHARED_NODE)); then use_gpus "$SERVE_GPUS" "$TRAIN_GPUS"; fi
    local args
    read -ra args <<<"$GYMTRL_TRAIN_ARGS"
    echo "trainer node $SLURM_PROCID of $N_TRAIN on $(hostname) (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-none})"
    exec accelerate launch --config_file "$ACCELERATE_CONFIG" \
        --num_machines "$N_TRAIN" --machine_rank "$SLURM_PROCID" \
        --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
        --num_processes $((N_TRAIN * TRAIN_PROCS_PER_NODE)) \
        -m gymtrl.cli train --config "$GYMTRL_CONFIG" --servers "$READY_FILE" --stop-file "$STOP_FILE" \
        --resume auto "${args[@]}"
}
export -f activate use_gpus serve_role train_role

step_args=(--overlap --open-mode=append --kill-on-bad-exit=1)
if [[ -n $CONTAINER_IMAGE ]]; then
    step_args+=("--container-image=$CONTAINER_IMAGE" "--container-mounts=$CONTAINER_MOUNTS"
        "--container-workdir=$GYMTRL_HOME")
fi

alive() { kill -0 "$1" 2>/dev/null; }

step_id() {  # step_id NAME: JOB.STEP of this job's running step named NAME
    squeue -h -s -j "$JOB" -o '%i %j' 2>/dev/null | awk -v n="$1" '$2 == n {print $1; exit}'
}

stop_step() {  # stop_step PID NAME: SIGTERM to the step's processes, the step cancelled after STOP_TIMEOUT_S
    local pid=$1 name=$2 t0=$SECONDS id
    alive "$pid" || return 0
    id=$(step_id "$name")
    # (a SIGTERM to srun itself would make it kill the step at once: scancel only signals)
    if [[ -n $id ]]; then scancel --signal=TERM "$id" 2>/dev/null || true; fi
    while alive "$pid" && ((SECONDS - t0 < STOP_TIMEOUT_S)); do sleep 1; done
    if alive "$pid"; then
        say "$name still running after ${STOP_TIMEOUT_S}s: cancelling it"
        if [[ -n $id ]]; then scancel "$id" 2>/dev/null || true; fi
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

stop_requested=0
request_stop() {
    stop_requested=1
    say "SIGTERM (time limit or preemption): the trainer checkpoints at the end of its step, then the job requeues"
    touch "$STOP_FILE"
}
trap request_stop TERM

say "phase: start: job $JOB (restart ${SLURM_RESTART_COUNT:-0}) on ${HOSTS[*]}: servers on $SERVER_NODE" \
    "(${SERVE_GPUS} GPUs), training on ${TRAIN_HOSTS[*]} ($TRAIN_PROCS_PER_NODE processes each); config $GYMTRL_CONFIG"
rm -f "$READY_FILE" "$STOP_FILE"

say "phase: servers starting (log: $LOG_DIR/serve.log)"
srun "${step_args[@]}" --job-name=gymtrl-serve --nodes=1 --ntasks=1 --nodelist="$SERVER_NODE" --output="$LOG_DIR/serve.log" \
    bash -c serve_role &
serve_pid=$!
train_nodes=$(IFS=,; echo "${TRAIN_HOSTS[*]}")
srun "${step_args[@]}" --job-name=gymtrl-train --nodes="$N_TRAIN" --ntasks="$N_TRAIN" --ntasks-per-node=1 --nodelist="$train_nodes" \
    --output="$LOG_DIR/train-%t.log" bash -c train_role &
train_pid=$!

ready=0
while alive "$serve_pid" && alive "$train_pid"; do
    if ((!ready)) && [[ -f $READY_FILE ]]; then
        ready=1
        say "phase: servers ready: $(tr -d '\n ' <"$READY_FILE")"
        say "phase: training (log: $LOG_DIR/train-0.log)"
    fi
    sleep 2 &
    wait $! || true  # a signal interrupts this wait, so the trap runs at once
done

if ! alive "$train_pid"; then
    train_rc=0
    wait "$train_pid" || train_rc=$?
    say "phase: servers stopping"
    stop_step "$serve_pid" gymtrl-serve
    say "phase: servers stopped"
    if ((train_rc == 0)); then
        say "phase: training finished; job done"
        exit 0
    fi
    if ((stop_requested)); then
        # (accelerate reports a stopped worker as exit 1: the trainer's own last line says what it saved)
        saved=$(tail -n 100 "$LOG_DIR/train-0.log" | grep -o 'stopped by .*checkpoint: .*' | tail -n 1 || true)
        if [[ -n $saved ]]; then
            say "phase: checkpoint saved: $saved; requeueing job $JOB"
        else
            say "phase: checkpoint not confirmed (trainer exit $train_rc, see train-0.log); requeueing job $JOB:" \
                "it resumes from the newest complete checkpoint"
        fi
        scontrol requeue "$JOB"
        exit 0
    fi
    say "ERROR: training failed (exit $train_rc): see $LOG_DIR/train-0.log"
    exit "$train_rc"
fi

serve_rc=0
wait "$serve_pid" || serve_rc=$?
say "ERROR: the servers exited (exit $serve_rc) while training ran: see $LOG_DIR/serve.log; stopping the trainer"
stop_step "$train_pid" gymtrl-train
exit 1
