"""Checkpoints that resume can trust, and stopping without losing the run.

- A checkpoint counts as complete only once the Trainer has written all of it (model, optimizer,
  scheduler, RNG, trainer state): gymtrl then adds a marker file. A save cut short by a kill leaves
  no marker, so `--resume auto` passes over it, and `--resume PATH` refuses it with the reason.
- The first SIGTERM or SIGINT (preemption, Ctrl-C), or a stop file (<output.dir>/STOP), asks the
  run to stop at the end of the current step with a checkpoint; a second signal stops at once.
- A run that must stop on an error (a server died, too many rollouts failed) saves a checkpoint of
  its last finished step first.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

from gymtrl.atomic import write_text_atomic
from gymtrl.distributed import any_process
from gymtrl.errors import ConfigError

log = logging.getLogger(__name__)
MARKER = "gymtrl-complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint directory under `out_dir`, oldest first."""
    found = []
    for p in Path(out_dir).glob("checkpoint-*"):
        m = _CHECKPOINT.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(resume: str | None, out_dir: Path) -> str | None:
    """`--resume`: None (fresh), "auto" (the newest complete checkpoint in the run directory, if
    any), or a checkpoint path (which must be complete)."""
    if resume is None:
        return None
    if resume == "auto":
        for step, path in reversed(checkpoints(out_dir)):
            if is_complete(path):
                log.info("resuming from %s (step %d)", path, step)
                return str(path)
            log.warning("skipping %s: its save did not finish (no %s)", path, MARKER)
        log.info("--resume auto: no complete checkpoint in %s; starting from the beginning", out_dir)
        return None
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"--resume {resume}: no such checkpoint directory",
                          hint=f"use --resume auto, or one of {', '.join(str(p) for _, p in checkpoints(out_dir)) or 'none'}")
    if not is_complete(path):
        raise ConfigError(f"--resume {resume}: this checkpoint is incomplete (its save was interrupted)",
                          hint="resume from an earlier checkpoint, or use --resume auto")
    return str(path)


def mark_complete(path: Path, step: int) -> None:
    write_text_atomic(path / MARKER, json.dumps({"step": step, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


class MarkCompleteCheckpoints(TrainerCallback):
    """The Trainer calls on_save after the whole checkpoint is on disk."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)


class GracefulStop(TrainerCallback):
    """Stop at the end of this step with a checkpoint when asked: by the first SIGTERM/SIGINT, or
    by a stop file appearing (`touch <output.dir>/STOP`; reaches every node of a multi-node run
    through the shared file system, with no signal to a launcher that might kill its workers first).
    A second signal stops at once, as does one before training has begun (nothing to save yet).

    Slurm signals every process of a job step, and a launcher (torchrun, under accelerate) passes
    the same signal on to its workers: a repeat within DUPLICATE_SIGNAL_S is that one delivery, not
    a second request."""

    DUPLICATE_SIGNAL_S = 1.0

    def __init__(self, stop_file: Path | None = None) -> None:
        self.signal: int | None = None
        self.stop_file = stop_file
        self.reason: str | None = None
        self.training = False
        self._signalled_at = 0.0

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def clear_stop_file(self) -> None:
        """A stop file left from before this run (the one that made the last run stop) is not a request to this one."""
        if self.stop_file is not None and self.stop_file.exists():
            log.info("removing %s left by an earlier run", self.stop_file)
            self.stop_file.unlink(missing_ok=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and time.monotonic() - self._signalled_at < self.DUPLICATE_SIGNAL_S:
            return
        if self.signal is not None or not self.training:
            raise KeyboardInterrupt(f"signal {signum}")
        self.signal = signum
        self._signalled_at = time.monotonic()
        self.reason = signal.Signals(signum).name
        log.warning("received %s: saving a checkpoint at the end of this step, then stopping "
                    "(send it again to stop at once)", self.reason)

    def _stop_file_seen(self) -> bool:
        if self.stop_file is None or self.reason is not None or not self.stop_file.exists():
            return False
        self.reason = f"stop file {self.stop_file}"
        log.warning("found %s: saving a checkpoint at the end of this step, then stopping", self.stop_file)
        return True

    def on_step_end(self, args, state, control, **kwargs):
        asked = self._stop_file_seen() or self.reason is not None  # (a signal sets the reason)
        # Every process stops at the same step (a save is collective), whichever was asked.
        if any_process(asked, args.device):
            self.reason = self.reason or "another process's stop request"
            control.should_save = True
            control.should_training_stop = True
        return control

    @property
    def stopped(self) -> bool:
        return self.reason is not None


def save_now(trainer) -> Path | None:
    """A checkpoint of the last finished step, unless it exists already (None before step 1)."""
    step = trainer.state.global_step
    path = Path(trainer.args.output_dir) / f"checkpoint-{step}"
    if step == 0:
        return None
    if is_complete(path):
        return path
    trainer._save_checkpoint(trainer.model, trial=None)  # the Trainer's own save: model, optimizer, RNG, state
    if trainer.state.is_world_process_zero:
        mark_complete(path, step)
    return path
