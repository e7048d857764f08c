"""Run a batch of rollouts against NeMo Gym agents and turn each reply into an outcome.

TRL calls the rollout function synchronously; the HTTP work is async. The engine owns one event
loop on a background thread and blocks the trainer only until every rollout of the batch has
finished or hit its deadline.

Each batch gets its own HTTP client, closed when the batch ends. Between batches the trainer
trains for seconds to minutes, longer than any keep-alive is worth, and a pool kept across steps
would hold up to rollout.max_concurrency idle sockets (and as many on the agent's side) for nothing:
with thousands of rollouts in flight that is thousands of file descriptors. New connections each
batch are cheap: gymtrl's whole cost, connection included, is 2.6-3.9 ms of CPU per rollout from
256 to 4,000 in flight (bench/results/rollout_load.md).

While it waits it calls `watch` every second (the launched servers' liveness check): a server that
dies mid-batch ends the batch at once, instead of leaving every rollout to run into its deadline
(NeMo Gym's model server retries a vanished vLLM forever).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from gymtrl.gym.client import AgentClient, RunResult, parse_reward, response_output
from gymtrl.gym.discovery import GymTopology
from gymtrl.failures import FailureBound, FailureKind, FailureLedger
from gymtrl.rollout.trajectory import StitchError, Trajectory, stitch, token_items


# A batch ends at most this long after its rollouts' own deadline (rollout.timeout_s).
ROLLOUT_BATCH_SLACK_S = 60.0
# How long a cancelled batch (or the engine's close) waits for its requests to end and connections to close.
ABANDON_GRACE_S = 10.0


@dataclass
class RolloutOutcome:
    env: str  # the agent instance the row was routed to
    reward: float | None  # None: excluded from training
    trajectory: Trajectory | None
    failure: FailureKind | None
    detail: str
    latency_s: float
    reply: dict | None
    model_calls: int = 0  # model calls that reported token ids (2+: a multi-turn episode)
    tool_calls: int = 0  # function calls the model server parsed from the model's text (the agent ran them)


@dataclass
class SamplingParams:
    temperature: float
    top_p: float
    max_output_tokens: int | None
    # vLLM enforces `strict: true` tools and `parallel_tool_calls: false` by constrained decoding and
    # returns the logprobs of the *constrained* distribution, which the trainer's model cannot
    # reproduce: measured on vLLM 0.32, up to 5-8 nats apart on one token. Lifting the constraints
    # keeps the samples on-policy (the agent still runs each call, one after another).
    lift_tool_constraints: bool = True

    def apply(self, row: dict) -> dict:
        """The row to send: the dataset row with the trainer's sampling settings in its params."""
        params = dict(row["responses_create_params"])
        params["temperature"] = self.temperature
        params["top_p"] = self.top_p
        if self.max_output_tokens is not None:
            params["max_output_tokens"] = self.max_output_tokens
        if self.lift_tool_constraints:
            if isinstance(params.get("tools"), list):
                params["tools"] = [{**t, "strict": False} if isinstance(t, dict) and t.get("strict") else t
                                   for t in params["tools"]]
            if params.get("parallel_tool_calls") is False:
                params["parallel_tool_calls"] = True
        return {**row, "responses_create_params": params}


def outcome_from_result(env: str, result: RunResult, vocab_size: int | None = None) -> RolloutOutcome:
    if result.failure is not None or result.reply is None:
        return RolloutOutcome(env, None, None, result.failure or FailureKind.INVALID_REPLY, result.detail,
                              result.latency_s, None)
    reply = result.reply
    try:
        calls = len(token_items(response_output(reply)))
    except StitchError:
        calls = 0
    tools = count_tool_calls(reply)
    reward, failure, detail = parse_reward(reply)
    if failure is None:
        try:
            trajectory = stitch(response_output(reply), vocab_size)
        except StitchError as e:
            failure, detail = e.kind, e.detail
        else:
            return RolloutOutcome(env, reward, trajectory, None, "", result.latency_s, reply, calls, tools)
    return RolloutOutcome(env, None, None, failure, detail, result.latency_s, reply, calls, tools)


def count_tool_calls(reply: dict) -> int:
    """The episode's `function_call` output items: calls in the tool-call format the model server's
    parser accepts. A call written in any other format is plain text to the agent and not counted."""
    output = response_output(reply)
    if not isinstance(output, list):
        return 0
    return sum(isinstance(item, dict) and item.get("type") == "function_call" for item in output)


class CopyPicker:
    """Spreads rollouts over an agent's copies (gym.launch.copies): each goes to the copy with the
    fewest rollouts in flight. Used from the rollout event loop only, so it needs no lock."""

    def __init__(self) -> None:
        self.in_flight: Counter = Counter()
        self.served: Counter = Counter()  # rollouts sent to each URL, for the logs and tests

    def acquire(self, urls: list[str]) -> str:
        url = min(urls, key=lambda u: self.in_flight[u])
        self.in_flight[url] += 1
        self.served[url] += 1
        return url

    def release(self, url: str) -> None:
        self.in_flight[url] -= 1


class RolloutsCancelled(Exception):
    """The engine was cancelled (the run is ending) while this batch was in flight."""


class RolloutEngine:
    def __init__(self, topology: GymTopology, sampling: SamplingParams, ledger: FailureLedger,
                 max_concurrency: int, timeout_s: float, retries: int, retry_backoff_s: float,
                 vocab_size: int | None = None, watch: Callable[[], None] | None = None):
        self.topology = topology
        self.copies = CopyPicker()
        self.watch = watch  # raises (ServerError) when a server this run depends on has died
        self.vocab_size = vocab_size  # token ids at or above it are refused (malformed_token_ids)
        self.sampling = sampling
        self.ledger = ledger
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency
        self._client_args = (max_concurrency, timeout_s, retries, retry_backoff_s)
        self._cancelled = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gymtrl-rollouts", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, cfg, topology: GymTopology, grpo_args, vocab_size: int | None,
                    watch: Callable[[], None] | None = None) -> "RolloutEngine":
        """The engine a run's `rollout` section and TRL's sampling settings describe."""
        r = cfg.rollout
        ledger = FailureLedger(FailureBound(r.max_failure_rate, r.failure_window, r.failure_min_rollouts))
        sampling = SamplingParams(grpo_args.temperature, grpo_args.top_p, grpo_args.max_completion_length,
                                  r.lift_tool_constraints)
        return cls(topology, sampling, ledger, r.max_concurrency, r.timeout_s, r.retries, r.retry_backoff_s,
                   vocab_size=vocab_size, watch=watch)

    async def _run_one(self, client: AgentClient, row: dict) -> RolloutOutcome:
        env = self.topology.route(row)
        if env is None:  # checked before training; a row can only get here if the config changed
            return RolloutOutcome("unrouted", None, None, FailureKind.HTTP_ERROR, "row routes to no agent", 0.0, None)
        url = self.copies.acquire(self.topology.urls_of(env))
        try:
            result = await client.run(url, self.sampling.apply(row))
        finally:
            self.copies.release(url)
        return outcome_from_result(env, result, self.vocab_size)

    def run(self, rows: list[dict]) -> list[RolloutOutcome]:
        """One outcome per row, in order. Every failure is recorded in the ledger."""
        started, finished = threading.Event(), threading.Event()

        async def run_all():
            started.set()
            try:
                # Closed on every exit, cancellation included: no socket outlives its batch.
                async with AgentClient(*self._client_args) as client:
                    return await asyncio.gather(*(self._run_one(client, r) for r in rows))
            finally:
                finished.set()

        def abandon() -> None:
            """Cancel the batch and wait until its requests are cancelled and its connections closed."""
            future.cancel()
            if started.is_set():
                finished.wait(timeout=ABANDON_GRACE_S)

        # Each rollout's deadline covers its queueing too, so the batch ends by one deadline (+slack).
        future = asyncio.run_coroutine_threadsafe(run_all(), self._loop)
        deadline = time.monotonic() + self.timeout_s + ROLLOUT_BATCH_SLACK_S
        while True:
            try:
                outcomes = future.result(timeout=1.0)
                break
            except concurrent.futures.TimeoutError:
                if time.monotonic() > deadline:
                    abandon()
                    raise
                if self._cancelled.is_set():
                    abandon()
                    raise RolloutsCancelled(f"{len(rows)} rollouts in flight were cancelled: the run is ending") from None
                if self.watch is not None:
                    try:
                        self.watch()
                    except BaseException:
                        abandon()  # the in-flight requests are abandoned with the batch
                        raise
        for o in outcomes:
            if o.failure is None:
                self.ledger.record_ok(o.env)
            else:
                self.ledger.record_failure(o.env, o.failure, o.detail)
        return outcomes

    def cancel(self) -> None:
        """End every batch in flight within a second (RolloutsCancelled), and every later one at once."""
        self._cancelled.set()

    def close(self) -> None:
        """Cancel whatever still runs on the loop, let it close its connections, then stop the loop. A
        loop stopped under a task still closing its client leaves that task to be destroyed pending,
        and Python prints its traceback at exit."""
        if self._loop.is_running():
            drained = asyncio.run_coroutine_threadsafe(_cancel_all_tasks(ABANDON_GRACE_S), self._loop)
            try:
                drained.result(timeout=ABANDON_GRACE_S + 1.0)
            except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
                pass  # a task that ignores cancellation is left; the loop stops all the same
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()


async def _cancel_all_tasks(grace_s: float) -> None:
    """Cancel every other task on the running loop and wait up to `grace_s` for them to end."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=grace_s)
    await asyncio.get_running_loop().shutdown_asyncgens()
