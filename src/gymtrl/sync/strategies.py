"""Weight-sync strategies behind one interface, and the choice between them.

- reload: write the weights as safetensors to a directory, ask vLLM to `reload_weights` from it,
  reset its prefix cache. Works on CPU and where trainer and vLLM share a GPU.
- ipc: vLLM on the trainer's GPU: the weights cross through CUDA IPC (gymtrl.sync.ipc).
- nccl: TRL's own server-mode sync (`use_vllm=True, vllm_mode="server"`): TRL broadcasts the
  weights over NCCL before each rollout call, so `push` has nothing left to do.
- none: never syncs (debugging only; the verification then fails as soon as the weights move).
Whatever the strategy, `SyncVerifier` checks afterwards that the server really serves the weights.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

from gymtrl.distributed import is_zero3
from gymtrl.sync.vllm_control import VLLMControl


def choose_strategy(configured: str, cuda_available: bool, shares_gpu: bool = False) -> str:
    """`auto`: reload on CPU, ipc when vLLM runs on the trainer's only GPU, else broadcast (gymtrl's
    own NCCL sync: 72 ms against TRL's 147 ms for the 0.5B shape on 2x H200, both verified every step;
    bench/results/gpu-2x/syncs-nccl-vs-broadcast)."""
    if configured != "auto":
        return configured
    if not cuda_available:
        return "reload"
    return "ipc" if shares_gpu else "broadcast"


def vllm_shares_trainer_gpu(launch_enabled: bool, vllm_env: dict[str, str], environ: dict[str, str],
                            device_count: int) -> bool:
    """Whether the vLLM gymtrl launches will run on the GPU this trainer uses: the trainer sees one
    GPU, and vLLM is given the same CUDA_VISIBLE_DEVICES (its own setting, else the inherited one)."""
    if not launch_enabled or device_count != 1:
        return False
    trainer = environ.get("CUDA_VISIBLE_DEVICES")
    return vllm_env.get("CUDA_VISIBLE_DEVICES", trainer) == trainer


class WeightSync:
    name = "none"
    phases: dict[str, float] = {}  # the last push's seconds by phase, logged as sync/<phase>

    def push(self, model) -> float:
        """Make the server serve `model`'s current weights; returns the seconds it took."""
        return 0.0

    def servers_restarted(self) -> None:
        """Servers were restarted (supervision): forget any connection to the old vLLM."""


class NcclSync(WeightSync):
    """TRL pushed the weights already (GRPOTrainer._generate, before rollout_func); `push` returns
    how long that took, measured by wrapping TRL's sync_weights (0.0 if it cannot be wrapped)."""

    name = "nccl"

    def __init__(self) -> None:
        self.last_seconds = 0.0

    def attach(self, trainer) -> None:
        generation = getattr(trainer, "vllm_generation", None)
        original = getattr(generation, "sync_weights", None)
        if original is None:
            return

        def timed_sync_weights(*args, **kwargs):
            start = time.monotonic()
            try:
                return original(*args, **kwargs)
            finally:
                self.last_seconds = time.monotonic() - start

        generation.sync_weights = timed_sync_weights

    def push(self, model) -> float:
        seconds, self.last_seconds = self.last_seconds, 0.0
        return seconds


def bound_nccl_join(timeout_s: float, give_up: Callable[[], None]) -> None:
    """TRL's VLLMClient.init_communicator waits in NCCL's rendezvous with no timeout, and a vLLM
    that cannot take a new trainer never arrives: measured with vLLM 0.26 on 2x H100, a second
    trainer against a server that had already synced with one hung at start-up for good. Past
    `timeout_s`, call `give_up` (from a timer thread: the waiting thread cannot be interrupted)."""
    from trl.generation.vllm_client import VLLMClient

    original = VLLMClient.init_communicator
    if getattr(original, "gymtrl_bounded", False):
        return

    def bounded_init_communicator(self, *args, **kwargs):
        timer = threading.Timer(timeout_s, give_up)
        timer.daemon = True
        timer.start()
        try:
            return original(self, *args, **kwargs)
        finally:
            timer.cancel()

    bounded_init_communicator.gymtrl_bounded = True  # type: ignore[attr-defined]
    VLLMClient.init_communicator = bounded_init_communicator


def tied_head(model):
    """(name, weight) of an output head tied to the input embeddings, else None.

    Neither save_pretrained nor named_parameters() lists `lm_head.weight` when it is tied, and vLLM's
    in-place `reload_weights` (0.32, layerwise) then leaves its LM head at the *old* values
    ("ParallelLMHead: Failed to load weights"): the server samples from a stale head while
    every other weight is new. Measured here: logprob difference 0.96 after an embedding change.
    So the syncs that can go through that reload send the head under its own name too."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return None
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head), None)
    if head is None or name is None:
        return None
    return f"{name}.weight", head.weight


def write_untied_head(model, directory: Path) -> None:
    """Store a tied output head as its own tensor next to the checkpoint (see tied_head)."""
    found = tied_head(model)
    if found is None:
        return
    from safetensors.torch import save_file

    key, weight = found
    save_file({key: weight.detach().to("cpu").contiguous().clone()}, str(directory / "tied_head.safetensors"),
              metadata={"format": "pt"})
    index = directory / "model.safetensors.index.json"
    if index.exists():  # sharded: loaders read only the files the index names
        data = json.loads(index.read_text())
        data["weight_map"][key] = "tied_head.safetensors"
        index.write_text(json.dumps(data, indent=2))


class ReloadSync(WeightSync):
    name = "reload"

    def __init__(self, control: VLLMControl, sync_dir: Path):
        self.control = control
        self.sync_dir = Path(sync_dir)

    def push(self, model) -> float:
        start = time.monotonic()
        staging = self.sync_dir.with_name(self.sync_dir.name + ".staging")
        shutil.rmtree(staging, ignore_errors=True)
        # Under ZeRO-3 (inside full_weights) the parameters are whole only for now: hand their values
        # over, since save_pretrained does not gather DeepSpeed shards itself.
        state_dict = ({k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
                      if is_zero3(model) else None)
        model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
        write_untied_head(model, staging)
        # Swap in whole: vLLM never reads a half-written directory.
        old = self.sync_dir.with_name(self.sync_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.sync_dir.exists():
            os.replace(self.sync_dir, old)
        os.replace(staging, self.sync_dir)
        shutil.rmtree(old, ignore_errors=True)
        self.control.reload_weights(str(self.sync_dir.resolve()))
        self.control.reset_prefix_cache()
        return time.monotonic() - start
