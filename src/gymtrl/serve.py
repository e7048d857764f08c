"""`gymtrl serve`: a run's servers (vLLM, judge, NeMo Gym) held up on their own node, for trainers
elsewhere (slurm/submit.sh puts them on the job's last node).

  gymtrl serve --config C --host NODE --ready-file F   launch what the config launches, bound to
      NODE; once every server answers its health endpoint, write F (their URLs, atomically);
      stay up until SIGTERM/SIGINT, or exit non-zero as soon as any server dies.
  gymtrl train --config C --servers F                   use the servers F names instead of
      launching any (waits for F to appear).

F is removed when the servers stop, so a trainer never attaches to servers that are gone.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from gymtrl.atomic import write_text_atomic
from gymtrl.config.schema import Config
from gymtrl.errors import ConfigError, ServerError
from gymtrl.sync.factory import choose_strategy

log = logging.getLogger(__name__)

SERVERS_FILE_VERSION = 1


def default_host() -> str:
    """This machine's name as other nodes of a cluster know it (its short hostname)."""
    return socket.gethostname().split(".")[0]


def with_host(url: str, host: str) -> str:
    parts = urlsplit(url)
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def bind_servers(cfg: Config, host: str) -> None:
    """Point every server gymtrl launches at `host` (they listen there, and that is the URL trainers use)."""
    if cfg.vllm.launch.enabled:
        cfg.vllm.base_url = with_host(cfg.vllm.base_url, host)
    if cfg.gym.launch.enabled:
        cfg.gym.head_server_url = with_host(cfg.gym.head_server_url, host)
    if cfg.judge.server == "launch":
        cfg.judge.base_url = with_host(cfg.judge.base_url, host)  # type: ignore[arg-type]


def servers_record(cfg: Config) -> dict:
    return {
        "version": SERVERS_FILE_VERSION,
        "vllm_base_url": cfg.vllm.base_url,
        "gym_head_server_url": cfg.gym.head_server_url,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def serve(cfg: Config, host: str, ready_file: Path | None) -> None:
    """Launch the config's servers on `host`, report them ready, hold them until a signal."""
    from gymtrl.servers.stack import ServerStack

    if not (cfg.vllm.launch.enabled or cfg.gym.launch.enabled or cfg.judge.server == "launch"):
        raise ConfigError("gymtrl serve: the config launches no server",
                          hint="set vllm.launch.enabled=true and/or gym.launch.enabled=true")
    bind_servers(cfg, host)
    if ready_file is not None:
        ready_file.unlink(missing_ok=True)  # a file left by an earlier run is not this run's servers
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log_dir = Path(cfg.output.dir) / "logs"
    t0 = time.monotonic()
    # The trainers run elsewhere: never on this node's GPUs, so auto means broadcast where there is CUDA
    # (the trainers' auto gives the same answer: vLLM then has the worker extension they need).
    strategy = choose_strategy(cfg.sync.strategy, _cuda_available(), lora=cfg.model.lora.r > 0)
    with ServerStack(cfg, log_dir, strategy=strategy) as stack:
        record = servers_record(cfg)
        log.info("servers ready in %.0fs: vLLM %s, NeMo Gym %s (logs in %s)", time.monotonic() - t0,
                 record["vllm_base_url"], record["gym_head_server_url"], log_dir)
        try:
            if ready_file is not None:
                write_json_atomic(ready_file, record)
                log.info("wrote %s", ready_file)
            while not stop.wait(1.0):
                died = stack.exited()
                if died is not None:
                    raise died
            log.info("stopping the servers (signal)")
        finally:
            if ready_file is not None:
                ready_file.unlink(missing_ok=True)


def read_servers_file(path: Path, wait_s: float) -> dict:
    """The record `gymtrl serve --ready-file` wrote, waiting up to `wait_s` for it to appear."""
    deadline = time.monotonic() + wait_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise ServerError(f"{path} did not appear within {wait_s:g}s: no `gymtrl serve` reported its servers ready",
                              hint="see the serve log (slurm/submit.sh: logs/<job id>/serve.log)")
        time.sleep(1.0)
    try:
        record = json.loads(path.read_text())
        vllm_url, gym_url = record["vllm_base_url"], record["gym_head_server_url"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ServerError(f"{path} is not a servers file written by `gymtrl serve` ({e})") from None
    return {"vllm_base_url": vllm_url, "gym_head_server_url": gym_url}


def attach_servers(cfg: Config, path: Path) -> None:
    """Train against the servers of `path` instead of launching any (the judge, if any, was wired
    into NeMo Gym by `gymtrl serve`). Waits for the file as long as the servers may take to start."""
    wait_s = 60.0 + cfg.vllm.launch.startup_timeout_s + cfg.gym.launch.startup_timeout_s
    if cfg.judge.server == "launch":
        wait_s += cfg.judge.launch.startup_timeout_s
    record = read_servers_file(path, wait_s)
    cfg.vllm.base_url = record["vllm_base_url"]
    cfg.gym.head_server_url = record["gym_head_server_url"]
    cfg.vllm.launch.enabled = False
    cfg.gym.launch.enabled = False
    cfg.judge.server = "none"
    log.info("attached to servers from %s: vLLM %s, NeMo Gym %s", path, cfg.vllm.base_url, cfg.gym.head_server_url)
