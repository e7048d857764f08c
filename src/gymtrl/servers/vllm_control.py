"""The few vLLM server endpoints the trainer itself calls (NeMo Gym does the generating)."""

from __future__ import annotations

import os

import httpx

from gymtrl.errors import ServerError, WeightSyncError
from gymtrl.net import IDLE_EXPIRY_S


class VLLMControl:
    def __init__(self, base_url: str, timeout_s: float, api_key_env: str | None = None):
        self.base_url = base_url.rstrip("/")
        key = os.environ.get(api_key_env) if api_key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s, headers=headers, trust_env=False,
                                  limits=httpx.Limits(keepalive_expiry=IDLE_EXPIRY_S))

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, body: dict) -> dict:
        try:
            resp = self._http.post(path, json=body)
        except httpx.HTTPError as e:
            raise ServerError(f"vLLM server {self.base_url}{path} unreachable: {type(e).__name__}: {e}") from None
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
            data = self._http.get("/v1/models").json()
        except (httpx.HTTPError, ValueError) as e:
            raise ServerError(f"cannot list models of vLLM server {self.base_url}: {e}") from None
        return [m.get("id") for m in data.get("data", [])]

    def prefix_correction_active(self, model_name: str) -> bool:
        """Whether the server runs gymtrl's prefix correction, asked by behaviour: a chat /tokenize
        whose assistant messages carry token ids that contradict each other must be refused by the
        plugin (its marker in an HTTP 400), while stock vLLM ignores the ids and tokenizes."""
        from gymtrl.vllm_plugin.protocol import REFUSAL_MARKER

        def turn(ids: list[int]) -> dict:
            return {"role": "assistant", "content": "ok", "prompt_token_ids": ids[:1], "generation_token_ids": ids[1:]}

        user = {"role": "user", "content": "probe"}
        body = {"model": model_name, "messages": [user, turn([1, 2]), user, turn([3, 4]), user]}
        try:
            resp = self._http.post("/tokenize", json=body)
        except httpx.HTTPError as e:
            raise ServerError(f"vLLM server {self.base_url}/tokenize unreachable: {type(e).__name__}: {e}") from None
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
        """Call `method` on every vLLM worker (string arguments only); one result per worker."""
        out = self._post("/collective_rpc", {"method": method, "kwargs": kwargs})
        if not isinstance(out.get("results"), list):
            raise ServerError(f"vLLM /collective_rpc {method} returned an unexpected answer: {str(out)[:200]}")
        return out["results"]

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
