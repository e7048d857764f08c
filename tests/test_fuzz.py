"""Fuzzing the boundaries (hypothesis): no config, dataset line or agent reply makes gymtrl crash with
a traceback. Each is accepted, refused with gymtrl's own error (one message), or, for a reply, turned
into a counted, excluded rollout; and what is accepted is safe to train on."""

import json
import math
import os

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gymtrl.config.load import load_config, load_prepare_config
from gymtrl.data.read import read_jsonl
from gymtrl.errors import GymtrlError
from gymtrl.gym.client import RunResult
from gymtrl.prepare.validate import schema_problem, verifier_problem, VERIFIER_FIELDS
from gymtrl.rollout.engine import RolloutOutcome, outcome_from_result

# GYMTRL_FUZZ_EXAMPLES raises the count for a longer hunt (CI runs the default).
FUZZ = settings(max_examples=int(os.environ.get("GYMTRL_FUZZ_EXAMPLES", "300")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
VOCAB = 1000

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                           max_leaves=20)

# --- config ------------------------------------------------------------------------------------
SECTION_KEYS = {
    "model": ["name_or_path", "dtype", "trust_remote_code"],
    "data": ["train", "eval", "max_train_rows"],
    "gym": ["head_server_url", "launch", "env_yaml"],
    "vllm": ["base_url", "dtype", "max_model_len", "launch", "prefix_correction"],
    "rollout": ["max_concurrency", "timeout_s", "retries", "max_failure_rate"],
    "sync": ["strategy", "verify", "verify_tolerance"],
    "grpo": ["max_steps", "learning_rate", "num_generations", "temperature", "save_strategy", "bogus"],
    "rewards": ["env_weight", "functions"],
    "judge": ["server", "base_url", "model", "launch"],
    "prepare": ["sources", "seed", "max_rows", "output_dir"],
    "output": ["dir"],
    "nonsense": ["x"],
}
config_docs = st.dictionaries(
    st.sampled_from(sorted(SECTION_KEYS)),
    st.one_of(scalars, st.lists(scalars, max_size=3),
              st.sampled_from(sorted(SECTION_KEYS)).flatmap(
                  lambda s: st.dictionaries(st.sampled_from(SECTION_KEYS[s]), json_values, max_size=3))),
    max_size=6,
)


def refused_cleanly(fn) -> None:
    try:
        fn()
    except GymtrlError as e:
        assert str(e).strip()  # a message the user can act on


@FUZZ
@given(doc=config_docs)
def test_any_config_document_is_loaded_or_refused_with_a_message(tmp_path, doc):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    refused_cleanly(lambda: load_config(path))
    refused_cleanly(lambda: load_prepare_config(path))


@FUZZ
@given(text=st.text(max_size=200), overrides=st.lists(st.text(max_size=30), max_size=3))
def test_any_config_text_or_override_is_loaded_or_refused_with_a_message(tmp_path, text, overrides):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    refused_cleanly(lambda: load_config(path, overrides))


# --- dataset rows --------------------------------------------------------------------------------
@FUZZ
@given(lines=st.lists(st.one_of(st.binary(max_size=60), json_values.map(lambda v: json.dumps(v).encode())),
                      min_size=1, max_size=6))
def test_any_dataset_file_is_read_or_refused_with_file_and_line(tmp_path, lines):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    try:
        rows = read_jsonl(path, agent="a")
    except GymtrlError as e:
        assert str(path) in str(e)
    else:
        assert all(isinstance(r.data["responses_create_params"], dict) for r in rows)


@FUZZ
@given(row=st.one_of(json_values, st.fixed_dictionaries({"responses_create_params": json_values}, optional={
    "ground_truth": json_values, "metadata": json_values, "expected_answer": json_values})))
def test_any_row_gets_a_verdict_from_the_prepare_checks(row):
    problem = schema_problem(row)
    assert problem is None or ":" in problem
    if problem is None:
        for env in VERIFIER_FIELDS:
            verdict = verifier_problem(row, env)
            assert verdict is None or verdict.startswith("missing_field:")


# --- agent replies -------------------------------------------------------------------------------
token_ids = st.one_of(st.lists(st.integers(-5, VOCAB + 5), max_size=6), json_values)
logprobs = st.one_of(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=6),
                     st.lists(st.floats(-20, 0), max_size=6), json_values)
output_item = st.one_of(json_values, st.fixed_dictionaries(
    {"type": st.sampled_from(["message", "function_call", "function_call_output"])},
    optional={"prompt_token_ids": token_ids, "generation_token_ids": token_ids, "generation_log_probs": logprobs,
              "content": json_values}))
replies = st.one_of(
    json_values,
    st.fixed_dictionaries({"response": st.one_of(json_values, st.fixed_dictionaries(
        {"output": st.one_of(json_values, st.lists(output_item, max_size=4))}))},
        optional={"reward": scalars, "mask_sample": scalars, "failure_kind": scalars, "failure_reason": scalars}),
)


@FUZZ
@given(reply=replies)
def test_any_agent_reply_becomes_a_trainable_sample_or_a_counted_failure(reply):
    result = RunResult(reply if isinstance(reply, dict) else None, None, "", 0.1, 1)
    outcome = outcome_from_result("env", result, vocab_size=VOCAB)
    assert isinstance(outcome, RolloutOutcome)
    if outcome.trajectory is None:
        assert outcome.failure is not None and outcome.reward is None
        return
    t = outcome.trajectory
    assert outcome.failure is None and math.isfinite(outcome.reward)
    assert len(t.completion_ids) == len(t.logprobs) == len(t.env_mask) and any(t.env_mask)
    assert all(0 <= i < VOCAB for i in t.prompt_ids + t.completion_ids)
    assert all(math.isfinite(lp) and lp <= 0.0 for lp in t.logprobs)
