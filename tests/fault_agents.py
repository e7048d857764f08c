"""FaultInjectingAgentServer: a stand-in for a NeMo Gym agent that misbehaves on purpose.

A fake, and named as one: real agents do not return 500s, hang, or drop their reward on demand,
so fault injection needs a server that does. The path picks the fault: POST /<fault>/run.
Healthy replies copy the shape a real simple_agent returns (see nemo-gym-protocol.md section 6).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def good_reply(reward=1.0, output=None) -> dict:
    output = output if output is not None else [{
        "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "42"}],
        "prompt_token_ids": [1, 2, 3], "generation_token_ids": [4, 5], "generation_log_probs": [-0.1, -0.2],
    }]
    return {"response": {"output": output, "status": "completed"}, "reward": reward, "mask_sample": False}


MISMATCH_OUTPUT = [
    {"type": "function_call", "prompt_token_ids": [1, 2], "generation_token_ids": [3, 4], "generation_log_probs": [-1.0, -1.0]},
    {"type": "message", "prompt_token_ids": [1, 2, 3, 9, 7], "generation_token_ids": [5], "generation_log_probs": [-1.0]},
]


class FaultInjectingAgentServer:
    def __init__(self, hang_s: float = 30.0):
        self.calls: dict[str, int] = {}
        self.cookies_seen: list[str | None] = []
        self.hang_s = hang_s
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Gym's servers: a client that pools connections keeps them open

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                fault = self.path.strip("/").split("/")[0]
                outer.calls[fault] = outer.calls.get(fault, 0) + 1
                length = int(self.headers.get("Content-Length", 0))
                self.rfile.read(length)
                outer.cookies_seen.append(self.headers.get("Cookie"))
                if fault == "setcookie":  # what a Gym server's session cookie looks like to a client
                    return self._send(200, json.dumps(good_reply()), {"Set-Cookie": "session=rollout-1; Path=/"})
                if fault == "hang":
                    time.sleep(outer.hang_s)
                if fault == "slow":  # slow, but inside the deadline
                    time.sleep(1.0)
                if fault == "slowdrip":  # a byte at a time: no single read ever times out
                    return self._drip(json.dumps(good_reply()).encode())
                if fault == "badshape":  # valid JSON, wrong schema: output is not a list of items
                    return self._send(200, json.dumps({"response": {"output": "oops"}, "reward": 1.0}))
                if fault == "http500":
                    return self._send(500, json.dumps("Hit an exception in SimpleAgent calling an inner server"))
                if fault == "flaky500" and outer.calls[fault] == 1:
                    return self._send(503, "busy")
                if fault == "notjson":
                    return self._send(200, "<html>gateway</html>")
                if fault == "truncated":
                    return self._send(200, json.dumps(good_reply())[:40])
                if fault == "noreward":
                    reply = good_reply()
                    del reply["reward"]
                    return self._send(200, json.dumps(reply))
                if fault == "masked":
                    return self._send(200, json.dumps({**good_reply(), "mask_sample": True, "failure_reason": "sandbox died"}))
                if fault == "judgedown":  # what NeMo Gym's judge_failsafe returns when the judge is down
                    return self._send(200, json.dumps({**good_reply(0.0), "mask_sample": True,
                                                       "failure_kind": "judge_failed", "failure_reason": "judge unreachable"}))
                if fault == "mismatch":
                    return self._send(200, json.dumps(good_reply(output=MISMATCH_OUTPUT)))
                if fault == "notokens":
                    return self._send(200, json.dumps(good_reply(output=[{"type": "message", "content": []}])))
                return self._send(200, json.dumps(good_reply()))

            def _drip(self, data: bytes):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    for i in range(len(data)):
                        self.wfile.write(data[i:i + 1])
                        self.wfile.flush()
                        time.sleep(0.3)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _send(self, code, body, headers=None):
                data = body.encode()
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except BrokenPipeError:
                    pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the default backlog of 5 refuses a burst of connections

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
