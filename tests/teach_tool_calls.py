#!/usr/bin/env python3
"""Teach a tiny model the Hermes tool-call format (for multi-turn tests and demos on CPU).

  python tests/teach_tool_calls.py MODEL_DIR OUT_DIR --rows ROWS.jsonl [--rows MORE.jsonl] [--steps 150]

A random model never emits a well-formed tool call, so NeMo Gym never runs a tool for it. This
fine-tunes it briefly on each row's conversation followed by a scripted episode: the assistant calls
the row's first tool (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`), the tool answers,
the assistant replies "Done.". Loss is on the assistant turns only. The result keeps the tokenizer
and architecture of MODEL_DIR, so its weights can be pushed to a vLLM server serving MODEL_DIR.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def scripted_episode(row: dict) -> list[dict]:
    params = row["responses_create_params"]
    messages = params["input"] if isinstance(params["input"], list) else [{"role": "user", "content": params["input"]}]
    tool = params["tools"][0]
    arg_names = list(tool.get("parameters", {}).get("properties", {}))
    synonyms = row.get("expected_synonyms") or ["value"]
    arguments = {name: str(synonyms[0]) for name in arg_names[:1]}
    return [
        *messages,
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": tool["name"], "arguments": arguments}}]},
        {"role": "tool", "content": json.dumps({"synonym_value": 7})},
        {"role": "assistant", "content": "Done."},
    ]


def chat_tools(params: dict) -> list[dict]:
    return [{"type": "function", "function": {k: v for k, v in t.items() if k in ("name", "description", "parameters")}}
            for t in params.get("tools", [])]


def encode(tokenizer, row: dict):
    """Token ids of the whole episode and a 0/1 mask of the assistant tokens to learn."""
    episode = scripted_episode(row)
    tools = chat_tools(row["responses_create_params"])
    ids: list[int] = []
    mask: list[int] = []
    for i in range(1, len(episode) + 1):  # prefix renders: each message's own tokens are the delta
        text = tokenizer.apply_chat_template(episode[:i], tools=tools, tokenize=False)
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        delta = full[len(ids):]
        assert full[: len(ids)] == ids, "chat template is not prefix-stable"
        learn = episode[i - 1]["role"] == "assistant"
        # The generation prompt ("<|im_start|>assistant\n") is template glue, not model output.
        header = len(tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]) if learn else 0
        ids += delta
        mask += [0] * header + [1 if learn else 0] * (len(delta) - header)
    return ids, mask


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--rows", required=True, action="append", help="NeMo Gym JSONL rows whose tools to call (repeatable)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the larger shapes")
    ap.add_argument("--target-loss", type=float, default=None,
                    help="stop early once the mean loss of the last 20 steps is below this")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).to(args.device)
    rows = [json.loads(l) for path in args.rows for l in Path(path).read_text().splitlines() if l.strip()]
    data = [encode(tokenizer, r) for r in rows]
    print(f"{len(data)} episodes, longest {max(len(ids) for ids, _ in data)} tokens", flush=True)
    if args.device != "cpu":  # long tool prompts: bf16 attention kernels and recomputed activations
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    recent: list[float] = []
    for step in range(args.steps):
        ids, mask = data[step % len(data)]
        x = torch.tensor([ids], device=args.device)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device != "cpu"):
            logits = model(input_ids=x).logits[0, :-1].float()
        target = x[0, 1:]
        m = torch.tensor(mask[1:], dtype=torch.float32, device=args.device)
        loss = (torch.nn.functional.cross_entropy(logits, target, reduction="none") * m).sum() / m.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        recent = (recent + [loss.item()])[-20:]
        done = args.target_loss is not None and len(recent) == 20 and sum(recent) / 20 < args.target_loss
        if step % 25 == 0 or step == args.steps - 1 or done:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
        if done:
            break
    out = Path(args.out_dir)
    shutil.rmtree(out, ignore_errors=True)
    model.to("cpu").save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
