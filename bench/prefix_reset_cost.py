#!/usr/bin/env python3
"""What vLLM's prefix-cache reset costs, by KV-cache size: every weight sync ends with one
(`/reset_prefix_cache`: KV computed with the old weights must not be reused), and on 2x H200 it
was 32 ms of the broadcast sync's 72 ms (bench/results/gpu-2x/syncs-nccl-vs-broadcast). vLLM's
block pool resets by visiting every KV block in Python, so the cost should follow the cache's
size, not the model's or the batch's. This runs a real vLLM (the CPU build here) at several
`--kv-cache-memory-bytes`, fills some cache with a request, and times the reset.

  source scripts/env.sh && python bench/prefix_reset_cost.py [--kv-mib 256 1024 4096] [--repeats 20]

Prints a Markdown table and writes it to bench/results/prefix_reset_cost.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def write_config(path: Path, model_dir: str, vllm_venv: str, port: int, kv_bytes: int) -> None:
    path.write_text(f"""model: {{name_or_path: {model_dir}, dtype: float32}}
data: {{train: unused.jsonl}}
vllm:
  base_url: http://127.0.0.1:{port}
  served_model_name: tiny
  dtype: float32
  max_model_len: 4096
  prefix_correction: false
  launch: {{enabled: true, venv: {vllm_venv}, extra_args: [--enforce-eager, --kv-cache-memory-bytes, "{kv_bytes}"]}}
sync: {{strategy: reload}}
""")


def cache_info(client, base_url: str) -> dict[str, int]:
    """vLLM's block size and block count (the `vllm:cache_config_info` gauge's labels on /metrics)."""
    text = client.get(f"{base_url}/metrics").text
    line = next((ln for ln in text.splitlines() if ln.startswith("vllm:cache_config_info{")), "")
    labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
    return {k: int(labels[k]) for k in ("block_size", "num_gpu_blocks") if labels.get(k, "").isdigit()}


def measure(kv_mib: int, model_dir: str, vllm_venv: str, repeats: int, work: Path) -> dict:
    import httpx

    from gymtrl.config import load_config
    from gymtrl.net import free_port
    from gymtrl.servers.process import ManagedProcess, http_ok
    from gymtrl.servers.vllm import vllm_command, vllm_env
    from gymtrl.servers.vllm_control import VLLMControl

    port = free_port()
    cfg_path = work / f"kv{kv_mib}.yaml"
    write_config(cfg_path, model_dir, vllm_venv, port, kv_mib * 2**20)
    cfg = load_config(cfg_path, [])
    log = work / f"vllm-kv{kv_mib}.log"
    vllm = ManagedProcess("vLLM", vllm_command(cfg, "reload"), log, env=vllm_env(cfg))
    vllm.start()
    try:
        vllm.wait_healthy(lambda: http_ok(f"{cfg.vllm.base_url}/health"), 600, "vLLM /health")
        control = VLLMControl(cfg.vllm.base_url, 120)
        seconds = []
        with httpx.Client(timeout=120, trust_env=False) as client, contextlib.closing(control):
            info = cache_info(client, cfg.vllm.base_url)
            for _ in range(repeats):
                # Some cached prefix to drop, as after a step's rollouts; then the reset alone is timed.
                client.post(f"{cfg.vllm.base_url}/v1/completions",
                            json={"model": "tiny", "prompt": "reset me " * 50, "max_tokens": 4}).raise_for_status()
                t0 = time.perf_counter()
                control.reset_prefix_cache()
                seconds.append(time.perf_counter() - t0)
    finally:
        vllm.stop()
    return {"kv_mib": kv_mib, **info, "median_ms": statistics.median(seconds) * 1e3,
            "min_ms": min(seconds) * 1e3, "max_ms": max(seconds) * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kv-mib", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--model", default=os.environ.get("GYMTRL_TINY_MODEL", str(REPO / "runs/tiny-model")))
    ap.add_argument("--vllm-venv", default=os.environ.get("GYMTRL_VLLM_VENV"))
    ap.add_argument("--out", default=str(REPO / "bench/results/prefix_reset_cost.md"))
    a = ap.parse_args()
    if not a.vllm_venv:
        raise SystemExit("set GYMTRL_VLLM_VENV (source scripts/env.sh) or pass --vllm-venv")
    if not (Path(a.model) / "config.json").exists():
        subprocess.run([sys.executable, str(REPO / "scripts/make_tiny_model.py"), a.model], check=True)
    work = Path(tempfile.mkdtemp(prefix="prefix-reset-"))
    rows = []
    for kv in a.kv_mib:
        r = measure(kv, a.model, a.vllm_venv, a.repeats, work)
        print(f"KV {kv} MiB: {r.get('num_gpu_blocks')} blocks of {r.get('block_size')} tokens, "
              f"reset median {r['median_ms']:.2f} ms", flush=True)
        rows.append(r)
    lines = [f"# vLLM's prefix-cache reset by KV-cache size ({datetime.date.today()})", "",
             f"- vLLM: the CPU build in {a.vllm_venv}; model: {a.model} (tiny random Qwen2, float32); "
             f"{a.repeats} resets per size, each after one 50-word completion; logs in {work}",
             f"- command: `python bench/prefix_reset_cost.py --kv-mib {' '.join(map(str, a.kv_mib))} --repeats {a.repeats}`",
             "", "| KV cache (MiB) | block size (tokens) | blocks | reset median (ms) | min | max |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kv_mib']} | {r.get('block_size', '?')} | {r.get('num_gpu_blocks', '?')} | "
                     f"{r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['max_ms']:.2f} |")
    if len(rows) > 1 and all("num_gpu_blocks" in r for r in (rows[0], rows[-1])):
        lo, hi = rows[0], rows[-1]
        per_block = (hi["median_ms"] - lo["median_ms"]) * 1e6 / (hi["num_gpu_blocks"] - lo["num_gpu_blocks"])
        lines += ["", f"Each further block adds {per_block:.0f} ns ({lo['kv_mib']} -> {hi['kv_mib']} MiB); "
                  f"the rest of the {lo['median_ms']:.1f} ms at {lo['kv_mib']} MiB is the HTTP call and the engine's round trip."]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
