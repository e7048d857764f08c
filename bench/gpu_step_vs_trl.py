"""A full GRPO step through `gymtrl train` against TRL's own GRPOTrainer in vLLM server mode, on the
same single-turn task, model, batch, vLLM server and GPUs; and how gymtrl's step time grows with the
batch and with the rollouts in flight.

    # one run (a fresh process each: its own NCCL group with the server, its own GPU memory)
    python bench/gpu_step_vs_trl.py run --side gymtrl|trl --json-out F [--batch 64 --gens 8 --tokens 128
                                     --steps 8 --concurrency 256 --group-port 51216] [gymtrl key=value ...]
    # the comparison and the scaling points, each run as `run` in a subprocess, and the Markdown table
    python bench/gpu_step_vs_trl.py compare --points 64x128 [--scaling 16x128 256x128 256x128@32] --out FILE.md
    # gymtrl's step vs turns per rollout on workplace_assistant (each T on servers whose Gym agent has max_steps T)
    python bench/gpu_step_vs_trl.py turns --turns 1 2 3 --gym-servers 8021:11021@0 8022:11022@0 8023:11023@0 \
                                     [--point 64x128 --tools 1 --rows ROWS --wait-s 240] [gymtrl key=value ...]

Servers: already running (bench/gpu_servers.py, from configs/bench-gpu.yaml: vLLM on GPU 1 with the
NCCL weight-transfer config, NeMo Gym's digit_reply). Both trainers run on the GPU they are given
(CUDA_VISIBLE_DEVICES=0) and push their weights to the same vLLM over NCCL every step (TRL's own
sync; each run joins the server with its own NCCL group port).

- gymtrl: gymtrl's `train()` on configs/bench-gpu.yaml in connect mode (vllm/gym launch off), rows =
  digit_reply with `ignore_eos` in each row's `metadata.extra_body`. Its step: TRL's sync_weights,
  gymtrl's sync check (a trainer forward pass, then one scoring request that runs beside the
  rollouts: only the wait for it after the batch counts here), the rollouts through NeMo Gym
  (reward computed there by digit_reply's /verify), stitching, TRL's loss and optimizer.
- trl: `trl.GRPOTrainer(use_vllm=True, vllm_mode="server")` on the same prompts (the rows' messages),
  `generation_kwargs={"ignore_eos": True}`, and a plain reward function computing the same reward
  (the fraction of digit characters, as digit_reply's verify does). TRL sends one /v1/completions
  request per step with the unique prompts and n = num_generations.
Same GRPOConfig on both sides where gymtrl sets its own defaults (logging_steps 1, save "no",
mask_truncated_completions False, bf16, model dtype bf16, lr, temperature 1, seed).

- turns (gymtrl only): NeMo Gym's workplace_assistant rows, every model call held to one tool call by
  vLLM structured outputs (bench/turns_scaling.py's rows; --tools keeps that many of the 27 tool
  schemas, which sets the prompt's length), on the servers given for each T, whose Gym runs the agent
  with max_steps = T (bench/device/device_bench.sh stage step-turns starts them). The run's JSON also
  carries what gymtrl's metrics.jsonl says of the measured steps (turns, tokens trained, prefix
  mismatches, failures).

Per step (median over the steps after the first --warmup ones): the wall time between two step ends,
and its phases, from TRL's own profiler blocks plus timers wrapped around gymtrl's rollout engine and
sync check: weight sync (TRL's sync_weights: NCCL push + prefix-cache reset), gymtrl's sync check,
generation (TRL: vLLM.generate; gymtrl: the rollout batch through Gym, which includes the
environment's verify), rewards (TRL's _calculate_rewards), the rest of TRL's _prepare_inputs
(tokenising, padding, the old-logprob forward pass, advantages), and training (the rest of the step:
loss forward, backward, optimizer step, logging).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from device_info import gpus, versions  # bench/device_info.py (this script's folder is on sys.path)
from call_timer import time_calls  # bench/call_timer.py

REPO = Path(__file__).resolve().parents[1]
# GYMTRL_BENCH_SRC: the gymtrl src/ to run (bench/device/device_bench.sh sets it)
sys.path.insert(0, os.environ.get("GYMTRL_BENCH_SRC") or str(REPO / "src"))

ROWS = REPO / "src/gymtrl/envs/resources_servers/digit_reply/data/train.jsonl"
CONFIG = REPO / "configs/bench-gpu.yaml"

# ---- instrumentation shared by both sides ---------------------------------------------------------
EVENTS: list[dict] = []  # {"step": i, "name": ..., "s": seconds}
STEP = {"i": 0}


def record(name: str, seconds: float) -> None:
    EVENTS.append({"step": STEP["i"], "name": name, "s": seconds})


def instrument_trl() -> None:
    """TRL's profiler blocks (sync_weights, vLLM.generate, _prepare_inputs, ...) reach wandb/mlflow/trackio
    only: record them here as well."""
    import trl.extras.profiling as profiling

    original = profiling.ProfilingContext._log_metrics

    def _log(self, duration):
        if self.is_main_process:
            record(self.name.split(".", 1)[-1], duration)
        return original(self, duration)

    profiling.ProfilingContext._log_metrics = _log


def timed(owner, attr: str, name: str) -> None:
    time_calls(owner, attr, lambda seconds: record(name, seconds))


def step_callback():
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.begin, self.end = [], []

        def on_step_begin(self, args, state, control, **kw):
            STEP["i"] = state.global_step + 1
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.end.append(time.perf_counter())

        def on_train_begin(self, args, state, control, **kw):
            self.train_begin = time.perf_counter()

    return StepTimes()


def digit_fraction(text: str) -> float:  # digit_reply's reward (src/gymtrl/envs/resources_servers/digit_reply/app.py)
    chars = [c for c in text if not c.isspace()]
    return sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0


def digit_reward(completions, **kwargs):
    out = []
    for c in completions:
        text = c[-1]["content"] if isinstance(c, list) else c
        out.append(digit_fraction(text or ""))
    return out


def bench_rows() -> list[dict]:
    rows = []
    for line in ROWS.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            row["responses_create_params"]["metadata"] = {"extra_body": json.dumps({"ignore_eos": True})}
            rows.append(row)
    return rows


# ---- one run -----------------------------------------------------------------------------------------
def run_trl(a, out_dir: Path, cb):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from gymtrl.config.load import load_config

    cfg = load_config(a.config, a.overrides)
    import torch

    cpu = not torch.cuda.is_available()
    if cpu:  # a CPU smoke test of this script only: TRL's NCCL sync needs CUDA, so it is switched off
        from trl.generation.vllm_client import VLLMClient
        from trl.generation.vllm_generation import VLLMGeneration

        import trl.generation.vllm_generation as vllm_generation

        import trl.generation.vllm_client as vllm_client

        vllm_generation.is_vllm_available = lambda *a, **k: True  # the trainer venv on CPU has no vllm
        vllm_client.is_vllm_available = lambda *a, **k: True
        VLLMClient.init_communicator = lambda self, device=0: None
        VLLMGeneration.sync_weights = lambda self: None
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else "bfloat16"
    prompts = [{"prompt": [{"role": m["role"], "content": m["content"]} for m in r["responses_create_params"]["input"]]}
               for r in bench_rows()]
    args = GRPOConfig(
        output_dir=str(out_dir), use_vllm=True, vllm_mode="server", vllm_server_base_url=cfg.vllm.base_url,
        vllm_group_port=a.group_port, per_device_train_batch_size=a.batch, num_generations=a.gens,
        max_completion_length=a.tokens, max_steps=a.steps, learning_rate=cfg.grpo.get("learning_rate", 1e-6),
        bf16=bool(cfg.grpo.get("bf16", not cpu)), use_cpu=cpu, model_init_kwargs={"dtype": dtype}, logging_steps=1, save_strategy="no", report_to="none",
        mask_truncated_completions=False, generation_kwargs={"ignore_eos": True}, temperature=1.0, top_p=1.0,
        disable_tqdm=True, seed=a.seed,
    )
    tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    trainer = GRPOTrainer(model=cfg.model.name_or_path, reward_funcs=[digit_reward], args=args,
                          train_dataset=Dataset.from_list(prompts), processing_class=tok, callbacks=[cb])
    trainer.train()
    return trainer


def run_gymtrl(a, out_dir: Path, cb):
    import gymtrl.rollout.engine as engine_mod
    import gymtrl.rollout.rollout_func as rf
    import gymtrl.train as train_mod
    from gymtrl.config.load import load_config

    rows_path = out_dir / "rows.jsonl"
    if a.turns:  # workplace_assistant, every model call held to one tool call (bench/turns_scaling.py)
        from turns_scaling import rows as workplace_rows
        data = workplace_rows(256, Path(a.rows) if a.rows else None, forced_tool_call=True, max_tokens=a.tokens,
                              tools=a.tools)
    else:
        data = bench_rows()
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in data))
    overrides = ["vllm.launch.enabled=false", "gym.launch.enabled=false", f"data.train=[{rows_path}]",
                 f"grpo.per_device_train_batch_size={a.batch}", f"grpo.num_generations={a.gens}",
                 f"grpo.max_completion_length={a.tokens}", f"grpo.max_steps={a.steps}",
                 f"grpo.vllm_group_port={a.group_port}", f"grpo.seed={a.seed}", "grpo.disable_tqdm=true",
                 f"rollout.max_concurrency={a.concurrency}", f"output.dir={out_dir}", *a.overrides]
    cfg = load_config(a.config, overrides)
    timed(engine_mod.RolloutEngine, "run", "gym_rollouts")
    if hasattr(rf.GymRolloutFunc, "_publish"):  # gymtrl.sync.publisher: publish = push + the probe's forward pass
        from gymtrl.sync.publisher import WeightPublisher
        timed(rf.GymRolloutFunc, "_publish", "gymtrl_sync_check")
        timed(WeightPublisher, "settle", "gymtrl_check_wait")  # the stamp check + what is left of the probe's scoring
    else:
        timed(rf.GymRolloutFunc, "_supervised_sync", "gymtrl_sync_check")  # the probe's forward pass (+ a reload/ipc push)
        timed(rf.GymRolloutFunc, "_finish_check", "gymtrl_check_wait")  # what is left of vLLM's scoring after the batch
    # add our step timer next to gymtrl's own callbacks
    from trl import GRPOTrainer
    original_init = GRPOTrainer.__init__

    def init(self, *args, callbacks=None, **kw):
        original_init(self, *args, callbacks=[*(callbacks or []), cb], **kw)

    GRPOTrainer.__init__ = init
    train_mod.train(cfg)
    return None


METRICS = {  # metrics.jsonl key -> name in the run's JSON (median over the measured steps)
    "rollout/turns_mean": "turns_mean", "completions/mean_length": "completion_tokens_mean",
    "rollout/model_tokens": "model_tokens", "rollout/prefix_mismatch_rate": "prefix_mismatch_rate",
    "rollout/failure_rate": "failure_rate", "sampling/sampling_logp_difference/mean": "sampling_logp_diff_mean",
}


def gymtrl_metrics(out_dir: Path, warmup: int) -> dict:
    """What gymtrl's own metrics.jsonl says of the steps measured (after the warm-up ones); tokens_per_step is
    TRL's num_tokens (prompt + completion tokens trained on) from one step to the next."""
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "step" in r and "loss" in r]
    keep = [r for r in rows if r["step"] > warmup]
    out = {name: statistics.median(r[key] for r in keep if key in r) for key, name in METRICS.items()
           if any(key in r for r in keep)}
    tokens = [b["num_tokens"] - a["num_tokens"] for a, b in zip(rows, rows[1:]) if b["step"] > warmup]
    if tokens:
        out["tokens_per_step"] = statistics.median(tokens)
    return out


PHASES = [  # (column, event names summed)
    ("weight sync (TRL sync_weights)", ["sync_weights"]),
    ("gymtrl sync check", ["gymtrl_sync_check", "gymtrl_check_wait"]),
    ("generation (+env for gymtrl)", ["vLLM.generate", "gym_rollouts"]),
    ("rewards", ["_calculate_rewards"]),
]


def summarize(events: list[dict], cb, warmup: int) -> dict:
    ends = cb.end
    walls = [ends[i] - ends[i - 1] for i in range(1, len(ends))]  # step i+1's wall (end to end)
    begin_end = [e - b for b, e in zip(cb.begin, cb.end)]
    steps = {}
    for i in range(2, len(ends) + 1):  # step numbers with an end-to-end wall: 2..n
        ev = [e for e in events if e["step"] == i]
        ph = {col: sum(e["s"] for e in ev if e["name"] in names) for col, names in PHASES}
        prep = sum(e["s"] for e in ev if e["name"] == "_prepare_inputs")
        wall = walls[i - 2]
        ph["rest of _prepare_inputs (tokenise, old logprobs, advantages)"] = prep - sum(ph.values())
        ph["training (loss, backward, optimizer, logging)"] = wall - prep
        steps[i] = dict(wall=wall, begin_end=begin_end[i - 1], prepare=prep, phases=ph)
    keep = [s for i, s in steps.items() if i > warmup]
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    return dict(
        steps=steps, n_measured=len(keep), warmup=warmup,
        step_s=med([s["wall"] for s in keep]), step_min_s=min((s["wall"] for s in keep), default=float("nan")),
        step_max_s=max((s["wall"] for s in keep), default=float("nan")),
        begin_end_s=med([s["begin_end"] for s in keep]),
        phases={k: med([s["phases"][k] for s in keep]) for k in (keep[0]["phases"] if keep else {})},
        first_step_s=(cb.end[0] - cb.train_begin) if cb.end else None,
    )


def cmd_run(a) -> int:
    out_dir = Path(a.out_dir or tempfile.mkdtemp(prefix=f"bench-{a.side}-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    instrument_trl()
    cb = step_callback()
    t0 = time.perf_counter()
    (run_trl if a.side == "trl" else run_gymtrl)(a, out_dir, cb)
    total = time.perf_counter() - t0
    s = summarize(EVENTS, cb, a.warmup)
    s.update(side=a.side, batch=a.batch, gens=a.gens, tokens=a.tokens, steps_run=len(cb.end), concurrency=a.concurrency,
             process_s=total, events=EVENTS, turns=a.turns, tools=a.tools,
             metrics=gymtrl_metrics(out_dir, a.warmup) if a.side == "gymtrl" else {})
    Path(a.json_out).write_text(json.dumps(s, indent=1))
    print(f"RESULT {a.side}: step median {s['step_s']:.3f} s over {s['n_measured']} steps; phases "
          + ", ".join(f"{k} {v:.3f}" for k, v in s["phases"].items()), flush=True)
    return 0


# ---- the comparison -------------------------------------------------------------------------------
def parse_point(p: str) -> tuple[int, int, int | None]:
    """BxT[@C]: batch B (completions per step), T tokens each, C rollouts in flight (default B)."""
    c = None
    if "@" in p:
        p, c = p.split("@")
    b, t = p.lower().split("x")
    return int(b), int(t), int(c) if c else None


def server_overrides(side: str, a) -> list[str]:
    """A fresh vLLM server for every run (--gym-servers for gymtrl, --plain-servers for TRL): vLLM 0.26
    took a trainer's NCCL group once; a second trainer's /init_weight_transfer_engine on the same
    server hung (seen on 2x H200, 2026-11-26)."""
    pool = a.gym_servers if side == "gymtrl" else a.plain_servers
    if not pool:
        return []
    spec = pool.pop(0)
    vport, _, hport = spec.partition(":")
    out = [f"vllm.base_url=http://127.0.0.1:{vport}"]
    if hport and hport != "-":
        out.append(f"gym.head_server_url=http://127.0.0.1:{hport}")
    return out


def one(side: str, b: int, t: int, c: int, a, port: int, tag: str, extra: tuple[str, ...] = ()) -> dict | None:
    js = Path(a.work) / f"{tag}.json"
    log = Path(a.work) / f"{tag}.log"
    if (a.gym_servers or a.plain_servers) and not (a.gym_servers if side == "gymtrl" else a.plain_servers):
        print(f"   {tag}: skipped, no fresh server left for it", flush=True)
        return None
    cmd = [sys.executable, __file__, "run", "--side", side, "--json-out", str(js), "--batch", str(b), "--gens", str(a.gens),
           "--tokens", str(t), "--steps", str(a.steps), "--warmup", str(a.warmup), "--concurrency", str(c),
           "--group-port", str(port), "--config", a.config, "--out-dir", str(Path(a.work) / tag), *extra, *a.overrides,
           *server_overrides(side, a)]
    print(f"== {tag}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ)
    gpu = a.gymtrl_gpu if side == "gymtrl" else a.trl_gpu
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=a.run_timeout, env=env).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    print(f"   {tag}: rc {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
    if rc != 0 or not js.exists():
        print(log.read_text()[-3000:], flush=True)
        return None
    r = json.loads(js.read_text())
    r["cmd"] = " ".join(cmd[2:])
    r["elapsed_s"] = time.perf_counter() - t0
    return r


def table_pair(g: dict | None, t: dict | None, b: int, tok: int, c: int) -> list[str]:
    lines = [f"### GRPO step: {b} completions ({b // 8} prompts x 8) x {tok} tokens (ignore_eos), {c} rollouts in flight", "",
             "| phase (median s per step) | gymtrl train | TRL GRPOTrainer (server mode) | gymtrl - TRL |", "|---|---|---|---|"]
    if not g or not t:
        lines.append(f"| (run failed: gymtrl {'ok' if g else 'FAILED'}, TRL {'ok' if t else 'FAILED'}) | | | |")
        return lines
    for k in g["phases"]:
        gv, tv = g["phases"].get(k, 0.0), t["phases"].get(k, 0.0)
        lines.append(f"| {k} | {gv:.3f} | {tv:.3f} | {gv - tv:+.3f} |")
    ratio = g["step_s"] / t["step_s"]
    met = "yes" if ratio <= 1.10 else f"no, over by {ratio - 1.10:.2f} ({100 * (ratio / 1.10 - 1):.0f}% above the target)"
    lines += [f"| **step (end to end)** | **{g['step_s']:.3f}** | **{t['step_s']:.3f}** | {g['step_s'] - t['step_s']:+.3f} |",
              f"| step range (min-max) | {g['step_min_s']:.3f}-{g['step_max_s']:.3f} | {t['step_min_s']:.3f}-{t['step_max_s']:.3f} | |",
              f"| first step (incl. warm-up) | {g['first_step_s']:.2f} | {t['first_step_s']:.2f} | |",
              "", f"**Step time ratio gymtrl / TRL: {ratio:.3f}** (target <= 1.10: {met}); "
              f"{g['n_measured']} and {t['n_measured']} steps measured after {g['warmup']} warm-up steps."]
    return lines


def cmd_compare(a) -> int:
    Path(a.work).mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    port = a.group_port
    lines = [f"## GRPO step, gymtrl vs TRL: {started:%Y-%m-%d %H:%M} UTC", "",
             f"- device: {gpus()}", f"- versions: {versions('vllm', 'trl', 'transformers', 'torch', 'accelerate')}", f"- config: {a.config} {' '.join(a.overrides)}",
             f"- command: `python bench/gpu_step_vs_trl.py {' '.join(sys.argv[1:])}`"]
    if a.gym_servers or a.plain_servers:
        lines.append(f"- servers: every run on a fresh vLLM of its own, all alike and on the same GPU (gymtrl runs: "
                     f"{', '.join(a.gym_servers)} as vLLM:Gym-head ports; TRL runs: {', '.join(a.plain_servers)}): a second "
                     "trainer's NCCL init on a vLLM 0.26 server that had served one hung")
    if a.gymtrl_gpu is not None or a.trl_gpu is not None:
        lines.append(f"- trainer GPU (CUDA_VISIBLE_DEVICES): gymtrl {a.gymtrl_gpu}, TRL {a.trl_gpu}; each side's vLLM on the other GPU")
    lines.append("")
    dump = {"pairs": [], "scaling": []}
    for p in a.points:
        b, t, c = parse_point(p)
        c = c or b
        res = {}
        for side in (a.order.split(",")):
            port += 1
            res[side] = one(side, b, t, c, a, port, f"{side}-{b}x{t}@{c}")
        dump["pairs"].append(res)
        lines += table_pair(res.get("gymtrl"), res.get("trl"), b, t, c) + [""]
        flush(a, lines, dump)
    if a.scaling:
        lines += ["### Scaling: gymtrl's step time vs batch size and rollouts in flight", "",
                  "| completions per step | tokens | rollouts in flight | step s (median) | generation+env s | "
                  "training s | sync+check s | output tokens/s in generation | TRL step s (same point) | gymtrl / TRL |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for p in a.scaling:
            b, t, c = parse_point(p)
            c = c or b
            port += 1
            g = one("gymtrl", b, t, c, a, port, f"gymtrl-{b}x{t}@{c}")
            tr = None
            if a.scaling_trl and f"{b}x{t}" not in {x.split("@")[0] for x in a.points} and c == b:
                port += 1
                tr = one("trl", b, t, b, a, port, f"trl-{b}x{t}@{b}")
            dump["scaling"].append({"gymtrl": g, "trl": tr})
            if g:
                ph = g["phases"]
                gen = ph["generation (+env for gymtrl)"]
                sync = ph["weight sync (TRL sync_weights)"] + ph["gymtrl sync check"]
                tt = f"{tr['step_s']:.3f}" if tr else ""
                rr = f"{g['step_s'] / tr['step_s']:.3f}" if tr else ""
                lines.append(f"| {b} | {t} | {c} | {g['step_s']:.3f} | {gen:.3f} | "
                             f"{ph['training (loss, backward, optimizer, logging)']:.3f} | {sync:.3f} | "
                             f"{b * t / gen:,.0f} | {tt} | {rr} |")
            else:
                lines.append(f"| {b} | {t} | {c} | FAILED | | | | | | |")
            flush(a, lines, dump)
        lines.append("")
    flush(a, lines, dump)
    print("\n".join(lines), flush=True)
    return 0


def servers_up(spec: str, wait_s: float) -> bool:
    """Wait until the vLLM at VPORT answers /health and the Gym head at HPORT /readyz (a set that is still
    starting while an earlier T trains)."""
    from gymtrl.servers.process import http_ok

    vport, _, hport = spec.partition(":")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if http_ok(f"http://127.0.0.1:{vport}/health") and http_ok(f"http://127.0.0.1:{hport}/readyz"):
            return True
        time.sleep(2)
    return False


def cmd_turns(a) -> int:
    """gymtrl's full step against turns per rollout: workplace_assistant, every model call held to one tool
    call, each T on the fresh servers named in --gym-servers (in order), whose Gym runs the agent with
    max_steps = T (bench/device/device_bench.sh stage step-turns starts them)."""
    Path(a.work).mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    b, t, c = parse_point(a.point)
    c = c or b
    lines = [f"## GRPO step vs turns per rollout: {started:%Y-%m-%d %H:%M} UTC", "",
             f"- device: {gpus()}", f"- versions: {versions('vllm', 'trl', 'transformers', 'torch', 'accelerate')}",
             f"- config: {a.config} {' '.join(a.overrides)}", f"- command: `python bench/gpu_step_vs_trl.py {' '.join(sys.argv[1:])}`",
             f"- task: NeMo Gym's workplace_assistant, {b} rollouts per step ({b // a.gens} prompts x {a.gens}), each model call "
             f"held by vLLM structured outputs to one tool call of at most {t} tokens, which the resources server runs; "
             f"the agent's max_steps = T, so a rollout is T model calls and T tool calls"
             + (f"; each prompt keeps {a.tools} of the 27 tool schemas" if a.tools is not None else ""),
             f"- every T on a fresh vLLM and Gym of its own ({', '.join(a.gym_servers)} as vLLM:Gym-head[@trainer GPU]), "
             f"{a.steps} steps, the first {a.warmup} not measured", "",
             "| turns T | step s (median) | min-max | generation + env s | training s | sync + check s | rest of "
             "_prepare_inputs s | tokens trained a step | turns seen (mean) | prefix mismatch rate | failure rate | "
             "step vs T=first |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    dump = {"turns": []}
    first = None
    specs = list(a.gym_servers)
    for i, turns in enumerate(a.turns):
        if i >= len(specs):
            lines.append(f"| {turns} | no server set left for it | | | | | | | | | | |")
            continue
        a.gym_servers = [specs[i].partition("@")[0]]  # VPORT:HPORT[@GPU]: GPU, the trainer's for this T
        a.gymtrl_gpu = specs[i].partition("@")[2] or a.gymtrl_gpu
        if a.wait_s and not servers_up(a.gym_servers[0], a.wait_s):
            lines.append(f"| {turns} | its servers {a.gym_servers[0]} were not up within {a.wait_s:g} s | | | | | | | | | | |")
            dump["turns"].append({"turns": turns, "gymtrl": None})
            continue
        extra = ("--turns", str(turns), *(("--rows", a.rows) if a.rows else ()),
                 *(("--tools", str(a.tools)) if a.tools is not None else ()))
        g = one("gymtrl", b, t, c, a, a.group_port + 1 + i, f"gymtrl-turns{turns}-{b}x{t}", extra)
        dump["turns"].append({"turns": turns, "gymtrl": g})
        if not g:
            lines.append(f"| {turns} | FAILED | | | | | | | | | | |")
            flush(a, lines, dump)
            continue
        first = first or g
        ph, m = g["phases"], g.get("metrics", {})
        sync = ph["weight sync (TRL sync_weights)"] + ph["gymtrl sync check"]
        fmt = lambda k, f: format(m[k], f) if k in m else "n/a"  # noqa: E731
        lines.append(f"| {turns} | {g['step_s']:.3f} | {g['step_min_s']:.3f}-{g['step_max_s']:.3f} | "
                     f"{ph['generation (+env for gymtrl)']:.3f} | {ph['training (loss, backward, optimizer, logging)']:.3f} | "
                     f"{sync:.3f} | {ph['rest of _prepare_inputs (tokenise, old logprobs, advantages)']:.3f} | "
                     f"{fmt('tokens_per_step', ',.0f')} | {fmt('turns_mean', '.2f')} | {fmt('prefix_mismatch_rate', '.3f')} | "
                     f"{fmt('failure_rate', '.3f')} | {g['step_s'] / first['step_s']:.2f}x |")
        flush(a, lines, dump)
    lines.append("")
    flush(a, lines, dump)
    print("\n".join(lines), flush=True)
    return 0 if len(dump["turns"]) == len(a.turns) and all(x["gymtrl"] for x in dump["turns"]) else 1


def flush(a, lines, dump):
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text("\n".join(lines) + "\n")
    if a.json_out:
        slim = json.loads(json.dumps(dump))
        for grp in slim.get("pairs", []) + slim.get("scaling", []) + slim.get("turns", []):
            for r in grp.values():
                if isinstance(r, dict):
                    r.pop("events", None)
        Path(a.json_out).write_text(json.dumps(slim, indent=1))


def cmd_table(a) -> int:
    """A pair's table from two `run` JSONs measured in separate calls (a side that failed or timed
    out in its own call, rerun on the same warm machine): the origin of each is printed with it."""
    g, t = json.loads(Path(a.gymtrl).read_text()), json.loads(Path(a.trl).read_text())
    if (g["batch"], g["tokens"], g["concurrency"]) != (t["batch"], t["tokens"], t["concurrency"]):
        raise SystemExit(f"not the same point: gymtrl {g['batch']}x{g['tokens']}@{g['concurrency']}, "
                         f"TRL {t['batch']}x{t['tokens']}@{t['concurrency']}")
    lines = table_pair(g, t, g["batch"], g["tokens"], g["concurrency"])
    lines += ["", f"- gymtrl: {a.gymtrl} ({a.gymtrl_note})", f"- TRL: {a.trl} ({a.trl_note})"]
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--side", choices=["gymtrl", "trl"], required=True)
    r.add_argument("--json-out", required=True)
    r.add_argument("--out-dir", default=None)
    c = sub.add_parser("compare")
    c.add_argument("--points", nargs="*", default=["64x128"], help="BxT[@C] pairs run on both sides")
    c.add_argument("--scaling", nargs="*", default=[], help="BxT[@C] points run through gymtrl only")
    c.add_argument("--scaling-trl", action="store_true", help="also run TRL at each scaling point (C = B only)")
    c.add_argument("--order", default="gymtrl,trl")
    c.add_argument("--work", default="/tmp/bench-step")
    c.add_argument("--out", default=None)
    c.add_argument("--json-out", default=None)
    c.add_argument("--run-timeout", type=float, default=240)
    c.add_argument("--gym-servers", nargs="*", default=[], help="VPORT:HPORT, one fresh vLLM (+Gym) per gymtrl run")
    c.add_argument("--plain-servers", nargs="*", default=[], help="VPORT, one fresh vLLM per TRL run")
    c.add_argument("--gymtrl-gpu", default=None, help="CUDA_VISIBLE_DEVICES of the gymtrl trainer")
    c.add_argument("--trl-gpu", default=None, help="CUDA_VISIBLE_DEVICES of the TRL trainer")
    tu = sub.add_parser("turns", help="gymtrl's step vs turns per rollout on workplace_assistant (one fresh server set per T)")
    tu.add_argument("--turns", type=int, nargs="+", default=[1, 2, 3])
    tu.add_argument("--point", default="64x128", help="BxT[@C]: rollouts per step, most tokens a model call")
    tu.add_argument("--work", default="/tmp/bench-step")
    tu.add_argument("--out", default=None)
    tu.add_argument("--json-out", default=None)
    tu.add_argument("--run-timeout", type=float, default=300)
    tu.add_argument("--wait-s", type=float, default=0, help="wait this long for each T's servers to come up")
    tu.add_argument("--gym-servers", nargs="+", required=True,
                    help="VPORT:HPORT[@GPU] per T, in order (Gym's max_steps = that T; GPU: the trainer's)")
    tu.add_argument("--plain-servers", nargs="*", default=[])
    tu.add_argument("--gymtrl-gpu", default=None, help="CUDA_VISIBLE_DEVICES of the trainer")
    tu.add_argument("--trl-gpu", default=None)
    tb = sub.add_parser("table", help="one pair's table from a gymtrl and a TRL `run` JSON of separate calls")
    tb.add_argument("--gymtrl", required=True)
    tb.add_argument("--trl", required=True)
    tb.add_argument("--gymtrl-note", default="", help="where and when the gymtrl run was measured")
    tb.add_argument("--trl-note", default="", help="where and when the TRL run was measured")
    for p in (r, tu):
        p.add_argument("--rows", default=None, help="workplace_assistant rows (default: NeMo Gym's example.jsonl)")
        p.add_argument("--tools", type=int, default=None, help="keep this many of the rows' 27 tool schemas")
    r.add_argument("--turns", type=int, default=0, help="workplace_assistant rows with forced tool calls (the servers' "
                   "Gym runs the agent with max_steps = this); 0: digit_reply")
    for p in (r, c, tu):
        p.add_argument("--config", default=str(CONFIG))
        p.add_argument("--gens", type=int, default=8)
        p.add_argument("--steps", type=int, default=8)
        p.add_argument("--warmup", type=int, default=2)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--group-port", type=int, default=51216)
        p.add_argument("overrides", nargs="*", help="gymtrl key=value (model.name_or_path=..., vllm.base_url=...)")
    r.add_argument("--batch", type=int, default=64)
    r.add_argument("--tokens", type=int, default=128)
    r.add_argument("--concurrency", type=int, default=256)
    a = ap.parse_args(argv)
    return {"run": cmd_run, "compare": cmd_compare, "table": cmd_table, "turns": cmd_turns}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
