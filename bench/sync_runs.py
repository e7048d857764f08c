"""Tables of `gymtrl train` runs side by side, from the folders bench/device/device_train.sh brings back
(metrics.jsonl, and profile.jsonl with TRL's timed blocks): sync and step medians, where each
sync's time goes, and every run's verify result.

    python bench/sync_runs.py "TRL's nccl=runs/nccl" "broadcast=runs/broadcast" [--from-step 3] [--out FILE.md]

The first run is the baseline of the ratio column. Medians are over steps >= --from-step (step 1
serves the weights vLLM loaded; step 2's push forms the NCCL group).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# gymtrl's own sync phases (sync/<phase>_seconds) and TRL's client calls timed by device_train.sh
PHASES = [
    ("sync/pack_seconds", "pack (copy into the bucket)"),
    ("sync/send_seconds", "send: `/collective_rpc` + broadcast, until every worker has loaded"),
    ("sync/recv_seconds", "of which workers' receive"),
    ("sync/load_seconds", "of which workers' `load_weights`"),
    ("sync/reset_seconds", "prefix-cache reset"),
    ("vllm_client.update_named_params", "TRL `update_named_params` (HTTP + vLLM's layerwise reload)"),
    ("nccl.trainer_send_weights", "of which the NCCL send"),
    ("vllm_client._start_weight_update", "TRL `_start_weight_update`"),
    ("vllm_client._finish_weight_update", "TRL `_finish_weight_update`"),
    ("vllm_client.reset_prefix_cache", "TRL `reset_prefix_cache`"),
]


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(run: Path, from_step: int) -> dict:
    steps = [r for r in read_jsonl(run / "metrics.jsonl") if "reward" in r]
    measured = [r for r in steps if r["step"] >= from_step]
    # TRL's timers have no step: they come in the order of the syncs, one per step
    profile = read_jsonl(run / "profile.jsonl")
    checked = [r for r in steps if r.get("sync/verify_max_logprob_diff") is not None and r.get("sync/verify_bound")]
    out = {"steps": len(steps), "verified": len(checked),
           "max_diff": max((r["sync/verify_max_logprob_diff"] for r in checked), default=None),
           "worst_margin": max((r["sync/verify_max_logprob_diff"] / r["sync/verify_bound"] for r in checked), default=None),
           "failure_rate": max((r.get("rollout/failure_rate") or 0 for r in steps), default=None),
           "runtime": next((r["train_runtime"] for r in read_jsonl(run / "metrics.jsonl") if "train_runtime" in r), None),
           "first_push": next((r["sync/seconds"] for r in steps if r.get("sync/seconds")), None)}
    for key in ("sync/seconds", "step_time", "rollout/batch_seconds"):
        out[key] = median([r[key] for r in measured if r.get(key) is not None])
    for key, _ in PHASES:
        if key.startswith("sync/"):
            out[key] = median([r[key] for r in measured if r.get(key) is not None])
        else:
            calls = [r["seconds"] for r in profile if r["name"] == key]
            out[key] = median(calls[from_step - 1:]) if calls else None
    return out


def fmt(v: float | None, digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def table(runs: list[tuple[str, dict]]) -> list[str]:
    base = runs[0][1]
    head = "| median over measured steps | " + " | ".join(n for n, _ in runs) + " | " + \
        " | ".join(f"{n} / {runs[0][0]}" for n, _ in runs[1:]) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(runs) - 1)]
    for key, label in [("sync/seconds", "weight sync, s"), ("step_time", "step, s"),
                       ("rollout/batch_seconds", "rollout batch, s"), ("runtime", "train_runtime, s")]:
        ratios = [fmt(s[key] / base[key], 2) if s[key] and base[key] else "" for _, s in runs[1:]]
        lines.append(f"| {label} | " + " | ".join(fmt(s[key]) for _, s in runs) + " | " + " | ".join(ratios) + " |")
    lines.append("| first push, s | " + " | ".join(fmt(s["first_push"]) for _, s in runs) + " |" + " |" * (len(runs) - 1))
    lines += ["", "Where the sync's time goes (medians, s):", "",
              "| phase | " + " | ".join(n for n, _ in runs) + " |", "|---|" + "---|" * len(runs)]
    for key, label in PHASES:
        if any(s[key] is not None for _, s in runs):
            lines.append(f"| {label} | " + " | ".join(fmt(s[key], 4) for _, s in runs) + " |")
    lines += ["", "| run | steps | syncs verified | max abs logprob diff | largest diff / its step's bound | "
              "largest rollout failure rate |", "|---|---|---|---|---|---|"]
    for name, s in runs:
        lines.append(f"| {name} | {s['steps']} | {s['verified']} | {fmt(s['max_diff'], 4)} | {fmt(s['worst_margin'], 2)} "
                     f"| {fmt(s['failure_rate'], 3)} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_DIR, the baseline first")
    ap.add_argument("--from-step", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runs = []
    for spec in args.runs:
        label, _, path = spec.partition("=")
        if not path or not Path(path, "metrics.jsonl").exists():
            raise SystemExit(f"sync_runs.py: '{spec}': expected LABEL=RUN_DIR with a metrics.jsonl in it")
        runs.append((label, summarize(Path(path), args.from_step)))
    text = "\n".join(table(runs)) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
