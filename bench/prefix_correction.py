#!/usr/bin/env python3
"""Multi-turn prefix mismatches with and without gymtrl's prefix correction, and what it costs.

  python bench/prefix_correction.py --model MODEL_DIR --vllm-venv VENV --gym-venv VENV \
      (--rows-dir DIR | --rows ENV=FILE ...) [--episodes-per-row 12] [--requests 200] [--vllm-arg=--enforce-eager ...]

Starts two identical stacks through gymtrl's own launcher (vLLM + NeMo Gym's workplace_assistant
and example_multi_step, or the environments of --rows, e.g. price_lookup=its validation.jsonl), one with the plugin on and one with it off, runs the same rows through
both with gymtrl's rollout engine, and reports per environment the multi-turn episodes and the
share that failed the prefix check. Then it times chat `/tokenize` on both servers with the
same later-turn requests (taken from the corrected episodes): the plugin's cost per request.
The model must call tools (a real instruct model, or tests/teach_tool_calls.py), or no episode has a
second turn.
Writes a Markdown table to --out (default bench/results/prefix_correction.md) and prints it.
On the GPU machine: bench/device/device_prefix_correction.sh.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

DEFAULT_ENVS = ("workplace_assistant", "example_multi_step")  # rows: --rows-dir/<env>/example.jsonl


def row_files(args) -> dict[str, Path]:
    """Environment name -> its rows file (the agent is <env>_simple_agent)."""
    if args.rows:
        return {env: Path(path) for env, _, path in (r.partition("=") for r in args.rows)}
    if args.rows_dir is None:
        raise SystemExit("prefix_correction.py: give --rows-dir or --rows ENV=FILE")
    return {env: args.rows_dir / env / "example.jsonl" for env in DEFAULT_ENVS}


def stack_config(args, correction: bool, out: Path):
    from gymtrl.config.load import load_config
    from gymtrl.net import free_port

    out.mkdir(parents=True, exist_ok=True)
    path = out / "servers.yaml"
    path.write_text(json.dumps({
        "model": {"name_or_path": str(args.model), "dtype": args.dtype},
        "data": {"train": ["unused.jsonl"]},
        "gym": {"head_server_url": f"http://127.0.0.1:{free_port()}",
                "launch": {"enabled": True, "venv": args.gym_venv, "env": dict(args.gym_env),
                           "config_paths": ["responses_api_models/vllm_model/configs/vllm_model_for_training.yaml",
                                            *(f"resources_servers/{e}/configs/{e}.yaml" for e in row_files(args))]}},
        "vllm": {"base_url": f"http://127.0.0.1:{free_port()}", "served_model_name": "policy",
                 "dtype": args.dtype, "max_model_len": args.max_model_len, "prefix_correction": correction,
                 "launch": {"enabled": True, "venv": args.vllm_venv, "extra_args": args.vllm_arg}},
        "output": {"dir": str(out)},
    }))
    return load_config(path)


def load_rows(files: dict[str, Path], repeats: int, max_rows: int | None) -> list[dict]:
    rows = []
    for env, path in files.items():
        lines = [l for l in path.read_text().splitlines() if l.strip()][:max_rows]
        rows += [{**json.loads(l), "agent_ref": {"name": f"{env}_simple_agent"}} for l in lines]
    return rows * repeats


def later_turn_requests(rows, outcomes, model: str) -> list[dict]:
    """Chat /tokenize bodies for the second call of each multi-turn episode, as NeMo Gym's
    vllm_model sends them: the row's messages, the assistant's tool call carrying its token ids,
    and the tool's output."""
    bodies = []
    for row, o in zip(rows, outcomes):
        if not o.trajectory or o.trajectory.num_turns < 2:
            continue
        params = row["responses_create_params"]
        items = o.reply["response"]["output"]
        call = next(i for i in items if i.get("type") == "function_call" and "generation_token_ids" in i)
        result = next(i for i in items if i.get("type") == "function_call_output")
        messages = list(params["input"]) + [
            {"role": "assistant", "content": None, "prompt_token_ids": call["prompt_token_ids"],
             "generation_token_ids": call["generation_token_ids"],
             "tool_calls": [{"id": call["call_id"], "type": "function",
                             "function": {"name": call["name"], "arguments": call["arguments"]}}]},
            {"role": "tool", "tool_call_id": call["call_id"], "content": result["output"]}]
        tools = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if k in t}}
                 for t in params.get("tools", [])]
        bodies.append({"model": model, "messages": messages, "tools": tools, "add_generation_prompt": True})
    return bodies


def time_tokenize(urls: dict[str, str], bodies: list[dict], n: int) -> dict[str, list[float]]:
    """Milliseconds per /tokenize, the two servers interleaved request by request."""
    times: dict[str, list[float]] = {name: [] for name in urls}
    with httpx.Client(timeout=60, trust_env=False) as client:
        for i in range(n):
            body = bodies[i % len(bodies)]
            for name, url in urls.items():
                start = time.perf_counter()
                resp = client.post(url.rstrip("/") + "/tokenize", json=body)
                times[name].append((time.perf_counter() - start) * 1000)
                resp.raise_for_status()
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--vllm-venv", required=True)
    ap.add_argument("--gym-venv", required=True)
    ap.add_argument("--gym-env", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    ap.add_argument("--rows-dir", type=Path, help="holds <env>/example.jsonl for workplace_assistant and example_multi_step")
    ap.add_argument("--rows", action="append", default=[], metavar="ENV=FILE",
                    help="an environment and its rows, instead of --rows-dir (repeatable)")
    ap.add_argument("--max-rows", type=int, default=None, help="the first N rows of each environment")
    ap.add_argument("--episodes-per-row", type=int, default=12)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--requests", type=int, default=200, help="/tokenize requests timed per server")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=16384)
    ap.add_argument("--template-label", default="the model's own chat template",
                    help="how to describe the chat template the servers use (pass it with --vllm-arg)")
    ap.add_argument("--vllm-arg", action="append", default=[])
    ap.add_argument("--work", type=Path, default=Path("/tmp/gymtrl-bench-prefix"))
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "prefix_correction.md")
    ap.add_argument("--device-label", default="")
    args = ap.parse_args()

    from gymtrl.gym.discovery import discover
    from gymtrl.rollout.engine import RolloutEngine, SamplingParams
    from gymtrl.failures import FailureBound, FailureLedger
    from gymtrl.rollout.rollout_func import batch_metrics
    from gymtrl.servers.stack import ServerStack

    files = row_files(args)
    rows = load_rows(files, args.episodes_per_row, args.max_rows)
    results, stacks = {}, []
    try:
        for name in ("off", "on"):
            cfg = stack_config(args, name == "on", args.work / name)
            stack = ServerStack(cfg, args.work / name / "logs")
            stack.__enter__()  # from the main thread: launched servers die with the thread that started them
            stacks.append(stack)
            engine = RolloutEngine(discover(cfg.gym.head_server_url),
                                   SamplingParams(1.0, 1.0, args.max_tokens), FailureLedger(FailureBound(1.0, 10**6, 1)),
                                   args.concurrency, 600.0, 0, 0.1)
            start = time.monotonic()
            try:
                outcomes = engine.run(rows)
            finally:
                engine.close()
            results[name] = {"cfg": cfg, "outcomes": outcomes, "seconds": time.monotonic() - start,
                             "metrics": batch_metrics(outcomes)}
        bodies = later_turn_requests(rows, results["on"]["outcomes"], "policy")
        times = time_tokenize({n: r["cfg"].vllm.base_url for n, r in results.items()}, bodies, args.requests) \
            if bodies else {}
    finally:
        for stack in reversed(stacks):
            stack.__exit__(None, None, None)

    lines = [f"# Prefix correction: mismatch rate and cost ({datetime.date.today()})", "",
             f"device: {args.device_label or platform.node()}; model: {args.model.name} ({args.dtype}); "
             f"{len(rows)} episodes per server ({args.episodes_per_row} per row), sampling temperature 1.0, "
             f"max {args.max_tokens} tokens per call, concurrency {args.concurrency}; chat template: "
             f"{args.template_label}; versions: {versions(args)}", "",
             "| environment | correction | multi-turn episodes | prefix mismatches | refused | other failures |",
             "|---|---|---|---|---|---|"]
    for env in files:
        agent = f"{env}_simple_agent"
        for name in ("off", "on"):
            m = results[name]["metrics"]
            outs = [o for o in results[name]["outcomes"] if o.env == agent]
            other = sum(o.failure is not None and o.failure.value not in ("prefix_mismatch", "prefix_correction_refused")
                        for o in outs)
            lines.append(f"| {env} | {name} | {m[f'env/{agent}/multi_turn_episodes']:.0f} | "
                         f"{m[f'env/{agent}/prefix_mismatch_rate']:.1%} | "
                         f"{m[f'env/{agent}/prefix_correction_refused_rate']:.1%} | {other} |")
    if times:
        off, on = statistics.median(times["off"]), statistics.median(times["on"])
        lines += ["", f"Chat `/tokenize` of {len(bodies)} distinct later-turn requests, {args.requests} timed per "
                  "server, interleaved (median ms): ",
                  "", "| without plugin | with plugin | cost per request |", "|---|---|---|",
                  f"| {off:.2f} ms | {on:.2f} ms | {on - off:+.2f} ms ({on / off:.2f}x) |"]
        gen = [o.latency_s for o in results["on"]["outcomes"] if o.trajectory and o.trajectory.num_turns >= 2]
        if gen:
            lines.append(f"\nFor scale: a whole multi-turn episode took {statistics.median(gen) * 1000:.0f} ms (median) "
                         f"with the plugin on; each of its model calls renders once for generation and once for /tokenize.")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


def versions(args) -> str:
    import subprocess

    from gymtrl import __version__

    probe = "import vllm; print(vllm.__version__)"
    python = Path(args.vllm_venv) / "bin" / "python"
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True).stdout.strip()
    return f"gymtrl {__version__}, vLLM {out or '?'}"


if __name__ == "__main__":
    sys.exit(main())
