#!/usr/bin/env python3
"""Build a tiny random Qwen2 policy and its tokenizer locally (no hub), for CPU runs and tests.

  python scripts/make_tiny_model.py OUT_DIR [--corpus FILE ...] [--vocab-size 2048] [--seed 0]

- Tokenizer: byte-level BPE trained here on a built-in corpus plus any --corpus files (pass the
  NeMo Gym rows you will train on, so long tool schemas compress to few tokens); Qwen2.5's special
  tokens; <tool_call>/<tool_response>/<think> tags as non-special tokens; the chat template is
  TRL's qwen2_5.jinja, which TRL recognises by exact match.
- Model: Qwen2 with random weights, hidden 64, 2 layers, head_dim 32 (vLLM's CPU attention supports
  head sizes >= 32 only), float32, tied embeddings, long context (the prompts of NeMo Gym's
  workplace_assistant rows carry 27 tool schemas).
Idempotent: an OUT_DIR that already holds a model built with the same arguments is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

BUILTIN_CORPUS = """\
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
What is 12 + 30? Reply with a number.<|im_end|>
<|im_start|>assistant
42<|im_end|>
<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris"}}
</tool_call>
<tool_response>
{"output": "The weather in Paris is cold."}
</tool_response>
# Tools

You may call one or more functions to assist with the user query.
You are provided with function signatures within <tools></tools> XML tags:
{"type": "function", "function": {"name": "email_reply_email", "description": "Replies to an email by its ID.",
 "parameters": {"type": "object", "properties": {"email_id": {"type": "string"}}, "required": ["email_id"]}}}
For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags
def add(a, b):
    return a + b
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 123 456 789 1000 2023 31415
"""


def build_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        padding_side="left",
        model_max_length=32768,
    )
    fast.add_tokens(["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"])
    import trl

    template = Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja"
    fast.chat_template = template.read_text()
    return fast


def build_model(tokenizer, seed: int, max_positions: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,  # head_dim = 64 / 2 = 32
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = None
    return model


def read_corpus(paths: list[str]) -> list[str]:
    texts = [BUILTIN_CORPUS] * 20
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if line.strip():
                texts.append(line)
    return texts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--corpus", action="append", default=[], help="extra text/JSONL to train the tokenizer on")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-positions", type=int, default=32768)
    args = ap.parse_args()

    out = Path(args.out_dir)
    corpus = read_corpus(args.corpus)
    key = hashlib.sha256(
        json.dumps([corpus, args.vocab_size, args.seed, args.max_positions]).encode()
    ).hexdigest()[:16]
    stamp = out / ".gymtrl_tiny_model"
    if stamp.exists() and stamp.read_text().strip() == key:
        print(f"tiny model already built at {out}")
        return 0

    tokenizer = build_tokenizer(corpus, args.vocab_size)
    model = build_model(tokenizer, args.seed, args.max_positions)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / ".gymtrl_tiny_model").write_text(key)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # the finished folder appears at once, never half-written
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny model: {n} parameters, vocab {len(tokenizer)}, written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
