"""What gymtrl's prefix correction spends in Python on the ids a later-turn request carries.

    python bench/splice_cost.py [--prompt-ids 9700] [--turns 2 3 4] [--repeats 50]

In training mode NeMo Gym's vllm_model sends every earlier assistant message back with its
`prompt_token_ids` and `generation_token_ids`, so at turn k a request carries k - 1 whole prompts of
ids. The plugin (src/gymtrl/vllm_plugin/plugin.py) copies the messages (`plain`) and reads the anchor
(`find_anchor`, which checks every id) on vLLM's one API-server thread, before its two chat renders.
This times both on synthetic requests of the GPU runs' size (9.7k-id prompts, 60 generated ids and 40
tool-result ids a turn), beside the element-by-element versions they replaced (written out below as
the baseline). Writes bench/results/splice_cost.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from gymtrl.vllm_plugin.splice import find_anchor, plain  # noqa: E402


# ---- the baseline: the element-by-element versions (gymtrl before 2026-11-27) ----------------------
def plain_per_element(value):
    if hasattr(value, "model_dump"):
        return plain_per_element(value.model_dump())
    if isinstance(value, dict):
        return {k: plain_per_element(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_per_element(v) for v in value]
    if isinstance(value, (str, bytes, int, float, bool)) or value is None:
        return value
    if isinstance(value, Iterable):
        return [plain_per_element(v) for v in value]
    return value


def ids_per_element(message: dict, key: str) -> list[int]:
    value = message.get(key)
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise ValueError(key)
    return value


def anchor_ids_per_element(messages: list) -> list[int]:
    chain: list[list[int]] = []
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") == "assistant" and m.get("prompt_token_ids") is not None):
            continue
        prompt, generation = ids_per_element(m, "prompt_token_ids"), ids_per_element(m, "generation_token_ids")
        if chain and prompt[: len(chain[-1])] != chain[-1]:
            raise ValueError("inconsistent_history_ids")
        chain.append(prompt + generation)
    return chain[-1]


def request(turn: int, prompt_ids: int, rng: random.Random) -> list[dict]:
    """The messages of turn `turn`'s request: turn - 1 assistant messages, each with its call's ids."""
    ids = [rng.randrange(151_000) for _ in range(prompt_ids)]
    messages = [{"role": "system", "content": "tools ..."}, {"role": "user", "content": "Find Ana's email."}]
    for _ in range(turn - 1):
        generated = [rng.randrange(151_000) for _ in range(60)]
        messages.append({"role": "assistant", "content": "", "prompt_token_ids": list(ids), "generation_token_ids": generated,
                         "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]})
        messages.append({"role": "tool", "content": "ana@example.com", "tool_call_id": "c"})
        ids = ids + generated + [rng.randrange(151_000) for _ in range(40)]
    return messages


def ms(fn, arg, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-ids", type=int, default=9700)
    ap.add_argument("--turns", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/splice_cost.md")
    a = ap.parse_args()
    rng = random.Random(0)
    lines = ["# Prefix correction: Python time on a later-turn request's ids", "",
             f"`{' '.join(['python bench/splice_cost.py', *sys.argv[1:]])}` on {datetime.date.today()}, "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}. "
             f"Prompts of {a.prompt_ids:,} ids; median of {a.repeats} runs each.", "",
             "| turn | ids in the request | copy (`plain`) ms | element by element ms | anchor (`find_anchor`) ms | "
             "element by element ms | both, saved ms |", "|---|---|---|---|---|---|---|"]
    for turn in a.turns:
        messages = request(turn, a.prompt_ids, rng)
        assert plain(messages) == plain_per_element(messages)
        assert find_anchor(messages).token_ids == anchor_ids_per_element(messages)
        n = sum(len(m.get("prompt_token_ids", [])) + len(m.get("generation_token_ids", [])) for m in messages)
        copy, copy0 = ms(plain, messages, a.repeats), ms(plain_per_element, messages, a.repeats)
        anchor, anchor0 = ms(find_anchor, messages, a.repeats), ms(anchor_ids_per_element, messages, a.repeats)
        lines.append(f"| {turn} | {n:,} | {copy:.2f} | {copy0:.2f} | {anchor:.2f} | {anchor0:.2f} | "
                     f"{copy0 + anchor0 - copy - anchor:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    a.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
