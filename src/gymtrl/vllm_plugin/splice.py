"""On-policy prefix correction: the pure part (no vLLM import), shared by the plugin and tests.

On a later turn NeMo Gym's `vllm_model` (training config) sends the conversation back as messages,
and each earlier assistant message carries the exact ids of its call: `prompt_token_ids` (what the
model was prompted with) and `generation_token_ids` (what it sampled). Re-rendering the chat
template over those messages need not give back those ids (tool calls re-serialised, BPE merges
that differ from what was sampled, reasoning stripped), and then the new prompt does not extend
the history the model really saw. The correction builds the new prompt as

    anchor = prompt_token_ids + generation_token_ids   of the last assistant message carrying ids
    new    = anchor + (the rendering's tokens after the special token that closes that turn)

The join sits on a special token (an end-of-turn such as <|im_end|>), which tokenizers never merge
with neighbours, so the tokens after it are exactly what the template adds for the later messages:
tool results, template glue, a new user turn, the generation prompt.

Every check that can fail raises `SpliceRefused`; the plugin turns it into an explicit HTTP 400
whose message starts with `REFUSAL_MARKER`, which gymtrl counts as its own failure kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from .protocol import REFUSAL_MARKER  # (shared with the trainer)


class SpliceRefused(ValueError):  # vLLM answers ValueError with HTTP 400
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{REFUSAL_MARKER} ({reason}): {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Anchor:
    index: int  # position of the anchored assistant message in `messages`
    token_ids: list[int]  # its prompt_token_ids + generation_token_ids
    generation_len: int


_SCALARS = {str, bytes, int, float, bool, type(None)}


def plain(value: Any) -> Any:
    """A deep copy made of dicts and lists only. vLLM hands some request fields over as pydantic
    models or one-shot iterators (an assistant message's `tool_calls` in /tokenize requests): a
    second rendering would find them already consumed, so they are materialised once, up front."""
    if hasattr(value, "model_dump"):
        return plain(value.model_dump())
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if not set(map(type, value)) - _SCALARS:  # token ids: a 10k-id list copied in C, not element by element
            return list(value)
        return [plain(v) for v in value]
    if isinstance(value, (str, bytes, int, float, bool)) or value is None:
        return value
    if isinstance(value, Iterable):
        return [plain(v) for v in value]
    return value


def _ids(message: dict, key: str, index: int) -> list[int]:
    value = message.get(key)
    # checked in C (map, set, min): these lists hold a whole prompt's ids, on vLLM's one API-server thread
    if not isinstance(value, list) or set(map(type, value)) - {int} or (value and min(value) < 0):
        raise SpliceRefused("malformed_token_ids", f"message {index}: {key} is not a list of token ids")
    return value


def _carries_ids(message: Any) -> bool:
    return isinstance(message, dict) and message.get("role") == "assistant" and (
        message.get("prompt_token_ids") is not None or message.get("generation_token_ids") is not None)


def find_anchor(messages: list) -> Anchor | None:
    """The last assistant message that carries token ids, checked against the earlier ones.

    None when no message carries ids (a first turn, or a client that sends none): render as usual.
    """
    carrying = [i for i, m in enumerate(messages) if _carries_ids(m)]
    if not carrying:
        return None
    chain: list[list[int]] = []
    for i in carrying:
        prompt = _ids(messages[i], "prompt_token_ids", i)
        generation = _ids(messages[i], "generation_token_ids", i)
        if not prompt or not generation:
            raise SpliceRefused("malformed_token_ids", f"message {i}: empty prompt_token_ids or generation_token_ids")
        if chain and prompt[: len(chain[-1])] != chain[-1]:
            raise SpliceRefused(
                "inconsistent_history_ids",
                f"message {i}: its prompt_token_ids do not extend the ids of the assistant message before it",
            )
        chain.append(prompt + generation)
    k = carrying[-1]
    return Anchor(k, chain[-1], len(messages[k]["generation_token_ids"]))


def _texts(message: dict) -> list[str]:
    """The strings a faithful rendering of `message` must contain: its text content, and the names
    of the functions an assistant called (arguments are re-serialised, so they are not compared)."""
    out: list[str] = []
    content = message.get("content")
    if isinstance(content, str):
        out.append(content)
    elif isinstance(content, list):
        out += [part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)]
    for call in message.get("tool_calls") or []:
        fn = call.get("function", call) if isinstance(call, dict) else {}
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out.append(fn["name"])
    return [t.strip() for t in out if t and t.strip()]


def check_history_matches(messages: list, anchor: Anchor, anchor_text: str) -> None:
    """Refuse when the messages up to the anchor are not what its ids say (history edited between
    turns, e.g. a truncated tool output): splicing the ids would silently undo the edit."""
    pos = 0
    for i, message in enumerate(messages[: anchor.index + 1]):
        if not isinstance(message, dict):
            continue
        for text in _texts(message):
            found = anchor_text.find(text, pos)
            if found < 0:
                raise SpliceRefused(
                    "history_edited",
                    f"message {i} ({message.get('role')}) is not in the text of the earlier turn's token ids: "
                    f"{text[:80]!r}",
                )
            pos = found + len(text)


def splice(full_ids: list[int], history_ids: list[int], anchor: Anchor, special_ids: set[int],
           decode) -> list[int]:
    """The corrected prompt ids.

    full_ids:    the template's rendering of the whole request (what stock vLLM would use)
    history_ids: the rendering of messages[: anchor.index + 1], without a generation prompt
    decode:      ids -> text, to check what the template writes after the closing token
    """
    j = max((i for i, t in enumerate(history_ids) if t in special_ids), default=-1)
    if j < 0:
        raise SpliceRefused("no_boundary", "the chat template closes the assistant turn with no special token")
    trailing = decode(history_ids[j + 1:])
    if trailing.strip():
        raise SpliceRefused(
            "no_boundary",
            f"the chat template writes {trailing[:40]!r} after the assistant turn's last special token",
        )
    if full_ids[: j + 1] != history_ids[: j + 1]:
        raise SpliceRefused(
            "history_not_prefix",
            "rendering the later messages changed how the chat template renders the earlier ones",
        )
    closing = full_ids[j]
    generated = anchor.token_ids[-anchor.generation_len:]
    if generated[-1] == closing:  # the model ended its turn with this token: keep its own copy
        return anchor.token_ids + full_ids[j + 1:]
    # The generation stopped without it (cut at max_tokens, or a stop string): the template's
    # closing token follows, as environment tokens.
    return anchor.token_ids + full_ids[j:]
