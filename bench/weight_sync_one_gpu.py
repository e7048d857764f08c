"""One GPU shared by the trainer and vLLM: how fast do new weights reach the server?

    python bench/weight_sync_one_gpu.py --vllm-venv V --model 0.5b=/tmp/model [--model 1.5b=DIR]
                                        [--repeats 5] [--out PATH]
    python bench/weight_sync_one_gpu.py --stamp --vllm-venv V --model 0.5b=DIR [--model 1.5b=DIR]
                                        [--repeats 7] [--out PATH.md] [--json-out PATH.json]

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

--stamp: what the exact weight check (gymtrl.vllm_plugin.load_stamp, gymtrl.sync.check.StampCheck)
adds to an ipc push (1 GiB buckets), on the same server in the same process, --repeats rounds each,
alternating the order after one warm-up of each:
* digest on: IpcSync.push as gymtrl runs it (the trainer digests each packed tensor, vLLM's workers
  digest what they loaded, the push is committed), then StampCheck and ProbeCheck, each timed;
* digest off (bench-only switch, trainer side): the push id is empty, so vLLM's receiver neither digests
  nor stamps (it stamps only a payload that names a push), the trainer's digests return {} and the commit
  is skipped; the probe still checks every such push;
* raw: `tensor_digest` over the trainer's state dict on the GPU, timed alone;
* the premise, on the GPU: one AdamW step at lr 1e-6 on the bf16 model without a push: StampCheck must
  fail and ProbeCheck (bf16 bound) pass; after the push both pass.
Writes every round's figures to --json-out and a Markdown summary (median, min-max) to --out.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# GYMTRL_BENCH_SRC: the gymtrl src/ to run (bench/device/device_bench.sh sets it)
sys.path.insert(0, os.environ.get("GYMTRL_BENCH_SRC") or str(REPO / "src"))


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


def start_vllm(shape: str, model_dir: str, args, work: Path):
    """vLLM for one shape, as gymtrl launches it for the ipc sync, healthy: (cfg, process, seconds to start).
    The caller stops the process."""
    from gymtrl.config import load_config
    from gymtrl.servers.process import ManagedProcess, http_ok
    from gymtrl.servers.vllm import vllm_command, vllm_env
    from gymtrl.vllm_plugin.install import ensure_installed

    cfg_path = work / f"{shape}.yaml"
    write_config(cfg_path, model_dir, args.vllm_venv)
    cfg = load_config(cfg_path, [])
    ensure_installed(str(Path(args.vllm_venv) / "bin" / "python"))
    vllm = ManagedProcess("vLLM", vllm_command(cfg, "ipc"), work / f"vllm-{shape}.log", env=vllm_env(cfg))
    t0 = time.monotonic()
    vllm.start()
    try:
        vllm.wait_healthy(lambda: http_ok("http://127.0.0.1:8000/health"), 600, "vLLM /health")
    except BaseException:
        vllm.stop()
        raise
    return cfg, vllm, time.monotonic() - t0


def perturber(params: list, seed: int = 0):
    """A function that moves every parameter by 1e-3 of fresh noise (a stand-in for an optimizer step)."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)

    def perturb():
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=gen, device="cuda", dtype=p.dtype), alpha=1e-3)
        torch.cuda.synchronize()

    return perturb


def measure(shape: str, model_dir: str, args, work: Path) -> list[tuple]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gymtrl.servers.vllm import served_model_name
    from gymtrl.sync.ipc import IpcSync
    from gymtrl.sync.reload import ReloadSync
    from gymtrl.sync.check import ProbeCheck, probe_token_ids
    from gymtrl.servers.vllm_control import VLLMControl

    cfg, vllm, started_s = start_vllm(shape, model_dir, args, work)
    rows = []
    try:
        print(f"[{shape}] vLLM up in {started_s:.0f} s", flush=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        control = VLLMControl(cfg.vllm.base_url, 300)
        verifier = ProbeCheck(control, served_model_name(cfg), probe_token_ids(tokenizer), 5e-2,
                                scale_with_logits=True)
        params = [p for p in model.parameters()]
        nbytes = sum(p.numel() * p.element_size() for p in params)
        perturb = perturber(params)

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


def spread(xs: list[float], scale: float = 1e3, fmt: str = ".1f") -> str:
    """median (min-max) of seconds, in ms by default."""
    if not xs:
        return ""
    return f"{statistics.median(xs) * scale:{fmt}} ({min(xs) * scale:{fmt}}-{max(xs) * scale:{fmt}})"


def adam_step(model, lr: float) -> int:
    """One real AdamW step at `lr` on a language-model loss (as tests/test_sync_check.py); returns how many
    elements changed."""
    import torch

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ids = torch.arange(1, 33, device="cuda").unsqueeze(0)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    del opt
    torch.cuda.synchronize()
    return sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())


def measure_stamp(shape: str, model_dir: str, args, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gymtrl.sync.ipc as ipc_mod
    from gymtrl.errors import WeightSyncError
    from gymtrl.servers.vllm import served_model_name
    from gymtrl.servers.vllm_control import VLLMControl
    from gymtrl.sync.base import Expected
    from gymtrl.sync.check import ProbeCheck, StampCheck, probe_token_ids, trainer_logprobs
    from gymtrl.sync.ipc import IpcSync
    from gymtrl.vllm_plugin.load_stamp import CHUNK, digests

    cfg, vllm, started_s = start_vllm(shape, model_dir, args, work)
    res: dict = {"shape": shape, "model": model_dir}
    try:
        res["vllm_start_s"] = round(started_s, 1)
        print(f"[{shape}] vLLM up in {res['vllm_start_s']:.0f} s", flush=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        control = VLLMControl(cfg.vllm.base_url, 300)
        probe = ProbeCheck(control, served_model_name(cfg), probe_token_ids(tokenizer), 5e-2, scale_with_logits=True)
        stamp = StampCheck(control)
        params = list(model.parameters())
        res["bytes"] = sum(p.numel() * p.element_size() for p in params)
        res["elements"] = sum(p.numel() for p in params)
        res["tensors"] = len(params)
        res["chunks"] = sum(-(-(p.numel() * p.element_size() // 8) // CHUNK) for p in params)  # CHUNK: 64-bit words
        perturb = perturber(params)

        # raw: the digest alone over the state dict, on the GPU
        raw = []
        sd = model.state_dict()
        for i in range(args.repeats + 1):
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            digests(sd.items())
            torch.cuda.synchronize()
            if i:
                raw.append(time.perf_counter() - t1)
        res["raw_digest_s"] = raw
        res["raw_digest_tensors"] = len(sd)
        print(f"[{shape}] raw tensor_digest over {len(sd)} tensors: {spread(raw)} ms", flush=True)

        # the switch: digest on (gymtrl as it runs) or off (no push id: vLLM neither digests nor stamps)
        state = {"on": True, "digest_s": 0.0, "commit_s": 0.0}
        real_digests, real_commit = ipc_mod.digests, ipc_mod.commit_push

        def timed_digests(named):
            if not state["on"]:
                return {}
            t1 = time.perf_counter()
            out = real_digests(named)
            state["digest_s"] += time.perf_counter() - t1
            return out

        def timed_commit(control_, push):
            if not state["on"]:
                return None
            t1 = time.perf_counter()
            out = real_commit(control_, push)
            state["commit_s"] += time.perf_counter() - t1
            return out

        ipc_mod.digests, ipc_mod.commit_push = timed_digests, timed_commit
        sync = IpcSync(control, 1024, "bfloat16")
        real_new_id = sync.new_push_id
        sync.new_push_id = lambda: real_new_id() if state["on"] else ""
        rounds = []
        step = 0
        try:
            order = [(True, False)] + [((True, False) if r % 2 == 0 else (False, True)) for r in range(args.repeats)]
            for r, modes in enumerate(order):
                for on in modes:
                    step += 1
                    state.update(on=on, digest_s=0.0, commit_s=0.0)
                    perturb()
                    total = sync.push(model)
                    row = {"round": r, "warmup": r == 0, "digest": on, "push_s": total,
                           **{k.removesuffix("_seconds"): v for k, v in sync.phases.items()},
                           "trainer_digest": state["digest_s"], "commit": state["commit_s"]}
                    if on:
                        t1 = time.perf_counter()
                        row["stamp_tensors"] = stamp.check(sync.expected, step)
                        row["stamp_check_s"] = time.perf_counter() - t1
                    t1 = time.perf_counter()
                    row["probe_diff"] = probe.check(model, step)
                    row["probe_check_s"] = time.perf_counter() - t1
                    row["probe_bound"] = probe.last_bound
                    rounds.append(row)
        finally:
            ipc_mod.digests, ipc_mod.commit_push = real_digests, real_commit
            sync.new_push_id = real_new_id
        res["rounds"] = rounds
        for on in (True, False):
            rs = [x for x in rounds if x["digest"] is on and not x["warmup"]]
            print(f"[{shape}] digest {'on ' if on else 'off'}: push {spread([x['push_s'] for x in rs])} ms, "
                  f"load {spread([x['load'] for x in rs])}, pack {spread([x['pack'] for x in rs])}, "
                  f"stamp check {spread([x.get('stamp_check_s', 0) for x in rs])}, "
                  f"probe {spread([x['probe_check_s'] for x in rs])}", flush=True)

        # the premise on the GPU: one AdamW step at lr 1e-6 in bf16, no push
        demo: dict = {}
        state["on"] = True
        step += 1
        sync.push(model)
        demo["pushed_first"] = {"stamp_tensors": stamp.check(sync.expected, step), "probe_diff": probe.check(model, step),
                                "probe_bound": probe.last_bound}
        before_probe = trainer_logprobs(model, probe.probe_ids)
        before = digests(model.named_parameters())
        demo["adam_changed_elements"] = adam_step(model, 1e-6)
        after = digests(model.named_parameters())
        demo["tensors_with_new_digest"] = sum(before[n] != after[n] for n in before)
        demo["tensors"] = len(before)
        after_probe = trainer_logprobs(model, probe.probe_ids)
        demo["probe_moved_by_step"] = max(abs(a - b) for a, b in zip(before_probe, after_probe))
        step += 1
        for label, expected in (("missed push (new push id, nothing sent)", Expected(real_new_id(), after)),
                                ("same push id, the new digests", Expected(sync.expected.push, after))):
            try:
                stamp.check(expected, step)
                demo[label] = "StampCheck PASSED (unexpected)"
            except WeightSyncError as e:
                demo[label] = f"StampCheck failed: {e.message}"
        try:
            demo["probe_without_push"] = {"passed": True, "diff": probe.check(model, step), "bound": probe.last_bound}
        except WeightSyncError as e:
            demo["probe_without_push"] = {"passed": False, "error": e.message}
        step += 1
        sync.push(model)
        demo["after_push"] = {"stamp_tensors": stamp.check(sync.expected, step), "probe_diff": probe.check(model, step),
                              "probe_bound": probe.last_bound}
        res["demo"] = demo
        print(f"[{shape}] lr 1e-6 demo: {json.dumps(demo)}", flush=True)
        sync.flat = None
        control.close()
    finally:
        vllm.stop()
    return res


def stamp_table(results: list[dict], repeats: int) -> str:
    import torch

    gpu = torch.cuda.get_device_name(0)
    versions = ", ".join(f"{d} {md.version(d)}" for d in ("torch", "vllm", "transformers"))
    lines = ["# The exact weight check's cost on one GPU (ipc sync, trainer and vLLM share it)", "",
             f"{datetime.date.today()}, 1x {gpu}, {versions}; bf16 random-weight models of Qwen2.5's shapes; "
             f"{repeats} rounds per mode after a warm-up of each, orders alternating; ms, median (min-max); "
             "`python bench/weight_sync_one_gpu.py --stamp`.", "",
             "| shape | digest | push | pack (of it trainer digest) | rpc | vLLM load (incl. its digest) | commit | reset | "
             "stamp check | probe check |", "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for on in (True, False):
            rs = [x for x in res["rounds"] if x["digest"] is on and not x["warmup"]]
            g = lambda k: spread([x.get(k, 0.0) for x in rs])  # noqa: E731
            lines.append(f"| {res['shape']} | {'on' if on else 'off'} | {g('push_s')} | {g('pack')} ({g('trainer_digest')}) | "
                         f"{g('rpc')} | {g('load')} | {g('commit')} | {g('reset')} | "
                         f"{g('stamp_check_s') if on else '-'} | {g('probe_check_s')} |")
    lines += ["", "| shape | tensors | elements | 2^20-element chunks | raw tensor_digest over the state dict, ms |",
              "|---|---|---|---|---|"]
    for res in results:
        lines.append(f"| {res['shape']} | {res['tensors']} | {res['elements']:,} | {res['chunks']} | {spread(res['raw_digest_s'])} |")
    lines += ["", "One AdamW step at lr 1e-6 on the bf16 model, no push:", ""]
    for res in results:
        d = res["demo"]
        lines.append(f"- {res['shape']}: {d['adam_changed_elements']:,} elements changed, {d['tensors_with_new_digest']} of "
                     f"{d['tensors']} tensors with a new digest; trainer's probe moved by {d['probe_moved_by_step']:.3g}; "
                     f"ProbeCheck without the push: {d['probe_without_push']}; "
                     f"StampCheck (missed push): {d['missed push (new push id, nothing sent)'][:90]}...; "
                     f"StampCheck (same id, new digests): {d['same push id, the new digests'][:110]}...; "
                     f"after the push: {d['after_push']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vllm-venv", required=True)
    ap.add_argument("--model", action="append", required=True, help="SHAPE=DIR, repeatable")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--stamp", action="store_true", help="the exact check's cost on ipc pushes (see the docstring)")
    ap.add_argument("--json-out", default=None, help="--stamp: every round's figures")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to measure")
        return 0
    work = Path(tempfile.mkdtemp(prefix="sync1gpu-"))
    if args.stamp:
        results = []
        for item in args.model:
            shape, model_dir = item.split("=", 1)
            results.append(measure_stamp(shape, model_dir, args, work))
            if args.json_out:  # after each shape, so a cut-off call keeps what it measured
                Path(args.json_out).write_text(json.dumps(results, indent=1))
        table = stamp_table(results, args.repeats)
        print(table)
        if args.out:
            Path(args.out).write_text(table)
        return 0
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
