"""Evaluation during training: on data.eval's rows, before the first optimizer step (the baseline),
every eval.every_steps steps, and once training finished; logged as eval/<env>/reward, reward_se,
pass@1, pass@<samples>, failures, turns, model_tokens, rollouts, and eval/reward overall.

Why not TRL's own evaluation (grpo.eval_strategy)? It would call the rollout function on the eval
rows and report a GRPO loss on them: a number nobody tracks progress by, through the training
rollout function (which publishes weights, feeds training metrics and counts toward the failure
bound). So gymtrl keeps it off (grpo.eval_strategy must be "no": config/checks.py) and hands TRL no
eval dataset; this callback is the only evaluation, and it reports rewards.

Before evaluating, vLLM must serve this step's weights: the run's WeightPublisher pushes them (every
process calls `publish`: under ZeRO-3 the push gathers across all) and `settle` waits for their
check. The push counts for the step: the next batch's rollouts at the same step find it done. Only
the main process runs the evaluation rollouts; the others wait for it. Validation rows never train:
they come from data.eval only, under keys of their own ("eval:<i>"), and from_config refuses a row
store where an eval row is also a training row (by key or by object).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

from transformers import Trainer, TrainerCallback

from gymtrl.errors import DataError
from gymtrl.evaluation.run import Evaluator
from gymtrl.failures import FailureBound, FailureLedger
from gymtrl.rollout.engine import RolloutEngine
from gymtrl.servers.supervisor import ServersRestarted

log = logging.getLogger(__name__)


def check_disjoint(store: dict[str, dict], eval_keys: list[str]) -> None:
    """Eval rows are not training rows: by key, and by object. Identical content in both splits (the
    same row written twice) is allowed, with a warning: it inflates the evaluation."""
    eval_set = set(eval_keys)
    train_keys = [k for k in store if k not in eval_set]
    bad = [k for k in eval_keys if not k.startswith("eval:")] + [k for k in train_keys if k.startswith("eval:")]
    shared = {id(store[k]) for k in eval_keys} & {id(store[k]) for k in train_keys}
    if bad or shared:
        raise DataError(f"the evaluation rows are not kept apart from the training rows (keys {bad[:3]}, "
                        f"{len(shared)} shared row objects)")
    seen = {json.dumps(store[k], sort_keys=True) for k in train_keys}
    same = sum(json.dumps(store[k], sort_keys=True) in seen for k in eval_keys)
    if same:
        log.warning("%d of the %d evaluation rows also appear, with the same content, in the training data: they "
                    "measure memorisation, not generalisation", same, len(eval_keys))


class EvalCallback(TrainerCallback):
    def __init__(self, evaluator: Evaluator | None, publisher, training_engine: RolloutEngine | None,
                 at_start: bool, every_steps: int, at_end: bool, before_push: Callable[[], None] | None = None):
        self.evaluator = evaluator  # None: no eval rows, nothing to do
        self.publisher = publisher
        self.before_push = before_push  # waits for a batch generated ahead (rollout.max_staleness=1)
        self.training_engine = training_engine  # its topology is followed (Gym restarted: agents found afresh)
        self.at_start, self.every_steps, self.at_end = at_start, every_steps, at_end
        self.trainer = None
        self.last_step: int | None = None

    @classmethod
    def from_config(cls, cfg, rollout_func, eval_ds) -> "EvalCallback":
        """The callback the eval section describes, evaluating eval_ds's rows (from the run's row store)
        with the run's rollout engine settings and publisher (rollout_func: GymRolloutFunc)."""
        e = cfg.eval
        keys = list(eval_ds["prompt"])[:e.max_rows] if eval_ds is not None else []
        if not keys:
            return cls(None, None, None, False, 0, False)
        check_disjoint(rollout_func.rows, keys)
        train = rollout_func.engine
        r = cfg.rollout
        engine = RolloutEngine(train.topology, train.sampling, FailureLedger(FailureBound(1.0, 1, 1)), r.max_concurrency,
                               r.timeout_s, r.retries, r.retry_backoff_s, vocab_size=train.vocab_size, watch=train.watch)
        evaluator = Evaluator(engine, rollout_func.rows, keys, e.samples, e.pass_threshold, e.seed, e.temperature)
        return cls(evaluator, rollout_func.publisher, train, e.at_start, e.every_steps, e.at_end,
                   before_push=rollout_func.wait_ahead)

    def bind(self, trainer):
        """The trainer it evaluates for (TrainerCallback events do not carry it); returns the trainer."""
        self.trainer = trainer
        return trainer

    # --- when -------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if self.at_start and state.global_step == 0:
            self.evaluate(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_steps and state.global_step % self.every_steps == 0:
            self.evaluate(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        finished = state.max_steps <= 0 or state.global_step >= state.max_steps  # not stopped early
        if self.at_end and finished and self.last_step != state.global_step:
            self.evaluate(state.global_step)
        if self.evaluator is not None:
            self.evaluator.close()

    # --- what -------------------------------------------------------------------------------
    def evaluate(self, step: int) -> None:
        if self.evaluator is None:
            return
        if self.trainer is None:
            raise RuntimeError("EvalCallback.bind(trainer) was not called")
        trainer = self.trainer
        self.last_step = step
        if self.before_push is not None:
            self.before_push()  # no episode of a batch generated ahead is in flight during the push
        pushed, check = self.publisher.publish(trainer)  # every process: a collective under ZeRO-3
        # The main process's check (the others have none); the push and its check are logged with the
        # evaluation (the next training step finds these weights already pushed).
        pushed.update(self.publisher.settle(check))
        result = None
        if trainer.accelerator.is_main_process:
            start = time.monotonic()
            self.evaluator.engine.topology = self.training_engine.topology
            try:
                result = self.evaluator.run()
            except ServersRestarted as e:  # the next training batch re-syncs; this evaluation is lost
                log.warning("step %d: evaluation skipped: %s restarted under it", step, ", ".join(e.names))
            seconds = time.monotonic() - start
        trainer.accelerator.wait_for_everyone()
        if result is not None:
            metrics = {**result.metrics(), "eval/seconds": seconds, **pushed}
            log.info("step %d: eval reward %.4f ± %.4f (%d rows x %d samples, %.1fs)", step, metrics["eval/reward"],
                     metrics["eval/reward_se"], len(self.evaluator.keys), self.evaluator.samples, seconds)
            # transformers' Trainer.log, not GRPOTrainer's: that one would fold in (and clear) the metrics
            # TRL has gathered for this step's own log line, which follows. Logging clears the step's
            # should_log flag: kept, or that line would be lost.
            should_log = trainer.control.should_log
            Trainer.log(trainer, metrics)
            trainer.control.should_log = should_log
