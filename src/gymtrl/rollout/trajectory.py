"""Turn one NeMo Gym `/run` reply into one on-policy training sample.

NeMo Gym's `vllm_model` (training config) attaches `prompt_token_ids`, `generation_token_ids` and
`generation_log_probs` to the last output item of every model call. A multi-turn episode becomes one
sequence: the first call's prompt is the prompt; each call's generation is a model span (mask 1, its
sampling logprobs); whatever the next call's prompt adds after everything seen so far (tool results,
template glue, a new user turn) is an environment span (mask 0). That only works if each prompt
*starts with* the previous prompt + generation; when it does not (the server re-tokenized the
history differently), the sample cannot be trained on-policy and is rejected, never patched up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gymtrl.failures import FailureKind


@dataclass
class Trajectory:
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    env_mask: list[int]  # 1 = sampled by the model (trained), 0 = environment / template tokens
    num_turns: int
    turn_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of model spans

    @property
    def num_model_tokens(self) -> int:
        return sum(self.env_mask)


class StitchError(Exception):
    """The reply cannot become a training sample; `kind` says why (a FailureKind)."""

    def __init__(self, kind: FailureKind, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def _int_list(value: Any, name: str, turn: int, vocab_size: int | None) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise StitchError(FailureKind.MALFORMED_TOKEN_IDS, f"turn {turn}: {name} is not a list of ints")
    # An id outside the vocabulary would crash the trainer's embedding lookup mid-step.
    bad = next((t for t in value if t < 0 or (vocab_size is not None and t >= vocab_size)), None)
    if bad is not None:
        raise StitchError(FailureKind.MALFORMED_TOKEN_IDS,
                          f"turn {turn}: {name} holds {bad}, outside the vocabulary (0..{vocab_size})")
    return value


# Sampling logprobs are <= 0; a little above 0 is float noise. NaN or +inf would make the loss NaN.
LOGPROB_CEILING = 1e-3


def _float_list(value: Any, name: str, turn: int) -> list[float]:
    if not isinstance(value, list) or not all(
        isinstance(t, (int, float)) and not isinstance(t, bool) for t in value
    ):
        raise StitchError(FailureKind.MALFORMED_TOKEN_IDS, f"turn {turn}: {name} is not a list of numbers")
    out = [float(t) for t in value]
    bad = next((t for t in out if not (t <= LOGPROB_CEILING) or t == float("-inf")), None)
    if bad is not None:
        raise StitchError(FailureKind.MALFORMED_TOKEN_IDS, f"turn {turn}: {name} holds {bad}, not a log-probability")
    return [min(t, 0.0) for t in out]


def token_items(output: Any) -> list[dict]:
    """The output items that carry one model call's token ids, in order."""
    if not isinstance(output, list):
        raise StitchError(FailureKind.INVALID_REPLY, "response.output is not a list")
    items = []
    for item in output:
        if not isinstance(item, dict):
            continue
        has = [k in item and item[k] is not None for k in ("prompt_token_ids", "generation_token_ids")]
        if all(has):
            items.append(item)
        elif any(has):
            raise StitchError(FailureKind.MALFORMED_TOKEN_IDS, "an output item carries only part of its token ids")
    return items


def stitch(output: Any, vocab_size: int | None = None) -> Trajectory:
    """Stitch `response.output` into one sample; raises StitchError with a failure kind.
    With `vocab_size`, token ids outside [0, vocab_size) are refused."""
    items = token_items(output)
    if not items:
        raise StitchError(
            FailureKind.MISSING_TOKEN_IDS,
            "no output item carries prompt_token_ids/generation_token_ids "
            "(is the model server NeMo Gym's vllm_model_for_training config?)",
        )
    prompt: list[int] = []
    completion: list[int] = []
    logprobs: list[float] = []
    mask: list[int] = []
    spans: list[tuple[int, int]] = []
    seen: list[int] = []
    for turn, item in enumerate(items):
        p = _int_list(item["prompt_token_ids"], "prompt_token_ids", turn, vocab_size)
        g = _int_list(item["generation_token_ids"], "generation_token_ids", turn, vocab_size)
        lp = _float_list(item.get("generation_log_probs"), "generation_log_probs", turn)
        if len(lp) != len(g):
            raise StitchError(
                FailureKind.MALFORMED_TOKEN_IDS,
                f"turn {turn}: {len(g)} generated tokens but {len(lp)} logprobs",
            )
        if turn == 0:
            prompt = list(p)
        else:
            if p[: len(seen)] != seen:
                at = next((i for i, (a, b) in enumerate(zip(p, seen)) if a != b), min(len(p), len(seen)))
                raise StitchError(
                    FailureKind.PREFIX_MISMATCH,
                    f"turn {turn}: prompt diverges from the previous prompt+generation at token {at} "
                    f"(prompt {len(p)} tokens, history {len(seen)})",
                )
            glue = p[len(seen):]
            completion += glue
            logprobs += [0.0] * len(glue)
            mask += [0] * len(glue)
        start = len(completion)
        completion += g
        logprobs += lp
        mask += [1] * len(g)
        spans.append((start, len(completion)))
        seen = p + g
    if not any(mask):
        raise StitchError(FailureKind.MISSING_TOKEN_IDS, "the model generated no tokens")
    return Trajectory(prompt, completion, logprobs, mask, num_turns=len(items), turn_spans=spans)
