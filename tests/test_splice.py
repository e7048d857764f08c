"""The prefix-correction rule (gymtrl/vllm_plugin/splice.py) on the tiny model's real tokenizer and
a chat template that re-renders tool calls differently from how the model writes them."""

import pytest

from chat_templates import write_reordered_template
from gymtrl.vllm_plugin.splice import REFUSAL_MARKER, SpliceRefused, check_history_matches, find_anchor, plain, splice

TOOLS = [{"type": "function", "function": {"name": "get_synonym", "description": "A synonym.",
                                           "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}}]
USER = {"role": "user", "content": "What is a synonym of 808 things?"}
CALL = {"type": "function", "function": {"name": "get_synonym", "arguments": {"word": "808"}}}


@pytest.fixture(scope="module")
def tok(tiny_model, tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = write_reordered_template(tiny_model, tmp_path_factory.mktemp("t") / "r.jinja").read_text()
    return tokenizer


def render(tok, messages, generation_prompt):
    text = tok.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=generation_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def specials(tok):
    return set(tok.all_special_ids)


def decode(tok):
    return lambda ids: tok.decode(ids, skip_special_tokens=False)


def first_turn(tok, generation_text, end=True):
    """What the model saw and sampled on turn one: the canonical Qwen tool-call text, tokenized one
    character at a time (as a sampler may emit it), ended by <|im_end|> unless cut off."""
    prompt = render(tok, [USER], True)
    generated = [i for ch in generation_text for i in tok(ch, add_special_tokens=False)["input_ids"]]
    if end:
        generated.append(tok.convert_tokens_to_ids("<|im_end|>"))
    return prompt, generated


def conversation(prompt, generated, tool_output="synonym: 7"):
    return [USER, {"role": "assistant", "content": "", "tool_calls": [CALL],
                   "prompt_token_ids": prompt, "generation_token_ids": generated},
            {"role": "tool", "content": tool_output}]


CANONICAL = '<tool_call>\n{"name": "get_synonym", "arguments": {"word": "808"}}\n</tool_call>'


def corrected(tok, messages):
    anchor = find_anchor(messages)
    check_history_matches(messages, anchor, decode(tok)(anchor.token_ids))
    history = render(tok, messages[: anchor.index + 1], False)
    return splice(render(tok, messages, True), history, anchor, specials(tok), decode(tok)), anchor


def test_the_corrected_prompt_extends_the_sampled_history(tok):
    prompt, generated = first_turn(tok, CANONICAL)
    messages = conversation(prompt, generated)
    full = render(tok, messages, True)
    assert full[: len(prompt) + len(generated)] != prompt + generated  # stock rendering diverges
    ids, _ = corrected(tok, messages)
    assert ids[: len(prompt) + len(generated)] == prompt + generated
    tail = tok.decode(ids[len(prompt) + len(generated):], skip_special_tokens=False)
    assert tail == "\n<|im_start|>user\n<tool_response>\nsynonym: 7\n</tool_response><|im_end|>\n<|im_start|>assistant\n"


def test_a_generation_cut_off_before_its_end_token_gets_the_templates(tok):
    prompt, generated = first_turn(tok, CANONICAL, end=False)
    ids, _ = corrected(tok, conversation(prompt, generated))
    n = len(prompt) + len(generated)
    assert ids[:n] == prompt + generated
    assert tok.convert_ids_to_tokens(ids[n]) == "<|im_end|>"


def test_turns_chain_each_on_the_last(tok):
    prompt, generated = first_turn(tok, CANONICAL)
    second_prompt, _ = corrected(tok, conversation(prompt, generated))
    second_gen = tok("Done.", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    messages = conversation(prompt, generated) + [
        {"role": "assistant", "content": "Done.", "prompt_token_ids": second_prompt, "generation_token_ids": second_gen},
        {"role": "user", "content": "And another?"}]
    ids, anchor = corrected(tok, messages)
    assert anchor.index == 3 and ids[: len(second_prompt) + len(second_gen)] == second_prompt + second_gen


@pytest.mark.parametrize("edit, reason", [
    (lambda m: m[2].update(content="a different tool output"), None),  # the new turn: free to differ
    (lambda m: m[0].update(content="an edited question"), "history_edited"),
    (lambda m: m[1]["tool_calls"][0]["function"].update(name="other_tool"), "history_edited"),
    (lambda m: m[1].update(generation_token_ids="12 13"), "malformed_token_ids"),
    (lambda m: m[1].update(prompt_token_ids=[]), "malformed_token_ids"),
    (lambda m: m[1].update(prompt_token_ids=m[1]["prompt_token_ids"] + [-1]), "malformed_token_ids"),
    (lambda m: m[1].update(generation_token_ids=[True, 12]), "malformed_token_ids"),
    (lambda m: m[1].update(generation_token_ids=[12.0]), "malformed_token_ids"),
    (lambda m: m.extend([{"role": "assistant", "content": "x", "prompt_token_ids": [5], "generation_token_ids": [6]},
                         {"role": "user", "content": "y"}]), "inconsistent_history_ids"),
])
def test_unsafe_joins_are_refused_with_a_reason(tok, edit, reason):
    prompt, generated = first_turn(tok, CANONICAL)
    messages = conversation(prompt, generated)
    edit(messages)
    if reason is None:
        corrected(tok, messages)
        return
    with pytest.raises(SpliceRefused) as err:
        corrected(tok, messages)
    assert err.value.reason == reason and str(err.value).startswith(f"{REFUSAL_MARKER} ({reason})")


def test_a_template_that_writes_after_the_last_special_token_is_refused(tok):
    prompt, generated = first_turn(tok, CANONICAL)
    messages = conversation(prompt, generated)
    anchor = find_anchor(messages)
    history = render(tok, messages[:2], False) + tok("trailing words", add_special_tokens=False)["input_ids"]
    with pytest.raises(SpliceRefused, match="no_boundary"):
        splice(render(tok, messages, True), history, anchor, specials(tok), decode(tok))


def test_requests_without_token_ids_are_left_alone():
    assert find_anchor([USER, {"role": "assistant", "content": "hi"}, USER]) is None


def test_plain_copies_id_lists_and_leaves_no_model_or_iterator_inside():
    ids = list(range(5000))
    messages = plain(({"role": "assistant", "prompt_token_ids": ids, "tool_calls": (iter([{"function": {"name": "f"}}]),)},))
    assert messages[0]["prompt_token_ids"] == ids and messages[0]["prompt_token_ids"] is not ids
    assert messages == [{"role": "assistant", "prompt_token_ids": ids, "tool_calls": [[{"function": {"name": "f"}}]]}]


def test_one_shot_iterators_are_materialised_once():
    messages = plain([{"role": "assistant", "tool_calls": iter([{"function": {"name": "f"}}])}])
    assert messages == [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]
