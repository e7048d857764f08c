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

from gymtrl.errors import WeightSyncError
from gymtrl.servers.vllm_control import VLLMControl
from gymtrl.sync.base import Expected, WeightSync
from gymtrl.sync.buckets import Placed, bucket_layout, bucket_views, buffer_for, pack_bucket, plan_push
from gymtrl.sync.receiver import commit_push, receiver_rpc
from gymtrl.vllm_plugin.load_stamp import digests
from gymtrl.vllm_plugin.protocol import DTYPES, LOAD_PACKED_METHOD as RECEIVER_METHOD, PAYLOAD_VERSION


def share_payload(flat, bucket: list[Placed], push: str = "") -> str:
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
    return json.dumps({"version": PAYLOAD_VERSION, "gpu_uuid": gpu_uuid, "share": share, "push": push,
                       "tensors": bucket_layout(bucket)})


class IpcSync(WeightSync):
    name = "ipc"

    def __init__(self, control: VLLMControl, bucket_mb: int, vllm_dtype: str):
        super().__init__()
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
        expected = Expected(self.new_push_id())
        with torch.no_grad():
            for bucket in plan:
                t0 = time.monotonic()
                pack_bucket(self.flat, bucket, by_name)
                expected.digests.update(digests(zip((p.name for p in bucket), bucket_views(self.flat, bucket))))
                torch.cuda.synchronize(self.flat.device)  # the receiver reads it from another process
                t1 = time.monotonic()
                results = self._send(bucket, expected.push)
                phases["pack_seconds"] += t1 - t0
                phases["rpc_seconds"] += time.monotonic() - t1
                for key in ("open", "load"):  # the slowest worker's, as seen inside vLLM
                    phases[f"{key}_seconds"] += max(float(r.get(f"{key}_s", 0.0)) for r in results)
        torch.cuda.ipc_collect()
        commit_push(self.control, expected.push)
        self.expected = expected
        t0 = time.monotonic()
        self.control.reset_prefix_cache()  # its cached KV was computed with the old weights
        phases["reset_seconds"] = time.monotonic() - t0
        self.phases = phases
        return time.monotonic() - start

    def _send(self, bucket: list[Placed], push: str) -> list[dict]:
        results = receiver_rpc(self.control, RECEIVER_METHOD, {"payload": share_payload(self.flat, bucket, push)},
                               "take the weights over CUDA IPC (it must run on the trainer's GPU)")
        counts = {r.get("tensors") if isinstance(r, dict) else None for r in results}
        if counts != {len(bucket)}:  # every worker (one per tensor-parallel rank) loads the whole bucket
            raise WeightSyncError(f"vLLM's workers answered {str(results)[:300]} for a bucket of {len(bucket)} tensors")
        return results
