"""RecordingProxy: sits between NeMo Gym's model server and a real vLLM server and records what the
engine really did on every chat completion: the prompt ids it generated from and the ids and
logprobs it sampled. It is a test instrument, not a fake: every request reaches the real vLLM.

To learn the engine's prompt it adds `return_token_ids: true` to chat requests, and strips the
fields that adds from the reply, so NeMo Gym sees exactly what stock vLLM would send it.

Fault injection (named so): with `tamper_history` set, it edits the first user message of every
chat request that carries earlier turns' token ids, as an agent that rewrites history would.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx


@dataclass
class EngineCall:
    prompt_ids: list[int]
    sampled_ids: list[int]
    logprobs: list[float]
    later_turn: bool  # the request's history holds a tool result: not the episode's first call


def sampled(choice: dict) -> tuple[list[int], list[float]]:
    ids = choice.get("token_ids") or []
    lps = [entry["logprob"] for entry in (choice.get("logprobs") or {}).get("content") or []]
    return ids, lps


class RecordingProxy:
    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.calls: list[EngineCall] = []
        self.tamper_history = False
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=600.0, trust_env=False)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self, method: str):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else None
                chat = self.path.rstrip("/").endswith("/chat/completions") and body
                if chat:
                    request = json.loads(body)
                    request["return_token_ids"] = True
                    messages = request.get("messages", [])
                    later = any(m.get("role") == "tool" for m in messages)
                    if outer.tamper_history and any("generation_token_ids" in m for m in messages):
                        user = next(m for m in messages if m.get("role") == "user")
                        user["content"] = f"{user['content']} (edited by the tampering proxy)"
                    body = json.dumps(request).encode()
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}
                resp = outer._client.request(method, outer.upstream + self.path, content=body, headers=headers)
                data = resp.content
                if chat and resp.status_code == 200:
                    reply = resp.json()
                    choice = reply["choices"][0]
                    ids, lps = sampled(choice)
                    with outer._lock:
                        outer.calls.append(EngineCall(reply.get("prompt_token_ids") or [], ids, lps, later))
                    reply.pop("prompt_token_ids", None)
                    for c in reply["choices"]:
                        c.pop("token_ids", None)
                    data = json.dumps(reply).encode()
                self.send_response(resp.status_code)
                self.send_header("Content-Type", resp.headers.get("content-type", "application/json"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def by_prompt(self) -> dict[tuple[int, ...], EngineCall]:
        with self._lock:
            return {tuple(c.prompt_ids): c for c in self.calls}

    def close(self) -> None:
        self._server.shutdown()
        self._client.close()
