"""Server URLs as configs and NeMo Gym write them."""

from __future__ import annotations

import re


def server_root(url: str) -> str:
    """An OpenAI-compatible server's root URL: without a trailing "/v1" (NeMo Gym's base URLs have it)."""
    return re.sub(r"/v1/?$", "", url.rstrip("/"))


def same_server(a: str, b: str) -> bool:
    return server_root(a).replace("localhost", "127.0.0.1") == server_root(b).replace("localhost", "127.0.0.1")
