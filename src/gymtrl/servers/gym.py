"""The command that starts NeMo Gym's servers from gymtrl (gym_launcher.py, in the Gym venv)."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

from gymtrl.atomic import write_text_atomic
from gymtrl.net import server_root
from gymtrl.config.schema import Config
from gymtrl.errors import ConfigError
from gymtrl.servers.vllm import served_model_name

LAUNCHER = Path(__file__).with_name("gym_launcher.py")
# gymtrl's own environments, in NeMo Gym's layout (resources_servers/<name>/app.py), shipped in the package.
ENVS_ROOT = Path(__file__).resolve().parents[1] / "envs"


def gym_command(cfg: Config, log_dir: Path) -> list[str]:
    launch = cfg.gym.launch
    if launch.command:
        return list(launch.command) + list(launch.extra_args)
    if not launch.venv:
        raise ConfigError("gym.launch.enabled is true but neither gym.launch.venv nor gym.launch.command is set")
    if not launch.config_paths:
        raise ConfigError("gym.launch.config_paths is empty: list the NeMo Gym configs of your environments")
    head = urlsplit(cfg.gym.head_server_url)
    cmd = [
        str(Path(launch.venv).expanduser() / "bin" / "python"), str(LAUNCHER),
        "--head-host", head.hostname or "127.0.0.1", "--head-port", str(head.port or 11000),
        "--log-dir", str(log_dir), "--startup-timeout", str(launch.startup_timeout_s),
    ]
    if ENVS_ROOT.is_dir():
        cmd += ["--extra-root", str(ENVS_ROOT)]
    for path in launch.config_paths:
        local = Path(path).expanduser()
        cmd += ["--config", str(local.resolve()) if local.exists() else path]
    # NeMo Gym's policy_* keys point its model server at our vLLM (the env.yaml convention).
    policy = {
        "policy_base_url": cfg.vllm.base_url.rstrip("/") + "/v1",
        # Read by NeMo Gym from the environment, so the key never lands on a command line or in a log.
        "policy_api_key": f"${{oc.env:{cfg.vllm.api_key_env},EMPTY}}",
        "policy_model_name": served_model_name(cfg),
        # Every server listens where the head does (NeMo Gym's default is loopback), so agents on
        # a server node are reachable by trainers on other nodes (gymtrl serve --host).
        "default_host": head.hostname or "127.0.0.1",
    }
    for key, value in {**policy, **pool_overrides(cfg), **judge_overrides(cfg, log_dir), **launch.overrides}.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    cmd += ["--prompt-ids", launch.prompt_ids]
    if launch.copies > 1:
        cmd += ["--copies", str(launch.copies)]
    if cfg.judge.server != "none":
        cmd += ["--judge-server", "policy_model" if cfg.judge.server == "policy" else JUDGE_INSTANCE]
        for name in cfg.judge.resources_servers:
            cmd += ["--judge-for", name]
    return cmd + list(launch.extra_args)


# NeMo Gym 0.7 caps each server's connections to one host (say, its agent's to the model server) at 1,024.
NEMO_GYM_DEFAULT_PER_HOST = 1024


def pool_overrides(cfg: Config) -> dict:
    """Room in NeMo Gym's connection pools for every rollout gymtrl keeps in flight. Each rollout
    has at most one call open from its agent to each server, so the per-host cap must reach
    rollout.max_concurrency, or rollouts past 1,024 queue inside Gym for nothing."""
    want = cfg.rollout.max_concurrency
    if want <= NEMO_GYM_DEFAULT_PER_HOST:
        return {}
    return {"global_aiohttp_connector_limit_per_host": want, "global_aiohttp_connector_limit": max(100 * 1024, 4 * want)}


JUDGE_INSTANCE = "gymtrl_judge_model"


def judge_overrides(cfg: Config, log_dir: Path) -> dict:
    """For a url or launched judge: a NeMo Gym model server instance in front of the judge endpoint
    (plain chat, no token ids); its key is read from the environment by NeMo Gym.

    NeMo Gym 0.7 retries a refused connection forever, so a judge that is gone would hang every
    rollout that needs it until gymtrl's deadline. It bounds those retries only for a model server
    that reads its address from an `endpoint_file`; gymtrl writes one (holding the same address)
    so a dead judge fails fast, as NeMo Gym's counted `judge_failed`."""
    judge = cfg.judge
    if judge.server not in ("url", "launch"):
        return {}
    base_url = server_root(judge.base_url) + "/v1"  # type: ignore[arg-type]
    endpoint_file = write_endpoint_file(Path(log_dir) / "judge_endpoint", base_url)
    return {f"{JUDGE_INSTANCE}.responses_api_models.vllm_model": {
        "entrypoint": "app.py",
        "base_url": base_url,
        "api_key": f"${{oc.env:{judge.api_key_env},EMPTY}}",
        "model": judge.model,
        "return_token_id_information": False,
        "uses_reasoning_parser": False,
        "endpoint_file": str(endpoint_file),
        "endpoint_connection_retries": judge.connection_retries,
    }}


def write_endpoint_file(path: Path, url: str) -> Path:
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, url + "\n")  # NeMo Gym never reads a half-written address
