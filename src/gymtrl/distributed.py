"""Where this process stands in a multi-process run (`accelerate launch`, torchrun, srun), and the
few collective steps gymtrl itself takes.

The main process (global rank 0) launches the servers, pushes the weights to vLLM and checks them;
every process runs its own share of the rollouts (TRL calls `rollout_func` on each with its slice).
Under DeepSpeed ZeRO-3 each process holds only a shard of every parameter, so reading the whole
model (to save it for vLLM, or to run the check's forward pass) needs every process to take part:
`full_weights` gathers them on all processes for the duration of a `with` block.
"""

from __future__ import annotations

import contextlib
import os


def rank_and_world() -> tuple[int, int]:
    """Global rank and world size from the launcher's environment (1 process when not launched)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_zero3(model) -> bool:
    """Parameters partitioned by DeepSpeed ZeRO-3 carry a `ds_id`."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def full_weights(model):
    """Within the block every parameter is whole on every process (ZeRO-3: gathered, read-only).
    Under ZeRO-3 all processes must enter it together; elsewhere it does nothing."""
    if not is_zero3(model):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield


def any_process(flag: bool, device) -> bool:
    """True on every process if it is true on any (a collective: all processes must call it)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
