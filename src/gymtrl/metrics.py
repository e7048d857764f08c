"""What each logged step measured: one JSON object per line in <output>/metrics.jsonl.

TRL's own logs (reward, loss, lengths, rewards/<func>/mean) plus gymtrl's rollout metrics (per
environment reward and failure rate, turns, latency, tokens, failures by kind, sync time and check)
arrive together in `on_log`; this writes them with the step number and, on a GPU, the training
process's peak memory. Lines are flushed as written, so a run killed mid-way keeps every step it
logged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback


class MetricsJsonlWriter(TrainerCallback):
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step}
        for key, value in logs.items():
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            record[key] = value
        record.update(trainer_memory())
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def trainer_memory() -> dict[str, float]:
    """This training process's GPU memory so far (its own allocations: vLLM runs in another process),
    in GiB: the peak allocated by tensors and the peak reserved by PyTorch's caching allocator. Empty
    without CUDA."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"memory/trainer_peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "memory/trainer_peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def read_metrics(path: str | Path) -> list[dict]:
    # "\n" only: str.splitlines() also breaks at U+2028 and the like, which JSON may hold raw inside a string
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


class StepChannel:
    """What a rollout batch hands on to the parts of the step that TRL runs after it: its metrics
    (logged by the environment's reward function through TRL's `log_metric`) and, per sample in
    order, its environment and the [start, end) spans of its model turns (for the sampler-gap
    metrics of gymtrl.trl_seam)."""

    def __init__(self) -> None:
        self._metrics: dict[str, float] = {}
        self.samples: list[tuple[str, list[tuple[int, int]]]] = []

    def put(self, metrics: dict[str, float], samples: list[tuple[str, list[tuple[int, int]]]]) -> None:
        self._metrics = dict(metrics)
        self.samples = list(samples)

    def take_metrics(self) -> dict[str, float]:
        """This batch's metrics, once: the reward function is called again for a batch's next slices."""
        metrics, self._metrics = self._metrics, {}
        return metrics
