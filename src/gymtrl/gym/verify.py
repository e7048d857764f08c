"""Score a response with an environment's own verifier, without a model: `POST {resources}/verify`.

NeMo Gym's agents call `/verify` with the dataset row plus the episode's `response` (a Responses
API object) after the model's turns. Calling it directly with a hand-made response shows what the
environment rewards: a right answer built from a row's ground truth must score at the top and a
wrong one must not, or the environment cannot teach anything. The session is seeded first, as the
agent does, in a client of its own (the session lives in a cookie).
"""

from __future__ import annotations

import json
import uuid

import httpx

from gymtrl.errors import ServerError


def message(text: str) -> list[dict]:
    """Output items of a final assistant message."""
    return [{"id": f"msg_{uuid.uuid4().hex[:8]}", "type": "message", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": text, "annotations": []}]}]


def function_calls(calls: list[dict]) -> list[dict]:
    """Output items of tool calls, each `{name, arguments}` (arguments: a JSON string or an object)."""
    items = []
    for call in calls:
        args = call["arguments"] if isinstance(call["arguments"], str) else json.dumps(call["arguments"])
        call_id = f"call_{uuid.uuid4().hex[:8]}"
        items.append({"id": f"fc_{call_id}", "type": "function_call", "call_id": call_id, "name": call["name"],
                      "arguments": args, "status": "completed"})
    return items


def response_object(output: list[dict]) -> dict:
    return {"id": f"resp_{uuid.uuid4().hex[:8]}", "object": "response", "created_at": 0.0, "model": "handmade",
            "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}


def verify(resources_url: str, row: dict, output: list[dict], timeout_s: float = 60.0) -> dict:
    """The verifier's reply (`reward` and its own fields) for `row` answered with `output` items."""
    base = resources_url.rstrip("/")
    with httpx.Client(timeout=timeout_s, trust_env=False) as client:
        try:
            seeded = client.post(f"{base}/seed_session", json=row)
            reply = client.post(f"{base}/verify", json={**row, "response": response_object(output)})
        except httpx.HTTPError as e:
            raise ServerError(f"resources server {base} unreachable: {type(e).__name__}: {e}") from None
    for name, resp in (("seed_session", seeded), ("verify", reply)):
        if resp.status_code != 200:
            raise ServerError(f"resources server {base}/{name} answered HTTP {resp.status_code}: {resp.text[:300]}")
    return reply.json()
