"""The one-GPU weight sync: the trainer and vLLM share a GPU, and the weights cross through CUDA IPC.

NCCL cannot join two processes on one GPU, and the reload sync goes through the disk. Here the
trainer copies its parameters into a flat buffer of `sync.bucket_mb` (one bucket at a time, in
vLLM's dtype), shares the buffer's IPC handle, and asks vLLM's workers to load from it
(gymtrl.vllm_plugin.weight_receiver, through `/collective_rpc`). Two device copies per byte and one
HTTP call per bucket.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass

from gymtrl.errors import ServerError, WeightSyncError
from gymtrl.servers.vllm import RECEIVER_CLASS
from gymtrl.sync.strategies import WeightSync
from gymtrl.sync.vllm_control import VLLMControl
from gymtrl.vllm_plugin.weight_receiver import ALIGN_BYTES, DTYPES, PAYLOAD_VERSION

RECEIVER_METHOD = "gymtrl_load_packed"
INFO_METHOD = "gymtrl_receiver_info"  # the receiver's version (vllm_plugin.broadcast_receiver)


@dataclass
class Placed:
    name: str
    dtype: str      # the dtype it travels in (vLLM's, when that is known)
    shape: list[int]
    offset: int     # bytes into its bucket
    nbytes: int


def _aligned(n: int) -> int:
    return (n + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


def plan_buckets(tensors: list[tuple[str, str, list[int], int]], bucket_bytes: int) -> list[list[Placed]]:
    """Lay out (name, dtype, shape, nbytes) tensors, in order, into buckets of at most
    `bucket_bytes`; a tensor larger than that gets a bucket of its own."""
    buckets: list[list[Placed]] = []
    current: list[Placed] = []
    used = 0
    for name, dtype, shape, nbytes in tensors:
        if current and used + nbytes > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append(Placed(name, dtype, list(shape), used, nbytes))
        used = _aligned(used + nbytes)
    if current:
        buckets.append(current)
    return buckets


def bucket_size(bucket: list[Placed]) -> int:
    last = bucket[-1]
    return last.offset + last.nbytes


def plan_push(params: list[tuple[str, object]], vllm_dtype: str | None, bucket_bytes: int) -> list[list[Placed]]:
    """The buckets a push sends `params` (name, tensor) in: each in vLLM's dtype when known, else its own."""
    import torch

    placed = []
    for name, p in params:
        dtype = vllm_dtype or str(p.dtype).removeprefix("torch.")
        placed.append((name, dtype, list(p.shape), p.numel() * getattr(torch, dtype).itemsize))
    return plan_buckets(placed, bucket_bytes)


def buffer_for(flat, plan: list[list[Placed]], device):
    """`flat` if it holds the plan's largest bucket on `device`, else a new flat uint8 buffer that does."""
    import torch

    need = max(bucket_size(b) for b in plan)
    if flat is None or flat.numel() < need or flat.device != device:
        flat = torch.empty(need, dtype=torch.uint8, device=device)
    return flat


def receiver_rpc(control: VLLMControl, method: str, kwargs: dict[str, str], what: str) -> list:
    """`/collective_rpc` to gymtrl's worker extension; a failure names where its cause is."""
    try:
        return control.collective_rpc(method, kwargs)
    except ServerError as e:
        # vLLM answers a worker's exception with a bare HTTP 500: its log has the cause.
        raise ServerError(
            f"the vLLM server did not {what}: {e.message}",
            hint=f"see vLLM's log; a server gymtrl did not launch needs `gymtrl vllm-plugin install --python "
            f"<vLLM's python>` and `--worker-extension-cls {RECEIVER_CLASS}`") from None


def check_receivers(control: VLLMControl) -> list[dict]:
    """Every vLLM worker runs this gymtrl's weight receiver (asked before the model loads, so a
    server started without it fails the run in seconds, not at the first push)."""
    infos = receiver_rpc(control, INFO_METHOD, {}, "answer gymtrl's weight receiver")
    versions = {i.get("version") if isinstance(i, dict) else None for i in infos}
    if versions != {PAYLOAD_VERSION}:
        raise WeightSyncError(f"vLLM's weight receivers answered {str(infos)[:300]}; this gymtrl speaks version "
                              f"{PAYLOAD_VERSION}", hint="install this gymtrl's plugin into vLLM's environment: "
                              "`gymtrl vllm-plugin install --python <vLLM's python>`")
    return infos


def pack_bucket(flat, bucket: list[Placed], tensors: dict) -> None:
    """Copy each tensor of `bucket` into its place in `flat` (1-D uint8), cast to its travel dtype:
    one multi-tensor copy (one copy kernel per tensor cost 4-8 ms for 290 tensors on an H200)."""
    import torch

    dsts = [flat[p.offset:p.offset + p.nbytes].view(getattr(torch, p.dtype)).view(p.shape) for p in bucket]
    torch._foreach_copy_(dsts, [tensors[p.name].detach() for p in bucket])


def share_payload(flat, bucket: list[Placed]) -> str:
    """The JSON the receiver reads: the buffer's CUDA IPC handle and where each tensor lies in it."""
    import torch
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(flat)
    (_, _, _, _, _, _, _, handle, storage_size, storage_offset, _, ref_handle, ref_offset,
     event_handle, event_sync_required) = args

    def b64(raw):
        return None if raw is None else base64.b64encode(raw).decode()

    share = {"numel": flat.numel(), "handle": b64(handle), "storage_size": storage_size,
             "storage_offset": storage_offset, "ref_counter_handle": b64(ref_handle),
             "ref_counter_offset": ref_offset, "event_handle": b64(event_handle),
             "event_sync_required": bool(event_sync_required)}
    gpu_uuid = str(torch.cuda.get_device_properties(flat.device).uuid)
    return json.dumps({"version": PAYLOAD_VERSION, "gpu_uuid": gpu_uuid, "share": share,
                       "tensors": [[p.name, p.dtype, p.shape, p.offset, p.nbytes] for p in bucket]})


class IpcSync(WeightSync):
    name = "ipc"

    def __init__(self, control: VLLMControl, bucket_mb: int, vllm_dtype: str):
        self.control = control
        self.bucket_bytes = bucket_mb * 2**20
        # Parameters travel in vLLM's dtype (half the bytes of an fp32 trainer into a bf16 server).
        self.vllm_dtype = vllm_dtype if vllm_dtype in DTYPES else None
        self.flat = None  # the shared buffer, kept across steps

    def push(self, model) -> float:
        import torch

        start = time.monotonic()
        phases = dict.fromkeys(("pack_seconds", "rpc_seconds", "open_seconds", "load_seconds"), 0.0)
        params = [(name, p) for name, p in model.named_parameters()]
        if not params or params[0][1].device.type != "cuda":
            raise WeightSyncError("sync.strategy=ipc needs the model on a CUDA GPU",
                                  hint="use sync.strategy=reload on CPU")
        by_name = dict(params)
        plan = plan_push(params, self.vllm_dtype, self.bucket_bytes)
        self.flat = buffer_for(self.flat, plan, params[0][1].device)
        with torch.no_grad():
            for bucket in plan:
                t0 = time.monotonic()
                pack_bucket(self.flat, bucket, by_name)
                torch.cuda.synchronize(self.flat.device)  # the receiver reads it from another process
                t1 = time.monotonic()
                results = self._send(bucket)
                phases["pack_seconds"] += t1 - t0
                phases["rpc_seconds"] += time.monotonic() - t1
                for key in ("open", "load"):  # the slowest worker's, as seen inside vLLM
                    phases[f"{key}_seconds"] += max(float(r.get(f"{key}_s", 0.0)) for r in results)
        torch.cuda.ipc_collect()
        t0 = time.monotonic()
        self.control.reset_prefix_cache()  # its cached KV was computed with the old weights
        phases["reset_seconds"] = time.monotonic() - t0
        self.phases = phases
        return time.monotonic() - start

    def _send(self, bucket: list[Placed]) -> list[dict]:
        results = receiver_rpc(self.control, RECEIVER_METHOD, {"payload": share_payload(self.flat, bucket)},
                               "take the weights over CUDA IPC (it must run on the trainer's GPU)")
        counts = {r.get("tensors") if isinstance(r, dict) else None for r in results}
        if counts != {len(bucket)}:  # every worker (one per tensor-parallel rank) loads the whole bucket
            raise WeightSyncError(f"vLLM's workers answered {str(results)[:300]} for a bucket of {len(bucket)} tensors")
        return results
