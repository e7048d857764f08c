"""Async HTTP client for NeMo Gym agents' `POST /run`.

One rollout = one `/run` call with the whole dataset row. The client bounds requests in flight,
gives every rollout a deadline (retries included), retries connection errors and 5xx replies with
exponential backoff, and never keeps cookies: each `/run` builds its own sessions inside Gym, and a
shared cookie jar would leak one rollout's resources-server session into another.

It never raises for a failed rollout: the result says what happened (`RunResult.failure`).
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import httpx

from gymtrl.failures import FailureKind
from gymtrl.net import IDLE_EXPIRY_S
from gymtrl.vllm_plugin.protocol import REFUSAL_MARKER


@dataclass
class RunResult:
    reply: dict | None  # the agent's JSON reply when the call succeeded
    failure: FailureKind | None
    detail: str
    latency_s: float
    attempts: int


def _no_cookies() -> http.cookiejar.CookieJar:
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


# httpcore's connection pool rescans all its connections on every request and every release
# (encode/httpx#3215, encode/httpcore#1035): one pool of 1,000 connections spent 85% of gymtrl's CPU
# there. Rollouts are spread over pools of at most this many connections instead, so the cost per
# rollout stays flat as concurrency grows (bench/results/rollout_load.md).
POOL_SHARD_CONNECTIONS = 16


class _PoolShard:
    def __init__(self, client: httpx.AsyncClient):
        self.client = client
        self.in_flight = 0


class AgentClient:
    def __init__(
        self,
        max_concurrency: int,
        timeout_s: float,
        retries: int,
        retry_backoff_s: float,
        connect_timeout_s: float = 10.0,
    ):
        self.timeout_s = timeout_s
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self._sem = asyncio.Semaphore(max_concurrency)
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._shards: list[_PoolShard] = []
        self._ssl = None  # one TLS context for all shards (building one costs ~20 ms)

    def _new_shard(self) -> _PoolShard:
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()
        n = POOL_SHARD_CONNECTIONS
        shard = _PoolShard(httpx.AsyncClient(
            timeout=self._timeout, verify=self._ssl, cookies=_no_cookies(), trust_env=False,
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n, keepalive_expiry=IDLE_EXPIRY_S),
        ))
        self._shards.append(shard)
        return shard

    def _acquire_shard(self) -> _PoolShard:
        """A pool with a free connection slot (the semaphore bounds the total), created when all are full."""
        for shard in self._shards:
            if shard.in_flight < POOL_SHARD_CONNECTIONS:
                break
        else:
            shard = self._new_shard()
        shard.in_flight += 1
        return shard

    async def aclose(self) -> None:
        shards, self._shards = self._shards, []
        for shard in shards:
            await shard.client.aclose()

    async def __aenter__(self) -> "AgentClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def run(self, agent_url: str, row: dict) -> RunResult:
        """POST the row to `{agent_url}/run`; the deadline covers queueing, all attempts and backoff."""
        start = time.monotonic()
        attempts = [0]
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._sem:
                    shard = self._acquire_shard()
                    try:
                        reply, failure, detail = await self._run_with_retries(shard.client, agent_url, row, attempts)
                    finally:
                        shard.in_flight -= 1
        except TimeoutError:
            reply, failure, detail = None, FailureKind.TIMEOUT, f"no reply within {self.timeout_s:g}s"
        return RunResult(reply, failure, detail, time.monotonic() - start, attempts[0])

    async def _run_with_retries(self, client: httpx.AsyncClient, url: str, row: dict, attempts: list[int]):
        delay = self.retry_backoff_s
        while True:
            attempts[0] += 1
            retryable = False
            try:
                resp = await client.post(f"{url.rstrip('/')}/run", json=row)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
                failure, detail, retryable = FailureKind.CONNECTION_ERROR, f"{type(e).__name__}: {e}", True
            except httpx.TimeoutException as e:
                return None, FailureKind.TIMEOUT, f"{type(e).__name__}: {e}"
            else:
                if resp.status_code >= 400 and REFUSAL_MARKER in resp.text:
                    # Deterministic for this history: not retried. The reason follows the marker,
                    # inside error messages that Gym's servers nest (and escape) several times.
                    reason = resp.text[resp.text.index(REFUSAL_MARKER):].split("\\")[0].split('"')[0]
                    return None, FailureKind.PREFIX_CORRECTION_REFUSED, reason[:300]
                if resp.status_code >= 500:
                    failure, retryable = FailureKind.HTTP_ERROR, True
                    detail = f"HTTP {resp.status_code}: {resp.text[:300]}"
                elif resp.status_code >= 400:
                    return None, FailureKind.HTTP_ERROR, f"HTTP {resp.status_code}: {resp.text[:300]}"
                else:
                    try:
                        body = resp.json()
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        return None, FailureKind.INVALID_REPLY, f"reply is not JSON: {resp.text[:120]!r}"
                    if not isinstance(body, dict):
                        return None, FailureKind.INVALID_REPLY, f"reply is a JSON {type(body).__name__}, not an object"
                    return body, None, ""
            if not retryable or attempts[0] > self.retries:
                return None, failure, detail + (f" (after {attempts[0]} attempts)" if attempts[0] > 1 else "")
            await asyncio.sleep(delay)
            delay *= 2


def parse_reward(reply: dict) -> tuple[float | None, FailureKind | None, str]:
    """The reply's reward, or the failure kind that excludes it."""
    if reply.get("mask_sample") is True:
        reason = reply.get("failure_reason") or reply.get("failure_kind") or "mask_sample: true"
        # NeMo Gym's judge_failsafe marks a judge outage this way; it is not the policy's fault.
        kind = FailureKind.JUDGE_FAILED if reply.get("failure_kind") == "judge_failed" else FailureKind.MASK_SAMPLE
        return None, kind, str(reason)[:300]
    reward = reply.get("reward")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        return None, FailureKind.MISSING_REWARD, f"reward is {reward!r}"
    return float(reward), None, ""


def response_output(reply: dict) -> Any:
    response = reply.get("response")
    return response.get("output") if isinstance(response, dict) else None
