"""Prove after every sync that vLLM serves the trainer's weights, in two independent ways.

A silently stale inference server is the failure that costs most: the run goes on, rewards look
plausible, and the policy being trained is not the one generating. So after each push:

1. The exact check (StampCheck), wherever gymtrl owns vLLM's receiving side (reload, ipc,
   broadcast): every vLLM worker's stamp must name this push, and the digest of every tensor it
   loaded must equal the trainer's (gymtrl.vllm_plugin.load_stamp). It does not depend on the
   learning rate or the dtype: a server that missed one step at lr 1e-6 in bf16 fails it.
2. The behavioural check (ProbeCheck), for every strategy: the server scores a fixed probe
   sequence and its logprobs must equal the trainer's within a bound set by the dtypes in play. It
   catches what loading the right bytes cannot (a wrong model, a head left out of the load), but in
   bf16 a small step moves the probe less than the bound, so alone (sync.strategy=nccl) it cannot
   tell a stale server from a fresh one.
A mismatch of either stops the run.
"""

from __future__ import annotations

import torch

from gymtrl.errors import WeightSyncError
from gymtrl.servers.vllm_control import VLLMControl
from gymtrl.sync.base import Expected
from gymtrl.sync.receiver import load_stamps

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


# bf16 keeps 8 significant bits, so each program rounds a logit L by up to |L| * 2**-8, and a
# logprob (a logit minus the logsumexp) can differ between two correct bf16 programs by about
# 4 * 2**-8 * max|L|. A fixed bound fails sharp distributions: on 2x H200, a 0.5B model trained at
# lr 1e-2 (entropy 11.8 -> 3.9 in 6 steps) gave 0.066 after a correct NCCL sync against 5e-2, while
# a server that missed a single such step was off by 2.0.
BF16_LOGPROB_ERROR_PER_LOGIT = 4 * 2.0 ** -8


@torch.no_grad()
def trainer_logprobs(model, token_ids: list[int], with_max_logit: bool = False):
    """Logprob of each token given the ones before it (first excluded); with `with_max_logit`, also
    the largest |logit| at those positions (what bf16 rounding scales with)."""
    was_training = model.training
    model.eval()
    try:
        ids = torch.tensor([token_ids], device=next(model.parameters()).device)
        logits = model(input_ids=ids).logits.float()
        logps = torch.log_softmax(logits[0, :-1], dim=-1)
        values = logps.gather(1, ids[0, 1:, None]).squeeze(1).tolist()
        return (values, logits[0, :-1].abs().max().item()) if with_max_logit else values
    finally:
        model.train(was_training)


class ProbeCheck:
    def __init__(self, control: VLLMControl, served_model: str, probe_ids: list[int], tolerance: float,
                 scale_with_logits: bool = False):
        self.control = control
        self.served_model = served_model
        self.probe_ids = probe_ids
        self.tolerance = tolerance
        # Widen the bound by bf16's rounding of the probe's largest logit (the default for bf16).
        self.scale_with_logits = scale_with_logits
        self.last_bound = tolerance
        # The trainer's probe logprobs at the last verified step, and the differences accepted lately
        # (how far apart two correct programs are): they let a stale server be told from a fresh one
        # even when the step moved the weights less than the bound.
        self._verified: tuple[int, list[float]] | None = None
        self._recent_diffs: list[float] = []

    def trainer_side(self, model) -> tuple[list[float], float]:
        """The trainer's probe logprobs and largest |logit|. Under ZeRO-3 this forward pass is a
        collective: every process must run it (DeepSpeed's hooks gather the shards)."""
        return trainer_logprobs(model, self.probe_ids, with_max_logit=True)

    def check(self, model, step: int, trainer_side: tuple[list[float], float] | None = None) -> float:
        """Raise WeightSyncError if the server's logprobs differ from the trainer's; return max diff."""
        ours, max_logit = trainer_side or self.trainer_side(model)
        theirs = self.control.prompt_logprobs(self.served_model, self.probe_ids)
        diff = max(abs(a - b) for a, b in zip(ours, theirs))
        bound = self.tolerance
        if self.scale_with_logits:
            bound += BF16_LOGPROB_ERROR_PER_LOGIT * max_logit
        self.last_bound = bound
        if diff > bound:
            scaled = f" + bf16 rounding at max |logit| {max_logit:.3g}" if self.scale_with_logits else ""
            raise WeightSyncError(
                f"after step {step}, the vLLM server's logprobs differ from the trainer's by up to {diff:.3g} "
                f"(bound {bound:.3g}: tolerance {self.tolerance:g}{scaled}): it is not serving the weights being trained",
                hint="check that vLLM serves the same model as model.name_or_path and that sync.strategy "
                "is not 'none'; sync.verify_tolerance sets the bound",
            )
        self._check_not_stale(step, ours, theirs, diff)
        self._verified = (step, ours)
        self._recent_diffs = (self._recent_diffs + [diff])[-3:]
        return diff

    def _check_not_stale(self, step: int, ours: list[float], theirs: list[float], diff: float) -> None:
        """Within the bound, but closer to the last verified step's weights than to these: the server
        missed this step. Decided only when the step moved the probe well past the noise seen so far."""
        if self._verified is None or self._verified[0] == step or not self._recent_diffs:
            return
        before = self._verified[1]
        moved = max(abs(a - b) for a, b in zip(ours, before))
        if moved <= 3 * max(self._recent_diffs):
            return
        diff_to_before = max(abs(a - b) for a, b in zip(theirs, before))
        if diff_to_before <= diff:
            raise WeightSyncError(
                f"after step {step}, the vLLM server still serves the weights of step {self._verified[0]}: its "
                f"logprobs are {diff_to_before:.3g} from those and {diff:.3g} from this step's (the step moved "
                f"them by {moved:.3g})",
                hint="a weight sync did not reach the server; check sync.strategy and the server's log",
            )


class StampCheck:
    """vLLM's workers hold exactly the weights of the last push (see the module docstring, 1)."""

    def __init__(self, control: VLLMControl):
        self.control = control

    def check(self, expected: Expected, step: int) -> int:
        """Raise WeightSyncError unless every worker's stamp is `expected`; return the tensors compared."""
        for rank, stamp in enumerate(load_stamps(self.control)):
            stamp = stamp if isinstance(stamp, dict) else {}
            if stamp.get("push") != expected.push:
                held = stamp.get("push")
                raise WeightSyncError(
                    f"after step {step}, vLLM worker {rank} did not complete this step's weight push ({expected.push}): "
                    + (f"the last load it completed was push {held}" if held else "it completed no push from this run "
                       "(a restarted or replaced server serves the weights it started with)"),
                    hint="a weight sync did not reach the server; see vLLM's log")
            theirs = stamp.get("digests") or {}
            missing = sorted(set(expected.digests) - set(theirs))
            differ = sorted(n for n in expected.digests if n in theirs and theirs[n] != expected.digests[n])
            if missing or differ:
                names = ", ".join((differ + missing)[:3])
                raise WeightSyncError(
                    f"after step {step}, vLLM worker {rank} loaded other bytes than the trainer sent: {len(differ)} of "
                    f"{len(expected.digests)} tensors differ and {len(missing)} are missing (first: {names})",
                    hint="the weights were corrupted or cut short on the way; see vLLM's log")
        return len(expected.digests)
