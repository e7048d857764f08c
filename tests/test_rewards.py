"""Custom reward functions from config (gymtrl/rewards.py): loading by module or file path, the
wrapper's rules, and a real `gymtrl train` run whose logged total reward moves as configured."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from gymtrl.config.schema import RewardFunctionConfig
from gymtrl.errors import ConfigError
from gymtrl.metrics import read_metrics
from gymtrl.rewards import RewardFunctionError, build_reward_functions

DIGIT_ROWS = REPO / "src/gymtrl/envs/resources_servers/digit_reply/data/train.jsonl"
USER_REWARDS = '''
def bonus(completions, **kwargs):
    return [1.0] * len(completions)

def length_penalty(completions, env_reward, row, verifier, gym_env, **kwargs):
    assert all(isinstance(r, dict) and "responses_create_params" in r for r in row)
    return [-0.01 * len(c) for c in completions]

def broken(completions, **kwargs):
    return [1.0]
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def call(fn, env_reward, gym_env, logged=None):
    n = len(env_reward)
    return fn(prompts=["p"] * n, completions=["abc"] * n, completion_ids=[[1]] * n, env_reward=env_reward,
              gym_env=gym_env, row=[{"responses_create_params": {}}] * n, verifier=[{}] * n,
              log_metric=(lambda k, v: logged.__setitem__(k, v)) if logged is not None else None)


def test_functions_load_by_file_or_module_and_follow_the_rules(user_file):
    bonus, fabs = build_reward_functions([
        RewardFunctionConfig(function=f"{user_file}:bonus", envs=["a"]),
        RewardFunctionConfig(function="math:fabs", name="absolute")])
    assert (bonus.__name__, fabs.__name__, fabs.fn(-2.0)) == ("bonus", "absolute", 2.0)
    logged = {}
    # Failed rollouts (env_reward None) stay excluded; other environments get None (not applicable).
    assert call(bonus, [0.5, None, 0.2], ["a", "a", "b"], logged) == [1.0, None, None]
    assert logged == {"env/a/reward_bonus": 1.0}
    (penalty,) = build_reward_functions([RewardFunctionConfig(function=f"{user_file}:length_penalty")])
    assert call(penalty, [0.0, 1.0], ["a", "b"]) == [-0.03, -0.03]


@pytest.mark.parametrize("spec, needle", [
    ("no_colon", "not of the form"),
    ("/nowhere/x.py:f", "file not found"),
    ("gymtrl_no_such_module:f", "cannot import 'gymtrl_no_such_module'"),
    ("{file}:missing", "has no function 'missing'"),
])
def test_bad_function_specs_are_config_errors_naming_the_key(user_file, spec, needle):
    with pytest.raises(ConfigError, match="rewards.functions\\[0\\].function") as err:
        build_reward_functions([RewardFunctionConfig(function=spec.format(file=user_file))])
    assert needle in str(err.value)


def test_a_function_returning_the_wrong_shape_stops_with_its_name(user_file):
    (broken,) = build_reward_functions([RewardFunctionConfig(function=f"{user_file}:broken")])
    with pytest.raises(RewardFunctionError, match="'broken' returned list of length 1; expected a list of 2"):
        call(broken, [0.0, 0.0], ["a", "a"])


@pytest.mark.servers
def test_a_configured_reward_function_changes_the_logged_total(servers, user_file, tmp_path):
    """digit_reply with `bonus` (always 1) at weight 0.5: TRL's total reward is the environment's
    reward + 0.5 at every step, and the bonus is logged per environment."""
    config = tmp_path / "c.yaml"
    config.write_text(f"""
model: {{name_or_path: {servers.model}, dtype: float32}}
data: {{train: [{DIGIT_ROWS}]}}
rewards:
  env_weight: 1.0
  functions: [{{function: "{user_file}:bonus", weight: 0.5}}]
grpo: {{max_steps: 2, per_device_train_batch_size: 8, num_generations: 4, max_completion_length: 8,
        save_strategy: "no", learning_rate: 1.0e-5}}
output: {{dir: {tmp_path / 'run'}}}
""")
    proc = subprocess.run([sys.executable, "-m", "gymtrl.cli", "train", "--config", str(config),
                           *servers.connect_overrides()[:-1]], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [m for m in read_metrics(tmp_path / "run/metrics.jsonl") if "reward" in m]
    assert len(steps) == 2
    for m in steps:
        assert m["failures/total"] == 0
        assert m["reward"] == pytest.approx(m["env/digit_reply_simple_agent/reward"] + 0.5, abs=1e-5)
        assert m["env/digit_reply_simple_agent/reward_bonus"] == 1.0
        assert m["rewards/bonus/mean"] == 1.0
