"""The exact weight check's digest cost: gymtrl's digest (gymtrl.vllm_plugin.load_stamp.digests) over
every tensor of a Qwen2.5 0.5B- or 1.5B-shaped bf16 state dict, beside the first version it replaced
(BASELINE_first_version_digest below, kept verbatim as the baseline: four modular integer operations
an element and a host sync per 2^20-element chunk), in the same process on the same tensors.

Each side runs `--rounds` times after one warm-up; the medians and ranges are printed and written as
JSON. Both sides run once per push on each side of a sync (the trainer on what it sends, vLLM's
worker on what it loaded), so a push pays about twice the figure.

  python bench/digest_cost.py --device cuda --shapes 0.5b 1.5b --rounds 7 --out digest_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied
    "0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "1.5b": (1536, 8960, 28, 12, 2, 151936, True),
}


def state_dict_shapes(name: str) -> list[tuple[str, tuple[int, ...]]]:
    h, inter, layers, heads, kv, vocab, tied = SHAPES[name]
    kv_dim = h // heads * kv
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [(f"{p}.self_attn.q_proj.weight", (h, h)), (f"{p}.self_attn.q_proj.bias", (h,)),
                (f"{p}.self_attn.k_proj.weight", (kv_dim, h)), (f"{p}.self_attn.k_proj.bias", (kv_dim,)),
                (f"{p}.self_attn.v_proj.weight", (kv_dim, h)), (f"{p}.self_attn.v_proj.bias", (kv_dim,)),
                (f"{p}.self_attn.o_proj.weight", (h, h)), (f"{p}.mlp.gate_proj.weight", (inter, h)),
                (f"{p}.mlp.up_proj.weight", (inter, h)), (f"{p}.mlp.down_proj.weight", (h, inter)),
                (f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    if not tied:
        out.append(("lm_head.weight", (vocab, h)))
    return out


BASELINE_CHUNK = 1 << 20
_BASELINE_BITS = {1: ("uint8", 0xFF), 2: ("int16", 0xFFFF), 4: ("int32", 0xFFFFFFFF)}
_baseline_weights: dict = {}


def BASELINE_first_version_digest(tensor) -> str:
    """The digest gymtrl shipped first (measured on an H200 at 62 ms for the 0.5B shape), verbatim in
    its arithmetic: each element's bits times an odd weight, per 2^20-element chunk, summed on the host."""
    import torch

    flat = tensor.detach().contiguous().view(-1)
    view_dtype, mask = _BASELINE_BITS[flat.element_size()]
    ints = flat.view(getattr(torch, view_dtype))
    total = 0
    for k, start in enumerate(range(0, ints.numel(), BASELINE_CHUNK)):
        chunk = ints[start:start + BASELINE_CHUNK].to(torch.int64) & mask
        key = (str(chunk.device), chunk.numel())
        if key not in _baseline_weights:
            w = torch.arange(chunk.numel(), dtype=torch.int64, device=chunk.device) * -7046029254386353131
            w = w ^ (w >> 31)
            w = w * -4658895280553007687
            _baseline_weights[key] = (w ^ (w >> 29)) | 1
        part = int((chunk * _baseline_weights[key]).sum().item()) & ((1 << 64) - 1)
        total = (total + part * ((k * 0x2545F4914F6CDD1D) | 1)) & ((1 << 64) - 1)
    return f"{total:016x}.{flat.numel()}"


def timed(fn, device: str, rounds: int) -> list[float]:
    import torch

    fn()  # warm-up: weights made, kernels loaded
    out = []
    for _ in range(rounds):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shapes", nargs="+", default=["0.5b"], choices=sorted(SHAPES))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch

    from gymtrl.vllm_plugin.load_stamp import digests

    results = {"device": args.device, "torch": torch.__version__, "rounds": args.rounds, "shapes": {}}
    if args.device == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)
    for shape in args.shapes:
        g = torch.Generator(device=args.device).manual_seed(0)
        tensors = [(n, torch.randn(s, generator=g, device=args.device, dtype=torch.float32).to(torch.bfloat16))
                   for n, s in state_dict_shapes(shape)]
        params = sum(t.numel() for _, t in tensors)
        row = {"tensors": len(tensors), "params": params}
        sides = (("gymtrl", lambda ts=tensors: digests(ts)),
                 ("baseline_first_version", lambda ts=tensors: [BASELINE_first_version_digest(t) for _, t in ts]))
        for side, fn in sides:
            secs = timed(fn, args.device, args.rounds)
            row[side] = {"median_ms": 1e3 * statistics.median(secs), "min_ms": 1e3 * min(secs),
                         "max_ms": 1e3 * max(secs), "rounds_ms": [1e3 * s for s in secs]}
            print(f"{shape} {side}: {row[side]['median_ms']:.2f} ms (min {row[side]['min_ms']:.2f}, "
                  f"max {row[side]['max_ms']:.2f}) over {params / 1e6:.0f}M bf16 params", flush=True)
        row["speedup"] = row["baseline_first_version"]["median_ms"] / row["gymtrl"]["median_ms"]
        results["shapes"][shape] = row
        del tensors, sides
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
