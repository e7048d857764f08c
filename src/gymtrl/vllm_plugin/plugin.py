"""vLLM general plugin: on-policy prefix correction for multi-turn chat requests.

Loaded by vLLM in each of its processes through the `vllm.general_plugins` entry point that
`gymtrl vllm-plugin install` puts into the vLLM environment. It does nothing unless the server was
started with GYMTRL_PREFIX_CORRECTION=1 (gymtrl's launcher sets it when vllm.prefix_correction is
on). Then it wraps `OnlineRenderer.preprocess_chat`, through which both chat completions and chat
`/tokenize` render prompts (vLLM 0.26, 0.32 and any release with that hook), so the prompt the
engine generates from and the ids NeMo Gym reads back (with the completion, gymtrl's default, or from /tokenize) are the same
corrected ids. See splice.py for the rule.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os

from .protocol import ENV_SWITCH

try:  # installed as its own distribution into the vLLM environment
    from gymtrl_vllm_plugin.splice import Anchor, SpliceRefused, check_history_matches, find_anchor, plain, splice
except ImportError:  # imported from gymtrl's source tree (tests)
    from gymtrl.vllm_plugin.splice import Anchor, SpliceRefused, check_history_matches, find_anchor, plain, splice

# The versions gymtrl's tests run. Another one is patched too when it has the hook (OnlineRenderer's
# async preprocess_chat); gymtrl's start-up self-test then shows whether the correction works there.
TESTED = ("0.26.", "0.32.")
log = logging.getLogger("gymtrl.prefix_correction")


def special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def _prompt_ids(engine_input) -> list[int]:
    ids = engine_input.get("prompt_token_ids") if isinstance(engine_input, dict) else None
    if not isinstance(ids, list):
        raise SpliceRefused("unsupported_input", f"the rendered prompt has no token ids ({type(engine_input).__name__})")
    return ids


def corrected_preprocess_chat(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    async def preprocess_chat(self, request, messages, *args, **kwargs):
        messages = plain(list(messages))
        anchor: Anchor | None = find_anchor(messages)
        if anchor is None:
            return await original(self, request, messages, *args, **kwargs)
        conversation, engine_inputs = await original(self, request, messages, *args, **kwargs)
        if len(engine_inputs) != 1:
            raise SpliceRefused("unsupported_input", f"{len(engine_inputs)} prompts rendered for one chat request")
        # The history alone, closed and without a generation prompt; no tool parser adjustments.
        bound = signature.bind(self, request, messages[: anchor.index + 1], *args, **kwargs)
        bound.arguments["request"] = request.model_copy(
            update={"add_generation_prompt": False, "continue_final_message": False})
        if "parser" in bound.arguments:
            bound.arguments["parser"] = None
        _, history_inputs = await original(*bound.args, **bound.kwargs)

        tokenizer = self.renderer.get_tokenizer()
        decode = functools.partial(tokenizer.decode, skip_special_tokens=False)
        check_history_matches(messages, anchor, decode(anchor.token_ids))
        engine_input = engine_inputs[0]
        ids = splice(_prompt_ids(engine_input), _prompt_ids(history_inputs[0]), anchor, special_ids(tokenizer), decode)
        engine_input["prompt_token_ids"] = ids
        if "prompt" in engine_input:
            engine_input["prompt"] = decode(ids)
        return conversation, engine_inputs

    preprocess_chat.__gymtrl_prefix_correction__ = True
    return preprocess_chat


def register() -> None:
    """Entry point (`vllm.general_plugins`). Called in every vLLM process; patches once, and only
    where the OpenAI server's renderer lives."""
    if os.environ.get(ENV_SWITCH) != "1":
        return
    import vllm

    try:
        from vllm.renderers.online_renderer import OnlineRenderer
    except ImportError as e:
        raise RuntimeError(f"gymtrl prefix correction: vLLM {vllm.__version__} has no OnlineRenderer ({e})") from e
    if not inspect.iscoroutinefunction(getattr(OnlineRenderer, "preprocess_chat", None)):
        raise RuntimeError(f"gymtrl prefix correction: OnlineRenderer.preprocess_chat missing in vLLM {vllm.__version__}")
    if getattr(OnlineRenderer.preprocess_chat, "__gymtrl_prefix_correction__", False):
        return
    OnlineRenderer.preprocess_chat = corrected_preprocess_chat(OnlineRenderer.preprocess_chat)
    if vllm.__version__.startswith(TESTED):
        log.info("gymtrl prefix correction active (vLLM %s)", vllm.__version__)
    else:
        log.warning("gymtrl prefix correction active on vLLM %s, a version gymtrl's tests do not run (they run %s); "
                    "gymtrl's start-up self-test checks that it splices", vllm.__version__,
                    ", ".join(v + "x" for v in TESTED))
