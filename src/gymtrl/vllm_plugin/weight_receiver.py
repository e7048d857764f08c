"""vLLM worker extension: take new weights from a trainer on the same GPU through CUDA IPC.

Part of `vllm serve ... --worker-extension-cls gymtrl_vllm_plugin.receivers.WeightReceiver`
(gymtrl adds it when sync.strategy is ipc or broadcast). The trainer packs its parameters into one flat GPU
buffer (a bucket at a time), shares the buffer's CUDA IPC handle, and calls the method below
through vLLM's `/collective_rpc`; each worker opens the buffer, loads the tensors with the model's
own `load_weights` (which fuses q/k/v, gate/up and shards for tensor parallelism), and waits for
the copies to finish before answering, so the trainer may overwrite the buffer as soon as it returns.

Why not vLLM's own IPC weight-transfer backend: in vLLM 0.26 it imports ray at module level, which
`pip install vllm` does not install, and it takes the handles as a pickle (so the server must allow
insecure deserialization). This payload is plain JSON: sizes, offsets, dtype names and the handle
bytes in base64; nothing in it is executed.

Only torch is imported here: this module runs inside vLLM's environment, without gymtrl.
"""

from __future__ import annotations

import base64
import json
import time

from .protocol import ALIGN_BYTES, DTYPES, PAYLOAD_VERSION


def tensor_views(flat, entries: list[list]) -> list[tuple[str, object]]:
    """The named tensors packed in `flat` (a 1-D uint8 tensor), as views (no copy).

    Each entry is [name, dtype name, shape, byte offset, byte count], as `pack_layout` wrote it."""
    import torch

    views = []
    for name, dtype_name, shape, offset, nbytes in entries:
        if dtype_name not in DTYPES:
            raise ValueError(f"weight '{name}': dtype {dtype_name!r} is not one of {DTYPES}")
        if offset % ALIGN_BYTES or offset + nbytes > flat.numel():
            raise ValueError(f"weight '{name}': bytes {offset}..{offset + nbytes} do not fit the "
                             f"{flat.numel()}-byte buffer on {ALIGN_BYTES}-byte boundaries")
        view = flat[offset:offset + nbytes].view(getattr(torch, dtype_name)).view(shape)
        views.append((name, view))
    return views


def check_payload(data: dict) -> None:
    """Refuse a payload from a trainer whose gymtrl speaks another version of it."""
    if data.get("version") != PAYLOAD_VERSION:
        raise ValueError(f"gymtrl weight payload version {data.get('version')} is not {PAYLOAD_VERSION}: "
                         "install the plugin of the trainer's gymtrl into vLLM's environment")


def _b64(data: str | None) -> bytes | None:
    return None if data is None else base64.b64decode(data)


def open_shared_buffer(share: dict, device_index: int):
    """The trainer's flat uint8 buffer, mapped into this process from its CUDA IPC handle."""
    import torch
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size([share["numel"]]), (1,), 0, torch.storage.TypedStorage, torch.uint8,
        device_index, _b64(share["handle"]), share["storage_size"], share["storage_offset"], False,
        _b64(share["ref_counter_handle"]), share["ref_counter_offset"], _b64(share["event_handle"]),
        share["event_sync_required"])


class IpcWeightReceiver:
    """Mixed into every vLLM GPU worker (vLLM's --worker-extension-cls): `self` is the worker."""

    def gymtrl_load_packed(self, payload: str) -> dict:
        import torch

        t0 = time.perf_counter()
        data = json.loads(payload)
        check_payload(data)
        device_index = torch.cuda.current_device()
        here = str(torch.cuda.get_device_properties(device_index).uuid)
        if data["gpu_uuid"] != here:
            raise ValueError(f"the trainer's weights are on GPU {data['gpu_uuid']}, this vLLM worker runs on {here}: "
                             "sync.strategy=ipc needs the trainer and vLLM on the same GPU (use nccl for two GPUs)")
        # The trainer reuses one buffer step after step: keeping it mapped spares an open and a close of
        # the IPC handle per call (torch finds a mapped handle in its cache). A new buffer replaces it.
        key = data["share"]["handle"]
        if getattr(self, "_gymtrl_buffer_key", None) != key:
            self._gymtrl_buffer = None
        flat = open_shared_buffer(data["share"], device_index)
        self._gymtrl_buffer, self._gymtrl_buffer_key = flat, key
        t1 = time.perf_counter()
        views = tensor_views(flat, data["tensors"])
        model = self.get_model()  # type: ignore[attr-defined]
        with torch.no_grad():
            model.load_weights(views)
        if data.get("push"):
            self._gymtrl_note_loaded(data["push"], views)  # type: ignore[attr-defined]  # (load_stamp.LoadStamp)
        # The copies read the trainer's buffer: they must be done before the trainer reuses it.
        torch.cuda.synchronize(device_index)
        del views
        return {"tensors": len(data["tensors"]), "bytes": sum(e[4] for e in data["tensors"]),
                "open_s": t1 - t0, "load_s": time.perf_counter() - t1}
