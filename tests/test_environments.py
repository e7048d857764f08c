"""NeMo Gym's four reference environments (workplace_assistant, reasoning_gym, mcqa,
math_with_judge) on the real NeMo Gym 0.7.0 servers, through gymtrl's client and `gymtrl train`.

A reward path that always yields 0 (or always 1) would pass a test that only checks that rewards
arrive, so each environment's verifier is also asked directly, through gymtrl's verify client, to
score a right answer built from the row's ground truth and a wrong one: the right one must get the
top score and the wrong one must not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from gymtrl.gym.discovery import discover
from gymtrl.gym.verify import function_calls, message, verify
from gymtrl.metrics import read_metrics
from gymtrl.rollout.engine import RolloutEngine, SamplingParams
from gymtrl.failures import FailureBound, FailureLedger

pytestmark = pytest.mark.servers
ENVS = ["workplace_assistant", "reasoning_gym", "mcqa", "math_with_judge"]
# Fields only each environment's own verifier puts in its reply: the reward came from it.
VERIFIER_FIELDS = {"workplace_assistant": set(), "reasoning_gym": {"task_name", "score", "extracted_answer"},
                   "mcqa": {"extracted_answer", "expected_answer"}, "math_with_judge": {"library_reward", "extracted_answer"}}


def example_rows(gym_site, env):
    lines = (gym_site / f"resources_servers/{env}/data/example.jsonl").read_text().splitlines()
    return [{**json.loads(line), "agent_ref": {"name": f"{env}_simple_agent"}} for line in lines if line.strip()]


def right_and_wrong(env, row):
    """Output items answering `row` correctly, from its ground truth, and wrongly."""
    if env == "workplace_assistant":
        return function_calls(row["ground_truth"]), message("I have done what you asked.")
    if env == "mcqa":
        letters = [next(iter(option)) for option in row["options"]]
        wrong = next(letter for letter in letters if letter != row["expected_answer"])
        return message(f"\\boxed{{{row['expected_answer']}}}"), message(f"\\boxed{{{wrong}}}")
    if env == "math_with_judge":
        return message(f"The answer is \\boxed{{{row['expected_answer']}}}."), message("The answer is \\boxed{-12345}.")
    if env == "reasoning_gym":
        return message(f"<answer>{row['answer']}</answer>"), message("<answer>I cannot tell.</answer>")
    raise ValueError(env)


def run_rollouts(servers, rows, max_tokens):
    """Every row through the session's NeMo Gym (no failure bound), one outcome each."""
    engine = RolloutEngine(discover(servers.head_url), SamplingParams(1.0, 1.0, max_tokens),
                           FailureLedger(FailureBound(1.0, 100, 1)), 8, 180.0, 0, 0.1)
    try:
        return engine.run(rows)
    finally:
        engine.close()


@pytest.mark.parametrize("env", ENVS)
def test_the_verifier_tells_a_right_answer_from_a_wrong_one(servers, gym_site, env):
    topo = discover(servers.head_url)
    url = topo.resources_url_of(f"{env}_simple_agent")
    assert url, topo.resources
    rows = [r for r in example_rows(gym_site, env) if env != "workplace_assistant" or r["ground_truth"]][:3]
    for row in rows:
        right, wrong = right_and_wrong(env, row)
        good, bad = verify(url, row, right), verify(url, row, wrong)
        assert good["reward"] == 1.0, good
        assert bad["reward"] < 1.0, bad
        assert VERIFIER_FIELDS[env] <= set(good), sorted(good)


@pytest.mark.parametrize("env", ENVS)
def test_rollouts_complete_and_are_scored_by_the_environment(servers, gym_site, env):
    """The tiny random model's answers are wrong, but every episode must come back whole, with
    token ids, and a reward from the environment's own verifier."""
    outcomes = run_rollouts(servers, example_rows(gym_site, env), max_tokens=24)
    assert [(o.failure, o.detail) for o in outcomes if o.failure] == []
    for o in outcomes:
        assert o.env == f"{env}_simple_agent" and 0.0 <= o.reward <= 1.0
        assert VERIFIER_FIELDS[env] <= set(o.reply), sorted(o.reply)
        assert o.trajectory.num_model_tokens > 0


@pytest.fixture(scope="module")
def prepared_all_four(tmp_path_factory):
    """`gymtrl prepare-data --config configs/envs/all_four.yaml`: NeMo Gym's declared example rows
    of three environments and reasoning-gym tasks generated here (mini_sudoku, basic_arithmetic)."""
    out = tmp_path_factory.mktemp("all_four_data")
    proc = subprocess.run([sys.executable, "-m", "gymtrl.cli", "prepare-data", "--no-progress", "--config",
                           str(REPO / "configs/envs/all_four.yaml"), f"prepare.output_dir={out}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    return out, rows


def test_a_prepared_mix_runs_on_the_real_servers(servers, prepared_all_four):
    """Every prepared row is accepted by its environment's /run and scored by its verifier, and the
    generated reasoning-gym rows carry what that verifier needs to tell a right answer from a wrong one."""
    _, rows = prepared_all_four
    assert {r["agent_ref"]["name"] for r in rows} == {f"{env}_simple_agent" for env in ENVS}
    outcomes = run_rollouts(servers, rows, max_tokens=16)
    assert [(o.env, o.failure, o.detail) for o in outcomes if o.failure] == []
    assert all(0.0 <= o.reward <= 1.0 for o in outcomes)
    generated = [r for r in rows if r["agent_ref"]["name"] == "reasoning_gym_simple_agent"]
    assert {r["metadata"]["source_dataset"] for r in generated} == {"mini_sudoku", "basic_arithmetic"}
    url = discover(servers.head_url).resources_url_of("reasoning_gym_simple_agent")
    for row in generated:
        right, wrong = right_and_wrong("reasoning_gym", row)
        assert verify(url, row, right)["reward"] == 1.0 and verify(url, row, wrong)["reward"] < 1.0


def test_all_four_train_together_from_the_shipped_config(servers, prepared_all_four, tmp_path):
    """`gymtrl train --config configs/envs/all_four.yaml` on the rows `gymtrl prepare-data` built from
    the same file, pointed at the session's servers (and the tiny model) by overrides only: every
    environment's rows are trained on, and logged apart."""
    out, rows = prepared_all_four
    overrides = [*servers.connect_overrides(), "model.dtype=float32", "vllm.launch.enabled=false",
                 # One step over every prepared row, two completions each.
                 "gym.launch.enabled=false", "grpo.max_steps=1", f"grpo.per_device_train_batch_size={2 * len(rows)}",
                 "grpo.num_generations=2", "grpo.max_completion_length=16", "grpo.save_strategy=no",
                 "grpo.learning_rate=1e-5", f"prepare.output_dir={out}", f"output.dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, "-m", "gymtrl.cli", "train", "--config",
                           str(REPO / "configs/envs/all_four.yaml"), *overrides],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [m for m in read_metrics(tmp_path / "run/metrics.jsonl") if "reward" in m]
    assert len(steps) == 1 and steps[0]["failures/total"] == 0
    assert steps[0]["rollouts/total"] == 2 * len(rows)
    seen = {key.split("/")[1] for m in steps for key in m if key.startswith("env/") and key.endswith("/reward")}
    assert seen == {f"{env}_simple_agent" for env in ENVS}
