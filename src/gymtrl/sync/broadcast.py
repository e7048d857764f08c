"""The two-GPU weight sync of gymtrl's own: packed buckets broadcast to vLLM's workers.

The trainer forms a process group with vLLM's workers once (NCCL between GPUs; gloo when the
trainer runs on CPU), then pushes each step's parameters as flat buckets of `sync.bucket_mb` in
vLLM's dtype: one `/collective_rpc` call per bucket carries the layout, one broadcast the bytes
(gymtrl.vllm_plugin.broadcast_receiver loads them with the model's `load_weights`). TRL's
server-mode sync (sync.strategy=nccl) makes four HTTP calls a push and goes through vLLM's
layerwise reload instead.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import socket
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import urlsplit

from gymtrl.errors import WeightSyncError
from gymtrl.servers.vllm_control import VLLMControl
from gymtrl.sync.base import Expected, WeightSync, tied_head
from gymtrl.sync.buckets import bucket_layout, bucket_size, bucket_views, buffer_for, pack_bucket, plan_push
from gymtrl.sync.receiver import check_receivers, commit_push, receiver_rpc
from gymtrl.vllm_plugin.broadcast_receiver import make_group, ready_key, ready_keys
from gymtrl.vllm_plugin.load_stamp import digests
from gymtrl.vllm_plugin.protocol import DTYPES, JOIN_METHOD, PAYLOAD_VERSION, RECEIVE_METHOD


def address_towards(url: str) -> str:
    """This machine's address as the host of `url` reaches it (no packet is sent): where vLLM's
    workers connect to the trainer's store."""
    host = urlsplit(url).hostname or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((socket.gethostbyname(host), 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class BroadcastSync(WeightSync):
    name = "broadcast"

    def __init__(self, control: VLLMControl, bucket_mb: int, vllm_dtype: str, timeout_s: float):
        super().__init__()
        self.control = control
        self.bucket_bytes = bucket_mb * 2**20
        self.vllm_dtype = vllm_dtype if vllm_dtype in DTYPES else None
        self.timeout_s = timeout_s
        self.group = None   # the trainer's member of the weight group (rank 0), formed at the first push
        self.store = None   # the TCP store the group met through (hosted here; kept alive with the group)
        self.ready = None   # the store's keys where the workers accept or refuse each bucket
        self.world = 0
        self.seq = 0        # buckets sent through this group
        self.flat = None    # the send buffer, kept across steps
        # Groups given up mid-broadcast: destroying one waits for its pending broadcast to time out,
        # so they are kept (rare, and small) rather than dropped on the failing push's path.
        self._abandoned: list = []
        self._calls = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gymtrl-broadcast-rpc")

    # --- the group ------------------------------------------------------------------------------
    def _join(self, backend: str) -> None:
        import torch.distributed as dist

        world = 1 + len(check_receivers(self.control))
        host = address_towards(self.control.base_url)
        store = dist.TCPStore(host, 0, world, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=self.timeout_s))  # on a free port
        spec = {"version": PAYLOAD_VERSION, "host": host, "port": store.port, "prefix": f"gymtrl-{uuid.uuid4().hex}",
                "world_size": world, "backend": backend, "timeout_s": self.timeout_s}
        joining = self._calls.submit(receiver_rpc, self.control, JOIN_METHOD, {"spec": json.dumps(spec)}, "join gymtrl's weight group")
        group = make_group(store, spec["prefix"], 0, world, backend, self.timeout_s)  # gloo: waits for the workers
        joined = joining.result(timeout=self.timeout_s)
        if sorted(r.get("rank") if isinstance(r, dict) else -1 for r in joined) != list(range(1, world)):
            raise WeightSyncError(f"vLLM's workers joined gymtrl's weight group as {str(joined)[:300]}")
        self.store, self.group, self.ready, self.world = store, group, ready_keys(store, spec["prefix"]), world

    def servers_restarted(self) -> None:
        self._abandon()  # a new vLLM has not joined: the next push forms the group again

    def _abandon(self) -> None:
        if self.group is not None:
            self._abandoned.append((self.group, self.store))
        self.group = self.store = None

    # --- a push ---------------------------------------------------------------------------------
    def push(self, model) -> float:
        import torch

        start = time.monotonic()
        phases = dict.fromkeys(("join_seconds", "pack_seconds", "send_seconds", "recv_seconds", "load_seconds"), 0.0)
        params = list(model.named_parameters())
        head = tied_head(model)
        if head is not None and head[0] not in dict(params):
            params.append(head)
        device = params[0][1].device
        if self.group is None:
            self._join("nccl" if device.type == "cuda" else "gloo")
            phases["join_seconds"] = time.monotonic() - start
        by_name = dict(params)
        plan = plan_push(params, self.vllm_dtype, self.bucket_bytes)
        self.flat = buffer_for(self.flat, plan, device)
        expected = Expected(self.new_push_id())
        with torch.no_grad():
            for i, bucket in enumerate(plan):
                t0 = time.monotonic()
                pack_bucket(self.flat, bucket, by_name)
                expected.digests.update(digests(zip((p.name for p in bucket), bucket_views(self.flat, bucket))))
                t1 = time.monotonic()
                results = self._send(bucket, expected.push, last=i == len(plan) - 1)
                phases["pack_seconds"] += t1 - t0
                phases["send_seconds"] += time.monotonic() - t1
                for key in ("recv", "load"):  # the slowest worker's, as seen inside vLLM
                    phases[f"{key}_seconds"] += max(float(r.get(f"{key}_s", 0.0)) for r in results)
        commit_push(self.control, expected.push)
        self.expected = expected
        t0 = time.monotonic()
        self.control.reset_prefix_cache()  # its cached KV was computed with the old weights
        phases["reset_seconds"] = time.monotonic() - t0
        self.phases = phases
        return time.monotonic() - start

    def _send(self, bucket, push: str, last: bool) -> list[dict]:
        """One bucket: the layout by HTTP (answered once every worker loaded it), the bytes by broadcast,
        started only once every worker said it takes them."""
        size = bucket_size(bucket)
        self.seq += 1
        payload = json.dumps({"version": PAYLOAD_VERSION, "seq": self.seq, "size": size, "last": last, "push": push,
                              "tensors": bucket_layout(bucket)})
        call: Future = self._calls.submit(receiver_rpc, self.control, RECEIVE_METHOD, {"payload": payload}, "take the weights")
        deadline = time.monotonic() + self.timeout_s
        keys = [ready_key(self.seq, rank) for rank in range(1, self.world)]
        while not self.ready.check(keys) and not call.done():
            if time.monotonic() > deadline:
                self._abandon()
                raise WeightSyncError(f"vLLM's workers did not take a weight bucket within {self.timeout_s:g} s",
                                      hint="see vLLM's log")
            time.sleep(0.0002)
        answers = {key: self.ready.get(key).decode() for key in keys if self.ready.check([key])}
        for key in answers:
            self.ready.delete_key(key)
        refused = [a for a in answers.values() if a != "ok"]
        if refused:
            with contextlib.suppress(Exception):
                call.result(timeout=self.timeout_s)  # the refusal's HTTP answer: vLLM is idle again
            raise WeightSyncError(f"vLLM's workers refused a weight bucket: {'; '.join(refused)}",
                                  hint="see vLLM's log; the plugin in vLLM's environment must be this gymtrl's "
                                  "(`gymtrl vllm-plugin install --python <vLLM's python>`)")
        if len(answers) < len(keys):  # answered before every worker said it was ready: a failure
            self._abandon()  # (a vLLM restarted behind gymtrl's back has left the group: the next push rejoins)
            call.result()  # raises the HTTP error
            raise WeightSyncError(f"vLLM's workers answered {str(call.result())[:200]} without taking the bucket")
        work = self.group.broadcast(self.flat[:size], 0)
        while not work.is_completed():
            if call.done() and call.exception() is not None or time.monotonic() > deadline:
                self._abandon()  # a worker failed inside the broadcast
                raise call.exception() if call.done() else WeightSyncError(
                    f"vLLM's workers did not receive a {size}-byte bucket within {self.timeout_s:g} s",
                    hint="see vLLM's log")
            time.sleep(0.0002)
        work.wait()
        results = call.result(timeout=max(1.0, deadline - time.monotonic()))
        counts = {r.get("tensors") if isinstance(r, dict) else None for r in results}
        if counts != {len(bucket)}:  # every worker (one per tensor-parallel rank) loads the whole bucket
            raise WeightSyncError(f"vLLM's workers answered {str(results)[:300]} for a bucket of {len(bucket)} tensors")
        return results
