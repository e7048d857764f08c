"""FakeFastGenerationBackend: an OpenAI-compatible stand-in for vLLM, for load tests only.

A fake, and named as one. It answers `POST /v1/chat/completions` the way vLLM does when NeMo Gym's
vllm_model asks for training token data (top-level `prompt_token_ids`, `choice.token_ids`, and
`token_id:<n>` logprob entries), after holding each request for `--hold-ms` (a stand-in for
generation time; `--slow-every N` holds every Nth request `--slow-hold-ms` instead, so that thousands of rollouts are in flight at once). It never runs a model: the
load test measures gymtrl's rollout client and NeMo Gym's servers, not generation.

It also answers `POST /run` as a NeMo Gym agent would (FakeFastAgent), to measure gymtrl's client
alone.

GET /stats reports the peak number of requests it held at once, so a load test can prove how many
rollouts were really in flight together. Run it with a Python that has aiohttp (NeMo Gym's venv).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

from aiohttp import web

PROMPT_IDS = list(range(10, 42))  # any ids below the tiny model's vocabulary size


def prompt_ids(messages: list[dict]) -> list[int]:
    """Prompt token ids that extend the conversation's last model call as a real server's do: that
    call's prompt and generation, then a token per message since (tool results), then one for the
    generation prompt. Multi-turn stitching (gymtrl's prefix check) then holds."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m.get("role") == "assistant" and m.get("prompt_token_ids") and m.get("generation_token_ids"):
            return list(m["prompt_token_ids"]) + list(m["generation_token_ids"]) + [7] * (len(messages) - 1 - i) + [8]
    return PROMPT_IDS


def completion(body: dict, model: str, rng: random.Random, tool_turns: int = 1, tool_call: tuple = ()) -> dict:
    """One chat completion; with tool_turns T, the first T - 1 model calls of a conversation call `tool_call`."""
    n = max(1, min(int(body.get("max_tokens") or 4), 4))
    ids = [rng.randrange(100, 200) for _ in range(n)]
    text = "".join(str(rng.randrange(10)) for _ in range(n))  # digit_reply's reward: all digits
    messages = body.get("messages") or []
    calls_so_far = sum(m.get("role") == "assistant" for m in messages)
    calls = []
    if calls_so_far < tool_turns - 1:
        name, arguments = tool_call
        calls = [{"id": f"call_{rng.getrandbits(32):x}", "type": "function",
                  "function": {"name": name, "arguments": json.dumps(arguments)}}]
        text = ""
    return {
        "id": f"chatcmpl-{rng.getrandbits(48):x}", "object": "chat.completion", "created": int(time.time()),
        "model": model, "prompt_token_ids": prompt_ids(messages),
        "choices": [{
            "index": 0, "finish_reason": "tool_calls" if calls else "stop", "token_ids": ids,
            "message": {"role": "assistant", "content": text, "tool_calls": calls},
            "logprobs": {"content": [{"token": f"token_id:{i}", "logprob": -0.5, "bytes": None, "top_logprobs": []}
                                     for i in ids]},
        }],
        "usage": {"prompt_tokens": len(PROMPT_IDS), "completion_tokens": n, "total_tokens": len(PROMPT_IDS) + n},
    }


def make_app(model: str, hold_s: float, slow_every: int = 0, slow_hold_s: float = 0.0, tool_turns: int = 1,
             tool_call: tuple = ()) -> web.Application:
    rng = random.Random(0)
    state = {"in_flight": 0, "peak_in_flight": 0, "requests": 0}

    async def hold() -> bool:
        """Hold one request as generation would, counted in flight; returns whether it was a slow one."""
        state["requests"] += 1
        state["in_flight"] += 1
        state["peak_in_flight"] = max(state["peak_in_flight"], state["in_flight"])
        try:
            slow = slow_every > 0 and state["requests"] % slow_every == 0
            await asyncio.sleep(slow_hold_s if slow else hold_s)
            return slow
        finally:
            state["in_flight"] -= 1

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        await hold()
        return web.json_response(completion(body, model, rng, tool_turns, tool_call))

    async def agent_run(request: web.Request) -> web.Response:
        """POST /run as a NeMo Gym agent answers it: measures gymtrl's client with no Gym in between."""
        body = await request.json()
        params = body.get("responses_create_params", {})
        slow = await hold()
        choice = completion({"max_tokens": params.get("max_output_tokens")}, model, rng)["choices"][0]
        item = {"type": "message", "role": "assistant", "id": "msg-1", "status": "completed",
                "content": [{"type": "output_text", "text": choice["message"]["content"], "annotations": []}],
                "prompt_token_ids": PROMPT_IDS, "generation_token_ids": choice["token_ids"],
                "generation_log_probs": [-0.5] * len(choice["token_ids"])}
        reply = {**body, "response": {"output": [item], "status": "completed"}, "reward": 1.0}
        return web.json_response({**reply, "held_slow": True} if slow else reply)

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": model, "object": "model"}]})

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(state)

    async def reset(_: web.Request) -> web.Response:
        state["peak_in_flight"] = state["in_flight"]
        state["requests"] = 0
        return web.json_response(state)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes([web.post("/v1/chat/completions", chat), web.post("/run", agent_run), web.get("/v1/models", models), web.get("/health", health),
                    web.get("/stats", stats), web.post("/stats/reset", reset)])
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--hold-ms", type=float, default=0.0)
    parser.add_argument("--slow-every", type=int, default=0, help="hold every Nth request --slow-hold-ms instead")
    parser.add_argument("--slow-hold-ms", type=float, default=0.0)
    parser.add_argument("--tool-turns", type=int, default=1, help="model calls per conversation: the first N - 1 call --tool")
    parser.add_argument("--tool", default='company_directory_find_email_address {"name": "carlos"}',
                        help="the tool call: a name, a space, JSON arguments")
    args = parser.parse_args()
    name, _, arguments = args.tool.partition(" ")
    app = make_app(args.model, args.hold_ms / 1000, args.slow_every, args.slow_hold_ms / 1000, args.tool_turns,
                   (name, json.loads(arguments or "{}")))
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, backlog=4096)


if __name__ == "__main__":
    main()
