"""Baseline of a model on the price_lookup environment, through gymtrl's real servers.

Runs validation rows through the NeMo Gym agent (RolloutEngine, the training rollout path) against
servers already up (`gymtrl serve --config configs/envs/price_lookup.yaml --ready-file F`), and
reports: mean reward and its standard error, the share of episodes with at least one parsed tool
call, model calls (turns) per episode, exact answers, and episodes by outcome kind.

    python bench/price_lookup_baseline.py --servers F --rows .../validation.jsonl --n 64 \
        --out bench/results/price_lookup_baseline-qwen0.5b.json

Each (row, sample) gets a fixed sampling seed (vLLM `seed` through metadata.extra_body), so a rerun
draws the same samples from the same model.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import zlib
from collections import Counter
from pathlib import Path

from gymtrl.failures import FailureBound, FailureLedger
from gymtrl.gym.discovery import discover
from gymtrl.rollout.engine import RolloutEngine, SamplingParams


def with_seed(row: dict, seed: int) -> dict:
    params = dict(row["responses_create_params"])
    metadata = dict(params.get("metadata") or {})
    metadata["extra_body"] = json.dumps({**json.loads(metadata.get("extra_body") or "{}"), "seed": seed})
    return {**row, "responses_create_params": {**params, "metadata": metadata}}


def final_text(output: list[dict]) -> str | None:
    text = None
    for item in output:
        if item.get("type") == "message":
            text = "".join(p.get("text", "") or "" for p in item.get("content", []))
    return text


def outcome_kind(reply: dict) -> str:
    """What an episode came to, from its verify reply (first matching kind)."""
    output = (reply.get("response") or {}).get("output") or []
    calls = [o for o in output if o.get("type") == "function_call"]
    text = final_text(output)
    if reply.get("correct") and len(reply["looked_up"]) == len(reply["needed"]):
        return "solved"
    if reply.get("correct"):
        return "right_total_items_missed"
    if not calls:
        if text and re.search(r'"name"\s*:\s*"(get_price|calculate)"', text):
            return "no_parsed_call_json_in_text"
        return "no_parsed_call_other_text"
    if text is None:
        return "no_final_answer"
    if len(reply["looked_up"]) < len(reply["needed"]):
        return "items_missed_wrong_total"
    return "all_items_wrong_total"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--servers", help="the ready file `gymtrl serve --ready-file` wrote")
    p.add_argument("--head-url", help="NeMo Gym head server (instead of --servers)")
    p.add_argument("--rows", required=True)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=128, help="per model call")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    head = args.head_url or json.loads(Path(args.servers).read_text())["gym_head_server_url"]
    rows = [json.loads(l) for l in Path(args.rows).read_text().splitlines() if l.strip()][: args.n]
    rows = [with_seed(r, zlib.crc32(f"{args.seed}:{r['id']}".encode()) & 0x7FFFFFFF) for r in rows]
    engine = RolloutEngine(discover(head), SamplingParams(args.temperature, 1.0, args.max_tokens),
                           FailureLedger(FailureBound(1.0, 1000, 1)), args.concurrency, 1800.0, 0, 0.5)
    t0 = time.time()
    try:
        outcomes = engine.run(rows)
    finally:
        engine.close()
    wall = time.time() - t0
    rewards, kinds, episodes = [], Counter(), []
    for row, o in zip(rows, outcomes):
        ep = {"id": row["id"], "total": row["total"], "failure": o.failure.value if o.failure else None,
              "detail": o.detail[:300], "model_calls": o.model_calls, "latency_s": round(o.latency_s, 1)}
        if o.failure is None:
            reply = o.reply
            output = (reply.get("response") or {}).get("output") or []
            ep.update(reward=o.reward, correct=reply.get("correct"), looked_up=reply.get("looked_up"),
                      answer=reply.get("answer"), kind=outcome_kind(reply),
                      parsed_calls=sum(1 for x in output if x.get("type") == "function_call"),
                      final_text=(final_text(output) or "")[:400],
                      calls=[(x.get("name"), x.get("arguments")) for x in output if x.get("type") == "function_call"])
            rewards.append(o.reward)
            kinds[ep["kind"]] += 1
        else:
            kinds[f"rollout_failure:{o.failure.value}"] += 1
        episodes.append(ep)
    ok = [e for e in episodes if e["failure"] is None]
    n = len(rewards)
    mean = sum(rewards) / n if n else float("nan")
    sd = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1)) if n > 1 else float("nan")
    summary = {
        "label": args.label, "rows": args.rows, "episodes": len(rows), "scored": n,
        "temperature": args.temperature, "max_tokens_per_call": args.max_tokens, "seed": args.seed,
        "mean_reward": mean, "reward_se": sd / math.sqrt(n) if n else float("nan"),
        "correct_share": sum(bool(e["correct"]) for e in ok) / n if n else float("nan"),
        "share_with_parsed_tool_call": sum(e["parsed_calls"] > 0 for e in ok) / n if n else float("nan"),
        "model_calls_per_episode": sum(e["model_calls"] for e in ok) / n if n else float("nan"),
        "outcomes": dict(kinds.most_common()), "wall_s": round(wall, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "episodes": episodes}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
