"""Synchronous against one-step-off rollouts, from the runs bench/device/device_real.sh `staleness` brings
back (one metrics.jsonl per run, named <max_staleness>-r<round>.jsonl): per setting, over every step >=
--from-step of every round,

- step time (TRL's `step_time`: the whole optimizer step, the wait for its batch included): median,
  10th-90th percentile and the number of steps; steps per second from the median, and its ratio to the
  synchronous setting;
- the trainer's idle fraction: its wait for the batch over the step time (`rollout/wait_seconds`);
- the generation side's idle fraction: 1 - the batch's generation time over the step time
  (`rollout/batch_seconds`: first request to last outcome; vLLM and Gym have nothing to do outside it);
- the batch's lag in optimizer steps, the importance-sampling ratio and the fraction of tokens masked.

    python bench/staleness_speed.py runs/*.jsonl --from-step 3 --device "NVIDIA H200" --out table.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    i = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[i]


def steps_of(path: Path, from_step: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "reward" in r and r.get("step", 0) >= from_step]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--from-step", type=int, default=3,
                    help="first step measured (step 1 has nothing generated ahead, step 2 is the first overlapped)")
    ap.add_argument("--device", default="")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    by_k: dict[str, list[dict]] = {}
    rounds: dict[str, list[str]] = {}
    for path in sorted(args.runs):
        k = path.stem.split("-")[0]
        by_k.setdefault(k, []).extend(steps_of(path, args.from_step))
        rounds.setdefault(k, []).append(path.stem)
    lines = [f"Device: {args.device or 'unknown'}. Steps >= {args.from_step} of every round "
             f"({', '.join(f'{k}: {len(v)} runs' for k, v in sorted(rounds.items()))}); p10-p90 in brackets.", "",
             "| max_staleness | steps | step s, median [p10-p90] | steps/s | vs synchronous | trainer idle | "
             "generation idle | lag | IS ratio | masked |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = None
    for k in sorted(by_k):
        steps = by_k[k]
        if not steps:
            continue
        t = [s["step_time"] for s in steps]
        med = statistics.median(t)
        base = base or med
        trainer_idle = statistics.median(s["rollout/wait_seconds"] / s["step_time"] for s in steps)
        gen_idle = statistics.median(max(0.0, 1 - s["rollout/batch_seconds"] / s["step_time"]) for s in steps)
        lag = statistics.mean(s.get("rollout/policy_lag_steps", 0.0) for s in steps)
        ratio = statistics.mean(s.get("sampling/importance_sampling_ratio/mean", 1.0) for s in steps)
        masked = statistics.mean(s.get("sampler_gap/masked_fraction", 0.0) for s in steps)
        lines.append(f"| {k} | {len(steps)} | {med:.2f} [{pct(t, 0.1):.2f}-{pct(t, 0.9):.2f}] | {1 / med:.3f} | "
                     f"{base / med:.2f}x | {trainer_idle:.0%} | {gen_idle:.0%} | {lag:.2f} | {ratio:.4f} | {masked:.4f} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
