"""gym.launch.copies: rollout throughput through real NeMo Gym servers with 1, 2, ... copies of each.

    source scripts/env.sh && python bench/gym_copies.py [--copies 1 2 4] [--rollouts 1000]

Each NeMo Gym server is one Python process, so when generation is fast the agent, the model adapter
and the resources server become the limit. Generation here is FakeFastGenerationBackend (a fake,
named as one: it answers at once in vLLM's token-data shape), so that only gymtrl's client and
NeMo Gym's servers are measured. For each number of copies, in one run: NeMo Gym 0.7 launched as
`gymtrl train` launches it (simple_agent, vllm_model in training mode, gymtrl's digit_reply), a
warm-up, then `--repeats` batches of `--rollouts` rollouts with all of them in flight; the table
gives the median rollouts/s and the Gym processes' CPU per rollout. Writes bench/results/gym_copies.md.
Every process (client, fake backend, Gym) shares the machine's cores: the ratio a machine can reach
is bounded by its free cores.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rollout_load import REPO, Backend, descendants, free_port, run_batch, versions, write_config  # noqa: E402

from gymtrl.config.load import load_config  # noqa: E402
from gymtrl.gym.discovery import discover, wait_ready  # noqa: E402
from gymtrl.servers.gym import gym_command  # noqa: E402
from gymtrl.servers.process import ManagedProcess  # noqa: E402


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of `pids` (from /proc/<pid>/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return total


def measure(tmp: Path, backend_port: int, copies: int, n: int, repeats: int, timeout_s: float) -> dict:
    cfg = load_config(write_config(tmp, backend_port, free_port(), n), [f"gym.launch.copies={copies}"])
    gym = ManagedProcess("NeMo Gym servers", gym_command(cfg, tmp / f"gym-logs-{copies}"), tmp / f"gym-{copies}.log")
    gym.start()
    try:
        wait_ready(cfg.gym.head_server_url, 300, is_alive=gym.alive)
        topo = discover(cfg.gym.head_server_url)
        assert len(topo.urls_of("digit_reply_simple_agent")) == copies
        pids = descendants(gym.proc.pid)
        run_batch(topo, 64, 64, timeout_s)  # warm-up: first connections inside Gym
        runs = []
        for _ in range(repeats):
            cpu0 = cpu_seconds(pids)
            r = run_batch(topo, n, n, timeout_s)
            r["gym_cpu_ms"] = (cpu_seconds(pids) - cpu0) * 1000 / n
            runs.append(r)
            print(f"copies={copies}: {r['ok']}/{n} ok in {r['wall_s']:.2f}s, gym CPU {r['gym_cpu_ms']:.2f} ms/rollout",
                  flush=True)
    finally:
        gym.stop()
    walls = [r["wall_s"] for r in runs]
    return {"copies": copies, "ok": sum(r["ok"] for r in runs), "total": n * repeats,
            "wall_s": statistics.median(walls), "per_s": n / statistics.median(walls),
            "gym_cpu_ms": statistics.median(r["gym_cpu_ms"] for r in runs),
            "client_cpu_ms": statistics.median(r["cpu_ms"] for r in runs)}


def report(args, rows: list[dict]) -> str:
    base = rows[0]["per_s"]
    lines = [
        "# NeMo Gym server copies (`gym.launch.copies`)",
        "",
        f"`python bench/gym_copies.py --copies {' '.join(map(str, args.copies))} --rollouts {args.rollouts} "
        f"--repeats {args.repeats}` on {datetime.date.today()}, {os.cpu_count()} CPU cores, {versions()}.",
        "Generation is FakeFastGenerationBackend (a fake, named as one: it answers at once), so the rollout path",
        f"is the whole cost. Batches of {args.rollouts} digit_reply rollouts, all in flight; medians of "
        f"{args.repeats} batches.",
        "",
        "| copies | ok | batch wall | rollouts/s | vs 1 copy | Gym CPU ms/rollout | gymtrl CPU ms/rollout |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['copies']} | {r['ok']}/{r['total']} | {r['wall_s']:.2f} s | {r['per_s']:.0f} | "
                     f"{r['per_s'] / base:.2f}x | {r['gym_cpu_ms']:.2f} | {r['client_cpu_ms']:.2f} |")
    lines += ["", "The client, the fake backend and every Gym process share these cores; a copy can only add "
              "throughput while a core is free for it.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rollouts", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/gym_copies.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        with Backend(tmp, "backend", 0.0) as backend:
            rows = [measure(tmp, backend.port, k, args.rollouts, args.repeats, args.timeout_s) for k in args.copies]
    text = report(args, rows)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
