"""LLM-as-a-judge: math_with_judge's judge pointed by gymtrl's config (judge.server=url) at a real
judge server (the tiny model through a second vLLM CPU server), then that server taken down."""

import json

import pytest

from conftest import free_port, server_config
from gymtrl.errors import RolloutFailureBoundError
from gymtrl.gym.discovery import discover, wait_ready
from gymtrl.gym.verify import message, verify
from gymtrl.rollout.engine import RolloutEngine, SamplingParams
from gymtrl.rollout.failures import FailureBound, FailureKind, FailureLedger
from gymtrl.servers.gym import gym_command
from gymtrl.servers.process import ManagedProcess, http_ok
from gymtrl.servers.vllm import vllm_command, vllm_env

pytestmark = pytest.mark.servers
AGENT = "math_with_judge_simple_agent"


@pytest.fixture(scope="module")
def judged(servers, tiny_model, tmp_path_factory):
    """(head URL, the judge's vLLM process): a NeMo Gym of its own whose math_with_judge calls a
    judge vLLM of its own; the policy is the session's vLLM."""
    out = tmp_path_factory.mktemp("judge")
    judge_cfg = server_config(tiny_model, free_port(), free_port(), out / "judge", prefix_correction=False)
    judge = ManagedProcess("judge vLLM", vllm_command(judge_cfg, nccl=False), out / "judge.log", env=vllm_env(judge_cfg))
    cfg = server_config(tiny_model, int(servers.vllm_url.rsplit(":", 1)[1]), free_port(), out / "gym",
                        gym_configs=["responses_api_models/vllm_model/configs/vllm_model_for_training.yaml",
                                     "resources_servers/math_with_judge/configs/math_with_judge.yaml"])
    cfg.judge.server, cfg.judge.base_url, cfg.judge.model = "url", judge_cfg.vllm.base_url, "tiny"
    gym = ManagedProcess("gym", gym_command(cfg, out / "gym/logs"), out / "gym.log")
    judge.start()
    gym.start()
    try:
        judge.wait_healthy(lambda: http_ok(judge_cfg.vllm.base_url + "/health"), 600, "judge health")
        wait_ready(cfg.gym.head_server_url, 300, is_alive=gym.alive)
        yield cfg.gym.head_server_url, judge
    finally:
        gym.stop()
        judge.stop()


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


def test_answers_math_verify_cannot_settle_go_to_the_judge(judged, gym_site):
    head, _ = judged
    url = discover(head).resources_url_of(AGENT)
    row = math_rows(gym_site)[0]
    right = verify(url, row, message(f"\\boxed{{{row['expected_answer']}}}"))
    assert right["reward"] == 1.0 and not right.get("judge_evaluations")  # settled without the judge
    wrong = verify(url, row, message("\\boxed{-12345}"))
    # The judge server answered (twice when its first verdict is "equal", else once).
    assert wrong["judge_evaluations"] and all(e["response"]["output"] for e in wrong["judge_evaluations"])
    assert wrong["reward"] in (0.0, 1.0) and not wrong.get("mask_sample")


def run(head, rows, ledger, timeout_s):
    engine = RolloutEngine(discover(head), SamplingParams(1.0, 1.0, 16), ledger, 8, timeout_s, 0, 0.1)
    try:
        return engine.run(rows)
    finally:
        engine.close()


def test_a_judge_outage_is_counted_and_meets_the_bound(judged, gym_site):
    """Whole rollouts consult the judge while it is up. Once it is down, NeMo Gym 0.7 retries the
    refused connection without end, so gymtrl's rollout deadline ends each episode: counted as
    `timeout`, excluded (never a reward of 0), and the failure bound stops the run."""
    head, judge = judged
    rows = math_rows(gym_site, boxed=True)
    ledger = FailureLedger(FailureBound(max_rate=0.5, window=8, min_rollouts=4))
    up = run(head, rows, ledger, 120.0)
    assert [o.failure for o in up] == [None] * len(rows), [(o.failure, o.detail) for o in up]
    assert all(o.reply.get("judge_evaluations") for o in up)  # wrong boxed answers: judged
    judge.stop()
    down = run(head, rows, ledger, 20.0)
    assert [o.failure for o in down] == [FailureKind.TIMEOUT] * len(rows)
    assert all(o.reward is None for o in down)
    with pytest.raises(RolloutFailureBoundError, match=f"environment '{AGENT}'.*timeout={len(rows)}"):
        ledger.check_bound()
