"""What every weight sync is: push the trainer's weights to vLLM, and say what vLLM should now hold.

A push made through gymtrl's worker extension (reload, ipc, broadcast) also leaves `expected`: the
push's id and the exact digest of every tensor sent (gymtrl.vllm_plugin.load_stamp). The check
(gymtrl.sync.check) compares them with the stamp vLLM's workers set once their load completed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field


@dataclass
class Expected:
    """What vLLM's workers must report after a push: its id and {tensor name: digest}."""

    push: str
    digests: dict[str, str] = field(default_factory=dict)


class WeightSync:
    name = "none"

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}  # the last push's seconds by phase, logged as sync/<phase>
        self.expected: Expected | None = None  # set by pushes that vLLM stamps (None: no exact check)
        self._run = uuid.uuid4().hex[:12]
        self._pushes = 0

    def push(self, model) -> float:
        """Make the server serve `model`'s current weights; returns the seconds it took."""
        return 0.0

    def servers_restarted(self) -> None:
        """Servers were restarted (supervision): forget any connection to the old vLLM."""

    def new_push_id(self) -> str:
        """A push id no other push of any run shares: a stamp left by another one never matches."""
        self._pushes += 1
        return f"{self._run}-{self._pushes}"


def tied_head(model):
    """(name, weight) of an output head tied to the input embeddings, else None.

    Neither save_pretrained nor named_parameters() lists `lm_head.weight` when it is tied, and vLLM's
    in-place `reload_weights` (0.32, layerwise) then leaves its LM head at the *old* values
    ("ParallelLMHead: Failed to load weights"): the server samples from a stale head while
    every other weight is new. Measured here: logprob difference 0.96 after an embedding change.
    So the syncs that can go through that reload send the head under its own name too."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return None
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head), None)
    if head is None or name is None:
        return None
    return f"{name}.weight", head.weight
