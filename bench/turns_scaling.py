"""How the rollout path's cost grows with turns per rollout (issue 6, item 5), on CPU.

    source scripts/env.sh && python bench/turns_scaling.py [--turns 1 2 4 6] [--rollouts 64] [--hold-ms 0]

NeMo Gym 0.7's workplace_assistant (simple_agent, up to 6 model calls; 27 tools) with its vllm_model
in training mode, launched as `gymtrl train` launches them. Generation is FakeFastGenerationBackend
(bench/fake_fast_generation_backend.py, a fake named as one): it answers each model call after
--hold-ms, the first T - 1 calls of a conversation with a tool call (company_directory_find_email_address,
which the resources server really runs), with prompt token ids that extend the previous call's as a
real server's do. So this measures the CPU side of a turn: gymtrl's client and stitching, NeMo Gym's
agent, model and resources servers; not generation (that is the GPU's, measured by bench/device/device_bench.sh).

For each T: a fresh backend and Gym, a warm-up batch, then --repeats batches of --rollouts rollouts,
all in flight at once: every rollout must come back with T model calls and no failure. Reported: wall
time per batch, model calls per second, and CPU milliseconds per model call in gymtrl's process and in
Gym's processes. Writes bench/results/turns_scaling.md.

With --vllm URL (a real vLLM serving with gymtrl's launch flags, hermes tool parser included; on the GPU
machine, bench/device/device_bench.sh stage `turns`): real generation instead of the fake. A random model
never calls a tool by itself, so every model call is held to one well-formed tool call by vLLM's
structured outputs (a regex in each row's metadata.extra_body, which NeMo Gym's vllm_model forwards),
and the agent's max_steps is set to T: each rollout is exactly T model calls, each followed by the
resources server running the tool. --copies C launches C copies of each Gym server.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout_load import REPO, Backend, descendants, free_port, versions, write_config  # noqa: E402  (also puts src/ on sys.path)

from gymtrl.config.load import load_config  # noqa: E402
from gymtrl.gym.discovery import discover, wait_ready  # noqa: E402
from gymtrl.rollout.engine import RolloutEngine, SamplingParams  # noqa: E402
from gymtrl.failures import FailureBound, FailureLedger  # noqa: E402
from gymtrl.servers.gym import gym_command  # noqa: E402
from gymtrl.servers.process import ManagedProcess  # noqa: E402

AGENT = "workplace_assistant_simple_agent"
WORKPLACE_CONFIG = "resources_servers/workplace_assistant/configs/workplace_assistant.yaml"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of `pids` (those still alive)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total / TICKS


# One tool call, written as the Qwen2.5 template renders it back (so histories re-render to the same tokens).
FORCED_TOOL = "company_directory_find_email_address"
FORCED_TOOL_CALL = (r'<tool_call>\n\{"name": "' + FORCED_TOOL + r'", "arguments": '
                    r'\{"name": "[a-z]{1,12}"\}\}\n</tool_call>')


def rows(n: int, rows_file: Path | None = None, forced_tool_call: bool = False, max_tokens: int = 64,
         tools: int | None = None) -> list[dict]:
    """n workplace_assistant rows, cycled; `tools`: keep only that many of the 27 tool schemas (the forced
    call's tool first), which sets the prompt's length."""
    site = rows_file or Path(os.environ["GYMTRL_GYM_SITE"]) / "resources_servers/workplace_assistant/data/example.jsonl"
    base = [json.loads(line) for line in site.read_text().split("\n") if line.strip()]
    for row in base:
        row["agent_ref"] = {"type": "responses_api_agents", "name": AGENT}
        if tools is not None:
            schemas = row["responses_create_params"]["tools"]
            schemas.sort(key=lambda t: t["name"] != FORCED_TOOL)  # stable: the forced call's tool first
            del schemas[tools:]
        if forced_tool_call:
            params = row["responses_create_params"]
            params.update(max_output_tokens=max_tokens, temperature=1.0,
                          metadata={"extra_body": json.dumps({"structured_outputs": {"regex": FORCED_TOOL_CALL}})})
    return [base[i % len(base)] for i in range(n)]


def run_batch(topo, batch: list[dict], gym_pids: list[int], timeout_s: float, max_tokens: int = 4,
              vocab_size: int | None = 1000) -> dict:
    ledger = FailureLedger(FailureBound(max_rate=1.0, window=len(batch), min_rollouts=len(batch) + 1))
    engine = RolloutEngine(topo, SamplingParams(1.0, 1.0, max_tokens), ledger, max_concurrency=len(batch),
                           timeout_s=timeout_s, retries=0, retry_backoff_s=0.1, vocab_size=vocab_size)
    try:
        ours0, gym0, t0 = time.process_time(), cpu_seconds(gym_pids), time.monotonic()
        outcomes = engine.run(batch)
        wall, ours, gym = time.monotonic() - t0, time.process_time() - ours0, cpu_seconds(gym_pids) - gym0
    finally:
        engine.close()
    failures = [f"{o.failure.value}: {o.detail[:200]}" for o in outcomes if o.failure is not None]
    ok = [o.trajectory for o in outcomes if o.trajectory is not None]
    return {"wall_s": wall, "gymtrl_cpu_s": ours, "gym_cpu_s": gym, "failures": failures,
            "model_calls": [o.model_calls for o in outcomes], "model_tokens": sum(t.num_model_tokens for t in ok),
            "sequence_tokens": sum(len(t.prompt_ids) + len(t.completion_ids) for t in ok) / max(len(ok), 1)}


def gym_env(pythonpath: str | None) -> dict:
    """Gym's own PYTHONPATH where it is not a venv of its own (the GPU machine's bundle)."""
    return {"PYTHONPATH": pythonpath} if pythonpath else {}


def served_model(vllm: str) -> str:
    return httpx.get(vllm.rstrip("/") + "/v1/models", trust_env=False, timeout=30).json()["data"][0]["id"]


def measure(tmp: Path, turns: int, args) -> dict:
    n, repeats, timeout_s = args.rollouts, args.repeats, args.timeout_s
    with contextlib.ExitStack() as stack:
        head_port = free_port()
        if args.vllm:  # real generation: T tool calls, forced, then the agent's max_steps ends the rollout
            max_steps = "workplace_assistant_simple_agent.responses_api_agents.simple_agent.max_steps"
            path = write_config(tmp, 0, head_port, n, WORKPLACE_CONFIG, base_url=args.vllm,
                                served_model_name=served_model(args.vllm), overrides={max_steps: turns},
                                copies=args.copies, launch_env=gym_env(args.gym_pythonpath))
            batch_kw = dict(max_tokens=args.max_tokens, vocab_size=None)
        else:
            backend = stack.enter_context(Backend(tmp, f"backend-t{turns}", args.hold_ms, "--tool-turns", str(turns)))
            path = write_config(tmp, backend.port, head_port, n, WORKPLACE_CONFIG, copies=args.copies)
            batch_kw = {}
        make_rows = functools.partial(rows, rows_file=args.rows, forced_tool_call=bool(args.vllm), max_tokens=args.max_tokens,
                                      tools=args.tools)
        cfg = load_config(path)
        gym = ManagedProcess("NeMo Gym servers", gym_command(cfg, tmp / f"gym-logs-t{turns}"), tmp / f"gym-t{turns}.log",
                             env=dict(cfg.gym.launch.env))  # as gymtrl's ServerStack starts it
        gym.start()
        stack.callback(gym.stop)
        # gym.raise_if_exited() raises with the last lines of Gym's log when the launcher exited
        wait_ready(cfg.gym.head_server_url, 300, is_alive=lambda: gym.alive() or bool(gym.raise_if_exited()))
        topo = discover(cfg.gym.head_server_url)
        pids = descendants(gym.proc.pid)
        run_batch(topo, make_rows(min(n, 16)), pids, timeout_s, **batch_kw)  # warm-up: connections, first imports
        runs = [run_batch(topo, make_rows(n), pids, timeout_s, **batch_kw) for _ in range(repeats)]
    calls = [c for r in runs for c in r["model_calls"]]
    failures = [f for r in runs for f in r["failures"]]
    total_calls = sum(calls)
    wall = statistics.median(r["wall_s"] for r in runs)
    out = {"turns": turns, "rollouts": n * repeats, "failures": failures, "calls_ok": all(c == turns for c in calls),
           "calls_seen": sorted(set(calls)), "wall_s": wall, "calls_per_s": total_calls / sum(r["wall_s"] for r in runs),
           "gymtrl_ms_per_call": 1000 * sum(r["gymtrl_cpu_s"] for r in runs) / max(total_calls, 1),
           "gym_ms_per_call": 1000 * sum(r["gym_cpu_s"] for r in runs) / max(total_calls, 1),
           "model_tokens_per_s": sum(r["model_tokens"] for r in runs) / sum(r["wall_s"] for r in runs),
           "sequence_tokens": statistics.mean(r["sequence_tokens"] for r in runs)}
    print(json.dumps(out), flush=True)
    return out


def report(args, results: list[dict]) -> str:
    first = results[0]
    if args.vllm:
        source = (f"generation: the real vLLM at {args.vllm} ({args.device}), every model call held to one tool call "
                  f"(company_directory_find_email_address, at most {args.max_tokens} tokens) by structured outputs, "
                  "the agent's max_steps set to T, so each rollout is T model calls and T tool calls")
        title = f"# Rollout phase vs turns per rollout, real generation ({args.device})"
    else:
        source = ("generation is FakeFastGenerationBackend (a fake, named as one: "
                  f"each model call answered after {args.hold_ms:g} ms; the first T - 1 calls of a conversation call a tool)")
        title = "# Rollout cost vs turns per rollout (CPU side)"
    lines = [
        title, "",
        f"`python bench/turns_scaling.py {' '.join(sys.argv[1:])}` on {datetime.date.today()}, {os.cpu_count()} CPU cores, "
        f"{versions()}.",
        "NeMo Gym's workplace_assistant (simple_agent, vllm_model in training mode, the resources server running "
        f"each tool call, {args.copies} cop{'y' if args.copies == 1 else 'ies'} of each server) and gymtrl's rollout engine; "
        f"{source}. Each row: {args.repeats} batch(es) of {args.rollouts} rollouts, all in flight at once"
        + (f"; each prompt keeps {args.tools} of the 27 tool schemas." if args.tools is not None else "."),
        "",
        "| turns (model calls) per rollout | rollouts | failed | every rollout had T calls | batch wall s (median) | "
        "model calls / s | model tokens / s | tokens a rollout (prompt + completion) | gymtrl CPU ms / call | "
        "Gym CPU ms / call | Gym CPU ms / rollout | batch wall vs the first row |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['turns']} | {r['rollouts']} | {len(r['failures'])} | {'yes' if r['calls_ok'] else 'no: ' + str(r['calls_seen'])} | "
                     f"{r['wall_s']:.2f} | {r['calls_per_s']:.0f} | {r['model_tokens_per_s']:,.0f} | {r['sequence_tokens']:,.0f} | "
                     f"{r['gymtrl_ms_per_call']:.2f} | {r['gym_ms_per_call']:.2f} | {r['gym_ms_per_call'] * r['turns']:.0f} | "
                     f"{r['wall_s'] / first['wall_s']:.2f}x |")
    if len(results) > 1:
        last = results[-1]
        per_turn = (last["gym_ms_per_call"] * last["turns"] - first["gym_ms_per_call"] * first["turns"]) / (last["turns"] - first["turns"])
        wall_turn = (last["wall_s"] - first["wall_s"]) / (last["turns"] - first["turns"])
        lines += ["", f"Gym's CPU per rollout is a fixed part (the first row: {first['gym_ms_per_call'] * first['turns']:.0f} ms, "
                  "what a rollout costs Gym besides its turns) plus about "
                  f"{per_turn:.0f} ms per further turn (first row to last); gymtrl's own share stays at a few ms per call. "
                  f"The batch's wall time grows by about {wall_turn:.2f} s per further turn."]
    if not args.vllm:
        lines += ["", "On a GPU machine, where generation is far faster than on these cores, this CPU bounds how many",
                  "rollouts and turns per second the Gym side can feed vLLM; gym.launch.copies spreads it over more processes."]
    bad = [f for r in results for f in r["failures"]]
    if bad:
        lines += ["", "Failures (first 5):", *[f"- {f}" for f in bad[:5]]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, nargs="+", default=[1, 2, 4, 6])
    parser.add_argument("--rollouts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hold-ms", type=float, default=0.0)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--vllm", default=None, help="a real vLLM server (gymtrl's launch flags) instead of the fake")
    parser.add_argument("--max-tokens", type=int, default=64, help="with --vllm: most tokens a model call")
    parser.add_argument("--copies", type=int, default=1, help="gym.launch.copies")
    parser.add_argument("--rows", type=Path, default=None, help="workplace_assistant rows (default: NeMo Gym's example.jsonl)")
    parser.add_argument("--tools", type=int, default=None, help="keep this many of the rows' 27 tool schemas")
    parser.add_argument("--gym-pythonpath", default=None, help="with --vllm: PYTHONPATH of Gym's python (the GPU bundle's)")
    parser.add_argument("--device", default="", help="with --vllm: the device, for the report")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/turns_scaling.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gymtrl-turns-") as tmp:
        results = [measure(Path(tmp), t, args) for t in args.turns]
    text = report(args, results)
    print(text)
    args.out.write_text(text)
    if any(r["failures"] or not r["calls_ok"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
