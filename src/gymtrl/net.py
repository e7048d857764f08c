"""HTTP details shared by every client gymtrl runs: server URLs as configs and NeMo Gym write them,
how long an idle connection is kept, and a free local port for a server to start on."""

from __future__ import annotations

import re
import socket

# How long gymtrl's HTTP clients keep an idle connection to vLLM or NeMo Gym for reuse. Both serve
# through uvicorn, which closes a connection idle for 5 s (vLLM's VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
# uvicorn's default). httpx's own default expiry is also 5 s, so a request sent on a connection idle
# for about 5 s can meet the server closing it: "Connection reset by peer" (seen on a weight push that
# followed a 5 s pause). Dropping idle connections well before the server does closes that window.
IDLE_EXPIRY_S = 2.0


def server_root(url: str) -> str:
    """An OpenAI-compatible server's root URL: without a trailing "/v1" (NeMo Gym's base URLs have it)."""
    return re.sub(r"/v1/?$", "", url.rstrip("/"))


def same_server(a: str, b: str) -> bool:
    return server_root(a).replace("localhost", "127.0.0.1") == server_root(b).replace("localhost", "127.0.0.1")


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS calls free on `host` now (it may hand the same one out again once this closes)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
