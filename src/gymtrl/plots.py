"""A run's pictures and summary, from its metrics.jsonl: `gymtrl plot RUN_DIR`, and at the end of
`gymtrl train` (main process only; a failure to plot only warns, never fails a finished run).

PNG files in RUN_DIR/plots/ (each written atomically, through a temporary file and a rename):
  reward.png        reward per environment (env/<env>/reward) and overall, per step
  failure_rate.png  failure rate per environment (env/<env>/failure_rate), per step
  eval_reward.png   eval/<env>/reward at each evaluation (when the run evaluated)
  sync_seconds.png  seconds per weight push (sync/seconds)
  step_time.png     seconds per optimizer step (step_time)
matplotlib draws them with its Agg backend (no display needed).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

from gymtrl.errors import GymtrlError
from gymtrl.metrics import read_metrics

log = logging.getLogger(__name__)

_ENV_KEY = re.compile(r"^env/(.+)/(reward|failure_rate)$")
_EVAL_KEY = re.compile(r"^eval/(.+)/reward$")
_FAILURE_KIND = re.compile(r"^failures/([^/]+)$")


def _load(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise GymtrlError(f"no metrics.jsonl in {run_dir}", hint="give a run's output.dir (gymtrl train writes it there)")
    try:
        return read_metrics(path)
    except ValueError as e:
        raise GymtrlError(f"{path}: not JSON lines ({e})") from None


def series(records: list[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{figure: {curve: [(step, value), ...]}} for every figure the records have data for."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}

    def add(figure: str, curve: str, step, value) -> None:
        if isinstance(value, (int, float)) and step is not None:
            out.setdefault(figure, {}).setdefault(curve, []).append((float(step), float(value)))

    for r in records:
        step = r.get("step")
        if "reward" in r:  # a training step's log (TRL's), not an evaluation's or the final summary
            add("reward", "all environments", step, r["reward"])
            add("sync_seconds", "sync/seconds", step, r.get("sync/seconds"))
            add("step_time", "step_time", step, r.get("step_time"))
        for key, value in r.items():
            m = _ENV_KEY.match(key)
            if m:
                add(m.group(2), m.group(1), step, value)
            m = _EVAL_KEY.match(key)
            if m:
                add("eval_reward", m.group(1), step, value)
    return out


TITLES = {"reward": ("reward per environment", "mean reward"),
          "failure_rate": ("failure rate per environment", "failed rollouts / rollouts"),
          "eval_reward": ("evaluation reward per environment", "mean reward"),
          "sync_seconds": ("weight sync time", "seconds per push"),
          "step_time": ("step time", "seconds per optimizer step")}


def _write_png_atomically(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw the run's figures into RUN_DIR/plots/; returns the files written."""
    run_dir = Path(run_dir)
    curves = series(_load(run_dir))
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise GymtrlError("plotting needs matplotlib, which is not installed", hint="pip install matplotlib") from None
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, ylabel) in TITLES.items():
        if name not in curves:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        try:
            for curve, points in sorted(curves[name].items()):
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=curve)
            ax.set_title(f"{title} ({run_dir.name})")
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if len(curves[name]) > 1 or name in ("reward", "failure_rate", "eval_reward"):
                ax.legend(fontsize=8)
            fig.tight_layout()
            path = out_dir / f"{name}.png"
            _write_png_atomically(fig, path)
            written.append(path)
        finally:
            plt.close(fig)
    return written


def summary(records: list[dict]) -> dict:
    """First and last reward per environment, failures by kind (cumulative, at the last step),
    mean step and sync seconds."""
    steps = [r for r in records if "reward" in r]
    envs: dict[str, list[float]] = {}
    for r in steps:
        for key, value in r.items():
            m = _ENV_KEY.match(key)
            if m and m.group(2) == "reward" and isinstance(value, (int, float)):
                envs.setdefault(m.group(1), []).append(float(value))
    failures: dict[str, float] = {}
    for r in steps:
        for key, value in r.items():
            m = _FAILURE_KIND.match(key)
            if m and m.group(1) != "total" and isinstance(value, (int, float)):
                failures[m.group(1)] = float(value)  # cumulative counters: the last one is the run's

    def mean_of(key: str) -> float | None:
        values = [float(r[key]) for r in steps if isinstance(r.get(key), (int, float))]
        return sum(values) / len(values) if values else None

    return {"steps": len(steps), "rewards": {e: (v[0], v[-1]) for e, v in envs.items()}, "failures": failures,
            "rollouts": next((r["rollouts/total"] for r in reversed(steps) if "rollouts/total" in r), None),
            "step_time": mean_of("step_time"), "sync_seconds": mean_of("sync/seconds")}


def summary_table(run_dir: str | Path) -> str:
    s = summary(_load(Path(run_dir)))
    if not s["steps"]:
        return f"run summary ({run_dir}): no training step was logged"
    width = max([len("environment")] + [len(e) for e in s["rewards"]])
    lines = [f"run summary ({run_dir}): {s['steps']} steps", f"  {'environment':<{width}}  first reward  last reward"]
    for env, (first, last) in sorted(s["rewards"].items()):
        lines.append(f"  {env:<{width}}  {first:12.3f}  {last:11.3f}")
    total = sum(s["failures"].values())
    kinds = ", ".join(f"{k}={int(n)}" for k, n in sorted(s["failures"].items(), key=lambda kv: -kv[1]))
    of = f" of {int(s['rollouts'])} rollouts" if s["rollouts"] else ""
    lines.append(f"  failures: {int(total)}{of}" + (f" ({kinds})" if kinds else ""))
    for key, label in (("step_time", "mean step time"), ("sync_seconds", "mean sync time")):
        if s[key] is not None:
            lines.append(f"  {label}: {s[key]:.2f} s")
    return "\n".join(lines)


def finish_run(run_dir: str | Path, rank: int = 0) -> None:
    """End of `gymtrl train`, main process: the summary table on the terminal and the plots. Never
    raises: the run has finished, and a picture is not worth failing it for."""
    if rank != 0:
        return
    try:
        print(summary_table(run_dir), flush=True)
        written = plot_run(run_dir)
        if written:
            log.info("plots in %s", Path(run_dir) / "plots")
    except Exception as e:  # noqa: BLE001 - a finished run stays finished
        log.warning("could not write the run's summary or plots: %s: %s", type(e).__name__, e)
