"""Generation through gymtrl (rollout engine -> NeMo Gym simple_agent -> vLLM) against vLLM alone on
the same prompts and the same server, in one process; and rollout collection by gymtrl against NeMo
Gym's own collector (`ng_collect_rollouts`) on the same rows and concurrency.

    python bench/gpu_generation.py --vllm http://127.0.0.1:8000 --head http://127.0.0.1:11000 \
        [--shape 256x256] [--rounds 3] [--parts gen,collect] [--label 0.5b] [--out FILE.md]

Servers: already running (bench/gpu_servers.py starts them as `gymtrl train` would). Rows: gymtrl's
single-turn digit_reply rows (64 prompts), cycled to N. Every path asks for exactly T tokens:
`ignore_eos` on every request (NeMo Gym's vllm_model forwards `metadata.extra_body` to vLLM), so the
output lengths are equal on all sides and checked (tokens counted from what came back).

Part `gen`, paths, each timed as one batch of N (rounds alternate the order; first a warm-up of each):
  vllm-batch    one POST /v1/completions with the N prompts as token ids (the ids NeMo Gym's path
                sent, taken from the warm-up): vLLM's own best case, as TRL's server-mode client sends;
  vllm-chat     N concurrent POST /v1/chat/completions with the rows' messages and the fields NeMo
                Gym's training model server adds (logprobs, top_logprobs=0, return_tokens_as_token_ids):
                the same requests minus the Gym servers;
  gym-raw       N concurrent POST /run to the agent from a bare client (pools of 16 connections), no
                parsing: NeMo Gym's servers without gymtrl;
  gymtrl        gymtrl's RolloutEngine.run on the N rows (rollout.max_concurrency = N): client, Gym,
                vLLM, stitching, failure accounting: what `gymtrl train`'s rollout phase does.
The table gives output tokens/s and gymtrl's ratio to each baseline (target: >= 0.90 of vLLM's).
Part `inflight`: the gymtrl path alone on the same N rows with at most C rollouts in flight, for each C
of --inflight and N (issue 6's "step time vs rollouts in flight": the rollout phase is the part of the
step that C changes).
Profile: CPU seconds each process spent during the batch (/proc), per path: a single-threaded
server at ~100% of one core is the bottleneck.

Part `collect`: the same rows as NeMo Gym rows (N/R prompts x R repeats), rollout.max_concurrency =
num_samples_in_parallel = C: gymtrl's engine against NeMo Gym 0.7's `ng_collect_rollouts` (its
RolloutCollectionHelper, run with the Gym venv's python; aggregation and health checks off, since
gymtrl does neither). Its time is given two ways: the whole CLI process, and its collection call alone
(run_from_config, timed inside that process). Target: gymtrl <= 1.05x. NeMo Gym 0.7's collector
posts `/run` to the agent's environment server (a `legacy_agent` relay), never to the agent:
bench/collector_relay.py starts one, and a head server that lists it (--collector-head), beside the
running servers; gymtrl calls the agent directly.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from device_info import gpus, versions  # bench/device_info.py (this script's folder is on sys.path)

import httpx

REPO = Path(__file__).resolve().parents[1]
# GYMTRL_BENCH_SRC: the gymtrl src/ to run (bench/device/device_bench.sh sets it)
sys.path.insert(0, os.environ.get("GYMTRL_BENCH_SRC") or str(REPO / "src"))

from gymtrl.gym.discovery import discover  # noqa: E402
from gymtrl.rollout.engine import RolloutEngine, SamplingParams  # noqa: E402
from gymtrl.failures import FailureBound, FailureLedger  # noqa: E402

ROWS = REPO / "src/gymtrl/envs/resources_servers/digit_reply/data/train.jsonl"
AGENT = "digit_reply_simple_agent"
SHARD = 16


# ---- rows ------------------------------------------------------------------------------------------
def base_rows() -> list[dict]:
    return [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]


def bench_row(row: dict, tokens: int) -> dict:
    """The row with exactly `tokens` output tokens asked for (ignore_eos through vllm_model's extra_body)."""
    params = dict(row["responses_create_params"])
    params.update(max_output_tokens=tokens, temperature=1.0, top_p=1.0,
                  metadata={"extra_body": json.dumps({"ignore_eos": True})})
    return {**row, "responses_create_params": params}


def cycled(rows: list[dict], n: int) -> list[dict]:
    return [rows[i % len(rows)] for i in range(n)]


# ---- CPU per process (/proc) ----------------------------------------------------------------------
CLK = os.sysconf("SC_CLK_TCK")


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def interesting_processes(vllm_port: int, head_port: int) -> dict[int, str]:
    """pid -> label for the processes on the generation path: the vLLM server on `vllm_port` (and its
    engine), the Gym servers started by the gym_launcher on `head_port`, the collector's relay."""
    out = {os.getpid(): "bench client (gymtrl engine / baselines)"}
    launchers, apis = set(), set()
    pids = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]
    for pid in pids:
        cmd = _cmd(pid)
        if "gym_launcher.py" in cmd and f"--head-port {head_port} " in cmd + " ":
            out[pid] = "Gym head server (gym_launcher)"
            launchers.add(pid)
        elif "collector_relay.py" in cmd:
            out[pid] = "collector's head server (collector_relay.py)"
            launchers.add(pid)
        elif " serve " in cmd and "vllm" in cmd and f"--port {vllm_port} " in cmd + " ":
            out[pid] = "vLLM API server"
            apis.add(pid)
    for pid in pids:
        cmd, comm = _cmd(pid), _comm(pid)
        if (comm.startswith("VLLM::Engine") or "EngineCore" in comm) and _ppid(pid) in apis:
            out[pid] = "vLLM engine core"
    for pid in pids:  # --api-server-count N: the N API-server processes are children of `vllm serve`
        if pid not in out and _ppid(pid) in apis and not _comm(pid).startswith("VLLM::Worker"):
            out[pid] = "vLLM API server processes (--api-server-count)"
    engines = {p for p, lab in out.items() if lab == "vLLM engine core"}
    for pid in pids:
        if _comm(pid).startswith("VLLM::Worker") and _ppid(pid) in engines:
            out[pid] = "vLLM worker"
    for pid in pids:
        cmd = _cmd(pid)
        if pid in out:
            continue
        elif "LegacyAgentEnvironmentServer" in cmd and _ppid(pid) in launchers:
            out[pid] = "Gym legacy_agent relay (collector only)"
        elif "app.py" in cmd and _ppid(pid) in launchers:
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                cwd = "?"
            out[pid] = f"Gym {Path(cwd).parent.name}/{Path(cwd).name}"
    return out


def cpu_seconds(pids) -> dict[int, float]:
    res = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            res[pid] = (int(fields[11]) + int(fields[12])) / CLK
        except (OSError, IndexError, ValueError):
            pass
    return res


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class CpuMeter:
    def __init__(self, procs: dict[int, str]):
        self.procs = procs

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.c0 = cpu_seconds(self.procs)
        self.k0 = _children_cpu()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        c1 = cpu_seconds(self.procs)
        self.by_label: dict[str, float] = {}
        kids = _children_cpu() - self.k0
        if kids > 0.005:  # subprocesses this process waited for: ng_collect_rollouts
            self.by_label["ng_collect_rollouts process"] = kids
        for pid, label in self.procs.items():
            if pid in c1 and pid in self.c0:
                self.by_label[label] = self.by_label.get(label, 0.0) + c1[pid] - self.c0[pid]


# ---- the paths -------------------------------------------------------------------------------------
class Sharded:
    """Concurrent requests over httpx pools of 16 connections (one big pool rescans itself: see
    gymtrl.gym.client), so the baselines' client is no slower than gymtrl's."""

    def __init__(self, n: int, timeout_s: float):
        k = max(1, math.ceil(n / SHARD))
        self.clients = [httpx.AsyncClient(timeout=timeout_s, trust_env=False,
                                          limits=httpx.Limits(max_connections=SHARD, max_keepalive_connections=SHARD))
                        for _ in range(k)]

    async def post_all(self, url: str, bodies: list[dict]) -> list[dict]:
        async def one(i, body):
            r = await self.clients[i % len(self.clients)].post(url, json=body)
            if r.status_code != 200:
                raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.text[:300]}")
            return r.json()
        return await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))

    async def aclose(self):
        for c in self.clients:
            await c.aclose()


def chat_messages(row: dict) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in row["responses_create_params"]["input"]]


class Paths:
    def __init__(self, vllm: str, head: str, model: str, n: int, tokens: int, timeout_s: float):
        self.vllm, self.model, self.n, self.tokens, self.timeout_s = vllm.rstrip("/"), model, n, tokens, timeout_s
        self.topology = discover(head)
        self.agent_url = self.topology.agents[AGENT]
        self.rows = cycled([bench_row(r, tokens) for r in base_rows()], n)
        self.prompt_ids: list[list[int]] | None = None
        self.engine = RolloutEngine(self.topology, SamplingParams(1.0, 1.0, tokens), FailureLedger(FailureBound(1.0, 10**6, 10**6)),
                                    max_concurrency=n, timeout_s=timeout_s, retries=0, retry_backoff_s=0.5)

    def gymtrl(self, rows=None):
        rows = rows or self.rows
        outcomes = self.engine.run(rows)
        failed = [o for o in outcomes if o.trajectory is None]
        tokens = sum(o.trajectory.num_model_tokens for o in outcomes if o.trajectory is not None)
        if self.prompt_ids is None and not failed:
            self.prompt_ids = [o.trajectory.prompt_ids for o in outcomes]
        return dict(tokens=tokens, failed=len(failed), per_request=[o.trajectory.num_model_tokens for o in outcomes if o.trajectory],
                    detail=failed[0].detail if failed else "",
                    latency=sorted(o.latency_s for o in outcomes))

    async def _gym_raw(self):
        s = Sharded(self.n, self.timeout_s)
        try:
            replies = await s.post_all(self.agent_url.rstrip("/") + "/run", self.rows)
        finally:
            await s.aclose()
        toks = [r["response"]["usage"]["output_tokens"] for r in replies]
        return dict(tokens=sum(toks), failed=0, per_request=toks)

    def gym_raw(self):
        return asyncio.run(self._gym_raw())

    async def _vllm_chat(self):
        bodies = [dict(model=self.model, messages=chat_messages(r), max_tokens=self.tokens, temperature=1.0, top_p=1.0,
                       ignore_eos=True, logprobs=True, top_logprobs=0, return_tokens_as_token_ids=True)
                  for r in self.rows]
        s = Sharded(self.n, self.timeout_s)
        try:
            replies = await s.post_all(self.vllm + "/v1/chat/completions", bodies)
        finally:
            await s.aclose()
        toks = [r["usage"]["completion_tokens"] for r in replies]
        return dict(tokens=sum(toks), failed=0, per_request=toks)

    def vllm_chat(self):
        return asyncio.run(self._vllm_chat())

    def vllm_batch(self):
        assert self.prompt_ids is not None, "run the gymtrl path once first (its prompt ids are reused)"
        body = dict(model=self.model, prompt=self.prompt_ids, max_tokens=self.tokens, temperature=1.0, top_p=1.0,
                    ignore_eos=True, logprobs=0, return_token_ids=True, return_tokens_as_token_ids=True)
        r = httpx.post(self.vllm + "/v1/completions", json=body, timeout=self.timeout_s, trust_env=False)
        r.raise_for_status()
        j = r.json()
        toks = [len(c.get("token_ids") or []) or None for c in j["choices"]]
        return dict(tokens=j["usage"]["completion_tokens"], failed=0,
                    per_request=[t for t in toks if t is not None] or [j["usage"]["completion_tokens"] // len(j["choices"])])


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_gen(p: Paths, rounds: int, procs: dict[int, str]) -> dict:
    order = ["gymtrl", "vllm-batch", "vllm-chat", "gym-raw"]
    fns = {"gymtrl": p.gymtrl, "vllm-batch": p.vllm_batch, "vllm-chat": p.vllm_chat, "gym-raw": p.gym_raw}
    # warm-up: every path once (the gymtrl path first: its prompt ids feed vllm-batch)
    for name in order:
        r = fns[name]()
        print(f"  warm-up {name}: {r['tokens']} tokens, failed {r['failed']} {r.get('detail', '')}", flush=True)
    res = {name: [] for name in order}
    for rd in range(rounds):
        seq = order[rd % len(order):] + order[:rd % len(order)]  # rotate: no path always first
        for name in seq:
            with CpuMeter(procs) as m:
                r = fns[name]()
            r.update(seconds=m.wall, cpu=m.by_label)
            res[name].append(r)
            print(f"  round {rd} {name}: {m.wall:.3f} s, {r['tokens']} tokens, {r['tokens'] / m.wall:,.0f} tok/s, "
                  f"failed {r['failed']}", flush=True)
    return res


def run_inflight(p: Paths, limits: list[int], rounds: int, procs: dict[int, str]) -> dict:
    """The gymtrl path on the same N rows with at most C rollouts in flight (rollout.max_concurrency = C), for
    each C in `limits` and N itself; rounds rotate the order. Batch wall time grows as C falls below what
    keeps vLLM's batch full: what a user trades for a smaller rollout-phase memory or a slower environment."""
    limits = sorted({min(c, p.n) for c in limits} | {p.n})
    engines = {c: RolloutEngine(p.topology, SamplingParams(1.0, 1.0, p.tokens), FailureLedger(FailureBound(1.0, 10**6, 10**6)),
                                max_concurrency=c, timeout_s=p.timeout_s, retries=0, retry_backoff_s=0.5) for c in limits}
    res = {c: [] for c in limits}
    try:
        engines[limits[0]].run(p.rows[:limits[0]])  # warm-up
        for rd in range(rounds):
            seq = limits[rd % len(limits):] + limits[:rd % len(limits)]
            for c in seq:
                with CpuMeter(procs) as m:
                    outs = engines[c].run(p.rows)
                ok = [o for o in outs if o.trajectory is not None]
                res[c].append(dict(seconds=m.wall, tokens=sum(o.trajectory.num_model_tokens for o in ok),
                                   failed=len(outs) - len(ok), cpu=m.by_label))
                print(f"  inflight round {rd} C={c}: {m.wall:.3f} s, {res[c][-1]['tokens']} tokens, "
                      f"failed {res[c][-1]['failed']}", flush=True)
    finally:
        for e in engines.values():
            e.close()
    return res


def report_inflight(res: dict, p: Paths, label: str) -> list[str]:
    med = {c: statistics.median(r["seconds"] for r in v) for c, v in res.items()}
    toks = {c: statistics.median(r["tokens"] for r in v) for c, v in res.items()}
    full = max(res)
    lines = [f"### Rollouts in flight, {label}: {p.n} rollouts x {p.tokens} tokens, at most C in flight, "
             f"{len(res[full])} rounds", "",
             "| C (rollout.max_concurrency) | median s | best s | tokens/s (median) | time / all in flight | failed |",
             "|---|---|---|---|---|---|"]
    for c in sorted(res):
        lines.append(f"| {c} | {med[c]:.3f} | {min(r['seconds'] for r in res[c]):.3f} | {toks[c] / med[c]:,.0f} | "
                     f"{med[c] / med[full]:.2f} | {sum(r['failed'] for r in res[c])} |")
    return lines


# ---- collection: gymtrl vs ng_collect_rollouts -----------------------------------------------------
COLLECTOR_WRAPPER = r"""
import json, sys, time
import nemo_gym.rollout_collection as rc
orig = rc.RolloutCollectionHelper.run_from_config
timing = {}
async def timed(self, config):
    t0 = time.perf_counter()
    try:
        return await orig(self, config)
    finally:
        timing["collect_s"] = time.perf_counter() - t0
rc.RolloutCollectionHelper.run_from_config = timed
from nemo_gym.cli.legacy import main
sys.argv[0] = "ng_collect_rollouts"
try:
    main()
finally:
    print("COLLECTOR_TIMING " + json.dumps(timing), flush=True)
"""


def run_collector(gym_python: str, gym_env: dict, head: str, in_path: Path, out_path: Path, repeats: int,
                  concurrency: int, log_path: Path) -> dict:
    from urllib.parse import urlsplit

    u = urlsplit(head)
    cmd = [gym_python, "-c", COLLECTOR_WRAPPER,
           f"+input_jsonl_fpath={in_path}", f"+output_jsonl_fpath={out_path}",
           f"+num_repeats={repeats}", f"+num_samples_in_parallel={concurrency}",
           f"+agent_name={AGENT}", "+disable_aggregation=true", "+disable_health_check=true",
           f"+head_server.host={u.hostname}", f"+head_server.port={u.port}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **gym_env}, capture_output=True, text=True, cwd=str(out_path.parent))
    wall = time.perf_counter() - t0
    log_path.write_text(f"$ {' '.join(cmd[:2])} <wrapper> {' '.join(cmd[3:])}\n" + proc.stdout[-20000:] + proc.stderr[-20000:])
    timing = {}
    for line in proc.stdout.splitlines():
        if line.startswith("COLLECTOR_TIMING "):
            timing = json.loads(line.split(" ", 1)[1])
    # split on "\n" only: str.splitlines() also breaks at U+2028 and the like, which JSON leaves raw inside strings
    # (a random model's completions hold them)
    rows = [json.loads(x) for x in out_path.read_text().split("\n") if x.strip()] if out_path.exists() else []
    tokens = 0
    for r in rows:
        usage = (r.get("response") or {}).get("usage") or {}
        tokens += usage.get("output_tokens") or 0
    return dict(rc=proc.returncode, wall_s=wall, collect_s=timing.get("collect_s"), rollouts=len(rows), tokens=tokens,
                tail=(proc.stdout + proc.stderr)[-1500:])


def run_collect(p: Paths, args, procs) -> dict:
    n, c, reps = args.collect_n, args.collect_concurrency, args.collect_repeats
    uniq = [bench_row(r, args.collect_tokens) for r in base_rows()]
    uniq = cycled(uniq, n // reps)
    for i, r in enumerate(uniq):
        r["id"] = i  # unique task ids
    tmp = Path(tempfile.mkdtemp(prefix="gymtrl-collect-"))
    in_path = tmp / "rows.jsonl"
    in_path.write_text("".join(json.dumps(r) + "\n" for r in uniq))
    gym_rows = [r for r in uniq for _ in range(reps)]  # as TRL hands them over: each prompt R times in a row
    engine = RolloutEngine(p.topology, SamplingParams(1.0, 1.0, args.collect_tokens),
                           FailureLedger(FailureBound(1.0, 10**6, 10**6)), max_concurrency=c,
                           timeout_s=args.timeout, retries=0, retry_backoff_s=0.5)
    gym_python = args.gym_python
    gym_env = {"PYTHONPATH": args.gym_pythonpath} if args.gym_pythonpath else {}
    res = {"gymtrl": [], "ng_collect_rollouts": []}
    logs = []
    # warm-up of each
    engine.run(gym_rows[:c])
    w = run_collector(gym_python, gym_env, args.collector_head, in_path, tmp / "warm.jsonl", reps, c, tmp / "warm.log")
    print(f"  collector warm-up: rc {w['rc']}, {w['rollouts']} rollouts, {w['wall_s']:.2f} s wall, "
          f"collect {w['collect_s']}", flush=True)
    if w["rc"] != 0 or w["rollouts"] != len(gym_rows):
        print(w["tail"], flush=True)
    for rd in range(args.collect_rounds):
        for name in (["gymtrl", "ng_collect_rollouts"] if rd % 2 == 0 else ["ng_collect_rollouts", "gymtrl"]):
            if name == "gymtrl":
                with CpuMeter(procs) as m:
                    outs = engine.run(gym_rows)
                ok = [o for o in outs if o.trajectory is not None]
                res[name].append(dict(seconds=m.wall, rollouts=len(ok), tokens=sum(o.trajectory.num_model_tokens for o in ok),
                                      cpu=m.by_label))
            else:
                log = tmp / f"collect{rd}.log"
                with CpuMeter(procs) as m:
                    r = run_collector(gym_python, gym_env, args.collector_head, in_path, tmp / f"out{rd}.jsonl", reps, c, log)
                r.update(cpu=m.by_label)
                res[name].append(r)
                logs.append(log)
            last = res[name][-1]
            print(f"  collect round {rd} {name}: {json.dumps({k: v for k, v in last.items() if k not in ('cpu', 'tail')})}", flush=True)
    engine.close()
    return dict(results=res, n=len(gym_rows), c=c, reps=reps, tokens=args.collect_tokens, log=str(logs[-1]) if logs else None)


# ---- report ----------------------------------------------------------------------------------------
def cpu_table(res: dict, names: list[str], procs: dict[int, str]) -> list[str]:
    labels = sorted({lab for name in names for r in res[name] for lab in r.get("cpu", {})})
    lines = ["| process | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for lab in labels:
        cells = []
        for name in names:
            rs = res[name]
            cpu = statistics.median(r["cpu"].get(lab, 0.0) for r in rs)
            wall = statistics.median(r["seconds"] if "seconds" in r else r["wall_s"] for r in rs)
            cells.append(f"{cpu:.2f} s ({100 * cpu / wall:.0f}%)")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return lines


def report_gen(res: dict, p: Paths, label: str) -> list[str]:
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in res.items()}
    best = {k: min(r["seconds"] for r in v) for k, v in res.items()}
    toks = {k: statistics.median(r["tokens"] for r in v) for k, v in res.items()}
    tps = {k: toks[k] / med[k] for k in res}
    lines = [f"### Generation, {label}: {p.n} prompts x {p.tokens} tokens (ignore_eos), {len(res['gymtrl'])} rounds",
             "",
             "| path | median s | best s | output tokens | tokens/s (median) | gymtrl / this (tokens/s) | target | met |",
             "|---|---|---|---|---|---|---|---|"]
    for k in ("vllm-batch", "vllm-chat", "gym-raw", "gymtrl"):
        ratio = tps["gymtrl"] / tps[k]
        tgt = ">= 0.90" if k.startswith("vllm") else ""
        met = ("yes" if ratio >= 0.90 else f"no, short by {0.90 - ratio:.2f} ({100 * (0.90 - ratio) / 0.90:.0f}%)") if tgt else ""
        lines.append(f"| {k} | {med[k]:.3f} | {best[k]:.3f} | {toks[k]:.0f} | {tps[k]:,.0f} | "
                     f"{'' if k == 'gymtrl' else f'{ratio:.3f}'} | {tgt} | {met} |")
    per = {k: sorted(set(x for r in v for x in r["per_request"])) for k, v in res.items()}
    lines += ["", "Output tokens per request (distinct values seen): "
              + "; ".join(f"{k}: {v[:3]}{'...' if len(v) > 3 else ''}" for k, v in per.items()),
              "", "gymtrl rollout latency (last round): p50 {:.3f} s, p90 {:.3f} s, max {:.3f} s".format(
                  pct(res["gymtrl"][-1]["latency"], 0.5), pct(res["gymtrl"][-1]["latency"], 0.9), res["gymtrl"][-1]["latency"][-1])
              if res["gymtrl"][-1].get("latency") else "",
              "", "CPU seconds per process during the batch (median over rounds; % of one core over the batch's wall time):", ""]
    lines += cpu_table(res, list(res), {})
    return lines


def report_collect(c: dict, label: str) -> list[str]:
    res = c["results"]
    g = [r["seconds"] for r in res["gymtrl"]]
    n_wall = [r["wall_s"] for r in res["ng_collect_rollouts"]]
    n_coll = [r["collect_s"] for r in res["ng_collect_rollouts"] if r.get("collect_s")]
    gm, nw = statistics.median(g), statistics.median(n_wall)
    nc = statistics.median(n_coll) if n_coll else float("nan")
    lines = [f"### Rollout collection, {label}: {c['n']} rollouts ({c['n'] // c['reps']} rows x {c['reps']} repeats), "
             f"{c['tokens']} tokens each, concurrency {c['c']}, {len(g)} rounds", "",
             "| collector | median s | best s | rollouts | gymtrl / this | target | met |", "|---|---|---|---|---|---|---|"]
    lines.append(f"| gymtrl RolloutEngine.run | {gm:.3f} | {min(g):.3f} | {res['gymtrl'][-1]['rollouts']} | | | |")
    for name, t, allt in (("ng_collect_rollouts, whole CLI process", nw, n_wall),
                          ("ng_collect_rollouts, run_from_config alone", nc, n_coll)):
        ratio = gm / t
        met = "yes" if ratio <= 1.05 else f"no, over by {ratio - 1.05:.2f}x"
        lines.append(f"| {name} | {t:.3f} | {min(allt) if allt else float('nan'):.3f} | "
                     f"{res['ng_collect_rollouts'][-1]['rollouts']} | {ratio:.3f} | <= 1.05 | {met} |")
    lines += ["", "CPU seconds per process during the batch (median):", ""]
    lines += cpu_table(res, ["gymtrl", "ng_collect_rollouts"], {})
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vllm", default="http://127.0.0.1:8000")
    ap.add_argument("--head", default="http://127.0.0.1:11000")
    ap.add_argument("--model", default=None, help="served model name (default: the server's first)")
    ap.add_argument("--shape", default="256x256", help="NxT: N prompts, T output tokens each")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parts", default="gen,collect")
    ap.add_argument("--label", default="")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--inflight", default="16,32,64,128", help="part inflight: the limits C on rollouts in flight")
    ap.add_argument("--collect-n", type=int, default=256)
    ap.add_argument("--collect-repeats", type=int, default=4)
    ap.add_argument("--collect-concurrency", type=int, default=256)
    ap.add_argument("--collect-tokens", type=int, default=64)
    ap.add_argument("--collect-rounds", type=int, default=2)
    ap.add_argument("--collector-head", default="http://127.0.0.1:11100",
                    help="head server that lists an environment server for the agent (bench/collector_relay.py)")
    ap.add_argument("--gym-python", default=os.environ.get("GYM_PYTHON", "python3"))
    ap.add_argument("--gym-pythonpath", default=os.environ.get("GYM_PYTHONPATH"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)

    n, t = (int(x) for x in args.shape.lower().split("x"))
    model = args.model or httpx.get(args.vllm.rstrip("/") + "/v1/models", trust_env=False).json()["data"][0]["id"]
    p = Paths(args.vllm, args.head, model, n, t, args.timeout)
    from urllib.parse import urlsplit

    procs = interesting_processes(urlsplit(args.vllm).port or 80, urlsplit(args.head).port or 80)
    print(f"processes watched: {sorted(set(procs.values()))}", flush=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    parts = args.parts.split(",")
    lines = [f"## {args.label or model}: {started:%Y-%m-%d %H:%M} UTC", "",
             f"- device: {gpus()}", f"- versions: {versions('vllm', 'trl', 'transformers', 'torch', 'httpx')}",
             f"- model: {model}; vLLM {args.vllm}; NeMo Gym head {args.head}; agent {AGENT}",
             f"- command: `python bench/gpu_generation.py {' '.join(argv if argv is not None else sys.argv[1:])}`", ""]
    dump = {}
    if "gen" in parts:
        res = run_gen(p, args.rounds, procs)
        dump["gen"] = {k: [{kk: vv for kk, vv in r.items() if kk not in ("latency", "per_request")} for r in v] for k, v in res.items()}
        lines += report_gen(res, p, args.label or model) + [""]
    if "inflight" in parts:
        res = run_inflight(p, [int(x) for x in args.inflight.split(",")], args.rounds, procs)
        dump["inflight"] = {str(c): v for c, v in res.items()}
        lines += report_inflight(res, p, args.label or model) + [""]
    if "collect" in parts:
        c = run_collect(p, args, procs)
        dump["collect"] = c
        lines += report_collect(c, args.label or model) + [""]
    p.engine.close()
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(dump, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
