"""The few vLLM server endpoints the trainer itself calls (NeMo Gym does the generating).

A control call that is idempotent (asking it again changes nothing a first answer did not) is retried
with backoff when its connection fails (reset, refused, dropped): a vLLM that was paused for a while
(SIGSTOP, a swapped-out host, a long stall) answers again, and a run need not end on it. Bounded by
vllm.request_retries and vllm.request_retry_max_s. A bucket transfer and a join of the weight
group are never retried: each is one side of a collective, and a second call would wait for a
partner that is not coming.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import httpx

from gymtrl.errors import ServerError, WeightSyncError
from gymtrl.net import IDLE_EXPIRY_S
from gymtrl.vllm_plugin.protocol import (COMMIT_METHOD, INFO_METHOD, LOAD_PACKED_METHOD, RELOAD_METHOD,
                                         STAMP_METHOD)

log = logging.getLogger(__name__)

# /collective_rpc methods that may be asked again after a failed connection. Not RECEIVE_METHOD and
# JOIN_METHOD: each is one side of a broadcast, which a retry would deadlock.
IDEMPOTENT_RPC = frozenset({INFO_METHOD, STAMP_METHOD, RELOAD_METHOD, LOAD_PACKED_METHOD, COMMIT_METHOD,
                            "reload_weights"})
# The connection failures worth asking again: nothing (or not all) of the answer arrived. A timeout
# is not among them: it already waited vllm.request_timeout_s.
RETRYABLE = (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 4  # attempts after the first
    max_s: float = 60.0  # all the retries of one call together (backoff sleeps and attempts)
    backoff_s: float = 0.5  # the first sleep; doubled each time, at most 8 s

    def sleeps(self):
        delay = self.backoff_s
        for _ in range(self.retries):
            yield delay
            delay = min(2 * delay, 8.0)


_default_policy = RetryPolicy()


def configure_retries(retries: int, max_s: float) -> None:
    """The policy of every VLLMControl made without one (the run's config: ServerStack sets it)."""
    global _default_policy
    _default_policy = RetryPolicy(retries=max(0, int(retries)), max_s=float(max_s))


class VLLMControl:
    def __init__(self, base_url: str, timeout_s: float, api_key_env: str | None = None,
                 retry: RetryPolicy | None = None):
        self.base_url = base_url.rstrip("/")
        self.retry = retry or _default_policy
        key = os.environ.get(api_key_env) if api_key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s, headers=headers, trust_env=False,
                                  limits=httpx.Limits(keepalive_expiry=IDLE_EXPIRY_S))

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, idempotent: bool, **kwargs) -> httpx.Response:
        """One request; an idempotent one asked again after a failed connection, within the retry policy."""
        sleeps = self.retry.sleeps() if idempotent else iter(())
        give_up_at = time.monotonic() + self.retry.max_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._http.request(method, path, **kwargs)
            except RETRYABLE as e:
                delay = next(sleeps, None)
                if delay is None or time.monotonic() + delay > give_up_at:
                    tried = f" (tried {attempt} times)" if attempt > 1 else ""
                    raise ServerError(f"vLLM server {self.base_url}{path} unreachable{tried}: "
                                      f"{type(e).__name__}: {e}") from None
                log.warning("vLLM %s%s: %s: %s; asking again in %.1f s (retry %d of at most %d)", self.base_url,
                            path, type(e).__name__, e, delay, attempt, self.retry.retries)
                time.sleep(delay)
            except httpx.HTTPError as e:
                raise ServerError(f"vLLM server {self.base_url}{path} unreachable: {type(e).__name__}: {e}") from None

    def _post(self, path: str, body: dict, idempotent: bool = True) -> dict:
        resp = self._send("POST", path, idempotent, json=body)
        if resp.status_code == 404:
            raise ServerError(
                f"vLLM server has no {path} endpoint (HTTP 404)",
                hint="start vLLM with VLLM_SERVER_DEV_MODE=1 (gymtrl does this when it launches vLLM)",
            )
        if resp.status_code != 200:
            raise ServerError(f"vLLM {path} answered HTTP {resp.status_code}: {resp.text[:300]}")
        return resp.json()

    def served_models(self) -> list[str]:
        try:
            data = self._send("GET", "/v1/models", True).json()
        except ServerError as e:
            raise ServerError(f"cannot list models of vLLM server {self.base_url}: {e.message}") from None
        except ValueError as e:
            raise ServerError(f"cannot list models of vLLM server {self.base_url}: {e}") from None
        return [m.get("id") for m in data.get("data", [])]

    def _tokenize(self, body: dict) -> list[int]:
        resp = self._send("POST", "/tokenize", True, json=body)
        if resp.status_code != 200:
            raise ServerError(f"vLLM /tokenize answered HTTP {resp.status_code}: {resp.text[:300]}")
        return resp.json()["tokens"]

    def prefix_correction_active(self, model_name: str) -> bool:
        """Whether the server runs gymtrl's prefix correction, by a self-test of what it does: an
        assistant message carries token ids for its text that are not the ids the template would give
        (the text tokenized piece by piece), and the server's rendering of the next turn must hold those
        ids, spliced in. Stock vLLM ignores the ids and renders the text (-> False). A plugin that is
        loaded but refuses or splices wrong is an error (a vLLM whose renderer changed under it)."""
        from gymtrl.vllm_plugin.protocol import REFUSAL_MARKER

        user = {"role": "user", "content": "probe"}
        prompt = self._tokenize({"model": model_name, "messages": [user], "add_generation_prompt": True})
        text, generation = self._split_tokenization(model_name)
        if generation is None:  # a tokenizer that merges nothing: ask by a refusal instead
            return self._refuses_contradicting_ids(model_name)
        body = {"model": model_name, "add_generation_prompt": True, "messages": [
            user, {"role": "assistant", "content": text, "prompt_token_ids": prompt, "generation_token_ids": generation},
            {"role": "user", "content": "again"}]}
        resp = self._send("POST", "/tokenize", True, json=body)
        if resp.status_code == 400 and REFUSAL_MARKER in resp.text:
            raise ServerError(f"gymtrl's prefix correction in the vLLM at {self.base_url} refused its start-up "
                              f"self-test: {resp.text[:300]}",
                              hint="this vLLM's chat rendering differs from the versions gymtrl tests (see "
                                   "`gymtrl doctor`); set vllm.prefix_correction=false to train without it")
        if resp.status_code != 200:
            raise ServerError(f"vLLM /tokenize answered HTTP {resp.status_code}: {resp.text[:300]}")
        # Corrected, the rendering starts with the earlier turn's own ids; otherwise it was rendered from
        # the text (whatever the template does with the first turn).
        return resp.json()["tokens"][: len(prompt) + len(generation)] == prompt + generation

    PROBE_TEXTS = ("the", "ok", "hello", "probe", "answer")

    def _split_tokenization(self, model_name: str) -> tuple[str, list[int] | None]:
        """A text and ids that decode to it but are not its tokenization (its characters tokenized one
        by one); (text, None) when the tokenizer merges none of the candidate words."""
        for text in self.PROBE_TEXTS:
            whole = self._tokenize({"model": model_name, "prompt": text, "add_special_tokens": False})
            pieces = [i for ch in text
                      for i in self._tokenize({"model": model_name, "prompt": ch, "add_special_tokens": False})]
            if pieces != whole:
                return text, pieces
        return self.PROBE_TEXTS[0], None

    def _refuses_contradicting_ids(self, model_name: str) -> bool:
        from gymtrl.vllm_plugin.protocol import REFUSAL_MARKER

        def turn(ids: list[int]) -> dict:
            return {"role": "assistant", "content": "ok", "prompt_token_ids": ids[:1], "generation_token_ids": ids[1:]}

        user = {"role": "user", "content": "probe"}
        body = {"model": model_name, "messages": [user, turn([1, 2]), user, turn([3, 4]), user]}
        resp = self._send("POST", "/tokenize", True, json=body)
        if resp.status_code == 200:
            return False
        if REFUSAL_MARKER in resp.text:
            return True
        raise ServerError(f"vLLM /tokenize answered HTTP {resp.status_code}: {resp.text[:300]}")

    def reload_weights(self, weights_dir: str) -> None:
        out = self._post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": weights_dir}})
        if "results" not in out:
            raise WeightSyncError(f"vLLM reload_weights returned an unexpected answer: {str(out)[:200]}")

    def collective_rpc(self, method: str, kwargs: dict[str, str]) -> list:
        """Call `method` on every vLLM worker (string arguments only); one result per worker. Only the
        methods in IDEMPOTENT_RPC are asked again after a failed connection."""
        out = self._post("/collective_rpc", {"method": method, "kwargs": kwargs}, idempotent=method in IDEMPOTENT_RPC)
        if not isinstance(out.get("results"), list):
            raise ServerError(f"vLLM /collective_rpc {method} returned an unexpected answer: {str(out)[:200]}")
        return out["results"]

    def load_lora_adapter(self, name: str, path: str) -> None:
        """Load the adapter at `path` as `name`, in place of the version loaded under that name
        (vLLM started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING)."""
        resp = self._send("POST", "/v1/load_lora_adapter", True,
                          json={"lora_name": name, "lora_path": path, "load_inplace": True})
        if resp.status_code != 200:
            raise WeightSyncError(f"vLLM did not load the LoRA adapter {path} as {name}: HTTP {resp.status_code}: "
                                  f"{resp.text[:300]}", hint="vLLM must run with --enable-lora and "
                                  "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (gymtrl launches it so with model.lora)")

    def reset_prefix_cache(self) -> None:
        self._post("/reset_prefix_cache", {})

    def prompt_logprobs(self, model_name: str, token_ids: list[int]) -> list[float]:
        """The server's logprob of each token of `token_ids` given the ones before it (first excluded)."""
        out = self._post("/v1/completions", {
            "model": model_name, "prompt": token_ids, "max_tokens": 1, "temperature": 0.0,
            "prompt_logprobs": 0,
        })
        entries = out["choices"][0].get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) != len(token_ids):
            raise WeightSyncError("vLLM did not return prompt_logprobs for the verification probe")
        values = []
        for tok, entry in zip(token_ids[1:], entries[1:]):
            values.append(float(entry[str(tok)]["logprob"]))
        return values
