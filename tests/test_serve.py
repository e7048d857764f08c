"""`gymtrl serve` and `gymtrl train --servers`: servers on one node, trainers on others. The real
launch is exercised under Slurm (test_slurm.py); these check the addressing and the hand-over file."""

import json
import threading
import time

import pytest

from gymtrl.config import load_config
from gymtrl.errors import ConfigError, ServerError
from gymtrl.serve import attach_servers, bind_servers, read_servers_file, servers_record, write_json_atomic
from gymtrl.servers.gym import gym_command
from gymtrl.servers.vllm import vllm_command
from test_cli import assert_one_clear_error, run

LAUNCHING = """\
model: {name_or_path: some/model}
data: {train: rows.jsonl}
vllm: {base_url: "http://127.0.0.1:8000", launch: {enabled: true, venv: /v}}
gym: {head_server_url: "http://127.0.0.1:11000", launch: {enabled: true, venv: /g, config_paths: [x.yaml]}}
"""


def config(tmp_path, text=LAUNCHING, *overrides):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return load_config(p, list(overrides))


def test_served_on_a_node_every_server_listens_where_trainers_reach_it(tmp_path):
    cfg = config(tmp_path, LAUNCHING, "vllm.tensor_parallel_size=4")
    bind_servers(cfg, "node7")
    assert cfg.vllm.base_url == "http://node7:8000" and cfg.gym.head_server_url == "http://node7:11000"
    vllm = vllm_command(cfg, "nccl")
    assert vllm[vllm.index("--host") + 1] == "node7"
    assert vllm[vllm.index("--tensor-parallel-size") + 1] == "4"
    sets = [a for a in gym_command(cfg, tmp_path) if "=" in a]
    # NeMo Gym's agents and resources servers too, not only its head (their default is loopback),
    # and its model server calls vLLM at the node's address.
    assert 'default_host="node7"' in sets and 'policy_base_url="http://node7:8000/v1"' in sets


def test_one_gpu_vllm_gets_no_tensor_parallel_flag(tmp_path):
    assert "--tensor-parallel-size" not in vllm_command(config(tmp_path), "reload")
    with pytest.raises(ConfigError, match="vllm.tensor_parallel_size must be >= 1"):
        config(tmp_path, LAUNCHING, "vllm.tensor_parallel_size=0")


def test_a_trainer_attaches_to_the_servers_it_is_handed_once_they_are_ready(tmp_path):
    served = config(tmp_path)
    bind_servers(served, "node7")
    ready = tmp_path / "servers.json"
    # Written a moment later, as gymtrl serve does once every health check passes.
    threading.Timer(1.0, write_json_atomic, (ready, servers_record(served))).start()
    cfg = config(tmp_path, LAUNCHING + "judge: {server: policy}\n")
    t0 = time.monotonic()
    attach_servers(cfg, ready)
    assert time.monotonic() - t0 >= 0.9
    assert cfg.vllm.base_url == "http://node7:8000" and cfg.gym.head_server_url == "http://node7:11000"
    assert not cfg.vllm.launch.enabled and not cfg.gym.launch.enabled  # it launches nothing itself
    assert cfg.judge.server == "none"  # the judge was wired into NeMo Gym on the server node


def test_a_missing_or_broken_servers_file_is_one_clear_error(tmp_path):
    with pytest.raises(ServerError, match="did not appear within 0.5s"):
        read_servers_file(tmp_path / "servers.json", 0.5)
    (tmp_path / "servers.json").write_text(json.dumps({"vllm_base_url": "http://x:1"}))
    with pytest.raises(ServerError, match="not a servers file written by `gymtrl serve`"):
        read_servers_file(tmp_path / "servers.json", 0.5)


def test_serve_with_nothing_to_launch_says_so(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {name_or_path: m}\ndata: {train: rows.jsonl}\n")
    assert_one_clear_error(run(["serve", "--config", str(p)]), "the config launches no server")


def test_shipped_slurm_config_is_valid(monkeypatch):
    from conftest import REPO

    for name, value in (("GYMTRL_GYM_SITE", "/site"), ("GYMTRL_GYM_VENV", "/gym"), ("GYMTRL_VLLM_VENV", "/vllm")):
        monkeypatch.setenv(name, value)
    cfg = load_config(REPO / "configs/slurm.yaml")
    assert cfg.sync.strategy == "broadcast" and cfg.vllm.launch.enabled and cfg.gym.launch.enabled
