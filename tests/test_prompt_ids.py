"""gym.launch.prompt_ids: NeMo Gym's model server takes each call's prompt token ids from the
generation itself (one request a call) instead of a second, /tokenize, request; the ids are the same."""

import json
import re

import httpx
import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO, gym_beside
from gymtrl.config import load_config
from gymtrl.errors import ConfigError
from gymtrl.gym.discovery import discover
from gymtrl.rollout.engine import RolloutEngine, SamplingParams
from gymtrl.failures import FailureBound, FailureLedger
from gymtrl.servers import gym_launcher

KEY = gym_launcher.INLINE_IDS


def gym_config(judge_reports_ids: bool = False):
    model = {"entrypoint": "app.py", "host": "127.0.0.1", "port": 10, "return_token_id_information": True,
             KEY: False}
    return OmegaConf.create({
        "policy_model": {"responses_api_models": {"vllm_model": dict(model)}},
        "judge": {"responses_api_models": {"vllm_model": {**model, "return_token_id_information": judge_reports_ids}}},
        "env": {"resources_servers": {"env": {"entrypoint": "app.py", "host": "127.0.0.1", "port": 11}}},
    })


def test_model_servers_that_report_token_ids_take_them_from_the_generation():
    config = gym_config()
    assert gym_launcher.choose_prompt_ids(config, True, []) == ["policy_model"]
    assert config["policy_model"]["responses_api_models"]["vllm_model"][KEY] is True
    assert config["judge"]["responses_api_models"]["vllm_model"][KEY] is False  # plain chat: no ids wanted
    assert KEY not in config["env"]["resources_servers"]["env"]
    assert gym_launcher.choose_prompt_ids(config, True, []) == []  # already so
    assert gym_launcher.choose_prompt_ids(config, False, []) == ["policy_model"]
    assert config["policy_model"]["responses_api_models"]["vllm_model"][KEY] is False
    # copies are made after the choice, so they inherit it
    gym_launcher.choose_prompt_ids(config, True, [])
    gym_launcher.replicate(config, 2)
    assert config["policy_model__copy1"]["responses_api_models"]["vllm_model"][KEY] is True


def test_a_value_the_user_set_wins():
    config = gym_config()
    named = [f"policy_model.responses_api_models.vllm_model.{KEY}=false"]
    assert gym_launcher.choose_prompt_ids(config, True, named) == []
    assert config["policy_model"]["responses_api_models"]["vllm_model"][KEY] is False


def test_an_unknown_source_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {name_or_path: m}\ndata: {train: [rows.jsonl]}\n")
    assert load_config(p).gym.launch.prompt_ids == "generation"
    with pytest.raises(ConfigError, match="gym.launch.prompt_ids must be one of generation, tokenize, got 'both'"):
        load_config(p, ["gym.launch.prompt_ids=both"])


def tokenize_requests(vllm_url: str) -> float:
    """vLLM's own count of /tokenize requests served (its Prometheus metrics)."""
    text = httpx.get(vllm_url + "/metrics", timeout=10, trust_env=False).text
    return sum(float(m.group(1)) for m in re.finditer(r'^http_requests_total\{[^}]*handler="/tokenize"[^}]*\} (\S+)$',
                                                      text, re.M))


@pytest.fixture(scope="module")
def tokenize_gym(servers, tiny_model, tmp_path_factory):
    """A NeMo Gym of its own with NeMo Gym's default (prompt ids from /tokenize), on the session's vLLM."""
    out = tmp_path_factory.mktemp("prompt-ids")
    with gym_beside(servers, tiny_model, out, prompt_ids="tokenize") as cfg:
        yield cfg, out


def run(head_url: str, rows: list[dict]):
    engine = RolloutEngine(discover(head_url), SamplingParams(0.0, 1.0, 24), FailureLedger(FailureBound(1.0, 100, 1)),
                           16, 300.0, 0, 0.1)
    try:
        return engine.run(rows)
    finally:
        engine.close()


@pytest.mark.servers
def test_prompt_ids_from_the_generation_match_tokenize_and_skip_it(servers, tokenize_gym, gym_site):
    cfg, out = tokenize_gym
    launched = yaml.safe_load((out / "logs" / "gym" / "gym_config.yaml").read_text())
    assert launched["policy_model"]["responses_api_models"]["vllm_model"][KEY] is False
    session = yaml.safe_load(httpx.get(servers.head_url + "/global_config_dict_yaml", timeout=10, trust_env=False).json())
    assert session["policy_model"]["responses_api_models"]["vllm_model"][KEY] is True  # gymtrl's default

    digit = [json.loads(line) for line in (REPO / "src/gymtrl/envs/resources_servers/digit_reply/data/train.jsonl")
             .read_text().split("\n")[:8] if line.strip()]
    work = [{**json.loads(line), "agent_ref": {"name": "workplace_assistant_simple_agent"}}
            for line in (gym_site / "resources_servers/workplace_assistant/data/example.jsonl").read_text().split("\n")
            if line.strip()]
    rows = digit + work
    before = tokenize_requests(servers.vllm_url)
    inline = run(servers.head_url, rows)
    after_inline = tokenize_requests(servers.vllm_url)
    second = run(cfg.gym.head_server_url, rows)
    after_tokenize = tokenize_requests(servers.vllm_url)

    for outcomes in (inline, second):
        assert [o.failure for o in outcomes] == [None] * len(rows), [o.detail for o in outcomes if o.failure]
    assert after_inline == before  # no /tokenize: the ids came with the completions
    assert after_tokenize - after_inline >= sum(o.model_calls for o in second)  # one per model call
    assert [o.trajectory.prompt_ids for o in inline] == [o.trajectory.prompt_ids for o in second]
    assert sum(o.model_calls for o in inline) >= len(rows)
