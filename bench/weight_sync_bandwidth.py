"""How fast can trainer weights be pushed from GPU 0 to GPU 1 over NCCL?

    python bench/weight_sync_bandwidth.py [--models 0.5b 1.5b] [--buckets-mib 64 256 1024]
                                         [--repeats 5] [--warmup 2] [--out PATH]

Two processes, one per GPU, NCCL backend, rank 0 sends and rank 1 receives. For each model shape
(random bf16 tensors with the real Qwen2.5 parameter shapes, tied embeddings) it times:

* ``bound``: one broadcast of a single flat bf16 tensor as large as the whole model;
* ``per-param``: one broadcast per parameter tensor, queued back to back, one sync at the end;
* ``per-param+sync``: the same with a CUDA sync on both sides after every parameter, the shape of
  a sync that waits for each tensor before sending the next (older TRL server-mode syncs did this,
  with an HTTP request and a barrier per tensor on top; neither of those is in this figure);
* ``bucket-N MiB``: parameters packed into a preallocated flat bf16 buffer of N MiB
  (``torch.cat(..., out=view)``), one broadcast per bucket, unpacked on the receiver with views
  and copied into its own parameter tensors. Pack and unpack time are inside the timing. A
  parameter larger than the bucket goes alone, straight from/to its own tensor. TRL 1.16 on
  vLLM 0.26 syncs through vLLM's packed NCCL broadcast (``packed=True``: 1 GiB buffers, two of
  them), which is closest to the 1024 MiB row.

Each figure is the median of ``--repeats`` timed runs after ``--warmup`` untimed ones; a run's
time is the slower of the two ranks (barrier + cuda sync, then op, then cuda sync). GB/s is
10^9 bytes per second of model bytes. After the bucketed runs the receiver's tensors are checked
against the sender's (per-tensor checksums).

Prints a Markdown table and writes it to --out, or to $OUT/weight_sync_bandwidth.md when $OUT is
set. On a machine with fewer than two CUDA GPUs it prints why and exits 0 without measuring.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

# Keep NVLink multicast off (shared hosts); harmless elsewhere.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import torch  # noqa: E402

QWEN2 = {
    # name: hidden, intermediate, layers, heads, kv heads, vocab (tied embeddings)
    "0.5b": dict(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, vocab=151936),
    "1.5b": dict(hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2, vocab=151936),
}


def qwen2_shapes(hidden, intermediate, layers, heads, kv_heads, vocab):
    """(name, shape) for each parameter of Qwen2ForCausalLM, in module order, tied lm_head omitted."""
    hd = hidden // heads
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (heads * hd, hidden)),
            (p + "self_attn.q_proj.bias", (heads * hd,)),
            (p + "self_attn.k_proj.weight", (kv_heads * hd, hidden)),
            (p + "self_attn.k_proj.bias", (kv_heads * hd,)),
            (p + "self_attn.v_proj.weight", (kv_heads * hd, hidden)),
            (p + "self_attn.v_proj.bias", (kv_heads * hd,)),
            (p + "self_attn.o_proj.weight", (hidden, heads * hd)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    out.append(("model.norm.weight", (hidden,)))
    return out


def check_against_transformers(name, shapes):
    """Compare the hand-built shape list with transformers' Qwen2ForCausalLM on the meta device."""
    try:
        import transformers
        from transformers import Qwen2Config, Qwen2ForCausalLM
    except Exception as e:  # transformers absent: the hand-built list stands alone
        return f"not checked against transformers ({type(e).__name__})"
    c = QWEN2[name]
    cfg = Qwen2Config(hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                      num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                      num_key_value_heads=c["kv_heads"], vocab_size=c["vocab"], tie_word_embeddings=True)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    theirs = {n: tuple(p.shape) for n, p in model.named_parameters()}
    ours = dict(shapes)
    if theirs != ours:
        diff = sorted(set(theirs.items()) ^ set(ours.items()))[:6]
        raise SystemExit(f"{name}: shape list differs from transformers {transformers.__version__}: {diff}")
    return f"matches transformers {transformers.__version__} Qwen2ForCausalLM"


def make_buckets(numels, bucket_elems):
    """Group consecutive parameter indices into buckets of at most bucket_elems elements.
    A parameter larger than the bucket is a bucket of its own, marked direct=True."""
    buckets, cur, cur_n = [], [], 0
    for i, n in enumerate(numels):
        if n > bucket_elems:
            if cur:
                buckets.append((cur, False))
                cur, cur_n = [], 0
            buckets.append(([i], True))
            continue
        if cur_n + n > bucket_elems:
            buckets.append((cur, False))
            cur, cur_n = [], 0
        cur.append(i)
        cur_n += n
    if cur:
        buckets.append((cur, False))
    return buckets


def worker(rank, world, port, args, results):
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=dev)

    def timed(fn):
        for _ in range(args.warmup):
            dist.barrier(device_ids=[rank])
            fn()
            torch.cuda.synchronize()
        times = []
        for _ in range(args.repeats):
            dist.barrier(device_ids=[rank])
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            t = torch.tensor([time.perf_counter() - t0], device=dev, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times.append(t.item())
        return times

    rows = []
    for name in args.models:
        shapes = qwen2_shapes(**QWEN2[name])
        numels = [int(torch.Size(s).numel()) for _, s in shapes]
        total = sum(numels)
        nbytes = total * 2
        gen = torch.Generator(device=dev)
        gen.manual_seed(1234)
        if rank == 0:
            params = [torch.randn(s, generator=gen, device=dev, dtype=torch.bfloat16) for _, s in shapes]
        else:
            params = [torch.zeros(s, device=dev, dtype=torch.bfloat16) for _, s in shapes]

        def record(method, times, n_bcast):
            rows.append(dict(model=name, params=total, bytes=nbytes, method=method, n=n_bcast, times=times))

        # 1. bound: one flat tensor of the model's size
        flat = torch.empty(total, device=dev, dtype=torch.bfloat16)
        if rank == 0:
            flat.normal_(generator=gen)
        record("bound (1 flat tensor)", timed(lambda: dist.broadcast(flat, src=0)), 1)
        del flat
        torch.cuda.empty_cache()

        # 2. per-parameter
        def per_param():
            for p in params:
                dist.broadcast(p, src=0)

        def per_param_sync():
            for p in params:
                dist.broadcast(p, src=0)
                torch.cuda.synchronize()

        record("per-param", timed(per_param), len(params))
        record("per-param + sync each", timed(per_param_sync), len(params))

        # 3. packed flat buckets
        for mib in args.buckets_mib:
            bucket_elems = mib * 2**20 // 2
            buckets = make_buckets(numels, bucket_elems)
            packed = [b for b, direct in buckets if not direct]
            buf_elems = max((sum(numels[i] for i in b) for b in packed), default=0)
            buf = torch.empty(buf_elems, device=dev, dtype=torch.bfloat16)

            def bucketed():
                for idx, direct in buckets:
                    if direct:
                        dist.broadcast(params[idx[0]], src=0)
                        continue
                    n = sum(numels[i] for i in idx)
                    view = buf[:n]
                    if rank == 0:
                        torch.cat([params[i].reshape(-1) for i in idx], out=view)
                    dist.broadcast(view, src=0)
                    if rank != 0:
                        off = 0
                        for i in idx:
                            params[i].copy_(view[off:off + numels[i]].view(params[i].shape))
                            off += numels[i]

            if rank != 0:
                for p in params:
                    p.zero_()
            times = timed(bucketed)
            # the receiver now holds the sender's tensors: compare per-tensor checksums
            sums = torch.stack([p.float().sum(dtype=torch.float64) for p in params])
            other = sums.clone()
            dist.broadcast(other, src=0)
            ok = bool(torch.equal(sums, other))
            n_direct = sum(1 for _, d in buckets if d)
            record(f"bucket {mib} MiB", times, len(buckets))
            rows[-1]["note"] = (f"{len(buckets)} broadcasts ({n_direct} tensor(s) over the bucket sent alone); "
                                f"receiver matches sender: {'yes' if ok else 'NO'}")
            del buf
            torch.cuda.empty_cache()
        del params
        torch.cuda.empty_cache()

    if rank == 0:
        results.extend(rows)
    dist.barrier(device_ids=[rank])
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank, world, port, args, q):
    rows = []
    worker(rank, world, port, args, rows)
    if rank == 0:
        q.put(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["0.5b", "1.5b"], choices=sorted(QWEN2))
    ap.add_argument("--buckets-mib", nargs="+", type=int, default=[64, 256, 1024])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None, help="Markdown output (default $OUT/weight_sync_bandwidth.md if $OUT)")
    args = ap.parse_args(argv)

    out = args.out or (os.path.join(os.environ["OUT"], "weight_sync_bandwidth.md") if os.environ.get("OUT") else None)
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpu < 2:
        print(f"weight_sync_bandwidth: needs 2 CUDA GPUs, found {n_gpu}; nothing measured.")
        return 0
    if not torch.distributed.is_available() or not torch.distributed.is_nccl_available():
        print("weight_sync_bandwidth: torch.distributed with NCCL is not available; nothing measured.")
        return 0

    checks = {}
    for name in args.models:
        shapes = qwen2_shapes(**QWEN2[name])
        checks[name] = check_against_transformers(name, shapes)

    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    port = _free_port()
    t0 = time.time()
    mp.start_processes(_run, args=(2, port, args, q), nprocs=2, join=True, start_method="spawn")
    rows = q.get()
    wall = time.time() - t0

    bound = {r["model"]: statistics.median(r["times"]) for r in rows if r["method"].startswith("bound")}
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "?"
    lines = [
        f"GPUs: {torch.cuda.get_device_name(0)} -> {torch.cuda.get_device_name(1)}; "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {nccl}; "
        f"median of {args.repeats} after {args.warmup} warm-up; {wall:.0f} s in all.",
        "",
        "| model | params | MB (bf16) | method | broadcasts | median s | min s | max s | GB/s | x bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        med = statistics.median(r["times"])
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['bytes'] / 1e6:.0f} | {r['method']} | {r['n']} | "
            f"{med:.4f} | {min(r['times']):.4f} | {max(r['times']):.4f} | {r['bytes'] / med / 1e9:.1f} | "
            f"{med / bound[r['model']]:.2f} |")
    lines.append("")
    for r in rows:
        if r.get("note"):
            lines.append(f"- {r['model']} {r['method']}: {r['note']}")
    for name, c in checks.items():
        lines.append(f"- {name} shapes: {c}")
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
