"""LLM-as-a-judge: math_with_judge's judge started and wired by gymtrl (judge.server=launch: a
second vLLM CPU server with the tiny model, behind the real ServerStack), then that server taken down."""

import json

import httpx
import pytest

from conftest import free_port, server_config
from gymtrl.errors import RolloutFailureBoundError, ServerError
from gymtrl.gym.discovery import discover
from gymtrl.gym.verify import message, verify
from gymtrl.rollout.engine import RolloutEngine, SamplingParams
from gymtrl.failures import FailureBound, FailureKind, FailureLedger
from gymtrl.servers.stack import ServerStack

pytestmark = pytest.mark.servers
AGENT = "math_with_judge_simple_agent"


@pytest.fixture(scope="module")
def judged(servers, tiny_model, tmp_path_factory):
    """A ServerStack that launches a NeMo Gym of its own and the judge's vLLM; the policy is the
    session's vLLM (already running, so not launched)."""
    out = tmp_path_factory.mktemp("judge")
    cfg = server_config(tiny_model, int(servers.vllm_url.rsplit(":", 1)[1]), free_port(), out,
                        gym_configs=["responses_api_models/vllm_model/configs/vllm_model_for_training.yaml",
                                     "resources_servers/math_with_judge/configs/math_with_judge.yaml"])
    cfg.vllm.launch.enabled = False
    cfg.judge.server, cfg.judge.base_url, cfg.judge.model = "launch", f"http://127.0.0.1:{free_port()}", str(tiny_model)
    cfg.judge.launch.extra_args = list(cfg.vllm.launch.extra_args)  # CPU: eager, a small KV cache
    cfg.judge.launch.startup_timeout_s = 600
    with ServerStack(cfg, out / "logs") as stack:
        yield cfg, stack


def judge_process(stack):
    return next(p for p in stack.processes if p.name == "judge vLLM server")


def math_rows(gym_site, boxed=False):
    """The example rows; with `boxed`, vLLM is made to answer `\\boxed{<digits>}` (a regex through
    NeMo Gym's per-row extra_body), so that math-verify has an answer to reject and asks the judge."""
    lines = (gym_site / "resources_servers/math_with_judge/data/example.jsonl").read_text().splitlines()
    rows = [{**json.loads(line), "agent_ref": {"name": AGENT}} for line in lines if line.strip()]
    if boxed:
        extra = json.dumps({"structured_outputs": {"regex": r"\\boxed\{-[0-9]{2,4}\}"}})
        for row in rows:
            row["responses_create_params"]["metadata"] = {"extra_body": extra}
    return rows


def test_a_launched_judge_cannot_receive_weight_updates(judged):
    """It runs without vLLM's dev mode: the endpoints weight sync uses do not exist on it."""
    cfg, _ = judged
    for path in ("/collective_rpc", "/reset_prefix_cache"):
        assert httpx.post(cfg.judge.base_url + path, json={"method": "reload_weights"}).status_code == 404
    assert httpx.get(cfg.judge.base_url + "/v1/models").json()["data"][0]["id"] == cfg.judge.model


def test_answers_math_verify_cannot_settle_go_to_the_judge(judged, gym_site):
    cfg, _ = judged
    url = discover(cfg.gym.head_server_url).resources_url_of(AGENT)
    row = math_rows(gym_site)[0]
    right = verify(url, row, message(f"\\boxed{{{row['expected_answer']}}}"))
    assert right["reward"] == 1.0 and not right.get("judge_evaluations")  # settled without the judge
    wrong = verify(url, row, message("\\boxed{-12345}"))
    # The judge server answered (twice when its first verdict is "equal", else once).
    assert wrong["judge_evaluations"] and all(e["response"]["output"] for e in wrong["judge_evaluations"])
    assert wrong["reward"] in (0.0, 1.0) and not wrong.get("mask_sample")


def run(head, rows, ledger, timeout_s):
    # 32 tokens: room for the whole forced answer, so that each one reaches the judge.
    engine = RolloutEngine(discover(head), SamplingParams(1.0, 1.0, 32), ledger, 8, timeout_s, 0, 0.1)
    try:
        return engine.run(rows)
    finally:
        engine.close()


def test_a_judge_outage_is_counted_and_meets_the_bound(judged, gym_site):
    """Whole rollouts consult the judge while it is up. Once it is down, each judged rollout fails
    within judge.connection_retries x 0.5 s as `judge_failed` (never a reward of 0, never a hang
    until the deadline), the failure bound stops the run, and the stack reports the dead judge."""
    cfg, stack = judged
    head = cfg.gym.head_server_url
    rows = math_rows(gym_site, boxed=True)
    ledger = FailureLedger(FailureBound(max_rate=0.5, window=len(rows), min_rollouts=4))
    up = run(head, rows, ledger, 120.0)
    assert [o.failure for o in up] == [None] * len(rows), [(o.failure, o.detail) for o in up]
    assert all(o.reply.get("judge_evaluations") for o in up)  # wrong boxed answers: judged
    judge_process(stack).stop()
    down = run(head, rows, ledger, 60.0)
    # math_with_judge asks the judge only about a complete \boxed{} answer; a generation cut short
    # before it (rare) is scored 0 without one. Every rollout that reached the judge must fail.
    reached = [o for o in down if o.failure is not None or o.reply.get("judge_evaluations")]
    assert len(reached) >= 3, [(o.failure, o.detail) for o in down]
    assert all(o.failure is FailureKind.JUDGE_FAILED and o.reward is None for o in reached), \
        [(o.failure, o.detail) for o in down]
    slowest = max(o.latency_s for o in reached)
    print(f"judge down: {len(reached)} judged rollouts failed as judge_failed, slowest after {slowest:.1f} s")
    assert slowest < 30.0  # failed fast: well inside the 60 s deadline
    with pytest.raises(RolloutFailureBoundError, match=f"environment '{AGENT}'.*judge_failed={len(reached)}"):
        ledger.check_bound()
    with pytest.raises(ServerError, match="judge vLLM server exited"):
        stack.raise_if_any_exited()
