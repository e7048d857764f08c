"""Peak memory and speed of `gymtrl prepare-data` as the input grows, beside a naive in-memory
preparation (read every row into a list, shuffle, write) measured in the same run.

    source scripts/env.sh && python bench/prepare_memory.py [--sizes 100000 1000000] [--out bench/results/prepare_memory.md]

Each measurement runs in a fresh process and reports that process's peak RSS (ru_maxrss). The
synthetic rows are NeMo Gym rows of about 400 bytes (a system and a user message, two tools,
a ground truth), 1% of them repeated, routed by agent_ref.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, random, resource, sys, time
mode, src, out = sys.argv[1], sys.argv[2], sys.argv[3]
start = time.monotonic()
if mode == "gymtrl":
    from gymtrl.config.schema import PrepareConfig, PrepareSource
    from gymtrl.prepare.pipeline import prepare
    prep = PrepareConfig(sources=[PrepareSource(path=src, validation_fraction=0.01)], output_dir=out,
                         progress_bar=False, gym_configs=[])
    report = prepare(prep)
    rows = report.totals["train"] + report.totals["validation"]
else:  # naive: everything in memory
    rows_ = [json.loads(line) for line in open(src)]
    random.Random(0).shuffle(rows_)
    with open(out + "/train.jsonl", "w") as f:
        for r in rows_:
            f.write(json.dumps(r) + "\n")
    rows = len(rows_)
print(json.dumps({"rows": rows, "seconds": time.monotonic() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def synthetic_rows(path: Path, n: int) -> None:
    rng = random.Random(0)
    tools = [{"type": "function", "name": f"tool_{k}", "description": "does a thing",
              "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}} for k in range(2)]
    with path.open("w") as f:
        for i in range(n):
            j = i if rng.random() > 0.01 else rng.randrange(max(i, 1))  # ~1% repeats
            row = {"responses_create_params": {"input": [
                {"role": "system", "content": "You are a careful assistant."},
                {"role": "user", "content": f"Task {j}: combine {j * 7 % 1000} and {j * 13 % 1000} with the tools."}],
                "tools": tools},
                "ground_truth": [{"name": "tool_0", "arguments": json.dumps({"x": str(j)})}],
                "agent_ref": {"type": "responses_api_agents", "name": "synthetic_simple_agent"}}
            f.write(json.dumps(row) + "\n")


def measure(mode: str, src: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args()
    lines = ["| rows | input MB | gymtrl peak RSS MB | naive peak RSS MB | gymtrl s | naive s | gymtrl rows/s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            src = Path(tmp) / f"rows_{n}.jsonl"
            synthetic_rows(src, n)
            g = measure("gymtrl", src, Path(tmp) / f"g{n}")
            naive = measure("naive", src, Path(tmp) / f"n{n}")
            mb = src.stat().st_size / 2**20
            results.append((n, mb, g, naive))
            lines.append(f"| {n:,} | {mb:.0f} | {g['peak_rss_mb']:.0f} | {naive['peak_rss_mb']:.0f} | "
                         f"{g['seconds']:.1f} | {naive['seconds']:.1f} | {n / g['seconds']:,.0f} |")
            src.unlink()
    if len(results) >= 2:
        (n0, _, g0, v0), (n1, _, g1, v1) = results[0], results[-1]
        per_row = (g1["peak_rss_mb"] - g0["peak_rss_mb"]) * 2**20 / (n1 - n0)
        lines.append("")
        lines.append(f"From {n0:,} to {n1:,} rows, gymtrl's peak RSS grew {g1['peak_rss_mb'] / g0['peak_rss_mb']:.2f}x "
                     f"({per_row:.0f} bytes per added row); the naive preparation's grew "
                     f"{v1['peak_rss_mb'] / v0['peak_rss_mb']:.2f}x.")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(f"# prepare-data memory and speed ({os.cpu_count()} CPU cores, "
                                  f"{time.strftime('%Y-%m-%d')}; `python bench/prepare_memory.py`)\n\n{table}\n")


if __name__ == "__main__":
    main()
