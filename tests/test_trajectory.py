"""Stitching NeMo Gym output items into one on-policy sample (pure; no servers)."""

import pytest

from gymtrl.failures import FailureKind
from gymtrl.rollout.trajectory import StitchError, stitch


def call(prompt, gen, logps=None, type_="message"):
    return {"type": type_, "prompt_token_ids": prompt, "generation_token_ids": gen,
            "generation_log_probs": logps if logps is not None else [-0.5] * len(gen)}


def test_single_turn_is_prompt_plus_generation():
    t = stitch([{"type": "reasoning"}, call([1, 2, 3], [4, 5], [-0.1, -0.2])])
    assert t.prompt_ids == [1, 2, 3]
    assert t.completion_ids == [4, 5]
    assert t.logprobs == [-0.1, -0.2]
    assert t.env_mask == [1, 1]
    assert t.num_turns == 1


def test_multi_turn_masks_tool_and_template_tokens():
    out = [
        call([1, 2], [3, 4], [-1.0, -2.0], "function_call"),
        {"type": "function_call_output", "output": "ok"},  # carries no ids; its tokens show up below
        call([1, 2, 3, 4, 9, 9, 7], [5, 6], [-3.0, -4.0]),
    ]
    t = stitch(out)
    assert t.prompt_ids == [1, 2]
    assert t.completion_ids == [3, 4, 9, 9, 7, 5, 6]
    assert t.env_mask == [1, 1, 0, 0, 0, 1, 1]
    assert t.logprobs == [-1.0, -2.0, 0.0, 0.0, 0.0, -3.0, -4.0]
    assert t.turn_spans == [(0, 2), (5, 7)]
    assert t.num_turns == 2


def test_prefix_mismatch_is_a_counted_kind_not_a_crash():
    out = [call([1, 2], [3, 4]), call([1, 2, 3, 8, 9], [5])]  # re-tokenized: 4 became 8
    with pytest.raises(StitchError) as e:
        stitch(out)
    assert e.value.kind is FailureKind.PREFIX_MISMATCH
    assert "token 3" in e.value.detail


@pytest.mark.parametrize("output, kind", [
    ([{"type": "message", "content": []}], FailureKind.MISSING_TOKEN_IDS),
    ([], FailureKind.MISSING_TOKEN_IDS),
    ("not a list", FailureKind.INVALID_REPLY),
    ([call([1], [2, 3], [-0.1])], FailureKind.MALFORMED_TOKEN_IDS),
    ([call([1], ["a"])], FailureKind.MALFORMED_TOKEN_IDS),
    ([{"type": "message", "prompt_token_ids": [1]}], FailureKind.MALFORMED_TOKEN_IDS),
    ([call([1], [])], FailureKind.MISSING_TOKEN_IDS),
])
def test_unusable_outputs_name_their_kind(output, kind):
    with pytest.raises(StitchError) as e:
        stitch(output)
    assert e.value.kind is kind
