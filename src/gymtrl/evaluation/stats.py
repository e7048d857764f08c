"""The numbers an evaluation reports, from per-row lists of sample rewards.

Samples of one row are not independent (same prompt), so every standard error here treats the row
as the unit: the mean over rows of each row's mean reward, and its standard error from the spread
of those row means (a clustered standard error). A comparison of two models on the same rows is
paired: the mean over rows of the difference of the two row means, and the standard error of that
difference, which is much smaller than either model's own when the rows vary more than the models.
Rollouts that failed (the ledger's kinds: timeout, http_error, ...) carry no reward and are left
out of the reward and pass@k figures; they are counted separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import mean, stdev


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c passed (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), the chance that k samples drawn without replacement hold a pass."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i): no large binomials.
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_se(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n)); NaN where undefined
    (no values; one value has standard error NaN: nothing says how much it varies)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = mean(values)
    if n == 1:
        return m, math.nan
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def curve_rise(values: list[float], k: int, min_spread: float = 1e-3) -> tuple[float, float]:
    """Did a training curve (a reward per step) rise: the mean of its last k values minus that of its
    first k, and that rise in standard errors of the difference of two k-value means under "no
    learning", every value drawn like the first k (their spread, floored at `min_spread` so that a
    flat start does not make any rise look certain). A curve that does not rise gives about N(0, 1);
    a steep late rise is not penalised, as a two-window (Welch) error would be."""
    if not 2 <= k <= len(values):
        raise ValueError(f"curve_rise needs 2 <= k <= {len(values)} values, got k={k}")
    first, last = values[:k], values[-k:]
    rise = mean(last) - mean(first)
    spread = max(stdev(first), min_spread)
    return rise, rise / (spread * math.sqrt(2 / k))


@dataclass
class RowResult:
    """One row's samples under one model."""

    key: str
    env: str
    rewards: list[float] = field(default_factory=list)  # the scored samples' rewards
    failures: int = 0
    turns: list[int] = field(default_factory=list)
    model_tokens: list[int] = field(default_factory=list)
    tool_calls: list[int] = field(default_factory=list)  # parsed function calls per scored sample


def summarize(rows: list[RowResult], samples: int, threshold: float) -> dict:
    """The figures of one group of rows (an environment, or all): see the module docstring."""
    scored = [r for r in rows if r.rewards]
    reward, reward_se = mean_se([mean(r.rewards) for r in scored])
    out = {
        "rows": len(rows),
        "rollouts": sum(len(r.rewards) + r.failures for r in rows),
        "failed": sum(r.failures for r in rows),
        "reward": reward,
        "reward_se": reward_se,
        "turns": _mean([t for r in rows for t in r.turns]),
        "model_tokens": _mean([t for r in rows for t in r.model_tokens]),
        "tool_calls": _mean([t for r in rows for t in r.tool_calls]),
        # the share of scored samples with at least one parsed tool call
        "with_tool_call": _mean([float(t > 0) for r in rows for t in r.tool_calls]),
    }
    for k in sorted({1, samples}):
        # Rows with fewer than k scored samples (failures) cannot estimate pass@k: left out.
        values = [pass_at_k(len(r.rewards), sum(x >= threshold for x in r.rewards), k)
                  for r in scored if len(r.rewards) >= k]
        out[f"pass@{k}"] = mean(values) if values else math.nan
    return out


def paired_difference(a: list[RowResult], b: list[RowResult]) -> tuple[float, float, int]:
    """mean over rows of (b's row mean - a's row mean), its standard error, and the rows compared
    (those both models scored)."""
    by_key = {r.key: r for r in a}
    diffs = [mean(r.rewards) - mean(by_key[r.key].rewards) for r in b if r.rewards and by_key.get(r.key)
             and by_key[r.key].rewards]
    d, se = mean_se(diffs)
    return d, se, len(diffs)


def _mean(values: list) -> float:
    return float(mean(values)) if values else math.nan
