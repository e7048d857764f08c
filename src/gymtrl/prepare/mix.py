"""How many training rows each source contributes, and which ones. Pure functions of counts and a seed.

Per source, one of:
  count   exactly that many (down-sampled; up-sampled by repeating the whole source, then a sample)
  ratio   a share of what the ratio sources get together, in proportion to the ratios
  neither all of its rows
Together the ratio sources get `max_rows` minus everything else, or, without `max_rows`, the
largest total no ratio source must be up-sampled for. Without ratio sources, `max_rows` caps the
total: rows are taken from every source in proportion to its size. Rounding is largest-remainder,
so shares are exact to within one row per source.
"""

from __future__ import annotations

import math

import numpy as np

from gymtrl.errors import DataError


def largest_remainder(total: int, weights: list[float]) -> list[int]:
    """`total` split in proportion to `weights`, as integers that sum to `total`."""
    if total <= 0 or not weights:
        return [0] * len(weights)
    scale = total / sum(weights)
    exact = [w * scale for w in weights]
    out = [math.floor(x) for x in exact]
    # Ties go to the earlier source, so the result depends on nothing but the inputs.
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def plan_train_counts(available: list[int], ratios: list[float | None], counts: list[int | None],
                      max_rows: int | None, labels: list[str]) -> list[int]:
    n = len(available)
    plan: list[int] = [0] * n
    ratio_idx = [i for i in range(n) if ratios[i] is not None]
    fixed_idx = [i for i in range(n) if counts[i] is not None]
    natural_idx = [i for i in range(n) if ratios[i] is None and counts[i] is None]
    for i in fixed_idx:
        plan[i] = int(counts[i])  # type: ignore[arg-type]
    for i in natural_idx:
        plan[i] = available[i]
    if ratio_idx:
        weights = [float(ratios[i]) for i in ratio_idx]  # type: ignore[arg-type]
        if max_rows is not None:
            budget = max_rows - sum(plan)
            if budget < 0:
                raise DataError(f"prepare.max_rows={max_rows} is smaller than the rows of the count and "
                                f"all-rows sources ({sum(plan)})", hint="raise max_rows, or lower the counts")
        else:
            share = [w / sum(weights) for w in weights]
            budget = min(math.floor(available[i] / s + 1e-9) for i, s in zip(ratio_idx, share))
        for i, k in zip(ratio_idx, largest_remainder(budget, weights)):
            plan[i] = k
    elif max_rows is not None and sum(plan) > max_rows:
        fixed = sum(plan[i] for i in fixed_idx)
        if fixed > max_rows:
            raise DataError(f"prepare.max_rows={max_rows} is smaller than the count sources' total ({fixed})")
        for i, k in zip(natural_idx, largest_remainder(max_rows - fixed, [available[i] for i in natural_idx])):
            plan[i] = k
    for i in range(n):
        if plan[i] > 0 and available[i] == 0:
            raise DataError(f"source '{labels[i]}' has no rows left for training (all bad, duplicate or held out)")
    return plan


def sample(pool: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """`k` entries of `pool` (already in random order): its first k, or whole copies plus a sample."""
    if k <= len(pool):
        return pool[:k]
    repeats, rest = divmod(k, len(pool))
    return np.concatenate([np.tile(pool, repeats), pool[rng.permutation(len(pool))[:rest]]])
