"""Prove after every sync that vLLM serves the trainer's weights.

A silently stale inference server is the failure that costs most: the run goes on, rewards look
plausible, and the policy being trained is not the one generating. So after each push the server
scores a fixed probe sequence and its logprobs must equal the trainer's, token by token, within a
tolerance set by the dtypes in play. A mismatch stops the run.
"""

from __future__ import annotations

import torch

from gymtrl.errors import WeightSyncError
from gymtrl.sync.vllm_control import VLLMControl

PROBE_MESSAGES = [
    {"role": "system", "content": "gymtrl weight check."},
    {"role": "user", "content": "Count from 1 to 9 and name a tool."},
    {"role": "assistant", "content": "1 2 3 4 5 6 7 8 9 <tool_call>"},
]


def probe_token_ids(tokenizer, max_tokens: int = 48) -> list[int]:
    text = tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids[:max_tokens])


def default_tolerance(dtype_name: str) -> float:
    return 1e-3 if dtype_name == "float32" else 5e-2


@torch.no_grad()
def trainer_logprobs(model, token_ids: list[int]) -> list[float]:
    was_training = model.training
    model.eval()
    try:
        ids = torch.tensor([token_ids], device=next(model.parameters()).device)
        logits = model(input_ids=ids).logits.float()
        logps = torch.log_softmax(logits[0, :-1], dim=-1)
        return logps.gather(1, ids[0, 1:, None]).squeeze(1).tolist()
    finally:
        model.train(was_training)


class SyncVerifier:
    def __init__(self, control: VLLMControl, served_model: str, probe_ids: list[int], tolerance: float):
        self.control = control
        self.served_model = served_model
        self.probe_ids = probe_ids
        self.tolerance = tolerance

    def check(self, model, step: int) -> float:
        """Raise WeightSyncError if the server's logprobs differ from the trainer's; return max diff."""
        ours = trainer_logprobs(model, self.probe_ids)
        theirs = self.control.prompt_logprobs(self.served_model, self.probe_ids)
        diff = max(abs(a - b) for a, b in zip(ours, theirs))
        if diff > self.tolerance:
            raise WeightSyncError(
                f"after step {step}, the vLLM server's logprobs differ from the trainer's by up to {diff:.3g} "
                f"(tolerance {self.tolerance:g}): it is not serving the weights being trained",
                hint="check that vLLM serves the same model as model.name_or_path and that sync.strategy "
                "is not 'none'; sync.verify_tolerance sets the bound",
            )
        return diff
