"""Every kind of failed rollout is excluded (reward None, mask 0) and counted under its kind; the
client retries what is worth retrying and never waits past the deadline. Faults come from
FaultInjectingAgentServer (a deliberate fake); the engine, client and ledger are the real ones."""

import concurrent.futures
import gc
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fault_agents import FaultInjectingAgentServer
from gymtrl.errors import RolloutFailureBoundError
from gymtrl.gym.client import POOL_SHARD_CONNECTIONS
from gymtrl.gym.discovery import GymTopology
from gymtrl.rollout.engine import RolloutEngine, RolloutsCancelled, SamplingParams
from gymtrl.failures import FailureBound, FailureKind, FailureLedger
from gymtrl.rollout.rollout_func import to_trl_batch

FAULTS = ["setcookie", "ok", "slow", "http500", "flaky500", "hang", "slowdrip", "notjson", "truncated", "badshape",
          "noreward", "masked", "judgedown", "mismatch", "notokens"]
EXPECTED = {
    "setcookie": None, "ok": None, "slow": None, "flaky500": None, "http500": FailureKind.HTTP_ERROR,
    "hang": FailureKind.TIMEOUT, "slowdrip": FailureKind.TIMEOUT, "badshape": FailureKind.INVALID_REPLY,
    "notjson": FailureKind.INVALID_REPLY, "truncated": FailureKind.INVALID_REPLY,
    "noreward": FailureKind.MISSING_REWARD, "masked": FailureKind.MASK_SAMPLE, "judgedown": FailureKind.JUDGE_FAILED,
    "mismatch": FailureKind.PREFIX_MISMATCH, "notokens": FailureKind.MISSING_TOKEN_IDS,
}


@pytest.fixture
def agents():
    with FaultInjectingAgentServer(hang_s=30.0) as server:
        yield server


def make_engine(agents, ledger, timeout_s=2.0):
    topo = GymTopology({f: f"{agents.url}/{f}" for f in FAULTS})
    return RolloutEngine(topo, SamplingParams(1.0, 1.0, 16), ledger, max_concurrency=16, timeout_s=timeout_s,
                         retries=2, retry_backoff_s=0.05)


def row(fault):
    return {"responses_create_params": {"input": "hi"}, "agent_ref": {"name": fault}}


def test_each_fault_is_counted_under_its_kind(agents):
    ledger = FailureLedger(FailureBound(max_rate=1.0, window=100, min_rollouts=1))
    engine = make_engine(agents, ledger)
    try:
        start = time.monotonic()
        outcomes = engine.run([row(f) for f in FAULTS])
        elapsed = time.monotonic() - start
    finally:
        engine.close()
    # Uncut, the hanging rollout alone would take hang_s (30 s): the batch ending sooner is the deadline's doing.
    assert elapsed < agents.hang_s, "the hanging and the dripping rollouts must be cut at their 2 s deadline"
    for fault, o in zip(FAULTS, outcomes):
        assert o.env == fault
        assert o.failure is EXPECTED[fault], (fault, o.detail)
        assert (o.reward is None) == (EXPECTED[fault] is not None)
    snap = ledger.snapshot()
    for fault, kind in EXPECTED.items():
        if kind is not None:
            assert snap[f"failures/{fault}/{kind.value}"] == 1
    assert agents.calls["http500"] == 3  # first try + 2 retries
    assert agents.calls["flaky500"] == 2  # a 503 once, then success
    assert agents.calls["noreward"] == 1  # a 200 is never retried


def test_failed_rollouts_become_masked_placeholders_and_the_bound_stops(agents):
    ledger = FailureLedger(FailureBound(max_rate=0.5, window=8, min_rollouts=4))
    engine = make_engine(agents, ledger)
    try:
        rows = [row(f) for f in ["ok", "ok", "masked", "noreward"]]
        outcomes = engine.run(rows)
        out = to_trl_batch(outcomes, placeholder=0, rows=rows)
        assert out["env_reward"] == [1.0, 1.0, None, None]
        assert out["env_mask"][0] == [1, 1] and out["env_mask"][2] == [0] and out["env_mask"][3] == [0]
        assert out["completion_ids"][0] == [4, 5] and out["logprobs"][0] == [-0.1, -0.2]
        assert out["rollout_failure"] == ["", "", "mask_sample", "missing_reward"]
        assert out["gym_env"] == ["ok", "ok", "masked", "noreward"]
        # Reward functions see each sample's row and the verifier's reply (without the episode).
        assert out["row"] == rows
        assert out["verifier"][0] == {"reward": 1.0, "mask_sample": False} and out["verifier"][2]["mask_sample"] is True
        ledger.check_bound()  # below the bound: training goes on
        # A dead environment: every rollout fails; the bound turns it into a stop naming it.
        engine.run([row("http500") for _ in range(4)])
        with pytest.raises(RolloutFailureBoundError, match="environment 'http500'.*http_error=4"):
            ledger.check_bound()
    finally:
        engine.close()


def test_tool_constraints_are_lifted_unless_asked_to_keep():
    row = {"responses_create_params": {"input": "hi", "parallel_tool_calls": False,
                                       "tools": [{"type": "function", "name": "f", "strict": True}]}}
    sent = SamplingParams(0.7, 0.9, 32).apply(row)["responses_create_params"]
    assert sent["tools"][0]["strict"] is False and sent["parallel_tool_calls"] is True
    assert (sent["temperature"], sent["top_p"], sent["max_output_tokens"]) == (0.7, 0.9, 32)
    kept = SamplingParams(1.0, 1.0, None, lift_tool_constraints=False).apply(row)["responses_create_params"]
    assert kept["tools"][0]["strict"] is True and kept["parallel_tool_calls"] is False
    assert row["responses_create_params"]["tools"][0]["strict"] is True  # the stored row is untouched


def test_no_cookie_travels_between_rollouts(agents):
    ledger = FailureLedger(FailureBound(max_rate=1.0, window=10, min_rollouts=1))
    engine = make_engine(agents, ledger)
    try:
        engine.run([row("setcookie")])
        engine.run([row("ok"), row("setcookie")])
    finally:
        engine.close()
    assert agents.cookies_seen == [None, None, None]


def open_connections(port: int, client_only: bool = False) -> int:
    """Connected TCP sockets this process holds with `port` at either end (the client's and the in-process
    fault server's handler ends; not its listening socket), or with `client_only` the client's alone (the
    remote end is `port`). Sockets of anything else in the process, which may open or close meanwhile,
    are not counted."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            ports = {int(remote.rsplit(":", 1)[1], 16)}
            if not client_only:
                ports.add(int(local.rsplit(":", 1)[1], 16))
            count += inode in inodes and port in ports and state != "0A"  # 0A: LISTEN
    return count


def test_a_batch_of_many_rollouts_leaves_no_connection_open(agents):
    """Rollouts spread over several connection pools (more in flight than one pool holds); every
    one completes, and once the batch is over, every socket the client opened is closed again."""
    ledger = FailureLedger(FailureBound(max_rate=1.0, window=1000, min_rollouts=1))
    n = 3 * POOL_SHARD_CONNECTIONS + 5
    engine = RolloutEngine(GymTopology({"ok": f"{agents.url}/ok"}), SamplingParams(1.0, 1.0, 16), ledger,
                           max_concurrency=n, timeout_s=60.0, retries=0, retry_backoff_s=0.05)
    try:
        port = int(agents.url.rsplit(":", 1)[1])
        assert open_connections(port) == 0
        for _ in range(2):
            outcomes = engine.run([row("ok") for _ in range(n)])
            assert [o.failure for o in outcomes] == [None] * n
            # The client's sockets close with the batch; the fault server's handler threads (in this
            # process too) close their ends as they see the EOF.
            deadline = time.monotonic() + 10
            while open_connections(port) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert open_connections(port) == 0
    finally:
        engine.close()
    assert agents.calls["ok"] == 2 * n


def start_hanging_batch(agents, n):
    """An engine with `n` rollouts in flight that the agent never answers, run in a thread of its own."""
    engine = RolloutEngine(GymTopology({"hang": f"{agents.url}/hang"}), SamplingParams(1.0, 1.0, 16),
                           FailureLedger(FailureBound(1.0, 1000, 1)), max_concurrency=n, timeout_s=60.0, retries=0,
                           retry_backoff_s=0.05)
    pool = ThreadPoolExecutor(max_workers=1)
    batch = pool.submit(engine.run, [row("hang") for _ in range(n)])
    deadline = time.monotonic() + 30
    while agents.calls.get("hang", 0) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agents.calls.get("hang", 0) == n
    return engine, pool, batch


def test_a_cancelled_batch_has_closed_its_connections_when_it_returns(agents):
    """The end of a run cancels the batch generated ahead: by the time the trainer hears so, every
    request of that batch is cancelled and every socket it opened is closed (none waits on a reply)."""
    port = int(agents.url.rsplit(":", 1)[1])
    engine, pool, batch = start_hanging_batch(agents, 6)
    try:
        assert open_connections(port, client_only=True) == 6
        engine.cancel()
        with pytest.raises(RolloutsCancelled, match="6 rollouts in flight were cancelled"):
            batch.result(timeout=30)
        assert open_connections(port, client_only=True) == 0
    finally:
        engine.close()
        pool.shutdown()


def test_closing_the_engine_under_a_batch_in_flight_closes_it_and_prints_nothing(agents, capfd):
    """Closing the engine while a batch is in flight cancels it and lets it close its connections
    before the event loop stops: a loop stopped first leaves the batch's task to be destroyed
    pending, its sockets open and its traceback printed when the process ends."""
    port = int(agents.url.rsplit(":", 1)[1])
    engine, pool, batch = start_hanging_batch(agents, 6)
    engine.close()
    assert open_connections(port, client_only=True) == 0
    with pytest.raises(concurrent.futures.CancelledError):
        batch.result(timeout=30)
    pool.shutdown()
    del engine, batch
    gc.collect()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "destroyed but it is pending" not in err, err


def test_a_cap_below_half_the_batch_is_warned_once(agents, caplog):
    """rollout.max_concurrency under half a batch runs the rollout phase in waves: said once, with the fix."""
    from gymtrl.rollout.rollout_func import GymRolloutFunc

    engine = make_engine(agents, FailureLedger(FailureBound(1.0, 10**6, 10**6)))  # max_concurrency=16
    func = GymRolloutFunc(engine, rows={}, publisher=None, placeholder_token_id=0, channel=None)
    try:
        with caplog.at_level("WARNING", logger="gymtrl.rollout.rollout_func"):
            func._warn_in_flight(32)  # half in flight: no warning
            assert not caplog.records
            func._warn_in_flight(64)
            func._warn_in_flight(64)
        assert len(caplog.records) == 1
        assert "rollout.max_concurrency=16" in caplog.text and "Raise it to 64" in caplog.text
    finally:
        engine.close()
