"""Against the real servers (vLLM CPU + NeMo Gym 0.7.0, session-scoped): routing, stitching and
logprobs of real rollouts, and weight sync with its verification."""

import json

import pytest
import torch

from gymtrl.errors import WeightSyncError
from gymtrl.gym.discovery import discover
from gymtrl.rollout.engine import RolloutEngine, SamplingParams
from gymtrl.failures import FailureBound, FailureLedger
from gymtrl.sync.reload import ReloadSync
from gymtrl.sync.check import ProbeCheck, probe_token_ids, trainer_logprobs
from gymtrl.servers.vllm_control import VLLMControl

pytestmark = pytest.mark.servers

DIGIT_AGENT = "digit_reply_simple_agent"
WA_AGENT = "workplace_assistant_simple_agent"


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture
def control(servers):
    c = VLLMControl(servers.vllm_url, 60)
    yield c
    c.close()


def push(control, model, tmp_path):
    ReloadSync(control, tmp_path / "sync").push(model)


def digit_row():
    return {"responses_create_params": {"input": [{"role": "system", "content": "You answer with digits only."},
                                                  {"role": "user", "content": "Pick a number."}]},
            "agent_ref": {"type": "responses_api_agents", "name": DIGIT_AGENT}}


def workplace_row(gym_site):
    line = (gym_site / "resources_servers/workplace_assistant/data/example.jsonl").read_text().splitlines()[0]
    return {**json.loads(line), "agent_ref": {"type": "responses_api_agents", "name": WA_AGENT}}


def test_two_environments_in_one_batch_each_row_reaches_its_own_agent(servers, gym_site, model_and_tokenizer,
                                                                       control, tmp_path):
    model, tokenizer = model_and_tokenizer
    push(control, model, tmp_path)  # the server may hold another test's weights
    topo = discover(servers.head_url)
    assert {DIGIT_AGENT, WA_AGENT} <= set(topo.agents)
    ledger = FailureLedger(FailureBound(1.0, 10, 1))
    engine = RolloutEngine(topo, SamplingParams(1.0, 1.0, 12), ledger, 8, 120.0, 0, 0.1)
    try:
        outcomes = engine.run([digit_row(), workplace_row(gym_site), digit_row()])
    finally:
        engine.close()
    assert [o.env for o in outcomes] == [DIGIT_AGENT, WA_AGENT, DIGIT_AGENT]
    assert all(o.failure is None for o in outcomes), [o.detail for o in outcomes]
    # Each reply is its own environment's verifier output: digit_reply reports digit_fraction as
    # its reward; workplace_assistant has no such field and scores the (random) calls 0.
    for o in (outcomes[0], outcomes[2]):
        assert o.reward == pytest.approx(o.reply["digit_fraction"])
    assert "digit_fraction" not in outcomes[1].reply and outcomes[1].reward == 0.0

    # The prompt ids are the tokenizer's own rendering of the row; the completion carries the
    # sampling logprobs, which the trainer's model reproduces (float32, temperature 1).
    t = outcomes[0].trajectory
    messages = digit_row()["responses_create_params"]["input"]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert t.prompt_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert t.env_mask == [1] * len(t.completion_ids) and 0 < len(t.completion_ids) <= 12
    ours = trainer_logprobs(model, t.prompt_ids + t.completion_ids)[len(t.prompt_ids) - 1:]
    assert max(abs(a - b) for a, b in zip(ours, t.logprobs)) < 1e-3


STEP_SCALE = 1.0001  # moves the probe's logprobs by a few 1e-4: past float32 noise, inside the 1e-3 bound


def test_weight_sync_is_verified_and_a_stale_server_is_caught(servers, model_and_tokenizer, control, tmp_path):
    model, tokenizer = model_and_tokenizer
    verifier = ProbeCheck(control, "tiny", probe_token_ids(tokenizer), tolerance=1e-3)
    changed = type(model).from_pretrained(servers.model, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in changed.parameters():  # every tensor, the tied embedding/head included
            p.add_(torch.randn_like(p) * 0.05)
    try:
        push(control, changed, tmp_path)
        assert verifier.check(changed, step=1) < 1e-3
        # Sync "disabled": the trainer moves on, the server keeps the old weights -> caught.
        with torch.no_grad():
            changed.model.embed_tokens.weight.add_(torch.randn_like(changed.model.embed_tokens.weight) * 0.05)
        with pytest.raises(WeightSyncError, match="not serving the weights being trained"):
            verifier.check(changed, step=2)
        # A step too small for the bound (bf16's is wide on sharp distributions) is still caught: the
        # server's logprobs sit nearer the last verified step's than this one's.
        push(control, changed, tmp_path)
        assert verifier.check(changed, step=3) < 1e-3
        with torch.no_grad():
            changed.model.norm.weight.mul_(STEP_SCALE)
        push(control, changed, tmp_path)
        assert verifier.check(changed, step=4) < 1e-3  # synced: fine
        with torch.no_grad():
            changed.model.norm.weight.mul_(STEP_SCALE)
        with pytest.raises(WeightSyncError, match="still serves the weights of step 4"):
            verifier.check(changed, step=5)
    finally:
        push(control, model, tmp_path)
    assert verifier.check(model, step=6) < 1e-3


def _outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_servers_gymtrl_starts_listen_on_loopback_only(servers):
    """vLLM, NeMo Gym's head server and every agent and resources server it started answer on
    127.0.0.1 and refuse connections on the machine's outward address."""
    import socket
    from urllib.parse import urlsplit

    outward = _outward_address()
    if outward is None:
        pytest.skip("this machine has no address besides loopback")
    topo = discover(servers.head_url)
    urls = [servers.vllm_url, servers.head_url, *topo.agents.values(), *topo.resources.values()]
    ports = sorted({urlsplit(u).port for u in urls})
    assert len(ports) >= 8  # vLLM, head, and the agents and resources servers of six environments
    for port in ports:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        with pytest.raises(OSError):
            socket.create_connection((outward, port), timeout=5).close()


def test_the_trainer_drops_idle_connections_to_vllm_before_vllm_closes_them(servers):
    """vLLM (uvicorn) closes a connection idle for 5 s; a request sent on one at that moment gets
    "Connection reset by peer" (it failed a weight push once, in CI). gymtrl's client reuses a
    connection while it is fresh and opens a new one once it has idled for IDLE_EXPIRY_S."""
    import time

    from gymtrl.net import IDLE_EXPIRY_S

    control = VLLMControl(servers.vllm_url, 30)
    ports = []
    control._http.event_hooks["response"].append(
        lambda r: ports.append(r.extensions["network_stream"].get_extra_info("client_addr")[1]))
    try:
        control.served_models()
        control.served_models()
        assert ports[0] == ports[1]  # back to back: the same connection
        time.sleep(IDLE_EXPIRY_S + 0.5)  # still well inside vLLM's 5 s
        control.served_models()
        assert ports[2] != ports[1]  # idled past gymtrl's expiry: a fresh connection
    finally:
        control.close()
    assert IDLE_EXPIRY_S <= 2.5
