"""TRL's own server-mode sync (`use_vllm=True, vllm_mode="server"`): TRL broadcasts the weights over
NCCL through vLLM's weight-transfer endpoints before each rollout call, so `push` has nothing left to
do but report how long TRL took. gymtrl does not own vLLM's receiving side here, so there is no exact
check: only the logprob probe (gymtrl.sync.check), which a step at a small learning rate can pass
even when it did not arrive. `broadcast` is gymtrl's own NCCL transport, with the exact check.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from gymtrl.sync.base import WeightSync


class NcclSync(WeightSync):
    """TRL pushed the weights already (GRPOTrainer._generate, before rollout_func); `push` returns
    how long that took, measured by wrapping TRL's sync_weights (gymtrl.trl_seam)."""

    name = "nccl"

    def __init__(self) -> None:
        super().__init__()
        self.last_seconds = 0.0

    def push(self, model) -> float:
        seconds, self.last_seconds = self.last_seconds, 0.0
        return seconds


def bound_nccl_join(timeout_s: float, give_up: Callable[[], None]) -> None:
    """TRL's VLLMClient.init_communicator waits in NCCL's rendezvous with no timeout, and a vLLM
    that cannot take a new trainer never arrives: measured with vLLM 0.26 on 2x H100, a second
    trainer against a server that had already synced with one hung at start-up for good. Past
    `timeout_s`, call `give_up` (from a timer thread: the waiting thread cannot be interrupted)."""
    from trl.generation.vllm_client import VLLMClient

    original = VLLMClient.init_communicator
    if getattr(original, "gymtrl_bounded", False):
        return

    def bounded_init_communicator(self, *args, **kwargs):
        timer = threading.Timer(timeout_s, give_up)
        timer.daemon = True
        timer.start()
        try:
            return original(self, *args, **kwargs)
        finally:
            timer.cancel()

    bounded_init_communicator.gymtrl_bounded = True  # type: ignore[attr-defined]
    VLLMClient.init_communicator = bounded_init_communicator


def timed(sync: NcclSync, original: Callable) -> Callable:
    """`original` (TRL's sync_weights), recording on `sync` how long each call took."""

    def timed_sync_weights(*args, **kwargs):
        start = time.monotonic()
        try:
            return original(*args, **kwargs)
        finally:
            sync.last_seconds = time.monotonic() - start

    return timed_sync_weights
