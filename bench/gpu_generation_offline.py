"""vLLM's offline engine (`LLM.generate`, no HTTP, no server) on the prompts of bench/gpu_generation.py:
the physical limit that the server paths and gymtrl's rollout path are compared with.

    python bench/gpu_generation_offline.py --model DIR [--shape 256x256] [--rounds 5]
                                           [--gpu-memory-utilization 0.3] [--json-out F]

Rows: gymtrl's single-turn digit_reply rows (64 prompts) cycled to N, rendered with the model's chat
template (generation prompt added) into token ids; T output tokens each with `ignore_eos`, temperature
1, one sampled-token logprob per token (as NeMo Gym's training model server asks for), one
`LLM.generate` call of all N per round, after one warm-up. Prints output tokens/s per round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = REPO / "src/gymtrl/envs/resources_servers/digit_reply/data/train.jsonl"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--shape", default="256x256", help="NxT: N prompts, T output tokens each")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args(argv)
    n, t = (int(x) for x in a.shape.lower().split("x"))

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams, TokensPrompt

    tok = AutoTokenizer.from_pretrained(a.model)
    rows = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
    prompts = []
    for i in range(n):
        messages = rows[i % len(rows)]["responses_create_params"]["input"]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        prompts.append(TokensPrompt(prompt_token_ids=list(ids)))
    t0 = time.perf_counter()
    llm = LLM(model=a.model, dtype="bfloat16", gpu_memory_utilization=a.gpu_memory_utilization,
              max_model_len=a.max_model_len, seed=0)
    start_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=t, ignore_eos=True, temperature=1.0, logprobs=0)
    rounds = []
    for r in range(a.rounds + 1):
        t1 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t1
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        if tokens != n * t:
            print(f"round {r}: {tokens} tokens, expected {n * t}", file=sys.stderr)
            return 1
        if r:
            rounds.append({"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds})
        print(f"  round {r}{' (warm-up)' if not r else ''}: {seconds:.3f} s, {tokens / seconds:,.0f} tok/s", flush=True)
    tps = [x["tok_s"] for x in rounds]
    result = {"path": "vllm-offline LLM.generate", "shape": a.shape, "model": a.model, "engine_start_s": start_s,
              "prompt_tokens_mean": statistics.mean(len(p["prompt_token_ids"]) for p in prompts),
              "gpu_memory_utilization": a.gpu_memory_utilization, "rounds": rounds,
              "tok_s_median": statistics.median(tps), "tok_s_min": min(tps), "tok_s_max": max(tps)}
    print(f"RESULT offline {a.shape}: {result['tok_s_median']:,.0f} tok/s median ({min(tps):,.0f}-{max(tps):,.0f}) "
          f"over {a.rounds} rounds; engine start {start_s:.0f} s", flush=True)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
