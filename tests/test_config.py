"""Config loading: typed schema, overrides, and one clear message per mistake."""

import os
import textwrap

import pytest

from gymtrl.config import load_config, write_resolved_config
from gymtrl.errors import ConfigError

GOOD = """\
model:
  name_or_path: some/model
data:
  train: rows.jsonl
  eval:
    - path: val.jsonl
      agent: my_agent
grpo:
  max_steps: 3
  learning_rate: 1.0e-4
"""


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_good_config_defaults_and_sources(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.model.name_or_path == "some/model"
    assert [s.path for s in cfg.data.train] == ["rows.jsonl"]
    assert cfg.data.eval[0].agent == "my_agent"
    assert cfg.grpo == {"max_steps": 3, "learning_rate": 1e-4}
    assert cfg.rollout.max_concurrency == 64 and cfg.sync.strategy == "auto"


def test_overrides_apply_and_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["rollout.timeout_s=5", "grpo.max_steps=7", "sync.strategy=reload"])
    assert cfg.rollout.timeout_s == 5.0
    assert cfg.grpo["max_steps"] == 7
    assert cfg.sync.strategy == "reload"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["rollout.retries=5"])
    out = write_resolved_config(cfg, tmp_path / "run")
    again = load_config(out)
    assert again == cfg


@pytest.mark.parametrize("text, overrides, expected", [
    (GOOD + "rollout:\n  max_concurency: 3\n", [], "c.yaml:12: unknown key 'rollout.max_concurency' (did you mean 'max_concurrency'?)"),
    (GOOD.replace("model:", "modle:"), [], "c.yaml:1: unknown key 'modle' (did you mean 'model'?)"),
    (GOOD, ["vllm.baseurl=x"], "command-line override: unknown key 'vllm.baseurl' (did you mean 'base_url'?)"),
    (GOOD + "  learning_rat: 1\n", [], "c.yaml:11: unknown key 'grpo.learning_rat': not a field of trl.GRPOConfig (did you mean 'learning_rate'?)"),
    (GOOD + "  output_dir: x\n", [], "'grpo.output_dir' is set by gymtrl; use 'output.dir' instead"),
    (GOOD + "rollout:\n  max_concurrency: many\n", [], "bad value for 'rollout.max_concurrency'"),
    ("data:\n  train: x.jsonl\n", [], "required key(s) not set: model.name_or_path"),
    (GOOD, ["grpo.max_steps"], "override 'grpo.max_steps' is not of the form key=value"),
    (GOOD, ["sync.strategy=magic"], "sync.strategy must be one of auto, nccl, broadcast, ipc, reload, lora, none"),
    ("model: [unclosed\n", [], "c.yaml:2:1: invalid YAML"),
    ("- a\n- b\n", [], "the top level must be a mapping"),
])
def test_each_mistake_gets_one_clear_message(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), overrides)
    assert expected in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_quickstart_config_is_valid(monkeypatch):
    monkeypatch.setenv("GYMTRL_GYM_SITE", "/site")
    monkeypatch.setenv("GYMTRL_GYM_VENV", "/gym")
    monkeypatch.setenv("GYMTRL_VLLM_VENV", "/vllm")
    cfg = load_config("configs/quickstart.yaml")
    assert cfg.gym.launch.enabled and cfg.vllm.launch.enabled
    assert cfg.data.train[1].path == "/site/resources_servers/workplace_assistant/data/example.jsonl"


@pytest.mark.parametrize("name, strategy, vllm_gpu", [("gpu-1x", "ipc", "0"), ("gpu-2x", "broadcast", "1"),
                                                      ("bench-gpu", "nccl", "1")])
def test_shipped_gpu_configs_are_valid(monkeypatch, name, strategy, vllm_gpu):
    monkeypatch.setenv("GYMTRL_GYM_VENV", "/gym")
    monkeypatch.setenv("GYMTRL_VLLM_VENV", "/vllm")
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.sync.strategy == strategy and cfg.vllm.launch.env["CUDA_VISIBLE_DEVICES"] == vllm_gpu


def test_yaml_boolean_words_mean_what_the_field_needs(tmp_path):
    """YAML 1.1 reads `no` as False: `save_strategy: no` must still mean the word, and a boolean
    field must still take `no` as False, in the file and on the command line alike."""
    p = write(tmp_path, GOOD.replace("  max_steps: 3\n", "  max_steps: 3\n  save_strategy: no\n  bf16: 'no'\n"))
    cfg = load_config(p)
    assert cfg.grpo["save_strategy"] == "no" and cfg.grpo["bf16"] is False
    cfg = load_config(p, ["grpo.eval_strategy=no", "grpo.save_strategy=steps", "grpo.bf16=yes", "logging.wandb=yes"])
    assert cfg.grpo["eval_strategy"] == "no" and cfg.grpo["save_strategy"] == "steps"
    assert cfg.grpo["bf16"] is True and cfg.logging.wandb is True


@pytest.mark.parametrize("name", ["workplace_assistant", "reasoning_gym", "mcqa", "math_with_judge", "all_four"])
def test_shipped_environment_configs_are_valid(monkeypatch, name):
    from conftest import REPO

    monkeypatch.setenv("GYMTRL_GYM_SITE", "/gym-site")
    cfg = load_config(REPO / f"configs/envs/{name}.yaml")
    paths = [s.path for s in cfg.data.train]
    if name in ("reasoning_gym", "all_four"):  # rows built by `gymtrl prepare-data` from the same file
        from gymtrl.config.load import load_prepare_config

        prep = load_prepare_config(REPO / f"configs/envs/{name}.yaml")
        assert paths == [f"{prep.output_dir}/train.jsonl"] and prep.sources
    else:
        assert paths and all(p.startswith("/gym-site/resources_servers/") for p in paths)
    assert cfg.gym.launch.enabled and cfg.vllm.launch.enabled and cfg.vllm.prefix_correction


def test_a_nemo_gym_env_yaml_supplies_the_policy_server(tmp_path, monkeypatch):
    """An existing NeMo Gym env.yaml works as is: policy_base_url and policy_model_name point gymtrl
    at the server (the config and the command line still win), and policy_api_key becomes the API
    key without ever appearing in the resolved config."""
    from gymtrl.config.load import export_env_yaml_api_key

    env_yaml = write(tmp_path, "policy_base_url: http://vllm-host:9000/v1\npolicy_model_name: my-policy\n"
                               "policy_api_key: sk-secret-123\n", name="env.yaml")
    p = write(tmp_path, GOOD + f"gym: {{env_yaml: {env_yaml}}}\n")
    cfg = load_config(p)
    assert (cfg.vllm.base_url, cfg.vllm.served_model_name) == ("http://vllm-host:9000", "my-policy")
    assert load_config(p, ["vllm.served_model_name=other"]).vllm.served_model_name == "other"
    monkeypatch.delenv(cfg.vllm.api_key_env, raising=False)
    export_env_yaml_api_key(cfg)
    assert os.environ[cfg.vllm.api_key_env] == "sk-secret-123"
    assert "sk-secret" not in write_resolved_config(cfg, tmp_path / "out").read_text()
    with pytest.raises(ConfigError, match="gym.env_yaml: file not found"):
        load_config(p, [f"gym.env_yaml={tmp_path / 'nope.yaml'}"])


def test_a_separate_judge_must_be_a_separate_server(tmp_path):
    """judge.server=url at the policy's own vLLM would judge with weights that change every step."""
    p = write(tmp_path, GOOD + "gym: {launch: {enabled: true, venv: /v, config_paths: [x.yaml]}}\n")
    with pytest.raises(ConfigError, match="judge.base_url is the policy's vLLM server"):
        load_config(p, ["judge.server=url", "judge.base_url=http://localhost:8000/v1", "judge.model=j"])
    with pytest.raises(ConfigError, match="needs judge.base_url and judge.model"):
        load_config(p, ["judge.server=url"])
    with pytest.raises(ConfigError, match="only when gymtrl launches NeMo Gym"):
        load_config(p, ["judge.server=policy", "gym.launch.enabled=false"])
    with pytest.raises(ConfigError, match="judge.server=launch needs judge.base_url and judge.model"):
        load_config(p, ["judge.server=launch", "judge.model=j"])
    with pytest.raises(ConfigError, match="judge.server=launch needs a vLLM venv"):
        load_config(p, ["judge.server=launch", "judge.model=j", "judge.base_url=http://127.0.0.1:8001"])
    cfg = load_config(p, ["judge.server=url", "judge.base_url=http://judge:9000", "judge.model=j"])
    assert cfg.judge.resources_servers == ["math_with_judge"]


def test_the_distributed_watchdog_outlasts_a_rollout_batch(tmp_path, caplog):
    """Ranks wait for each other after every batch, and a batch may take rollout.timeout_s (+60 s):
    ddp_timeout is raised to twice that when episodes are long, and a shorter one set by hand is
    reported."""
    from gymtrl.train import build_grpo_config

    p = write(tmp_path, GOOD)
    assert build_grpo_config(load_config(p), "reload", cuda=False).ddp_timeout == 1800  # torch's default
    assert build_grpo_config(load_config(p, ["rollout.timeout_s=3000"]), "reload", cuda=False).ddp_timeout == 6120
    with caplog.at_level("WARNING"):
        args = build_grpo_config(load_config(p, ["grpo.ddp_timeout=300"]), "reload", cuda=False)
    assert args.ddp_timeout == 300 and "grpo.ddp_timeout=300s is shorter" in caplog.text


def test_launched_gym_has_room_for_every_rollout_in_flight(tmp_path):
    """NeMo Gym caps a server's connections to one host at 1,024: past that, gymtrl raises the cap
    to rollout.max_concurrency when it launches Gym (a user's own gym.launch.overrides still win)."""
    from gymtrl.servers.gym import gym_command

    p = write(tmp_path, GOOD + "gym: {launch: {enabled: true, venv: /v, config_paths: [x.yaml]}}\n")

    def sets(*overrides):
        cmd = gym_command(load_config(p, list(overrides)), tmp_path / "logs")
        return [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]

    assert not any("global_aiohttp" in s for s in sets())
    assert "global_aiohttp_connector_limit_per_host=4000" in sets("rollout.max_concurrency=4000")
    mine = sets("rollout.max_concurrency=4000", "gym.launch.overrides.global_aiohttp_connector_limit_per_host=9000")
    assert "global_aiohttp_connector_limit_per_host=9000" in mine
    assert "global_aiohttp_connector_limit_per_host=4000" not in mine


OPEN_FILES_PROBE = """
import logging, resource, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
from gymtrl.rollout.fd_limit import ensure_open_files
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))
print("soft", ensure_open_files(int(sys.argv[3])), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


@pytest.mark.parametrize("soft,hard,concurrency,expected,warns", [
    (256, 20000, 2000, 7024, False),  # raised to what 2,000 rollouts need
    (256, 512, 2000, 512, True),  # raised to the hard limit, and the user is told
    (8192, 20000, 64, 8192, False),  # already enough: left alone
])
def test_the_open_file_limit_makes_room_for_the_rollouts_in_flight(soft, hard, concurrency, expected, warns):
    import subprocess
    import sys

    _, real_hard = __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)
    if real_hard != -1 and real_hard < hard:
        pytest.skip(f"this machine's hard open-file limit is {real_hard}")
    proc = subprocess.run([sys.executable, "-c", OPEN_FILES_PROBE, str(soft), str(hard), str(concurrency)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"soft {expected} {expected}" in proc.stdout
    assert ("Too many open files" in proc.stderr) == warns, proc.stderr
