#!/usr/bin/env python3
"""vLLM's generation speed with and without a LoRA adapter, on the servers gymtrl launches.

  python bench/lora_generation.py --model MODEL_DIR --vllm-venv VENV --rows FILE [--rank 16] \
      [--concurrency 128] [--requests 256] [--max-tokens 256] [--rounds 5] \
      [--variant NAME=ARGS ...] [--vllm-arg=...] --out bench/results/NAME.md --raw NAME.json

Makes a LoRA adapter of the given rank on every linear layer (PEFT, random weights: its values do not
change the work), then starts, one after another, the vLLM servers gymtrl launches (`vllm_command`):
- `full`: as for a full-weight run (sync.strategy ipc): requests to the base model;
- `lora`: as for a LoRA run (sync.strategy lora, the adapter loaded as gymtrl's sync loads it):
  requests to the base model and to the adapter, alternating round by round;
- `lora-noplugin`: the same with gymtrl's prefix-correction plugin off: requests to the adapter;
- each `--variant NAME=ARGS`: the LoRA server with these extra vLLM arguments (space-separated):
  requests to the adapter.
Each round sends the same chat requests (the rows' messages and tools, as NeMo Gym's model server
sends them, logprobs on, temperature 1.0) with `ignore_eos`, so every request generates exactly
--max-tokens tokens and the rounds compare like for like; the first round of each kind is a
warm-up and is not counted. GPU utilisation is sampled with nvidia-smi while a round runs.
On the GPU machine: `bench/device/device_real.sh lorabench`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


def server_config(args, strategy: str, plugin: bool, extra: list[str], work: Path):
    from gymtrl.config.load import load_config
    from gymtrl.net import free_port

    work.mkdir(parents=True, exist_ok=True)
    path = work / "server.yaml"
    path.write_text(json.dumps({
        "model": {"name_or_path": str(args.model), "dtype": args.dtype,
                  "lora": {"r": args.rank if strategy == "lora" else 0, "alpha": 2 * args.rank}},
        "data": {"train": ["unused.jsonl"]},
        "vllm": {"base_url": f"http://127.0.0.1:{free_port()}", "dtype": args.dtype, "max_model_len": args.max_model_len,
                 "prefix_correction": plugin,
                 "launch": {"enabled": True, "venv": args.vllm_venv, "extra_args": list(args.vllm_arg) + extra}},
        "sync": {"strategy": strategy},
        "output": {"dir": str(work)},
    }))
    return load_config(path)


def make_adapter(model: Path, rank: int, out: Path) -> int:
    """A PEFT adapter of `rank` on every linear layer, with random (non-zero) weights; its size in bytes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    peft = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                           init_lora_weights=False, task_type="CAUSAL_LM"))
    peft.save_pretrained(out)
    return sum(f.stat().st_size for f in out.iterdir() if f.is_file())


def chat_bodies(rows_file: Path, max_tokens: int) -> list[dict]:
    """Chat requests from NeMo Gym rows: their messages and tools, sampled as a training rollout is."""
    bodies = []
    for line in rows_file.read_text().splitlines():
        if not line.strip():
            continue
        params = json.loads(line)["responses_create_params"]
        messages = [{"role": m["role"], "content": m["content"]} for m in params["input"]]
        tools = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if k in t}}
                 for t in params.get("tools", [])]
        bodies.append({"messages": messages, "tools": tools, "tool_choice": "auto", "max_tokens": max_tokens,
                       "temperature": 1.0, "top_p": 1.0, "logprobs": True, "ignore_eos": True})
    return bodies


class GpuSampler:
    """nvidia-smi's utilisation.gpu every 200 ms while a round runs (none without nvidia-smi)."""

    def __enter__(self):
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "200", "-i", "0"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        self.samples: list[float] = []
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=10)
            self.samples = [float(x) for x in out.split() if x.strip().isdigit()]


async def one_round(url: str, model: str, bodies: list[dict], n: int, concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0

    async def one(client: httpx.AsyncClient, body: dict) -> None:
        nonlocal tokens
        async with sem:
            start = time.perf_counter()
            resp = await client.post(url + "/v1/chat/completions", json={**body, "model": model})
            resp.raise_for_status()
            latencies.append(time.perf_counter() - start)
            tokens += resp.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, trust_env=False, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, bodies[i % len(bodies)]) for i in range(n)))
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "latency_median_s": statistics.median(latencies)}


def measure(url: str, kinds: dict[str, str], bodies, args) -> dict[str, list[dict]]:
    """`args.rounds` counted rounds of each kind (kind -> model name), alternating, after one warm-up each."""
    rounds: dict[str, list[dict]] = {k: [] for k in kinds}
    for r in range(args.rounds + 1):
        for kind, model in kinds.items():
            with GpuSampler() as gpu:
                result = asyncio.run(one_round(url, model, bodies, args.requests, args.concurrency))
            result["gpu_util_mean"] = statistics.mean(gpu.samples) if gpu.samples else None
            print(f"  {kind} round {r}: {result['tokens_per_s']:.0f} tokens/s, {result['seconds']:.2f} s, "
                  f"GPU {result['gpu_util_mean']}", file=sys.stderr, flush=True)
            if r > 0:
                rounds[kind].append(result)
    return rounds


def run_server(args, name: str, strategy: str, plugin: bool, extra: list[str], adapter: Path,
               bodies: list[dict]) -> dict:
    from gymtrl.servers.process import ManagedProcess, http_ok
    from gymtrl.servers.vllm import LORA_ADAPTER_NAME, served_model_name, vllm_command, vllm_env, vllm_python
    from gymtrl.servers.vllm_control import VLLMControl
    from gymtrl.vllm_plugin.install import ensure_installed

    work = args.work / name
    cfg = server_config(args, strategy, plugin, extra, work)
    if plugin:
        ensure_installed(vllm_python(cfg))
    url = cfg.vllm.base_url.rstrip("/")
    proc = ManagedProcess(f"vLLM ({name})", vllm_command(cfg, strategy), work / "vllm.log", env=vllm_env(cfg))
    start = time.monotonic()
    proc.start()
    try:
        proc.wait_healthy(lambda: http_ok(url + "/health"), args.startup_timeout_s, "/health")
        startup = time.monotonic() - start
        kinds = {"base": served_model_name(cfg)} if strategy != "lora" or name == "lora" else {}
        if strategy == "lora":  # loaded as the lora sync loads each push
            control = VLLMControl(url, timeout_s=120)
            try:
                control.load_lora_adapter(LORA_ADAPTER_NAME, str(adapter))
            finally:
                control.close()
            kinds["adapter"] = LORA_ADAPTER_NAME
        print(f"{name}: up after {startup:.0f} s; measuring {', '.join(kinds)}", file=sys.stderr, flush=True)
        rounds = measure(url, kinds, bodies, args)
    finally:
        proc.stop(grace_s=30.0)
    graph_lines = [l for l in proc.log_path.read_text(errors="replace").splitlines()
                   if any(w in l.lower() for w in ("cuda graph", "cudagraph", "lora", "compil", "kv cache", "backend"))]
    return {"name": name, "strategy": strategy, "plugin": plugin, "extra_args": extra, "startup_s": startup,
            "command": proc.command, "rounds": rounds, "log_lines": graph_lines[-40:]}


def summary(rounds: list[dict]) -> tuple[float, float, float]:
    values = [r["tokens_per_s"] for r in rounds]
    return statistics.median(values), min(values), max(values)


def table(args, results: list[dict], adapter_bytes: int) -> str:
    lines = [f"# vLLM generation with and without a LoRA adapter ({datetime.date.today()})", "",
             f"device: {args.device_label or platform.node()}; model: {args.model.name} ({args.dtype}); adapter: rank "
             f"{args.rank} on every linear layer ({adapter_bytes / 1e6:.1f} MB); {args.requests} chat requests per "
             f"round at concurrency {args.concurrency}, {args.max_tokens} tokens each (ignore_eos), logprobs on; "
             f"{args.rounds} rounds per row after one warm-up. Raw: `{args.raw.name}`.", "",
             "| server | requests to | tokens/s, median [min-max] | vs the first row | median request | GPU busy |",
             "|---|---|---|---|---|---|"]
    ref = None
    for res in results:
        for kind, rounds in res["rounds"].items():
            med, lo, hi = summary(rounds)
            ref = ref or med
            gpu = [r["gpu_util_mean"] for r in rounds if r["gpu_util_mean"] is not None]
            extra = f" `{' '.join(res['extra_args'])}`" if res["extra_args"] else ""
            lines.append(f"| {res['name']}{extra} | {kind} | {med:,.0f} [{lo:,.0f}-{hi:,.0f}] | {med / ref:.2f}x | "
                         f"{statistics.median(r['latency_median_s'] for r in rounds):.2f} s | "
                         f"{f'{statistics.mean(gpu):.0f}%' if gpu else '-'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--vllm-venv", required=True)
    ap.add_argument("--rows", type=Path, required=True, help="NeMo Gym rows (JSONL) whose messages and tools make the requests")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--requests", type=int, default=256, help="requests per round")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--startup-timeout-s", type=float, default=400)
    ap.add_argument("--vllm-arg", action="append", default=[], help="an argument every server gets (repeatable)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                    help="one more LoRA server with these extra vLLM arguments (space-separated; repeatable)")
    ap.add_argument("--skip", action="append", default=[], choices=["full", "lora", "lora-noplugin"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/gymtrl-bench-lora"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--raw", type=Path, required=True)
    ap.add_argument("--device-label", default="")
    args = ap.parse_args()

    adapter = args.work / "adapter"
    adapter_bytes = make_adapter(args.model, args.rank, adapter)
    settings = [("full", "ipc", True, []), ("lora", "lora", True, []), ("lora-noplugin", "lora", False, [])]
    settings = [s for s in settings if s[0] not in args.skip]
    settings += [(spec.partition("=")[0], "lora", True, spec.partition("=")[2].split()) for spec in args.variant]
    bodies = chat_bodies(args.rows, args.max_tokens)
    results = []
    for name, strategy, plugin, extra in settings:
        results.append(run_server(args, name, strategy, plugin, extra, adapter, bodies))
        args.raw.parent.mkdir(parents=True, exist_ok=True)
        args.raw.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "adapter_bytes": adapter_bytes,
                                        "results": results}, indent=1))
        text = table(args, results, adapter_bytes)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
