"""One GPU shared by the trainer and vLLM: how fast do new weights reach the server?

    python bench/weight_sync_one_gpu.py --vllm-venv V --model 0.5b=/tmp/model [--model 1.5b=DIR]
                                        [--repeats 5] [--out PATH]

For each model, vLLM is launched on this GPU as `gymtrl train` launches it for sync.strategy=ipc
(gymtrl's worker extension, --gpu-memory-utilization 0.3), the same weights are loaded into a bf16
trainer model on the same GPU, and the script times, median of --repeats after one warm-up (and
prints the last ipc push's phases: pack, the HTTP call, inside vLLM the buffer's open and the load,
and the prefix-cache reset):

* bound: one device-to-device copy of the model's bytes, the least any sync on one GPU must move;
* ipc: gymtrl's IpcSync.push (pack into the shared buffer, vLLM's load_weights from it, prefix-cache
  reset), at two bucket sizes;
* reload: gymtrl's ReloadSync.push to /dev/shm (safetensors, vLLM's reload_weights, reset).

Before each timed push the trainer's weights are changed (noise), and after the last one gymtrl's
ProbeCheck checks that vLLM serves them: a figure for a sync that did not land is not printed.
Prints a Markdown table, and writes it to --out (default $OUT/weight_sync_one_gpu.md, if set).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def median_seconds(fn, repeats: int, before=None) -> float:
    times = []
    for i in range(repeats + 1):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_copy_seconds(nbytes: int, repeats: int) -> float:
    """One device-to-device copy of `nbytes`: what any sync on one GPU moves at least once."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)

    def copy_once():
        dst.copy_(src)
        torch.cuda.synchronize()

    return median_seconds(copy_once, repeats)


def write_config(path: Path, model_dir: str, vllm_venv: str) -> None:
    path.write_text(f"""model: {{name_or_path: {model_dir}, dtype: bfloat16}}
data: {{train: unused.jsonl}}
vllm:
  base_url: http://127.0.0.1:8000
  dtype: bfloat16
  max_model_len: 2048
  launch: {{enabled: true, venv: {vllm_venv}, extra_args: [--gpu-memory-utilization, "0.3"]}}
sync: {{strategy: ipc}}
""")


def measure(shape: str, model_dir: str, args, work: Path) -> list[tuple]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gymtrl.config import load_config
    from gymtrl.servers.process import ManagedProcess, http_ok
    from gymtrl.servers.vllm import served_model_name, vllm_command, vllm_env
    from gymtrl.sync.ipc import IpcSync
    from gymtrl.sync.reload import ReloadSync
    from gymtrl.sync.check import ProbeCheck, probe_token_ids
    from gymtrl.servers.vllm_control import VLLMControl
    from gymtrl.vllm_plugin.install import ensure_installed

    cfg_path = work / f"{shape}.yaml"
    write_config(cfg_path, model_dir, args.vllm_venv)
    cfg = load_config(cfg_path, [])
    ensure_installed(str(Path(args.vllm_venv) / "bin" / "python"))
    vllm = ManagedProcess("vLLM", vllm_command(cfg, "ipc"), work / f"vllm-{shape}.log", env=vllm_env(cfg))
    t0 = time.monotonic()
    vllm.start()
    rows = []
    try:
        vllm.wait_healthy(lambda: http_ok("http://127.0.0.1:8000/health"), 600, "vLLM /health")
        print(f"[{shape}] vLLM up in {time.monotonic() - t0:.0f} s", flush=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        control = VLLMControl(cfg.vllm.base_url, 300)
        verifier = ProbeCheck(control, served_model_name(cfg), probe_token_ids(tokenizer), 5e-2,
                                scale_with_logits=True)
        params = [p for p in model.parameters()]
        nbytes = sum(p.numel() * p.element_size() for p in params)
        gen = torch.Generator(device="cuda").manual_seed(0)

        def perturb():
            with torch.no_grad():
                for p in params:
                    p.add_(torch.randn(p.shape, generator=gen, device="cuda", dtype=p.dtype), alpha=1e-3)
            torch.cuda.synchronize()

        bound = device_copy_seconds(nbytes, args.repeats)
        rows.append((shape, "bound: one device copy of the bytes", nbytes, bound, None, {}))
        for label, sync in (("ipc, 1024 MiB buckets", IpcSync(control, 1024, "bfloat16")),
                            ("ipc, 256 MiB buckets", IpcSync(control, 256, "bfloat16")),
                            ("reload via /dev/shm", ReloadSync(control, Path(tempfile.mkdtemp(dir="/dev/shm")) / "w"))):
            seconds = median_seconds(lambda: sync.push(model), args.repeats, before=perturb)
            diff = verifier.check(model, step=len(rows))  # raises if vLLM does not serve these weights
            rows.append((shape, label, nbytes, seconds, diff, dict(sync.phases)))
            print(f"[{shape}] {label}: {seconds * 1e3:.1f} ms (verified, max logprob gap {diff:.3g})", flush=True)
            if isinstance(sync, IpcSync):
                sync.flat = None  # give its buffer back before the next one
        control.close()
    finally:
        vllm.stop()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vllm-venv", required=True)
    ap.add_argument("--model", action="append", required=True, help="SHAPE=DIR, repeatable")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to measure")
        return 0
    work = Path(tempfile.mkdtemp(prefix="sync1gpu-"))
    rows = []
    for item in args.model:
        shape, model_dir = item.split("=", 1)
        rows += measure(shape, model_dir, args, work)

    gpu = torch.cuda.get_device_name(0)
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip()
    versions = ", ".join(f"{d} {md.version(d)}" for d in ("torch", "vllm", "transformers"))
    lines = ["# Weight sync on one GPU (trainer and vLLM share it)", "",
             f"{datetime.date.today()}, 1x {gpu} (driver {driver}), {versions}; bf16 random-weight models of "
             f"Qwen2.5's shapes; median of {args.repeats} after a warm-up; `python bench/weight_sync_one_gpu.py`.", "",
             "| shape | how | MB | ms | x bound | GB/s | verified max logprob gap | last push by phase, ms |",
             "|---|---|---|---|---|---|---|---|"]
    bounds = {r[0]: r[3] for r in rows if r[4] is None}
    for shape, label, nbytes, seconds, diff, phases in rows:
        by_phase = ", ".join(f"{k.removesuffix('_seconds')} {v * 1e3:.1f}" for k, v in phases.items())
        lines.append(f"| {shape} | {label} | {nbytes / 1e6:.0f} | {seconds * 1e3:.1f} | {seconds / bounds[shape]:.1f} | "
                     f"{nbytes / seconds / 1e9:.1f} | {'' if diff is None else f'{diff:.3g}'} | {by_phase} |")
    table = "\n".join(lines) + "\n"
    print(table)
    out = args.out or (os.path.join(os.environ["OUT"], "weight_sync_one_gpu.md") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
