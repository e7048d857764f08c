"""Agent discovery from the resolved NeMo Gym config, and NeMo Gym's routing rule."""

import pytest

from gymtrl.data.read import DatasetRow
from gymtrl.errors import DataError
from gymtrl.gym.discovery import check_routes, topology_from_config

CONFIG = {
    "policy_model": {"responses_api_models": {"vllm_model": {"host": "127.0.0.1", "port": 1}}},
    "wa": {"resources_servers": {"workplace_assistant": {"host": "127.0.0.1", "port": 2}}},
    "wa_agent": {"responses_api_agents": {"simple_agent": {
        "host": "127.0.0.1", "port": 3, "resources_server": {"type": "resources_servers", "name": "wa"}}}},
    "shared_res": {"resources_servers": {"x": {"host": "127.0.0.1", "port": 4}}},
    "a1": {"responses_api_agents": {"simple_agent": {
        "host": "127.0.0.1", "port": 5, "resources_server": {"name": "shared_res"}}}},
    "a2": {"responses_api_agents": {"simple_agent": {
        "host": "127.0.0.1", "port": 6, "resources_server": {"name": "shared_res"}}}},
    "head_server": {"host": "127.0.0.1", "port": 11000},
}


def test_agents_and_urls():
    topo = topology_from_config(CONFIG)
    assert topo.agents == {"wa_agent": "http://127.0.0.1:3", "a1": "http://127.0.0.1:5", "a2": "http://127.0.0.1:6"}


def test_loopback_hosts_are_rewritten_to_the_head_host():
    topo = topology_from_config(CONFIG, head_host="gym-node")
    assert topo.agents["wa_agent"] == "http://gym-node:3"


@pytest.mark.parametrize("row, agent", [
    ({"agent_ref": {"type": "responses_api_agents", "name": "a1"}}, "a1"),
    ({"agent_ref": {"name": "nope"}}, None),
    ({"task_source": "wa_agent"}, "wa_agent"),       # an agent instance is itself
    ({"task_source": "wa"}, "wa_agent"),             # a resources server -> its one agent
    ({"task_source": "shared_res"}, None),           # two agents reference it: ambiguous
    ({"task_source": "unknown"}, None),
    ({}, None),
])
def test_routing_rule(row, agent):
    assert topology_from_config(CONFIG).route(row) == agent


def test_dataset_pin_wins():
    cfg = dict(CONFIG)
    cfg["shared_res"] = {"resources_servers": {"x": {"host": "h", "port": 4, "datasets": [{"name": "t", "agent": {"name": "a2"}}]}}}
    assert topology_from_config(cfg).route({"task_source": "shared_res"}) == "a2"


def test_unroutable_rows_stop_with_names_counts_and_place():
    topo = topology_from_config(CONFIG)
    rows = [DatasetRow({"agent_ref": {"name": "a1"}}, "t.jsonl:1"),
            DatasetRow({"agent_ref": {"name": "ghost"}}, "t.jsonl:2"),
            DatasetRow({"agent_ref": {"name": "ghost"}}, "t.jsonl:3"),
            DatasetRow({"task_source": "shared_res"}, "e.jsonl:7")]
    with pytest.raises(DataError) as e:
        check_routes(rows, topo)
    msg = str(e.value)
    assert "3 row(s)" in msg
    assert "agent_ref.name=ghost: 2 row(s), first at t.jsonl:2" in msg
    assert "task_source=shared_res: 1 row(s), first at e.jsonl:7" in msg
    assert "a1" in msg  # the running agents are listed
