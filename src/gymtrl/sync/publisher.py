"""Make vLLM serve this step's weights, and settle the proof that it does.

`publish` pushes the trainer's weights once per optimizer step (the main process pushes; under
ZeRO-3 every process takes part in the gather) and starts the check of what arrived, which then
runs beside the batch's rollouts: the push is complete, so both see the same weights. `settle` waits
for that check; no batch is used before it passed. The first push of a run, of a resumed run and
after a server restart always happens: a server that loaded a checkpoint from disk is never assumed
to hold the trainer's weights.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor

from gymtrl.distributed import full_weights, is_zero3
from gymtrl.sync.base import WeightSync
from gymtrl.sync.check import ProbeCheck, StampCheck
from gymtrl.sync.merged import as_pushed

GATHERED_SYNCS = ("reload", "ipc", "broadcast", "lora")  # the syncs that need whole parameters under ZeRO-3


class WeightPublisher:
    def __init__(self, sync: WeightSync, probe: ProbeCheck | None, stamp: StampCheck | None):
        self.sync = sync
        self.probe = probe  # behavioural check (sync.verify)
        self.stamp = stamp  # exact check, where vLLM stamps what it loaded
        self.synced_step: int | None = None
        # The check of the weights just pushed runs beside the batch (one thread, one check at a time).
        self._checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gymtrl-sync-check")

    def publish(self, trainer) -> tuple[dict[str, float], Future | None]:
        """Push this step's weights (once per step); returns the push's metrics and its check, running."""
        step = trainer.state.global_step
        if step == self.synced_step:
            return {}, None
        model = trainer.accelerator.unwrap_model(trainer.model)
        main = trainer.accelerator.is_main_process
        zero3 = is_zero3(model)
        # The probe's forward pass: on the main process, or in lockstep on all under ZeRO-3.
        ours = self.probe.trainer_side(model) if self.probe is not None and (main or zero3) else None
        metrics: dict[str, float] = {}
        check: Future | None = None
        # ZeRO-3: whole parameters for the push, gathered by all processes; only gymtrl's own syncs need
        # them (TRL's NCCL sync gathers one parameter at a time itself, and a whole-model gather could
        # not fit where ZeRO-3 is needed most).
        gather = full_weights(model) if self.sync.name in GATHERED_SYNCS else contextlib.nullcontext()
        with gather:
            if main:
                self.sync.expected = None
                metrics["sync/seconds"] = self.sync.push(as_pushed(model, self.sync.name))
                metrics.update({f"sync/{phase}": seconds for phase, seconds in self.sync.phases.items()})
                check = self._checker.submit(self._check, model, step, ours)
        trainer.accelerator.wait_for_everyone()
        self.synced_step = step
        return metrics, check

    def _check(self, model, step: int, ours) -> dict[str, float]:
        metrics: dict[str, float] = {}
        expected = self.sync.expected
        if self.stamp is not None and expected is not None:
            metrics["sync/exact_tensors_checked"] = float(self.stamp.check(expected, step))
        if self.probe is not None:
            metrics["sync/verify_max_logprob_diff"] = self.probe.check(model, step, ours)
            metrics["sync/verify_bound"] = self.probe.last_bound
        return metrics

    def settle(self, check: Future | None) -> dict[str, float]:
        """Wait for the check of the pushed weights; raises WeightSyncError if they are not served."""
        if check is None:
            return {}
        start = time.monotonic()
        metrics = check.result()
        return {**metrics, "sync/verify_wait_seconds": time.monotonic() - start}

    def servers_restarted(self) -> None:
        """A new vLLM serves the weights on disk: the next publish pushes again."""
        self.sync.servers_restarted()
        self.synced_step = None

    def push_again(self) -> None:
        """The next publish pushes and checks again, even within the same step."""
        self.synced_step = None

    @staticmethod
    def drop(check: Future | None) -> None:
        """A check whose batch is abandoned: its outcome no longer matters, only that it is over."""
        if check is not None:
            with contextlib.suppress(Exception):
                check.result()
