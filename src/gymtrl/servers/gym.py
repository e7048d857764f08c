"""The command that starts NeMo Gym's servers from gymtrl (gym_launcher.py, in the Gym venv)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from gymtrl.atomic import write_text_atomic
from gymtrl.net import server_root
from gymtrl.config.schema import Config
from gymtrl.errors import ConfigError, ServerError
from gymtrl.servers.gym_requirements import UNMET_PREFIX
from gymtrl.servers.vllm import policy_model_name

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
        "policy_model_name": policy_model_name(cfg),
        # Every server listens where the head does (NeMo Gym's default is loopback), so agents on
        # a server node are reachable by trainers on other nodes (gymtrl serve --host).
        "default_host": head.hostname or "127.0.0.1",
    }
    for key, value in {**policy, **pool_overrides(cfg), **judge_overrides(cfg, log_dir), **launch.overrides}.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    cmd += ["--prompt-ids", launch.prompt_ids, "--requirements", launch.requirements]
    cmd += [f"--pip-arg={arg}" for arg in launch.pip_args]
    if launch.copies > 1:
        cmd += ["--copies", str(launch.copies)]
    if cfg.judge.server != "none":
        cmd += ["--judge-server", "policy_model" if cfg.judge.server == "policy" else JUDGE_INSTANCE]
        for name in cfg.judge.resources_servers:
            cmd += ["--judge-for", name]
    return cmd + list(launch.extra_args)


def unmet_gym_requirements(cfg: Config, log_dir: Path, install: bool) -> dict | None:
    """Run gym_launcher.py's requirements step alone (it starts no server): None when every launched
    server's requirements.txt is met by the Gym venv (after installing what is missing, if `install`),
    else its report: {"venv", "installed", "servers": [{"server", "missing", "install", ...}]}.
    Its output goes to <log_dir>/gym_requirements.log."""
    launch = cfg.gym.launch
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "gym_requirements.log"
    cmd = gym_command(cfg, log_dir / "gym") + ["--requirements-only"]
    cmd[cmd.index("--requirements") + 1] = "install" if install else "check"
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **launch.env}, timeout=launch.startup_timeout_s)
    except subprocess.TimeoutExpired:
        raise ServerError(f"checking the NeMo Gym servers' requirements took over {launch.startup_timeout_s:g}s",
                          hint="see pip's progress in the Gym venv, or set gym.launch.requirements=ignore") from None
    write_text_atomic(log_path, done.stdout)
    if done.returncode == 0:
        return None
    unmet = [line[len(UNMET_PREFIX):] for line in done.stdout.splitlines() if line.startswith(UNMET_PREFIX)]
    if not unmet:
        tail = [line for line in done.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
        raise ServerError(f"NeMo Gym's launcher failed before starting a server (exit {done.returncode}): {tail[0]}",
                          hint=f"its whole output is in {log_path}")
    return {**json.loads(unmet[-1]), "log": str(log_path)}


def check_gym_requirements(cfg: Config, log_dir: Path) -> None:
    """Before any server starts: every launched NeMo Gym server's requirements.txt is met by the Gym
    venv (what is missing installed first, with gym.launch.requirements=install), or the run stops
    here naming the servers and packages."""
    launch = cfg.gym.launch
    if launch.command or launch.requirements == "ignore":
        return
    report = unmet_gym_requirements(cfg, log_dir, install=launch.requirements == "install")
    if report is None:
        return
    parts = [f"{s['server']} needs {', '.join(s['missing'])}" for s in report["servers"]]
    wanted = [shlex.quote(line) for s in report["servers"] for line in s["install"]]
    pip_install = f"`{report['venv']}/bin/pip install {' '.join(dict.fromkeys(wanted))}`"
    if report["installed"]:
        errors = sorted({s["pip_error"] for s in report["servers"] if s.get("pip_error")})
        why = f"; pip could not install them ({'; '.join(errors) or 'see the log'})"
        hint = (f"install them into the Gym venv ({pip_install}), give pip a wheelhouse with "
                f"gym.launch.pip_args='[--no-index,--find-links,DIR]', or start anyway with "
                f"gym.launch.requirements=ignore; pip's output is in {report['log']}")
    else:
        why = " (gym.launch.requirements=check installs nothing)"
        hint = f"install them ({pip_install}) or set gym.launch.requirements=install"
    raise ServerError(f"the Gym venv lacks what its environments need: {'; '.join(parts)}{why}", hint=hint)


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
