"""Exact proof of what a vLLM worker loaded: per-tensor digests, stamped only by a completed load.

Both sides compute `tensor_digest` over the same bytes: the trainer over what it sends (or writes for
vLLM to read), vLLM's worker over what it received and handed to the model's own loader. A worker
records the digests of a push as pending while its buckets arrive, and makes them its stamp only
when the trainer commits the push (or, for a reload, when `reload_weights` returned). So the stamp
answers, independently of the learning rate or the dtype: did the last completed load in this vLLM
carry exactly the trainer's weights of this step? A server that missed a push keeps the older stamp,
a restarted one has none, and a corrupted transfer has other digests.

The digest is exact integer arithmetic on the raw bits, with no float rounding and no dependence on
the order of summation, so a CPU and a GPU, or two torch versions, agree on it: each element's bits
b (as an unsigned integer) times a fixed pseudo-random odd 64-bit weight w of its position, summed
modulo 2^64 (one multiply and one sum per element). A single changed element changes the sum by
(b' - b) w, never 0 modulo 2^64 for an odd w; any other change goes unseen with probability about
2^-64.

Only torch is imported here: this module runs inside vLLM's environment, without gymtrl.
"""

from __future__ import annotations

CHUNK = 1 << 20  # elements digested at a time (bounds the int64 temporaries; part of the definition)
MASK64 = (1 << 64) - 1
_BITS = {1: ("uint8", 0xFF), 2: ("int16", 0xFFFF), 4: ("int32", 0xFFFFFFFF)}
_weights: dict = {}  # (device, length) -> the odd position weights of a chunk


def _chunk_weights(n: int, device):
    """Odd pseudo-random int64 weights for positions 0..n-1 (a splitmix-style mix of the index),
    made once per device and length."""
    import torch

    key = (str(device), n)
    if key not in _weights:
        w = torch.arange(n, dtype=torch.int64, device=device) * -7046029254386353131  # 0x9E3779B97F4A7C15
        w = w ^ (w >> 31)
        w = w * -4658895280553007687  # 0xBF58476D1CE4E5B9
        w = w ^ (w >> 29)
        _weights[key] = w | 1
    return _weights[key]


def tensor_digest(tensor) -> str:
    """Exact digest of a tensor's bytes, computed on its own device: '<sum as 16 hex digits>.<numel>'."""
    import torch

    flat = tensor.detach().contiguous().view(-1)
    size = flat.element_size()
    if size not in _BITS:
        raise ValueError(f"cannot digest a tensor of {flat.dtype} ({size}-byte elements)")
    view_dtype, mask = _BITS[size]
    ints = flat.view(getattr(torch, view_dtype))
    total = 0
    with torch.no_grad():
        for k, start in enumerate(range(0, ints.numel(), CHUNK)):
            chunk = ints[start:start + CHUNK].to(torch.int64) & mask
            part = int((chunk * _chunk_weights(chunk.numel(), chunk.device)).sum().item()) & MASK64
            # Chunks at other places weigh differently: the k-th chunk's sum times an odd constant of k.
            total = (total + part * ((k * 0x2545F4914F6CDD1D) | 1)) & MASK64
    return f"{total:016x}.{flat.numel()}"


def digests(named_tensors) -> dict[str, str]:
    return {name: tensor_digest(t) for name, t in named_tensors}


class LoadStamp:
    """Mixed into every vLLM worker (vLLM's --worker-extension-cls) with the weight receivers: `self`
    is the worker. The receivers call `_gymtrl_note_loaded` for each tensor they handed to the loader."""

    def _gymtrl_note_loaded(self, push: str, named_tensors) -> None:
        if getattr(self, "_gymtrl_pending_push", None) != push:
            self._gymtrl_pending_push, self._gymtrl_pending_digests = push, {}
        self._gymtrl_pending_digests.update(digests(named_tensors))

    def gymtrl_commit_push(self, push: str) -> dict:
        """Make the pending digests of `push` this worker's stamp (the trainer calls it once every
        bucket of the push was loaded). A push this worker did not see whole commits nothing. Committing
        the push that already is the stamp answers as the first commit did (the trainer asks again when
        the connection of its first call failed, not knowing whether that one arrived)."""
        stamp = getattr(self, "_gymtrl_stamp", None)
        if getattr(self, "_gymtrl_pending_push", None) != push and stamp and stamp["push"] == push:
            return {"push": push, "tensors": len(stamp["digests"])}
        if getattr(self, "_gymtrl_pending_push", None) != push:
            raise ValueError(f"this vLLM worker received no weights for push {push!r}")
        self._gymtrl_stamp = {"push": push, "digests": self._gymtrl_pending_digests}
        self._gymtrl_pending_push, self._gymtrl_pending_digests = None, {}
        return {"push": push, "tensors": len(self._gymtrl_stamp["digests"])}

    def gymtrl_load_stamp(self) -> dict:
        """The last committed push and the digest of every tensor it loaded ({} before any push)."""
        return dict(getattr(self, "_gymtrl_stamp", None) or {"push": None, "digests": {}})

    def gymtrl_reload(self, weights_path: str, push: str) -> dict:
        """vLLM's own in-place `reload_weights` from a directory of safetensors files, with the digest
        of every tensor it read; stamped once the reload returned."""
        import glob
        import os
        import time

        from safetensors import safe_open

        t0 = time.perf_counter()
        self._gymtrl_pending_push, self._gymtrl_pending_digests = push, {}

        def read_and_digest():
            for path in sorted(glob.glob(os.path.join(weights_path, "*.safetensors"))):
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        tensor = f.get_tensor(name)
                        self._gymtrl_pending_digests[name] = tensor_digest(tensor)
                        yield name, tensor

        try:
            self.reload_weights(weights_iterator=read_and_digest())  # type: ignore[attr-defined]
        except TypeError:  # a vLLM whose reload_weights takes only a path: digest the files it read
            self.reload_weights(weights_path=weights_path)  # type: ignore[attr-defined]
            for _ in read_and_digest():
                pass
        out = self.gymtrl_commit_push(push)
        out["load_s"] = time.perf_counter() - t0
        return out
