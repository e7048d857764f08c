"""Load test: thousands of rollouts in flight through gymtrl's rollout engine and real NeMo Gym servers.

    source scripts/env.sh && python bench/rollout_load.py

Generation is served by FakeFastGenerationBackend (bench/fake_fast_generation_backend.py), a fake
named as one: it holds each request for a fixed time in place of generating, and answers in vLLM's
token-data shape, so that the rollout path, not a model, is under load. Three parts, one run:

A. gymtrl's client alone, against the same process answering `/run` as an agent (FakeFastAgent):
   CPU per rollout as concurrency grows, with gymtrl's sharded connection pools and, side by side,
   with one httpx pool as before (httpcore rescans every connection on every request).
B. Head-of-line blocking: at the top concurrency every 50th rollout is held 10x longer; the
   ordinary rollouts' latency must not move towards the slow ones'.
C. The real path: NeMo Gym 0.7's head server, simple_agent, vllm_model in training mode and gymtrl's
   digit_reply resources server, launched as `gymtrl train` launches them. Batches of c rollouts
   with rollout.max_concurrency = c: all complete, the peak of open connections proves c in flight,
   and sockets, file descriptors and memory of gymtrl and of the Gym processes return to their
   baseline once the batch ends (NeMo Gym's own pools drop idle connections after 15 s).
It writes the tables to bench/results/rollout_load.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import gymtrl.gym.client as client_module  # noqa: E402
from gymtrl.config.load import load_config  # noqa: E402
from gymtrl.gym.discovery import GymTopology, discover, wait_ready  # noqa: E402
from gymtrl.rollout.engine import RolloutEngine, SamplingParams  # noqa: E402
from gymtrl.failures import FailureBound, FailureLedger  # noqa: E402
from gymtrl.servers.gym import gym_command  # noqa: E402
from gymtrl.net import free_port  # noqa: E402
from gymtrl.servers.process import ManagedProcess, http_ok  # noqa: E402

ROWS = REPO / "src/gymtrl/envs/resources_servers/digit_reply/data/train.jsonl"
BACKEND = REPO / "bench/fake_fast_generation_backend.py"
AGENT = "digit_reply_simple_agent"
SHARD = client_module.POOL_SHARD_CONNECTIONS


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def usage(pids: list[int]) -> dict:
    """File descriptors, sockets among them, and resident memory (MiB), summed over `pids`."""
    fds = sockets = 0
    rss_kb = 0
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
            fds += len(names)
            for n in names:
                try:
                    sockets += os.readlink(f"/proc/{pid}/fd/{n}").startswith("socket:")
                except OSError:
                    pass
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss_kb += int(line.split()[1])
        except OSError:
            continue
    return {"fds": fds, "sockets": sockets, "rss_mib": rss_kb / 1024}


def established_loopback() -> int:
    """ESTABLISHED TCP connections on 127.0.0.1 (state 01 in /proc/net/tcp), both ends counted."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[3] == "01" and parts[1].startswith("0100007F"):
            n += 1
    return n


def snapshot(gym_pids: list[int]) -> dict:
    gc.collect()
    return {"gymtrl": usage([os.getpid()]), "gym": usage(gym_pids), "tcp_established": established_loopback()}


def write_config(tmp: Path, backend_port: int, head_port: int, max_concurrency: int,
                 resources_config: str = "resources_servers/digit_reply/configs/digit_reply.yaml",
                 base_url: str | None = None, served_model_name: str = "tiny", overrides: dict | None = None,
                 copies: int = 1, launch_env: dict | None = None) -> Path:
    """The config `gymtrl train` would launch Gym from (so gymtrl's pool settings for Gym apply). `base_url`
    (a real vLLM) replaces the backend on `backend_port`; `overrides` are gym.launch.overrides."""
    path = tmp / f"load-{head_port}.yaml"
    path.write_text(f"""
model: {{name_or_path: unused, dtype: float32}}
data: {{train: [unused.jsonl]}}
gym:
  head_server_url: http://127.0.0.1:{head_port}
  launch:
    enabled: true
    venv: {os.environ['GYMTRL_GYM_VENV']}
    config_paths: [responses_api_models/vllm_model/configs/vllm_model_for_training.yaml,
                   {resources_config}]
    overrides: {json.dumps(overrides or {})}
    copies: {copies}
    env: {json.dumps(launch_env or {})}
vllm: {{base_url: "{base_url or f'http://127.0.0.1:{backend_port}'}", served_model_name: {json.dumps(served_model_name)}}}
rollout: {{max_concurrency: {max_concurrency}}}
output: {{dir: {tmp}}}
""")
    return path


def rows(n: int) -> list[dict]:
    base = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
    return [base[i % len(base)] for i in range(n)]


class PeakSockets:
    """Samples this process's open sockets on a thread: the peak proves how many were open at once."""

    def __init__(self, interval_s: float = 0.2):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval_s,), daemon=True)

    def _sample(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.peak = max(self.peak, usage([os.getpid()])["sockets"])

    def __enter__(self) -> "PeakSockets":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_batch(topo, n: int, concurrency: int, timeout_s: float) -> dict:
    ledger = FailureLedger(FailureBound(max_rate=1.0, window=max(n, 1), min_rollouts=n + 1))
    engine = RolloutEngine(topo, SamplingParams(1.0, 1.0, 4), ledger, max_concurrency=concurrency,
                           timeout_s=timeout_s, retries=0, retry_backoff_s=0.1, vocab_size=1000)
    try:
        with PeakSockets() as peak:
            cpu0, t0 = time.process_time(), time.monotonic()
            outcomes = engine.run(rows(n))
            wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    finally:
        engine.close()
    failures: dict[str, int] = {}
    for o in outcomes:
        if o.failure is not None:
            failures[o.failure.value] = failures.get(o.failure.value, 0) + 1
    return {"rollouts": n, "ok": sum(o.failure is None for o in outcomes), "failures": failures, "wall_s": wall,
            "cpu_ms": cpu * 1000 / n, "peak_sockets": peak.peak, "latencies": [o.latency_s for o in outcomes],
            "held_slow": [bool(o.reply and o.reply.get("held_slow")) for o in outcomes]}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


class Backend:
    """FakeFastGenerationBackend in NeMo Gym's venv (it needs aiohttp)."""

    def __init__(self, tmp: Path, name: str, hold_ms: float, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        python = str(Path(os.environ["GYMTRL_GYM_VENV"]) / "bin/python")
        self.proc = ManagedProcess("FakeFastGenerationBackend", [
            python, str(BACKEND), "--port", str(self.port), "--hold-ms", str(hold_ms), *extra], tmp / f"{name}.log")

    def __enter__(self) -> "Backend":
        self.proc.start()
        self.proc.wait_healthy(lambda: http_ok(self.url + "/health"), 60, "FakeFastGenerationBackend")
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stop()

    def reset_peak(self) -> None:
        httpx.post(self.url + "/stats/reset", trust_env=False)

    def peak(self) -> int:
        return httpx.get(self.url + "/stats", trust_env=False).json()["peak_in_flight"]


def part_a_client_alone(tmp: Path, levels: list[int], one_pool_max: int, hold_ms: float, timeout_s: float) -> list[dict]:
    out = []
    with Backend(tmp, "agent-a", hold_ms) as agent:
        topo = GymTopology({AGENT: agent.url})
        run_batch(topo, 32, 32, timeout_s)  # warm-up
        for c in levels:
            sharded = run_batch(topo, c, c, timeout_s)
            one = None
            if c <= one_pool_max:  # the pool as it was: minutes at the top levels
                client_module.POOL_SHARD_CONNECTIONS = 10**9
                try:
                    one = run_batch(topo, c, c, timeout_s)
                finally:
                    client_module.POOL_SHARD_CONNECTIONS = SHARD
            row = {"c": c, "sharded": sharded, "one_pool": one}
            print(json.dumps({"A": c, "sharded": summary(sharded), "one_pool": one and summary(one)}), flush=True)
            out.append(row)
    return out


def part_b_head_of_line(tmp: Path, c: int, hold_ms: float, timeout_s: float) -> dict:
    with Backend(tmp, "agent-b", hold_ms, "--slow-every", "50", "--slow-hold-ms", str(10 * hold_ms)) as agent:
        topo = GymTopology({AGENT: agent.url})
        mixed = run_batch(topo, c, c, timeout_s)
    with Backend(tmp, "agent-b0", hold_ms) as agent:
        plain = run_batch(GymTopology({AGENT: agent.url}), c, c, timeout_s)
    ordinary = [x for x, slow in zip(mixed["latencies"], mixed["held_slow"]) if not slow]
    slow = [x for x, slow in zip(mixed["latencies"], mixed["held_slow"]) if slow]
    result = {"c": c, "ok": mixed["ok"], "slow": len(slow), "ordinary_p50": pct(ordinary, 0.5),
              "ordinary_p99": pct(ordinary, 0.99), "slow_p50": pct(slow, 0.5),
              "plain_p50": pct(plain["latencies"], 0.5), "plain_p99": pct(plain["latencies"], 0.99)}
    print(json.dumps({"B": result}), flush=True)
    return result


def part_c_through_gym(tmp: Path, levels: list[int], repeats_at_top: int, hold_ms: float, timeout_s: float,
                       idle_s: float) -> dict:
    with Backend(tmp, "backend-c", hold_ms) as backend:
        head_port = free_port()
        cfg = load_config(write_config(tmp, backend.port, head_port, max(levels)))
        gym = ManagedProcess("NeMo Gym servers", gym_command(cfg, tmp / "gym-logs"), tmp / "gym.log")
        gym.start()
        try:
            wait_ready(cfg.gym.head_server_url, 300, is_alive=gym.alive)
            topo = discover(cfg.gym.head_server_url)
            gym_pids = descendants(gym.proc.pid)
            run_batch(topo, 32, 32, timeout_s)  # warm-up: first connections inside Gym
            time.sleep(40.0)  # past NeMo Gym's keep-alive timers: the idle state
            baseline = snapshot(gym_pids)
            print(json.dumps({"C": "baseline", **baseline}), flush=True)
            runs = []
            plan = levels[:-1] + [levels[-1]] * repeats_at_top
            for c in plan:
                backend.reset_peak()
                r = run_batch(topo, c, c, timeout_s)
                r["c"], r["backend_peak"] = c, backend.peak()
                r["after"] = snapshot(gym_pids)
                r["after_idle"], r["back_after_s"] = wait_for_baseline(gym_pids, baseline, idle_s)
                print(json.dumps({"C": c, **summary(r), "after": r["after"], "after_idle": r["after_idle"]}), flush=True)
                runs.append(r)
        finally:
            gym.stop()
    return {"baseline": baseline, "runs": runs}


def wait_for_baseline(gym_pids: list[int], baseline: dict, max_wait_s: float) -> tuple[dict, float | None]:
    """Poll until sockets of gymtrl and of Gym are back to their baseline (Gym: within 16, for its
    listeners' churn); returns the last snapshot and the seconds it took, or None if they never were."""
    start = time.monotonic()
    while True:
        now = snapshot(gym_pids)
        back = (now["gymtrl"]["sockets"] <= baseline["gymtrl"]["sockets"]
                and now["gym"]["sockets"] <= baseline["gym"]["sockets"] + 16)
        if back:
            return now, time.monotonic() - start
        if time.monotonic() - start > max_wait_s:
            return now, None
        time.sleep(1.0)


def summary(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("latencies", "held_slow", "after", "after_idle")}


def versions() -> str:
    gym_python = str(Path(os.environ["GYMTRL_GYM_VENV"]) / "bin/python")
    gym_version = subprocess.run([gym_python, "-c", "import importlib.metadata as m; print(m.version('nemo-gym'))"],
                                 capture_output=True, text=True).stdout.strip()
    return f"Python {platform.python_version()}, httpx {httpx.__version__}, nemo-gym {gym_version}"


def cells(u: dict) -> str:
    return (f"{u['gymtrl']['sockets']} / {u['gymtrl']['fds']} / {u['gymtrl']['rss_mib']:.0f} | "
            f"{u['gym']['sockets']} / {u['gym']['fds']} / {u['gym']['rss_mib']:.0f} | {u['tcp_established']}")


def failed(r: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in r["failures"].items()) or "0"


def report(args, a: list[dict], b: dict, c: dict) -> str:
    lines = [
        "# Rollout load test",
        "",
        f"`python bench/rollout_load.py` on {datetime.date.today()}, {os.cpu_count()} CPU cores, {versions()}.",
        "Generation and, in part A, the agent too, are FakeFastGenerationBackend (a fake, named as one: it holds",
        "each request, then answers in vLLM's / NeMo Gym's shape). Everything runs on the same cores.",
        "",
        f"## A. gymtrl's rollout client alone (FakeFastAgent holds each `/run` {args.hold_ms_a:.0f} ms)",
        "",
        f"A batch of c rollouts with rollout.max_concurrency = c. *sharded*: gymtrl's pools of {SHARD} connections;",
        "*one pool*: a single httpx pool for all of them, as before (httpcore rescans its connections on every",
        "request: encode/httpx#3215).",
        "",
        "| c | completed | peak open sockets | wall s | gymtrl CPU ms/rollout | one pool: wall s | one pool: CPU ms/rollout "
        "| CPU ratio one pool / sharded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in a:
        s, o = row["sharded"], row["one_pool"]
        tail = (f"{o['wall_s']:.1f} | {o['cpu_ms']:.2f} | {o['cpu_ms'] / s['cpu_ms']:.1f}x" if o else "not run | | ")
        lines.append(f"| {row['c']} | {s['ok']} of {s['rollouts']} | {s['peak_sockets']} | {s['wall_s']:.1f} | "
                     f"{s['cpu_ms']:.2f} | {tail} |")
    lines += [
        "",
        f"## B. Head-of-line blocking ({b['c']} rollouts in flight, every 50th held 10x longer)",
        "",
        "| run | ordinary p50 s | ordinary p99 s | slow p50 s |",
        "|---|---|---|---|",
        f"| no slow rollouts | {b['plain_p50']:.2f} | {b['plain_p99']:.2f} | |",
        f"| {b['slow']} slow rollouts | {b['ordinary_p50']:.2f} | {b['ordinary_p99']:.2f} | {b['slow_p50']:.2f} |",
        "",
        f"{b['ok']} of {b['c']} completed.",
        "",
        f"## C. Through real NeMo Gym servers (the fake backend holds each generation {args.hold_ms_c:.0f} ms)",
        "",
        "NeMo Gym 0.7: head server, simple_agent, vllm_model (training mode), gymtrl's digit_reply resources server,",
        "launched from the config `gymtrl train` would use. *peak open sockets*: gymtrl's connections to the agent,",
        "sampled during the batch; *backend peak*: generations held at once. Resources right after the batch, and",
        "once sockets are back to the baseline (NeMo Gym's aiohttp pools close idle connections after 15 s, on a",
        "timer; its uvicorn servers after 30 s): gymtrl's are back at once, since each batch closes its client.",
        "",
        "| c | completed | failed | peak open sockets | backend peak | wall s | path CPU ms/rollout* | p50 s | p99 s "
        "| when | gymtrl sockets / fds / RSS MiB | Gym sockets / fds / RSS MiB | loopback TCP |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| | | | | | | | | | baseline | {cells(c['baseline'])} |",
    ]
    for r in c["runs"]:
        path_ms = (r["wall_s"] - args.hold_ms_c / 1000) * 1000 * os.cpu_count() / r["rollouts"]
        lines.append(f"| {r['c']} | {r['ok']} | {failed(r)} | {r['peak_sockets']} | {r['backend_peak']} | "
                     f"{r['wall_s']:.1f} | {path_ms:.1f} | {pct(r['latencies'], 0.5):.1f} | "
                     f"{pct(r['latencies'], 0.99):.1f} | after batch | {cells(r['after'])} |")
        back = f"back after {r['back_after_s']:.0f} s" if r["back_after_s"] is not None else f"NOT back in {args.idle_s:.0f} s"
        lines.append(f"| | | | | | | | | | {back} | {cells(r['after_idle'])} |")
    lines += [
        "",
        "\\* (wall - hold) x cores / c: an upper bound on the CPU the whole path (gymtrl, three Gym servers and",
        "the fake backend, all on these cores) spends per rollout.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--levels-a", type=int, nargs="+", default=[16, 256, 1000, 2000, 4000])
    parser.add_argument("--one-pool-max", type=int, default=2000, help="run the single-pool comparison up to this c")
    parser.add_argument("--hold-ms-a", type=float, default=2000.0)
    parser.add_argument("--c-b", type=int, default=1000, help="B: rollouts in flight")
    parser.add_argument("--levels-c", type=int, nargs="+", default=[256, 1000, 2000])
    parser.add_argument("--repeats-at-top", type=int, default=3, help="C: batches at the top level (memory growth)")
    parser.add_argument("--hold-ms-c", type=float, default=20000.0)
    parser.add_argument("--idle-s", type=float, default=90.0, help="C: longest wait for sockets to return to baseline")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/rollout_load.md")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="gymtrl-load-"))
    a = part_a_client_alone(tmp, args.levels_a, args.one_pool_max, args.hold_ms_a, args.timeout_s)
    b = part_b_head_of_line(tmp, args.c_b, args.hold_ms_a, args.timeout_s)
    c = part_c_through_gym(tmp, args.levels_c, args.repeats_at_top, args.hold_ms_c, args.timeout_s, args.idle_s)
    text = report(args, a, b, c)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".tmp")
    partial.write_text(text)
    partial.replace(args.out)
    print(text)


if __name__ == "__main__":
    main()
