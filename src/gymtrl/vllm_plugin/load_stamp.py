"""Exact proof of what a vLLM worker loaded: per-tensor digests, stamped only by a completed load.

Both sides compute `tensor_digest` over the same bytes: the trainer over what it sends (or writes for
vLLM to read), vLLM's worker over what it received and handed to the model's own loader. A worker
records the digests of a push as pending while its buckets arrive, and makes them its stamp only
when the trainer commits the push (or, for a reload, when `reload_weights` returned). So the stamp
answers, independently of the learning rate or the dtype: did the last completed load in this vLLM
carry exactly the trainer's weights of this step? A server that missed a push keeps the older stamp,
a restarted one has none, and a corrupted transfer has other digests.

The digest is exact integer arithmetic on the raw bytes, with no float rounding and no dependence on
the order of summation, so a CPU and a GPU, or two torch versions, agree on it. The bytes are read
as 64-bit words (four bf16 values a word; a tail shorter than a word is zero-padded into one), each
word w_i is multiplied by a fixed pseudo-random odd 64-bit weight c_i of its position, and the
products are summed modulo 2^64 (integer multiplication and addition wrap): one multiply and one
sum per word, on the tensor's own device, with one host transfer for all the tensors of a call. A
changed word changes the sum by (w' - w) c, never 0 modulo 2^64 for an odd c; any other change goes
unseen with probability about 2^-64. (The first version, four modular operations per element and a
host sync per chunk, made a push of the 0.5B shape 3.6x slower on an H200: docs/performance.md.)

Only torch is imported here: this module runs inside vLLM's environment, without gymtrl.
"""

from __future__ import annotations

CHUNK = 1 << 22  # 64-bit words digested at a time (bounds the temporaries; part of the definition)
MASK64 = (1 << 64) - 1
_weights: dict = {}  # str(device) -> the odd position weights of a chunk (CHUNK words)


def _chunk_weights(device):
    """Odd pseudo-random int64 weights for word positions 0..CHUNK-1 (a splitmix-style mix of the
    index), made once per device."""
    import torch

    key = str(device)
    if key not in _weights:
        w = torch.arange(CHUNK, dtype=torch.int64, device=device) * -7046029254386353131  # 0x9E3779B97F4A7C15
        w = w ^ (w >> 31)
        w = w * -4658895280553007687  # 0xBF58476D1CE4E5B9
        w = w ^ (w >> 29)
        _weights[key] = w | 1
    return _weights[key]


def _words(tensor):
    """The tensor's bytes as int64 words, the last one zero-padded (a copy only for that tail, or for
    a tensor whose storage does not start on an 8-byte boundary)."""
    import torch

    raw = tensor.detach().contiguous().view(-1).view(torch.uint8)
    whole = raw.numel() // 8 * 8
    try:
        words = raw[:whole].view(torch.int64)
    except RuntimeError:  # storage offset not a multiple of 8 bytes
        words = raw[:whole].clone().view(torch.int64)
    if whole == raw.numel():
        return words
    tail = torch.zeros(8, dtype=torch.uint8, device=raw.device)
    tail[:raw.numel() - whole] = raw[whole:]
    return torch.cat([words, tail.view(torch.int64)])


def _device_sum(tensor):
    """The weighted word sum modulo 2^64, as a 0-d int64 tensor on the tensor's device (no host sync)."""
    words = _words(tensor)
    weights = _chunk_weights(words.device)
    total = (words[:CHUNK] * weights[:min(CHUNK, words.numel())]).sum()  # two kernels for most tensors
    for k, start in enumerate(range(CHUNK, words.numel(), CHUNK), start=1):
        chunk = words[start:start + CHUNK]
        # The k-th chunk's sum times an odd constant of k: chunks at other places weigh differently.
        total = total + (chunk * weights[:chunk.numel()]).sum() * _signed(((k * 0x2545F4914F6CDD1D) | 1) & MASK64)
    return total


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _format(total: int, numel: int) -> str:
    return f"{total & MASK64:016x}.{numel}"


def tensor_digest(tensor) -> str:
    """Exact digest of a tensor's bytes, computed on its own device: '<sum as 16 hex digits>.<numel>'."""
    import torch

    with torch.no_grad():
        return _format(int(_device_sum(tensor).item()), tensor.numel())


def digests(named_tensors) -> dict[str, str]:
    """The digest of each (name, tensor), with one host transfer per device for all of them."""
    import torch

    named = list(named_tensors)
    if not named:
        return {}
    with torch.no_grad():
        sums = [_device_sum(t) for _, t in named]
        by_device: dict = {}
        for i, s in enumerate(sums):
            by_device.setdefault(str(s.device), []).append(i)
        values: list = [0] * len(named)
        for idxs in by_device.values():
            for i, v in zip(idxs, torch.stack([sums[i] for i in idxs]).tolist()):
                values[i] = v
    return {name: _format(v, t.numel()) for (name, t), v in zip(named, values)}


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
