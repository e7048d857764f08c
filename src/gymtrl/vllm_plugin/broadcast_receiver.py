"""vLLM worker extension: take new weights from a trainer on another GPU as packed broadcasts.

The trainer and vLLM's workers form a process group of their own (NCCL between GPUs, gloo on CPU),
rank 0 the trainer, rank 1 + r vLLM's worker r, joined once through a TCP store the trainer hosts.
Each push then sends the parameters as a few flat buckets (`sync.bucket_mb`): per bucket, one
`/collective_rpc` call tells the workers the layout, and one broadcast carries the bytes into a
buffer each worker keeps; the worker loads the tensors with the model's own `load_weights` (which
fuses q/k/v, gate/up and shards for tensor parallelism).

Against TRL's server-mode sync (vLLM's weight-transfer endpoints: four HTTP calls a push, vLLM's
layerwise reload; 100 ms for the 0.5B shape on 2x H100, of which 5.7 ms the broadcast) this is one
HTTP call per bucket and the plain `load_weights`.

The layout is plain JSON (names, dtype names, shapes, offsets), checked before the worker enters the
broadcast, so a refused call fails on both sides instead of leaving the trainer waiting.
Only torch is imported here: this module runs inside vLLM's environment, without gymtrl.
"""

from __future__ import annotations

import datetime
import json
import time

from .weight_receiver import PAYLOAD_VERSION, check_payload, tensor_views  # relative: the same in gymtrl and in the plugin wheel

BACKENDS = ("nccl", "gloo")


def make_group(store, prefix: str, rank: int, world_size: int, backend: str, timeout_s: float):
    """This process's member of the weight group, over `store` (both sides call it; the trainer hosts
    the store). gloo connects here, waiting for every member; NCCL at the first broadcast."""
    import torch.distributed as dist

    if backend not in BACKENDS:
        raise ValueError(f"weight group backend {backend!r} is not one of {BACKENDS}")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.PrefixStore(prefix, store)  # a group formed again (a new trainer) gets keys of its own
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world_size, options)


def ready_keys(store, prefix: str):
    """Where each worker says, per bucket, whether it enters the broadcast ("ok") or not ("refused: why")
    before the trainer starts it: a broadcast one side never joins cannot be called off cleanly."""
    import torch.distributed as dist

    return dist.PrefixStore(f"{prefix}/ready", store)


def ready_key(seq: int, rank: int) -> str:
    return f"{seq}/{rank}"


class BroadcastWeightReceiver:
    """Mixed into every vLLM worker (vLLM's --worker-extension-cls): `self` is the worker."""

    def gymtrl_receiver_info(self) -> dict:
        """What the trainer needs before it forms the group: this worker's rank and payload version."""
        return {"version": PAYLOAD_VERSION, "rank": int(self.rank)}  # type: ignore[attr-defined]

    def gymtrl_join_weight_group(self, spec: str) -> dict:
        """Join the trainer's weight group: {"version", "host", "port", "prefix", "world_size", "backend", "timeout_s"}."""
        data = json.loads(spec)
        check_payload(data)
        rank = 1 + int(self.rank)  # type: ignore[attr-defined]
        if rank >= data["world_size"]:
            raise ValueError(f"vLLM worker rank {self.rank} does not fit a weight group of {data['world_size']}")  # type: ignore[attr-defined]
        import torch.distributed as dist

        store = dist.TCPStore(data["host"], data["port"], data["world_size"], is_master=False,
                              timeout=datetime.timedelta(seconds=data["timeout_s"]))
        self._gymtrl_group = make_group(store, data["prefix"], rank, data["world_size"], data["backend"], data["timeout_s"])
        self._gymtrl_store, self._gymtrl_ready = store, ready_keys(store, data["prefix"])
        self._gymtrl_recv = None
        return {"rank": rank, "device": str(self.device)}  # type: ignore[attr-defined]

    def gymtrl_receive_bucket(self, payload: str) -> dict:
        """Receive one bucket by broadcast from rank 0 and load it: {"version", "size", "tensors", "last"}."""
        import torch

        data = json.loads(payload)
        group = getattr(self, "_gymtrl_group", None)
        if group is None:
            raise ValueError("this vLLM worker has not joined a gymtrl weight group (gymtrl_join_weight_group)")
        key = ready_key(int(data.get("seq", -1)), 1 + int(self.rank))  # type: ignore[attr-defined]
        try:
            check_payload(data)
            size = int(data["size"])
            flat = getattr(self, "_gymtrl_recv", None)
            if flat is None or flat.numel() < size:
                flat = self._gymtrl_recv = torch.empty(size, dtype=torch.uint8, device=self.device)  # type: ignore[attr-defined]
            views = tensor_views(flat[:size], data["tensors"])
        except Exception as e:
            self._gymtrl_ready.set(key, f"refused: {e}")
            raise
        self._gymtrl_ready.set(key, "ok")
        t0 = time.perf_counter()
        group.broadcast(flat[:size], 0).wait()
        t1 = time.perf_counter()
        if data.get("push"):  # digests of the bytes received, before a CPU load may reuse them
            self._gymtrl_note_loaded(data["push"], views)  # type: ignore[attr-defined]  # (load_stamp.LoadStamp)
        self._gymtrl_load(views, bool(data.get("last", True)))
        if flat.is_cuda:
            torch.cuda.synchronize(flat.device)  # the next bucket overwrites this buffer
        return {"tensors": len(views), "bytes": size, "recv_s": t1 - t0, "load_s": time.perf_counter() - t1}

    def _gymtrl_load(self, views: list, last: bool) -> None:
        """Load a bucket's tensors with the model's own `load_weights`. Where the linear layers lost
        their loaders (vLLM's CPU backend repacks their weights after loading), keep the push's
        tensors until its last bucket and reload them in place with vLLM's `reload_weights`, which
        restores the loaders first."""
        import torch

        model = self.get_model()  # type: ignore[attr-defined]
        if getattr(self, "_gymtrl_direct", None) is None:
            from vllm.model_executor.layers.linear import LinearBase

            self._gymtrl_direct = all(hasattr(m.weight, "weight_loader") for m in model.modules()
                                      if isinstance(m, LinearBase) and isinstance(getattr(m, "weight", None), torch.Tensor))
            self._gymtrl_pending = []
        if self._gymtrl_direct:
            with torch.no_grad():
                model.load_weights(views)
            return
        self._gymtrl_pending += [(name, view.clone()) for name, view in views]
        if last:
            pending, self._gymtrl_pending = self._gymtrl_pending, []
            self.reload_weights(weights_iterator=pending)  # type: ignore[attr-defined]
