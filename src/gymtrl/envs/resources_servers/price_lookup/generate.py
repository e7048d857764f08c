"""Generate price_lookup rows (see app.py for the environment and its reward rule).

Each task comes from one integer seed: two different items, a quantity of each (1-5) and a hidden
unit price of each (2-12 whole dollars), asked in one of a few phrasings. Train rows use seeds
0..n-1, validation rows VALIDATION_SEED_BASE + 0..m-1, so the two never share a task.

    python src/gymtrl/envs/resources_servers/price_lookup/generate.py --generate           # the committed data/
    python .../generate.py --generate --train 10000 --validation 500 --out-dir data/price_lookup

Only the standard library: it runs in any venv, and tests import `make_row` from this file.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

VALIDATION_SEED_BASE = 1_000_000
AGENT = "price_lookup_simple_agent"

ITEMS = {  # singular -> plural
    "apple": "apples", "pear": "pears", "banana": "bananas", "orange": "oranges", "lemon": "lemons",
    "mango": "mangoes", "peach": "peaches", "plum": "plums", "kiwi": "kiwis", "melon": "melons",
    "onion": "onions", "carrot": "carrots", "potato": "potatoes", "tomato": "tomatoes", "egg": "eggs",
    "cucumber": "cucumbers", "avocado": "avocados", "lime": "limes", "coconut": "coconuts", "pepper": "peppers",
}

QUESTIONS = [
    "What do {a} and {b} cost in total?",
    "How much do I pay for {a} and {b}?",
    "I want to buy {a} and {b}. What is the total price?",
    "What is the total cost of {a} and {b}?",
]

SYSTEM = (
    "You are a shop assistant. You do not know any prices: get each item's unit price with the get_price "
    "tool, one call per item. Then reply with the total cost in dollars as a number.\n"
    "Call a tool by writing its call inside <tool_call></tool_call> tags, for example:\n"
    '<tool_call>\n{"name": "get_price", "arguments": {"item": "apple"}}\n</tool_call>'
)

# Only get_price: offered a calculate tool (its description showing "3*4 + 2*5"), Qwen2.5-Coder-0.5B
# called calculate with that made-up expression in nearly every episode and never get_price (the
# server still serves /calculate for rows that offer it).
TOOLS = [
    {"type": "function", "name": "get_price", "description": "The unit price in dollars of one item.",
     "parameters": {"type": "object", "properties": {"item": {"type": "string", "description": "The item, e.g. apple"}},
                    "required": ["item"], "additionalProperties": False},
     "strict": False},
]


def phrase(name: str, quantity: int) -> str:
    return f"{quantity} {name if quantity == 1 else ITEMS[name]}"


def make_row(seed: int, split: str = "train") -> dict:
    """The task of `seed` as a NeMo Gym row: the prompt and tools, and the hidden items and total."""
    rng = random.Random(f"price_lookup:{seed}")
    names = rng.sample(sorted(ITEMS), 2)
    items = [{"name": n, "quantity": rng.randint(1, 5), "price": rng.randint(2, 12)} for n in names]
    question = rng.choice(QUESTIONS).format(a=phrase(names[0], items[0]["quantity"]),
                                            b=phrase(names[1], items[1]["quantity"]))
    return {
        "id": f"price_lookup-{split}-{seed}",
        "seed": seed,
        "responses_create_params": {
            "input": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            "tools": TOOLS,
        },
        "agent_ref": {"type": "responses_api_agents", "name": AGENT},
        "items": items,
        "total": sum(i["quantity"] * i["price"] for i in items),
    }


def train_seeds(n: int) -> range:
    if n > VALIDATION_SEED_BASE:
        raise ValueError(f"at most {VALIDATION_SEED_BASE} train rows (their seeds would reach validation's)")
    return range(n)


def validation_seeds(n: int) -> range:
    return range(VALIDATION_SEED_BASE, VALIDATION_SEED_BASE + n)


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--generate", action="store_true", help="write train.jsonl and validation.jsonl")
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--validation", type=int, default=64)
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "data")
    args = p.parse_args(argv)
    if not args.generate:
        p.error("nothing to do: pass --generate")
    write(args.out_dir / "train.jsonl", [make_row(s, "train") for s in train_seeds(args.train)])
    write(args.out_dir / "validation.jsonl", [make_row(s, "validation") for s in validation_seeds(args.validation)])
    print(f"wrote {args.train} train and {args.validation} validation rows to {args.out_dir}")


if __name__ == "__main__":
    main()
