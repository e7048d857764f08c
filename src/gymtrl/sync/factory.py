"""Which weight sync a run uses, and building it with its checks from the config."""

from __future__ import annotations

import logging
from pathlib import Path

from gymtrl.config.schema import Config
from gymtrl.errors import ConfigError, ServerError
from gymtrl.servers.vllm import policy_model_name
from gymtrl.servers.vllm_control import VLLMControl
from gymtrl.sync.base import WeightSync
from gymtrl.sync.check import ProbeCheck, StampCheck, default_tolerance, probe_token_ids
from gymtrl.sync.publisher import WeightPublisher
from gymtrl.sync.receiver import check_receivers

log = logging.getLogger(__name__)


def choose_strategy(configured: str, cuda_available: bool, shares_gpu: bool = False, lora: bool = False) -> str:
    """`auto`: lora when training an adapter; else reload on CPU, ipc when vLLM runs on the trainer's
    only GPU, else broadcast (gymtrl's own NCCL transport, faster than TRL's and checked exactly;
    docs/performance.md)."""
    if configured != "auto":
        return configured
    if lora:
        return "lora"
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


def check_strategy(strategy: str, cuda: bool, shares_gpu: bool, world: int) -> None:
    """The weight syncs that cannot work here, refused before any server starts."""
    if strategy == "ipc" and not cuda:
        raise ConfigError("sync.strategy=ipc needs a CUDA GPU", hint="use sync.strategy=reload (or auto) on CPU")
    if strategy == "ipc" and world > 1:
        raise ConfigError(f"sync.strategy=ipc takes one training process, this run has {world}",
                          hint="give vLLM its own GPU and use sync.strategy=broadcast (or auto)")
    if strategy in ("nccl", "broadcast") and shares_gpu:
        raise ConfigError(f"sync.strategy={strategy}, but the vLLM gymtrl launches gets the trainer's GPU: NCCL cannot "
                          "connect two processes on one GPU",
                          hint="use sync.strategy=ipc (or auto), or give vLLM another GPU with "
                          "vllm.launch.env.CUDA_VISIBLE_DEVICES")


def build_sync(cfg: Config, strategy: str, control: VLLMControl, out_dir: Path) -> WeightSync:
    """The strategy's sync. ipc and broadcast need gymtrl's worker extension in vLLM (refused now,
    not at step 2, when it is missing); reload uses it where it is there, for the exact check."""
    from gymtrl.sync.broadcast import BroadcastSync
    from gymtrl.sync.ipc import IpcSync
    from gymtrl.sync.nccl import NcclSync
    from gymtrl.sync.reload import ReloadSync

    if strategy in ("ipc", "broadcast"):
        check_receivers(control)
    if strategy == "reload":
        if cfg.vllm.launch.enabled:  # gymtrl started vLLM with its receiver: it must answer
            check_receivers(control)
        stamped = cfg.vllm.launch.enabled or _has_receiver(control)
        return ReloadSync(control, Path(cfg.sync.dir or out_dir / "weight_sync"), stamped=stamped)
    if strategy == "ipc":
        return IpcSync(control, cfg.sync.bucket_mb, cfg.vllm.dtype)
    if strategy == "broadcast":
        return BroadcastSync(control, cfg.sync.bucket_mb, cfg.vllm.dtype, cfg.vllm.request_timeout_s)
    if strategy == "nccl":
        return NcclSync()
    if strategy == "lora":
        from gymtrl.sync.lora import LoraSync

        return LoraSync(control, Path(cfg.sync.dir or out_dir / "weight_sync"), policy_model_name(cfg))
    return WeightSync()


def _has_receiver(control: VLLMControl) -> bool:
    """Whether a vLLM gymtrl did not launch runs gymtrl's worker extension. One that runs another
    gymtrl's version of it is an error (WeightSyncError, with the fix), not a reason to check less."""
    try:
        check_receivers(control)
        return True
    except ServerError as e:  # no such method: started without the extension
        log.warning("sync.strategy=reload: the vLLM server does not run gymtrl's worker extension (%s), so only the "
                    "logprob probe checks each push, and in bf16 it cannot tell a server that missed a small step from "
                    "a fresh one. Let gymtrl launch vLLM (vllm.launch.enabled=true) for the exact check.", e.message)
        return False


def build_publisher(cfg: Config, sync: WeightSync, control: VLLMControl, tokenizer) -> WeightPublisher:
    """The sync with its checks: the exact one wherever vLLM stamps its loads, the probe when
    sync.verify (its bound from sync.verify_tolerance, else from the dtypes in play)."""
    probe = None
    if cfg.sync.verify:
        tol = cfg.sync.verify_tolerance
        scaled = False
        if tol is None:
            dtypes = {cfg.model.dtype, cfg.vllm.dtype}
            tol = default_tolerance("float32" if dtypes == {"float32"} else "mixed")
            scaled = dtypes != {"float32"}
        probe = ProbeCheck(control, policy_model_name(cfg), probe_token_ids(tokenizer), tol, scale_with_logits=scaled)
    stamp = StampCheck(control) if cfg.sync.verify else None
    if cfg.sync.verify and sync.name == "nccl":
        log.warning("sync.strategy=nccl: TRL's sync is checked by the logprob probe only, which a small step in bf16 "
                    "can pass without arriving; sync.strategy=broadcast (gymtrl's NCCL sync) is checked exactly")
    return WeightPublisher(sync, probe, stamp)
