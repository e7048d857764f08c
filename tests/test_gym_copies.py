"""gym.launch.copies: several copies of every NeMo Gym server (each is one Python process), rollouts
spread over an agent's copies, a rollout staying on one copy of everything it calls."""

import json

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO, gym_beside
from gymtrl.gym.discovery import discover, topology_from_config
from gymtrl.rollout.engine import CopyPicker, RolloutEngine, SamplingParams
from gymtrl.failures import FailureBound, FailureLedger
from gymtrl.servers import gym_launcher

GYM_CONFIG = {
    "policy_model": {"responses_api_models": {"vllm_model": {
        "entrypoint": "app.py", "host": "127.0.0.1", "port": 10, "base_url": "${policy_base_url}",
        "api_key": "${oc.env:SOME_SECRET,EMPTY}"}}},
    "env": {"resources_servers": {"env": {"entrypoint": "app.py", "host": "127.0.0.1", "port": 11,
                                          "datasets": [{"name": "train", "jsonl_fpath": "x.jsonl"}]}}},
    "env_agent": {"responses_api_agents": {"simple_agent": {
        "entrypoint": "app.py", "host": "127.0.0.1", "port": 12,
        "resources_server": {"type": "resources_servers", "name": "env"},
        "model_server": {"type": "responses_api_models", "name": "policy_model"}}}},
    "policy_base_url": "http://127.0.0.1:8000/v1",
}


def test_every_copy_calls_its_own_copies_on_its_own_port():
    config = OmegaConf.create(GYM_CONFIG)
    added = gym_launcher.replicate(config, 3)
    assert sorted(added) == sorted(f"{n}__copy{k}" for n in ("policy_model", "env", "env_agent") for k in (1, 2))
    agent2 = config["env_agent__copy2"]["responses_api_agents"]["simple_agent"]
    assert agent2["resources_server"]["name"] == "env__copy2" and agent2["model_server"]["name"] == "policy_model__copy2"
    ports = [b["port"] for _, _, _, b in gym_launcher.server_blocks(config)]
    assert len(ports) == 9 and len(set(ports)) == 9
    assert "datasets" not in config["env__copy1"]["resources_servers"]["env"]  # declared once
    # A secret read from the environment stays a reference: the resolved config is written to the logs.
    raw = OmegaConf.to_yaml(config)
    assert raw.count("${oc.env:SOME_SECRET,EMPTY}") == 3
    assert config["policy_model__copy1"]["responses_api_models"]["vllm_model"]["base_url"] == "http://127.0.0.1:8000/v1"


def test_copies_never_share_a_port_when_the_os_hands_one_out_twice(monkeypatch):
    """The OS may give a just-closed port out again; each copy must still get a port of its own, and
    none of the servers' or the head server's."""
    handed = iter([5000, 5000, 10, 11000, 5001, 5001, 5002, 12, 5003, 5004, 5005])
    monkeypatch.setattr(gym_launcher, "os_free_port", lambda host: next(handed))
    config = OmegaConf.create({**GYM_CONFIG, "head_server": {"host": "127.0.0.1", "port": 11000}})
    gym_launcher.replicate(config, 3)
    ports = [b["port"] for _, _, _, b in gym_launcher.server_blocks(config)]
    assert sorted(ports) == [10, 11, 12, 5000, 5001, 5002, 5003, 5004, 5005]


def test_discovery_folds_copies_into_their_agent():
    config = OmegaConf.create(GYM_CONFIG)
    gym_launcher.replicate(config, 3)
    topo = topology_from_config(OmegaConf.to_container(config, resolve=True))
    assert list(topo.agents) == ["env_agent"] and list(topo.resources) == ["env"]
    urls = topo.urls_of("env_agent")
    assert urls[0] == "http://127.0.0.1:12" and len(set(urls)) == 3
    assert topo.route({"task_source": "env"}) == "env_agent"  # routing by resources server still works


def test_each_rollout_goes_to_the_copy_with_fewest_in_flight():
    picker = CopyPicker()
    urls = ["a", "b", "c"]
    assert [picker.acquire(urls) for _ in range(3)] == ["a", "b", "c"]
    picker.release("b")
    assert picker.acquire(urls) == "b"  # b finished first: the next rollout goes there
    picker.release("a")
    picker.release("c")
    assert picker.acquire(urls) == "a" and picker.acquire(urls) == "c"  # equal load: the first listed
    assert picker.served == {"a": 2, "b": 2, "c": 2}


@pytest.fixture(scope="module")
def two_copies(servers, tiny_model, tmp_path_factory):
    """A NeMo Gym of its own with two copies of every server, generating with the session's vLLM."""
    out = tmp_path_factory.mktemp("copies")
    with gym_beside(servers, tiny_model, out, copies=2) as cfg:
        yield cfg, out


@pytest.mark.servers
def test_rollouts_spread_over_two_real_copies_and_stay_on_one(two_copies, gym_site):
    cfg, out = two_copies
    topo = discover(cfg.gym.head_server_url)
    assert sorted(topo.agents) == ["digit_reply_simple_agent", "workplace_assistant_simple_agent"]
    assert all(len(set(topo.urls_of(a))) == 2 for a in topo.agents)
    launched = yaml.safe_load((out / "logs" / "gym" / "gym_config.yaml").read_text())
    copy = launched["workplace_assistant_simple_agent__copy1"]["responses_api_agents"]["simple_agent"]
    assert copy["resources_server"]["name"] == "workplace_assistant__copy1"
    assert copy["model_server"]["name"] == "policy_model__copy1"

    digit = [json.loads(l) for l in (REPO / "src/gymtrl/envs/resources_servers/digit_reply/data/train.jsonl")
             .read_text().splitlines()[:8]]
    work = [{**json.loads(l), "agent_ref": {"name": "workplace_assistant_simple_agent"}}
            for l in (gym_site / "resources_servers/workplace_assistant/data/example.jsonl").read_text().splitlines()[:8]]
    ledger = FailureLedger(FailureBound(1.0, 100, 1))
    engine = RolloutEngine(topo, SamplingParams(1.0, 1.0, 32), ledger, 16, 300.0, 0, 0.1)
    try:
        outcomes = engine.run(digit + work)  # 8 + the 5 example rows
    finally:
        engine.close()
    assert [o.failure for o in outcomes] == [None] * len(digit + work)
    assert all(isinstance(o.reward, float) for o in outcomes)
    served = engine.copies.served
    for agent in topo.agents:  # every copy of every agent served rollouts
        assert all(served[url] >= 1 for url in topo.urls_of(agent)), served
    assert sum(served.values()) == len(digit + work) and not +engine.copies.in_flight  # all released
