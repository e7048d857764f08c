"""Failed rollouts are data: each one is counted by kind and environment, and a bound on the
failure rate turns "too many" into a clean stop instead of a run that quietly trains on the rest."""

from __future__ import annotations

import enum
from collections import Counter, defaultdict, deque
from dataclasses import dataclass

from gymtrl.errors import RolloutFailureBoundError


class FailureKind(str, enum.Enum):
    TIMEOUT = "timeout"  # the rollout passed its deadline
    CONNECTION_ERROR = "connection_error"  # agent unreachable (after retries)
    HTTP_ERROR = "http_error"  # non-2xx reply (after retries for 5xx)
    INVALID_REPLY = "invalid_reply"  # not JSON, not an object, or the wrong shape
    MISSING_REWARD = "missing_reward"  # no numeric `reward`
    MASK_SAMPLE = "mask_sample"  # the environment flagged an infrastructure failure
    JUDGE_FAILED = "judge_failed"  # the environment's LLM judge could not be reached or answer
    MISSING_TOKEN_IDS = "missing_token_ids"  # no token ids (model server not in training mode)
    MALFORMED_TOKEN_IDS = "malformed_token_ids"  # ids/logprobs of the wrong type or length
    PREFIX_MISMATCH = "prefix_mismatch"  # a later turn's prompt does not extend the history
    # gymtrl's vLLM plugin could not join a turn's history ids safely and said so (vllm_plugin/splice.py)
    PREFIX_CORRECTION_REFUSED = "prefix_correction_refused"


@dataclass
class FailureBound:
    max_rate: float  # stop when an environment's failure rate over the window exceeds this
    window: int  # rollouts per environment the rate is measured over
    min_rollouts: int  # no verdict before an environment has this many rollouts


class FailureLedger:
    """Counts per (environment, kind), totals per environment, and a sliding window for the bound."""

    def __init__(self, bound: FailureBound):
        self.bound = bound
        self.failures: dict[str, Counter] = defaultdict(Counter)
        self.totals: Counter = Counter()
        self._recent: dict[str, deque] = defaultdict(lambda: deque(maxlen=bound.window))
        self._last_detail: dict[tuple[str, FailureKind], str] = {}

    def record_ok(self, env: str) -> None:
        self.totals[env] += 1
        self._recent[env].append(False)

    def record_failure(self, env: str, kind: FailureKind, detail: str = "") -> None:
        self.totals[env] += 1
        self.failures[env][kind] += 1
        self._recent[env].append(True)
        if detail:
            self._last_detail[(env, kind)] = detail

    def window_rate(self, env: str) -> float:
        recent = self._recent[env]
        return sum(recent) / len(recent) if recent else 0.0

    def check_bound(self) -> None:
        """Raise RolloutFailureBoundError naming the environment, its kinds and the last detail."""
        for env, recent in self._recent.items():
            if len(recent) < min(self.bound.min_rollouts, self.bound.window):
                continue
            rate = self.window_rate(env)
            if rate > self.bound.max_rate:
                kinds = self.failures[env].most_common()
                top_kind = kinds[0][0]
                detail = self._last_detail.get((env, top_kind), "")
                breakdown = ", ".join(f"{k.value}={n}" for k, n in kinds)
                raise RolloutFailureBoundError(
                    f"environment '{env}': {rate:.0%} of its last {len(recent)} rollouts failed "
                    f"(bound {self.bound.max_rate:.0%}); failures so far: {breakdown}"
                    + (f"; last {top_kind.value}: {detail}" if detail else ""),
                    hint="check the server logs in <output_dir>/logs, or raise "
                    "rollout.max_failure_rate if these failures are expected",
                )

    def snapshot(self) -> dict[str, float]:
        """Cumulative counters as flat metric names."""
        out: dict[str, float] = {}
        for env, counts in self.failures.items():
            for kind, n in counts.items():
                out[f"failures/{env}/{kind.value}"] = n
        for kind in FailureKind:
            n = sum(c[kind] for c in self.failures.values())
            if n:
                out[f"failures/{kind.value}"] = n
        out["failures/total"] = sum(sum(c.values()) for c in self.failures.values())
        out["rollouts/total"] = sum(self.totals.values())
        return out
