"""The vLLM server command gymtrl launches, with the flags NeMo Gym's training model config needs."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from gymtrl.config.schema import Config
from gymtrl.errors import ConfigError
from gymtrl.vllm_plugin.protocol import ENV_SWITCH

# The worker extension that takes gymtrl's own weight pushes and stamps what it loaded (reload, ipc, broadcast).
RECEIVER_CLASS = "gymtrl_vllm_plugin.receivers.WeightReceiver"
RECEIVER_STRATEGIES = ("reload", "ipc", "broadcast")


def served_model_name(cfg: Config) -> str:
    return cfg.vllm.served_model_name or cfg.model.name_or_path


LORA_ADAPTER_NAME = "gymtrl-lora"
# The ranks vLLM's --max-lora-rank accepts.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def pushes_adapter(cfg: Config) -> bool:
    """model.lora with the adapter sync (sync.strategy lora, or auto): vLLM serves the adapter."""
    return cfg.model.lora.r > 0 and cfg.sync.strategy in ("auto", "lora")


def policy_model_name(cfg: Config) -> str:
    """The model name rollouts and checks ask vLLM for: the LoRA adapter pushed by the lora sync
    (loaded in place under one name at every push), else the served model."""
    return LORA_ADAPTER_NAME if pushes_adapter(cfg) else served_model_name(cfg)


def lora_server_args(rank: int) -> list[str]:
    """vLLM's LoRA switches for one adapter of this rank (its --max-lora-rank rounded up to one it takes)."""
    allowed = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
    if allowed is None:
        raise ConfigError(f"model.lora.r={rank} is above vLLM's largest LoRA rank ({VLLM_LORA_RANKS[-1]})",
                          hint=f"set model.lora.r to at most {VLLM_LORA_RANKS[-1]}")
    return ["--enable-lora", "--max-lora-rank", str(allowed), "--max-loras", "1"]


def vllm_command(cfg: Config, strategy: str) -> list[str]:
    """`vllm serve` for the policy; `strategy` is the weight sync's (choose_strategy's answer)."""
    launch = cfg.vllm.launch
    if launch.command:
        return list(launch.command) + list(launch.extra_args)
    if not launch.venv:
        raise ConfigError("vllm.launch.enabled is true but neither vllm.launch.venv nor vllm.launch.command is set")
    url = urlsplit(cfg.vllm.base_url)
    cmd = [
        str(Path(launch.venv).expanduser() / "bin" / "vllm"), "serve", cfg.model.name_or_path,
        "--host", url.hostname or "127.0.0.1", "--port", str(url.port or 8000),
        "--served-model-name", served_model_name(cfg),
        "--dtype", cfg.vllm.dtype,
        "--max-model-len", str(cfg.vllm.max_model_len),
        # NeMo Gym sends tools with tool_choice "auto"; Qwen2.5-style models use the hermes format.
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        # Sampling logprobs as the sampler saw them (after temperature), as TRL's server does.
        "--logprobs-mode", "processed_logprobs", "--max-logprobs", "-1",
    ]
    if cfg.vllm.tensor_parallel_size > 1:
        cmd += ["--tensor-parallel-size", str(cfg.vllm.tensor_parallel_size)]
    if strategy == "nccl":
        cmd += ["--weight-transfer-config", '{"backend":"nccl"}']
    elif strategy in RECEIVER_STRATEGIES:
        cmd += ["--worker-extension-cls", RECEIVER_CLASS]
    elif strategy == "lora":
        cmd += lora_server_args(cfg.model.lora.r)
    return cmd + list(launch.extra_args)


def vllm_env(cfg: Config) -> dict[str, str]:
    # Dev mode exposes /collective_rpc (reload_weights), /reset_prefix_cache and the NCCL endpoints.
    env = {"VLLM_SERVER_DEV_MODE": "1"}
    if cfg.vllm.prefix_correction:
        env[ENV_SWITCH] = "1"  # switches gymtrl's vLLM plugin on (gymtrl.vllm_plugin)
    if pushes_adapter(cfg):
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # /v1/load_lora_adapter, each push
    return {**env, **cfg.vllm.launch.env}


def vllm_python(cfg: Config) -> str | None:
    """The Python of the venv gymtrl launches vLLM from (None with a custom launch command)."""
    launch = cfg.vllm.launch
    return None if launch.command or not launch.venv else str(Path(launch.venv).expanduser() / "bin" / "python")


def judge_vllm_command(cfg: Config) -> list[str]:
    """judge.server=launch: a plain vLLM for the judge. No dev mode, so it has no weight-update
    endpoints: nothing can push the policy's weights to it, by accident or otherwise."""
    judge = cfg.judge
    venv = judge.launch.venv or cfg.vllm.launch.venv
    url = urlsplit(judge.base_url or "")
    return [
        str(Path(venv).expanduser() / "bin" / "vllm"), "serve", str(judge.model),  # type: ignore[arg-type]
        "--host", url.hostname or "127.0.0.1", "--port", str(url.port or 8001),
        "--served-model-name", str(judge.model),
        "--dtype", cfg.vllm.dtype,
        "--max-model-len", str(cfg.vllm.max_model_len),
    ] + list(judge.launch.extra_args)


def judge_vllm_env(cfg: Config) -> dict[str, str]:
    # Explicitly off, whatever the parent's environment holds.
    return {"VLLM_SERVER_DEV_MODE": "0", ENV_SWITCH: "0", **cfg.judge.launch.env}
