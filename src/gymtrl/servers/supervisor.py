"""What happens when a server gymtrl launched exits mid-run (supervision.on_server_exit).

- stop: the exit is raised as a ServerError with the server's log tail; the trainer saves its last
  finished step and the run ends with one line saying which server died.
- restart: the server is started again and waited for, as at start-up, up to
  supervision.max_restarts times in a run. The batch in flight is abandoned and run again in full
  (none of its rollouts is trained on half-done), NeMo Gym's agents are looked up afresh (their
  ports may change), and a new vLLM, which loads the weights on disk, is given the trainer's
  current weights and checked before the batch is redone.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from gymtrl.errors import ServerError

if TYPE_CHECKING:
    from gymtrl.servers.stack import ServerStack

log = logging.getLogger(__name__)


class ServersRestarted(Exception):
    """Raised by `watch()` into a batch in flight: the servers under it were restarted, redo it."""

    def __init__(self, names: list[str]):
        super().__init__(", ".join(names))
        self.names = names


class Supervisor:
    def __init__(self, stack: "ServerStack", on_server_exit: str, max_restarts: int, can_resync_vllm: bool = True):
        self.stack = stack
        self.on_server_exit = on_server_exit
        self.max_restarts = max_restarts
        # With TRL's NCCL sync the communicator lives inside TRL's client and cannot be rebuilt
        # from here yet: a new vLLM would serve stale weights, so its exit stops the run instead.
        self.can_resync_vllm = can_resync_vllm
        self.restarts = 0
        self.generation = 0  # bumped by every restart; a consumer re-syncs when it changes
        self.last_restarted: list[str] = []
        # The trainer's thread and a batch generated ahead (rollout.max_staleness=1) both look: one restarts.
        self._lock = threading.RLock()

    @classmethod
    def from_config(cls, cfg, stack: "ServerStack", world: int, strategy: str) -> "Supervisor":
        """The run's supervision section. Restarting applies to single-process runs: with several
        processes the others would go on rolling out against the dead server, out of step."""
        on_exit = cfg.supervision.on_server_exit
        if on_exit == "restart" and world > 1:
            log.warning("supervision.on_server_exit=restart applies to single-process runs; with %d processes a "
                        "server that exits stops the run", world)
            on_exit = "stop"
        return cls(stack, on_exit, cfg.supervision.max_restarts, can_resync_vllm=strategy != "nccl")

    def watch_callback(self):
        """A TrainerCallback that checks the launched servers after every optimizer step."""
        from transformers import TrainerCallback

        supervisor = self

        class WatchServers(TrainerCallback):
            def on_step_end(self, *a, **k):
                supervisor.handle_exits()  # a launched server that exited: restarted, or the run stops with its log tail

        return WatchServers()

    def handle_exits(self) -> bool:
        """Raise if a launched server has exited and may not be restarted; restart it if it may.
        Returns whether servers were restarted."""
        with self._lock:
            return self._handle_exits()

    def _handle_exits(self) -> bool:
        died = self.stack.exited()
        if died is None:
            return False
        if self.on_server_exit != "restart":
            raise died
        if self.restarts >= self.max_restarts:
            raise ServerError(f"{died.message}\n(after {self.restarts} restarts in this run: "
                              f"supervision.max_restarts={self.max_restarts})",
                              hint="find out why it keeps exiting from its log, or raise supervision.max_restarts")
        vllm = self.stack.vllm
        if vllm is not None and not vllm.alive() and not self.can_resync_vllm:
            raise ServerError(f"{died.message}\n(supervision.on_server_exit=restart cannot restart vLLM with the "
                              "nccl weight sync yet)", hint="use sync.strategy=reload to restart vLLM mid-run")
        log.warning("%s; restarting it (restart %d of at most %d)", died.message.splitlines()[0],
                    self.restarts + 1, self.max_restarts)
        start = time.monotonic()
        names = self.stack.restart_exited()
        self.restarts += len(names)
        self.generation += 1
        self.last_restarted = names
        log.warning("restarted %s in %.1f s", ", ".join(names), time.monotonic() - start)
        return True

    def recover(self, wait_s: float = 5.0) -> bool:
        """After a request to a server failed: whether a launched server has exited and was restarted
        (the caller then retries). A request can fail a moment before its process is seen to exit."""
        deadline = time.monotonic() + wait_s
        while self.stack.exited() is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        return self.handle_exits()

    def watch(self) -> None:
        """For the rollout engine, polled while a batch is in flight."""
        if self.handle_exits():
            raise ServersRestarted(self.last_restarted)
