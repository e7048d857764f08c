"""Does one-step-off hurt learning? The same config trained synchronously (rollout.max_staleness=0)
and one-step-off (=1), several seeds each, against one set of servers held up by `gymtrl serve`.

    source scripts/env.sh
    python bench/staleness_learning.py --config configs/quickstart.yaml --seeds 0 1 2 \
        --work runs/staleness-learning --out bench/results/staleness-learning-cpu

For every run: the reward of the environment named by --env over the first and the last --k steps
(the quickstart test's measure), that rise in standard errors of "no learning" (the first k steps'
spread), the median step time and the trainer's median wait for its batch. Writes <out>/README.md
(the table) and <out>/<k>-seed<s>.jsonl (each run's metrics.jsonl, unchanged).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gymtrl.atomic import write_text_atomic
from gymtrl.evaluation.stats import curve_rise
from gymtrl.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent


def start_servers(config: str, ready: Path, log: Path, overrides: list[str]) -> subprocess.Popen:
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "gymtrl.cli", "serve", "--config", config, "--host", "127.0.0.1",
                             "--ready-file", str(ready), *overrides],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 900
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"gymtrl serve did not come up; see {log}")
        time.sleep(2)
    return proc


def train(config: str, ready: Path, out: Path, seed: int, staleness: int, overrides: list[str], log: Path) -> list[dict]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "gymtrl.cli", "train", "--config", config, "--servers", str(ready),
           f"output.dir={out}", f"grpo.seed={seed}", f"rollout.max_staleness={staleness}", "grpo.save_strategy=no",
           *overrides]
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"run seed={seed} max_staleness={staleness} failed (rc {rc}); see {log}")
    return read_metrics(out / "metrics.jsonl")


def summarize(metrics: list[dict], env: str, k: int) -> dict:
    steps = [m for m in metrics if "reward" in m]
    curve = [m[f"env/{env}/reward"] for m in steps if f"env/{env}/reward" in m]
    rise, z = curve_rise(curve, k)
    return {"steps": len(steps), "first": statistics.mean(curve[:k]), "last": statistics.mean(curve[-k:]),
            "rise": rise, "z": z,
            "step_s": statistics.median(m["step_time"] for m in steps[1:] if "step_time" in m),
            "wait_s": statistics.median(m["rollout/wait_seconds"] for m in steps[1:]),
            "failures": sum(m.get("failures/total", 0) for m in steps[-1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--env", default="digit_reply_simple_agent", help="the environment whose reward is compared")
    ap.add_argument("--k", type=int, default=10, help="steps averaged at each end of a run")
    ap.add_argument("--work", default="runs/staleness-learning")
    ap.add_argument("--out", default="bench/results/staleness-learning-cpu")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for both the servers and every run")
    args = ap.parse_args()

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    ready = work / "servers.json"
    servers = start_servers(args.config, ready, work / "serve.log", args.overrides)
    rows = []
    try:
        for seed in args.seeds:
            for k in args.staleness:
                name = f"{k}-seed{seed}"
                metrics = train(args.config, ready, work / name, seed, k, args.overrides, work / f"{name}.log")
                shutil.copyfile(work / name / "metrics.jsonl", out / f"{name}.jsonl")
                rows.append((k, seed, summarize(metrics, args.env, args.k)))
                print(name, rows[-1][2], flush=True)
    finally:
        os.killpg(servers.pid, signal.SIGTERM)
        servers.wait(timeout=120)

    lines = [f"`python bench/staleness_learning.py --config {args.config} --seeds {' '.join(map(str, args.seeds))}"
             f"{' ' + ' '.join(args.overrides) if args.overrides else ''}`, one machine, one set of servers "
             f"(`gymtrl serve`) for every run, runs one after another.",
             "",
             f"Reward of `{args.env}`: mean of the first and the last {args.k} steps; z is the rise in standard errors "
             f"of \"no learning\" (the first {args.k} steps' spread), as in the quickstart test.",
             "",
             "| max_staleness | seed | steps | first | last | rise | z | median step s | median wait s | failures |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for k, seed, s in rows:
        lines.append(f"| {k} | {seed} | {s['steps']} | {s['first']:.3f} | {s['last']:.3f} | {s['rise']:.3f} | {s['z']:.1f} | "
                     f"{s['step_s']:.2f} | {s['wait_s']:.2f} | {s['failures']:.0f} |")
    lines += ["", "| max_staleness | runs | last (mean ± sd over seeds) | rise (mean ± sd) | median step s (mean) |",
              "|---|---|---|---|---|"]
    for k in args.staleness:
        got = [s for kk, _, s in rows if kk == k]
        sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
        lines.append(f"| {k} | {len(got)} | {statistics.mean(s['last'] for s in got):.3f} ± {sd([s['last'] for s in got]):.3f} | "
                     f"{statistics.mean(s['rise'] for s in got):.3f} ± {sd([s['rise'] for s in got]):.3f} | "
                     f"{statistics.mean(s['step_s'] for s in got):.2f} |")
    write_text_atomic(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
