"""gymtrl's price_lookup environment (src/gymtrl/envs/resources_servers/price_lookup): the generator,
and the real NeMo Gym resources server's tools and partial-credit reward, with hand-made replies."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import httpx
import pytest

from gymtrl.gym.discovery import discover
from gymtrl.gym.verify import function_calls, message, verify

REPO = Path(__file__).resolve().parents[1]
ENV_DIR = REPO / "src/gymtrl/envs/resources_servers/price_lookup"
AGENT = "price_lookup_simple_agent"


def load_generator():
    spec = importlib.util.spec_from_file_location("price_lookup_generate", ENV_DIR / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = load_generator()


def committed(split: str) -> list[dict]:
    return [json.loads(line) for line in (ENV_DIR / f"data/{split}.jsonl").read_text().splitlines()]


def test_the_generator_is_deterministic_and_the_committed_data_is_its_output(tmp_path):
    assert gen.make_row(7) == gen.make_row(7)
    assert gen.make_row(7) != gen.make_row(8)
    gen.main(["--generate", "--out-dir", str(tmp_path)])  # the defaults wrote the committed files
    for split in ("train", "validation"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (ENV_DIR / f"data/{split}.jsonl").read_bytes()


def test_train_and_validation_seeds_and_tasks_are_disjoint():
    train, validation = committed("train"), committed("validation")
    assert (len(train), len(validation)) == (256, 64)
    assert not {r["seed"] for r in train} & {r["seed"] for r in validation}
    assert set(gen.train_seeds(10**6)).isdisjoint(gen.validation_seeds(10**4))
    with pytest.raises(ValueError):
        gen.train_seeds(gen.VALIDATION_SEED_BASE + 1)
    for row in train + validation:
        items = row["items"]
        assert len({i["name"] for i in items}) == 2
        assert row["total"] == sum(i["quantity"] * i["price"] for i in items)
        assert row["agent_ref"]["name"] == AGENT
        question = row["responses_create_params"]["input"][-1]["content"]
        assert all(str(i["quantity"]) in question for i in items)
        assert set(row["responses_create_params"]) == {"input", "tools"}  # the prices stay out of the prompt
    # The hidden prices vary between tasks: a model cannot learn them, only to look them up.
    assert len({(r["items"][0]["name"], r["items"][0]["price"]) for r in train}) > 100


@pytest.fixture(scope="module")
def resources_url(servers):
    url = discover(servers.head_url).resources_url_of(AGENT)
    assert url
    return url


def lookups(row: dict, names: list[str] | None = None) -> list[dict]:
    names = [i["name"] for i in row["items"]] if names is None else names
    return function_calls([{"name": "get_price", "arguments": {"item": n}} for n in names])


@pytest.mark.servers
def test_verify_gives_the_documented_partial_credit(resources_url):
    for row in committed("validation")[:3]:
        total, (a, b) = row["total"], [i["name"] for i in row["items"]]
        cases = [
            (lookups(row) + message(f"The total is ${total}."), 1.0, True),                 # everything
            (lookups(row, [gen.ITEMS[a], b.upper()]) + message(f"{total}"), 1.0, True),   # plural, case
            (lookups(row) + message(f"The total is ${total + 1}."), 0.5, False),          # wrong total
            (lookups(row), 0.5, False),                                                    # no answer
            (lookups(row, [a, a, "unicorn"]) + message("I don't know."), 0.25, False),    # one item of two
            (message(f"{total}"), 0.5, True),                                              # a lucky guess
            (message('```json\n{"name": "get_price", "arguments": {"item": "%s"}}\n```' % a), 0.0, False),
            (function_calls([{"name": "calculate", "arguments": {"expression": "1+1"}}]) + message("2"),
             0.0, total == 2),
        ]
        for output, reward, correct in cases:
            got = verify(resources_url, row, output)
            assert (got["reward"], got["correct"]) == (reward, correct), (output, got)
            assert got["needed"] == sorted([a, b])


@pytest.mark.servers
def test_the_tools_answer_from_the_episode_s_hidden_prices(resources_url):
    row_a, row_b = committed("train")[:2]
    with httpx.Client(trust_env=False) as a, httpx.Client(trust_env=False) as b:  # two episodes, two sessions
        a.post(f"{resources_url}/seed_session", json=row_a).raise_for_status()
        b.post(f"{resources_url}/seed_session", json=row_b).raise_for_status()
        for client, row in ((a, row_a), (b, row_b)):
            for item in row["items"]:
                got = client.post(f"{resources_url}/get_price", json={"item": gen.ITEMS[item["name"]]}).json()
                assert got == {"item": item["name"], "price": item["price"]}
        other = next(n for n in gen.ITEMS if n not in {i["name"] for i in row_a["items"]})
        assert "error" in a.post(f"{resources_url}/get_price", json={"item": other}).json()
        assert a.post(f"{resources_url}/calculate", json={"expression": "3*4 + 2*(5-1)"}).json() == {"result": 20}
        assert "error" in a.post(f"{resources_url}/calculate", json={"expression": "__import__('os')"}).json()


@pytest.mark.servers
def test_episodes_through_the_agent_are_scored(servers):
    """The tiny random model through the real simple_agent: every episode comes back whole and scored."""
    from gymtrl.failures import FailureBound, FailureLedger
    from gymtrl.rollout.engine import RolloutEngine, SamplingParams

    engine = RolloutEngine(discover(servers.head_url), SamplingParams(1.0, 1.0, 16),
                           FailureLedger(FailureBound(1.0, 100, 1)), 4, 180.0, 0, 0.1)
    try:
        outcomes = engine.run(committed("validation")[:4])
    finally:
        engine.close()
    assert [(o.failure, o.detail) for o in outcomes if o.failure] == []
    for o in outcomes:
        assert o.env == AGENT and 0.0 <= o.reward <= 1.0
        assert {"correct", "looked_up", "needed", "answer"} <= set(o.reply)
        assert o.trajectory.num_model_tokens > 0
