"""The adapter between TRL 1.16's GRPOTrainer and the rollout engine.

TRL's contract (see shared/reference/trl-grpo-contract.md): `rollout_func(prompts, trainer)` is
called on every rank with that rank's slice; each unique prompt already appears num_generations
times, consecutively; it must return exactly one completion per entry, in order, as `prompt_ids`,
`completion_ids`, `logprobs`, plus optional `env_mask` and extra fields that reach the reward
functions. A dataset row's `prompt` here is its key in the row store (see gymtrl.data.rows): the
whole NeMo Gym row, not just its messages, is what the agent needs.

A failed rollout becomes a one-token placeholder with env_mask 0 and reward None: TRL excludes it
from the group baseline and the loss, and the ledger counts it.

With rollout.max_staleness=1 a call returns the batch generated during the step before and starts
generating its own prompts for the next step (gymtrl.rollout.ahead has the whole scheme).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter, defaultdict
from concurrent.futures import Future
from statistics import mean
from typing import Callable

from gymtrl.errors import ServerError, WeightSyncError
from gymtrl.gym.discovery import GymTopology
from gymtrl.metrics import StepChannel
from gymtrl.rollout.ahead import Batch, BatchAhead
from gymtrl.rollout.engine import RolloutEngine, RolloutOutcome, RolloutsCancelled
from gymtrl.failures import FailureKind
from gymtrl.servers.supervisor import ServersRestarted, Supervisor
from gymtrl.sync.publisher import WeightPublisher

log = logging.getLogger(__name__)


class GymRolloutFunc:
    def __init__(self, engine: RolloutEngine, rows: dict[str, dict], publisher: WeightPublisher,
                 placeholder_token_id: int, channel: StepChannel,
                 supervisor: Supervisor | None = None, rediscover: Callable[[], GymTopology] | None = None,
                 max_staleness: int = 0):
        self.engine = engine
        self.rows = rows
        self.publisher = publisher  # makes vLLM serve this step's weights, and checks it does
        self.placeholder = placeholder_token_id
        self.channel = channel  # this batch's metrics and sample layout, for what TRL runs next
        self.supervisor = supervisor  # restarts launched servers that exit (supervision.on_server_exit)
        self.rediscover = rediscover  # NeMo Gym's agents afresh, after Gym was restarted
        self.seen_generation = 0
        self._warned_in_flight = False
        # rollout.max_staleness=1: the next step's batch is generated while this one trains (ahead.py)
        self.ahead = BatchAhead() if max_staleness else None

    # --- servers restarted under a batch ------------------------------------------------------
    def _follow_restarts(self) -> None:
        """After servers were restarted: find Gym's agents again, and push the weights again, since a
        new vLLM serves the ones on disk."""
        if self.supervisor is None or self.supervisor.generation == self.seen_generation:
            return
        self.seen_generation = self.supervisor.generation
        self.publisher.servers_restarted()
        if self.rediscover is not None:
            self.engine.topology = self.rediscover()

    def _recover_or_raise(self) -> None:
        """After a sync or its check failed: restart the server that exited under it
        (supervision.on_server_exit), or re-raise the failure."""
        if self.supervisor is None or not self.supervisor.recover():
            raise
        self._follow_restarts()

    def _publish(self, trainer) -> tuple[dict[str, float], Future | None]:
        """The publisher's push, once more after restarting a server that exited under it."""
        try:
            return self.publisher.publish(trainer)
        except (ServerError, WeightSyncError):
            self._recover_or_raise()
        return self.publisher.publish(trainer)

    def _run_batch(self, rows: list[dict], trainer, metrics: dict[str, float], check: Future | None):
        """The batch's rollouts, with the sync's check running beside them: the outcomes are returned
        only once the check passed. A server restarted mid-batch, or a failed check that a restart
        recovers from, runs the whole batch again on freshly pushed weights."""
        step = trainer.state.global_step + 1  # the step this batch trains, as metrics.jsonl numbers it
        while True:
            try:
                outcomes = self.engine.run(rows)
            except ServersRestarted as e:
                log.warning("step %d: the batch in flight is run again after restarting %s", step, ", ".join(e.names))
                self.publisher.drop(check)
                self._follow_restarts()
                more, check = self._publish(trainer)
                metrics.update(more)
                continue
            try:
                metrics.update(self.publisher.settle(check))
                return outcomes
            except (ServerError, WeightSyncError):
                self._recover_or_raise()
                log.warning("step %d: the batch is run again: the sync check failed and a server was restarted", step)
                self.publisher.push_again()
                more, check = self._publish(trainer)
                metrics.update(more)

    def _warn_in_flight(self, batch: int) -> None:
        """Once per run: a cap on rollouts in flight below half the batch slows every rollout phase
        (docs/performance.md measures it)."""
        cap = self.engine.max_concurrency
        if self._warned_in_flight or 2 * cap >= batch:
            return
        self._warned_in_flight = True
        log.warning("rollout.max_concurrency=%d lets fewer than half of this process's %d rollouts a batch run at once: "
                    "the rollout phase runs in waves. Raise it to %d unless the environment needs the cap.",
                    cap, batch, batch)

    # --- the TRL entry point -----------------------------------------------------------------
    def __call__(self, prompts: list, trainer) -> dict:
        if self.supervisor is not None:
            self.supervisor.handle_exits()  # a server that exited since the last batch: restarted, or the run stops
        self._follow_restarts()
        version = trainer.state.global_step  # the optimizer steps taken: the weights pushed now
        step = version + 1  # the step this call's batch trains, as metrics.jsonl and the log number it
        keys = list(prompts)
        rows = [self.rows[key] for key in keys]
        self._warn_in_flight(len(rows))
        if self.ahead is None:
            batch = self._generate(keys, rows, trainer)
            return self._hand_over(batch, step, waited=batch.seconds)
        batch, waited = self._take_ahead(step)
        if batch is None:  # the run's first call, a resumed run's, or the one after a dropped batch
            log.info("step %d: nothing was generated ahead (a run's first step, a resumed run's, or one after a dropped "
                     "batch): this batch is generated now, and a second draw of "
                     "its prompts is started for the next step", step)
            batch = self._generate(keys, rows, trainer)
            waited = batch.seconds
        metrics, check = self._publish(trainer)  # this step's weights, with no episode in flight
        self.ahead.start(functools.partial(self._generate_ahead, keys, rows, check, version, metrics), len(rows))
        return self._hand_over(batch, step, waited)

    def _generate(self, keys: list[str], rows: list[dict], trainer) -> Batch:
        """Push this step's weights, run the batch and settle the push's check, while the trainer waits."""
        metrics, check = self._publish(trainer)
        start = time.monotonic()
        outcomes = self._run_batch(rows, trainer, metrics, check)
        return Batch(keys, rows, outcomes, trainer.state.global_step, time.monotonic() - start, metrics)

    def _generate_ahead(self, keys: list[str], rows: list[dict], check: Future | None, version: int,
                        metrics: dict[str, float]) -> Batch:
        """In the ahead thread, while the trainer trains: the rollouts, then the check of the push made for them."""
        generation = self.supervisor.generation if self.supervisor is not None else 0
        start = time.monotonic()
        outcomes = self.engine.run(rows)
        seconds = time.monotonic() - start
        return Batch(keys, rows, outcomes, version, seconds, {**metrics, **self.publisher.settle(check)}, generation)

    def _take_ahead(self, step: int) -> tuple[Batch | None, float]:
        """The batch generated ahead; (None, 0) when there is none, or when it was dropped because a
        server under it failed and was restarted (supervision.on_server_exit=restart)."""
        try:
            batch, waited = self.ahead.take()  # type: ignore[union-attr]
            if batch is not None and self.supervisor is not None and batch.servers_generation != self.supervisor.generation:
                # restarted from the trainer's thread while it ran: a new vLLM served weights from disk
                log.warning("step %d: the batch generated ahead is dropped: servers were restarted under it", step)
                self._follow_restarts()
                return None, 0.0
            return batch, waited
        except ServersRestarted as e:
            log.warning("step %d: the batch generated ahead is dropped after restarting %s", step, ", ".join(e.names))
            self._follow_restarts()
        except (ServerError, WeightSyncError):
            self._recover_or_raise()
            log.warning("step %d: the batch generated ahead is dropped: its server failed and was restarted", step)
        return None, 0.0

    def _hand_over(self, batch: Batch, step: int, waited: float) -> dict:
        """TRL's batch from a generated one, with its metrics for the step that trains on it."""
        metrics = dict(batch.metrics)
        metrics["rollout/batch_seconds"] = batch.seconds
        metrics["rollout/wait_seconds"] = waited  # the trainer's wait for this batch
        if self.ahead is not None:
            metrics["rollout/policy_lag_steps"] = float(step - 1 - batch.version)  # optimizer steps since its weights
        if self.supervisor is not None:
            metrics["servers/restarts"] = float(self.supervisor.restarts)
        log_excluded(batch.outcomes, step)
        self.engine.ledger.check_bound()

        out = to_trl_batch(batch.outcomes, self.placeholder, batch.rows, batch.keys)
        metrics.update(batch_metrics(batch.outcomes))
        metrics.update(self.engine.ledger.snapshot())
        self.channel.put(metrics, [(o.env, o.trajectory.turn_spans if o.trajectory else []) for o in batch.outcomes])
        return out

    def wait_ahead(self) -> None:
        """Until the batch generated ahead is done (kept for the next step): before anything else uses
        vLLM's weights, such as an evaluation's push."""
        if self.ahead is not None:
            self.ahead.wait()

    def close(self) -> None:
        """Cancel and drop the batch generated ahead for a step that will not run (the end of the run, a
        stop, an error): the engine ends its requests within a second, so nothing waits on them."""
        if self.ahead is None:
            return
        if self.ahead.in_flight:
            self.engine.cancel()
        dropped, error = self.ahead.close()
        if dropped:
            log.info("%d rollouts generated ahead for a step that did not run were not trained on", dropped)
        if error is not None and not isinstance(error, RolloutsCancelled):
            # nothing trains on it any more, but its failure (a push's check among them) is not passed over
            log.warning("the batch generated ahead for a step that did not run failed: %s: %s", type(error).__name__, error)


def log_excluded(outcomes: list[RolloutOutcome], step: int) -> None:
    """One warning line per batch that lost rollouts: how many, of which kind, where, and the last reason."""
    failed = [o for o in outcomes if o.failure is not None]
    if not failed:
        return
    kinds = Counter(f"{o.failure.value}@{o.env}" for o in failed)  # type: ignore[union-attr]
    last = failed[-1]
    log.warning("step %d: %d of %d rollouts excluded (%s); last %s: %s", step, len(failed), len(outcomes),
                ", ".join(f"{k} x{n}" for k, n in kinds.most_common()), last.failure.value,  # type: ignore[union-attr]
                (last.detail or "-")[:300])


def to_trl_batch(outcomes: list[RolloutOutcome], placeholder: int, rows: list[dict],
                 keys: list[str] | None = None) -> dict[str, list]:
    """TRL's rollout dict: one entry per outcome, in order. Extra keys reach the reward functions:
    `row` (the dataset row), `verifier` (the verifier's reply, without the episode) and `prompt_key`
    (the row's key: TRL's `prompts` name the batch TRL asked for, which one-step-off is not) among them."""
    out: dict[str, list] = {k: [] for k in ("prompt_ids", "completion_ids", "logprobs", "env_mask", "env_reward",
                                            "gym_env", "num_turns", "rollout_failure", "row", "verifier")}
    if keys is not None:
        out["prompt_key"] = list(keys)
    for o, row in zip(outcomes, rows):
        t = o.trajectory
        if t is None:  # excluded: nothing to train on, and reward None keeps it out of the baseline
            out["prompt_ids"].append([placeholder])
            out["completion_ids"].append([placeholder])
            out["logprobs"].append([0.0])
            out["env_mask"].append([0])
        else:
            out["prompt_ids"].append(t.prompt_ids)
            out["completion_ids"].append(t.completion_ids)
            out["logprobs"].append(t.logprobs)
            out["env_mask"].append(t.env_mask)
        out["env_reward"].append(o.reward)
        out["gym_env"].append(o.env)
        out["num_turns"].append(t.num_turns if t else 0)
        out["rollout_failure"].append(o.failure.value if o.failure else "")
        out["row"].append(row)
        out["verifier"].append({k: v for k, v in (o.reply or {}).items() if k != "response"})
    return out


def batch_metrics(outcomes: list[RolloutOutcome]) -> dict[str, float]:
    by_env: dict[str, list[RolloutOutcome]] = defaultdict(list)
    for o in outcomes:
        by_env[o.env].append(o)
    ok = [o for o in outcomes if o.trajectory is not None]
    m: dict[str, float] = {
        "rollout/failure_rate": 1 - len(ok) / len(outcomes) if outcomes else 0.0,
        "rollout/latency_mean_s": mean(o.latency_s for o in outcomes) if outcomes else 0.0,
        "rollout/latency_max_s": max((o.latency_s for o in outcomes), default=0.0),
        "rollout/model_tokens": float(sum(o.trajectory.num_model_tokens for o in ok)),
        "rollout/turns_mean": mean(o.trajectory.num_turns for o in ok) if ok else 0.0,
    }
    m.update(prefix_mismatch_metrics("rollout", outcomes))
    for env, items in by_env.items():
        good = [o for o in items if o.trajectory is not None]
        m[f"env/{env}/failure_rate"] = 1 - len(good) / len(items)
        m.update(prefix_mismatch_metrics(f"env/{env}", items))
        if good:
            m[f"env/{env}/reward"] = mean(o.reward for o in good)  # type: ignore[misc]
            m[f"env/{env}/turns"] = mean(o.trajectory.num_turns for o in good)  # type: ignore[union-attr]
            m[f"env/{env}/tool_calls"] = mean(o.tool_calls for o in good)
    return m


def prefix_mismatch_metrics(prefix: str, outcomes: list[RolloutOutcome]) -> dict[str, float]:
    """Multi-turn health: episodes with 2+ model calls, and the share of them whose history could
    not be stitched on-policy (prefix_mismatch) or that the server's prefix correction refused."""
    multi = [o for o in outcomes if o.model_calls >= 2]
    refused = sum(o.failure is FailureKind.PREFIX_CORRECTION_REFUSED for o in outcomes)
    mismatched = sum(o.failure is FailureKind.PREFIX_MISMATCH for o in multi)
    # A refused episode never returns its token ids, so it counts as multi-turn by definition.
    attempts = len(multi) + refused
    return {
        f"{prefix}/multi_turn_episodes": float(attempts),
        f"{prefix}/prefix_mismatch_rate": mismatched / attempts if attempts else 0.0,
        f"{prefix}/prefix_correction_refused_rate": refused / attempts if attempts else 0.0,
    }


def make_env_reward(channel: StepChannel):
    """TRL reward function returning the environment's reward (None for excluded rollouts), which
    also hands the rollout's metrics to TRL's metric buffer (log_metric averages across ranks)."""

    def env_reward(completions, env_reward, log_metric=None, **kwargs):
        metrics = channel.take_metrics()
        if log_metric is not None:
            for name, value in metrics.items():
                log_metric(name, float(value))
        return list(env_reward)

    return env_reward
