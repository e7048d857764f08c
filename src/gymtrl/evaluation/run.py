"""Evaluate the model vLLM serves now on a fixed set of rows: every row `samples` times, through the
training rollout path (gymtrl.rollout.engine.RolloutEngine: the same agents, routing, sampling
settings and failure kinds), with a fixed seed per (row, sample).

The seed reaches vLLM through the row's `metadata.extra_body` (NeMo Gym's vllm_model merges it into
every chat request of the episode), so two evaluations of the same rows (two steps of a run, or two
models under `gymtrl eval --compare`) draw their samples with the same random numbers: their
difference is less noisy than either alone.
"""

from __future__ import annotations

import json
import math
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

from gymtrl.evaluation.stats import RowResult, paired_difference, summarize
from gymtrl.failures import FailureBound, FailureLedger
from gymtrl.rollout.engine import RolloutEngine

ALL = "all"  # the name of the overall group in reports


def sample_seed(base: int, key: str, sample: int) -> int:
    """A seed for sample `sample` of row `key`, the same in every evaluation that uses `base`."""
    return zlib.crc32(f"{base}:{key}:{sample}".encode()) & 0x7FFFFFFF


def with_seed(row: dict, seed: int) -> dict:
    """The row with `seed` in its responses_create_params.metadata.extra_body (a JSON string, as
    OpenAI's metadata holds strings only); any extra_body the row already had is kept."""
    params = dict(row["responses_create_params"])
    metadata = dict(params.get("metadata") or {})
    extra = json.loads(metadata.get("extra_body") or "{}")
    metadata["extra_body"] = json.dumps({**extra, "seed": seed})
    return {**row, "responses_create_params": {**params, "metadata": metadata}}


@dataclass
class EvalResult:
    """One model's evaluation: its rows' samples and the ledger's failure counts by kind."""

    rows: list[RowResult]
    failures: dict[str, dict[str, int]] = field(default_factory=dict)  # env -> kind -> count
    samples: int = 1
    threshold: float = 1.0

    def envs(self) -> list[str]:
        return sorted({r.env for r in self.rows})

    def summary(self, env: str = ALL) -> dict:
        rows = self.rows if env == ALL else [r for r in self.rows if r.env == env]
        out = summarize(rows, self.samples, self.threshold)
        kinds: Counter = Counter()
        for e, counts in self.failures.items():
            if env in (ALL, e):
                kinds.update(counts)
        out["failures"] = dict(sorted(kinds.items()))
        return out

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Flat metric names for the training log: <prefix>/<env>/{reward, reward_se, pass@1,
        pass@<samples>, failures, turns, model_tokens, rollouts, tool_calls, with_tool_call}, and <prefix>/reward(_se) overall."""
        out: dict[str, float] = {}
        for env in self.envs():
            s = self.summary(env)
            for key in ("reward", "reward_se", "pass@1", f"pass@{self.samples}", "turns", "model_tokens", "rollouts",
                        "tool_calls", "with_tool_call"):
                out[f"{prefix}/{env}/{key}"] = float(s[key])
            out[f"{prefix}/{env}/failures"] = float(s["failed"])
        total = self.summary()
        out[f"{prefix}/reward"] = float(total["reward"])
        out[f"{prefix}/reward_se"] = float(total["reward_se"])
        return out


class Evaluator:
    """Runs `keys` (rows of `store`) `samples` times each on an engine of its own: a ledger of its
    own (evaluation failures never count toward training's failure bound) and its own temperature."""

    def __init__(self, engine: RolloutEngine, store: dict[str, dict], keys: list[str], samples: int,
                 threshold: float, seed: int, temperature: float | None = None):
        if temperature is not None:
            engine.sampling = replace(engine.sampling, temperature=temperature)
        self.engine = engine
        self.store = store
        self.keys = list(keys)
        self.samples = samples
        self.threshold = threshold
        self.seed = seed

    def run(self) -> EvalResult:
        # A ledger per evaluation, whose bound is never checked: the counts are the report.
        self.engine.ledger = FailureLedger(FailureBound(1.0, 1, 1))
        jobs = [(key, j) for key in self.keys for j in range(self.samples)]
        batch = [with_seed(self.store[key], sample_seed(self.seed, key, j)) for key, j in jobs]
        # In waves of at most rollout.max_concurrency: a rollout's deadline covers its time queued.
        wave = max(1, self.engine.max_concurrency)
        outcomes = []
        for start in range(0, len(batch), wave):
            outcomes += self.engine.run(batch[start:start + wave])
        rows: dict[str, RowResult] = {}
        for (key, _), o in zip(jobs, outcomes):
            r = rows.setdefault(key, RowResult(key, o.env))
            if o.failure is not None or o.reward is None:
                r.failures += 1
                continue
            r.rewards.append(float(o.reward))
            r.tool_calls.append(o.tool_calls)
            if o.trajectory is not None:
                r.turns.append(o.trajectory.num_turns)
                r.model_tokens.append(o.trajectory.num_model_tokens)
        failures: dict[str, dict[str, int]] = defaultdict(dict)
        for env, counts in self.engine.ledger.failures.items():
            failures[env] = {k.value: n for k, n in counts.items()}
        return EvalResult([rows[k] for k in self.keys if k in rows], dict(failures), self.samples, self.threshold)

    def close(self) -> None:
        self.engine.close()


# --- reports ---------------------------------------------------------------------------------

def report(results: list[tuple[str, EvalResult]], settings: dict) -> dict:
    """The JSON report of one or two models (the second compared with the first, paired by row)."""
    out: dict = {**settings, "models": []}
    for name, result in results:
        envs = {env: result.summary(env) for env in result.envs()}
        out["models"].append({"model": name, "overall": result.summary(), "envs": envs})
    if len(results) == 2:
        (_, a), (_, b) = results
        groups = {ALL: None, **{env: env for env in a.envs()}}
        compare = {}
        for group, env in groups.items():
            ra = [r for r in a.rows if env is None or r.env == env]
            rb = [r for r in b.rows if env is None or r.env == env]
            diff, se, n = paired_difference(ra, rb)
            compare[group] = {"reward_diff": diff, "reward_diff_se": se, "rows": n}
        out["compare"] = compare
    return _finite(out)


def table(rep: dict) -> str:
    """A compact text table of a report: one line per environment (and all)."""
    models = rep["models"]
    k = rep["samples"]
    head = f"{'environment':<28} {'rows':>4} {'rollouts':>8} {'reward ± se':>16} {'pass@1':>6} {f'pass@{k}':>6} " \
           f"{'failed':>6} {'turns':>5} {'tokens':>6} {'tools':>5}"
    lines = []
    for i, m in enumerate(models):
        label = "A" if len(models) == 2 and i == 0 else "B" if len(models) == 2 else ""
        lines.append(f"model{' ' + label if label else ''}: {m['model']}")
        lines.append(head)
        groups = [(env, s) for env, s in m["envs"].items()] + [(ALL, m["overall"])]
        for env, s in groups:
            lines.append(f"{env:<28} {s['rows']:>4} {s['rollouts']:>8} {_pm(s['reward'], s['reward_se']):>16} "
                         f"{_num(s['pass@1']):>6} {_num(s[f'pass@{k}']):>6} {s['failed']:>6} {_num(s['turns'], 2):>5} "
                         f"{_num(s['model_tokens'], 1):>6} {_num(s['tool_calls'], 2):>5}")
            if s["failures"]:
                lines.append(f"{'':<28} failures: " + ", ".join(f"{kind}={n}" for kind, n in s["failures"].items()))
    if "compare" in rep:
        lines.append("B - A, paired by row (same rows, same seeds):")
        for env, c in rep["compare"].items():
            se = c["reward_diff_se"]
            z = f"  ({c['reward_diff'] / se:+.1f} se)" if se else ""
            lines.append(f"{env:<28} {c['rows']:>4} rows  reward {_pm(c['reward_diff'], se, signed=True)}{z}")
    return "\n".join(lines)


def _pm(value, se, signed: bool = False) -> str:
    if value is None:
        return "-"
    v = f"{value:+.3f}" if signed else f"{value:.3f}"
    return f"{v} ± {se:.3f}" if se is not None else f"{v} ± ?"


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _finite(obj):
    """NaN (undefined: no rows, one row's standard error) as null: JSON has no NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
