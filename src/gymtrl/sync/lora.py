"""The adapter sync (model.lora): write only the LoRA adapter, and have vLLM load it in place under
one name (`/v1/load_lora_adapter` with load_inplace), the name every rollout and check asks for.

vLLM serves one adapter version at a time: each push replaces the last one (vLLM's LoRA support
takes the new tensors from the files; the old version is gone from the server), then the prefix
cache is reset, since cached prompts were computed with the old adapter. The two newest adapter
folders are kept on disk (vLLM may read the serving one again); older ones are removed. vLLM's LoRA
loader is not gymtrl's receiver, so there is no exact stamp: the logprob probe checks each push,
with the adapter, against the trainer's model with the adapter.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from gymtrl.servers.vllm_control import VLLMControl
from gymtrl.sync.base import WeightSync

ADAPTER_PREFIX = "adapter-"


class LoraSync(WeightSync):
    name = "lora"

    def __init__(self, control: VLLMControl, sync_dir: Path, adapter_name: str):
        super().__init__()
        self.control = control
        self.dir = sync_dir
        self.adapter_name = adapter_name

    def push(self, model) -> float:
        start = time.monotonic()
        push = self.new_push_id()
        target = self.dir / f"{ADAPTER_PREFIX}{push}"
        partial = self.dir / f".{ADAPTER_PREFIX}{push}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(partial))  # a PeftModel writes its adapter only
        partial.rename(target)  # vLLM never reads a half-written adapter
        saved = time.monotonic()
        self.control.load_lora_adapter(self.adapter_name, str(target.resolve()))
        loaded = time.monotonic()
        self.control.reset_prefix_cache()
        self.phases = {"save_seconds": saved - start, "load_seconds": loaded - saved,
                       "reset_seconds": time.monotonic() - loaded,
                       "adapter_bytes": float(sum(f.stat().st_size for f in target.iterdir()))}
        self._prune(keep=target)
        return time.monotonic() - start

    def _prune(self, keep: Path) -> None:
        """Remove every adapter folder but `keep` and the newest one before it."""
        others = sorted((p for p in self.dir.glob(f"{ADAPTER_PREFIX}*") if p.is_dir() and p != keep),
                        key=lambda p: p.stat().st_mtime)
        for old in others[:-1]:
            shutil.rmtree(old, ignore_errors=True)
