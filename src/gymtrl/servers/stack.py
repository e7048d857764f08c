"""The servers a run needs, up and healthy before the first step, and stopped when it ends.

For each of vLLM and NeMo Gym: when `launch.enabled`, gymtrl starts it (all at once), streams its
output to <output>/logs/, and waits for its health endpoint; otherwise it must already answer at
its configured URL. With judge.server=launch the judge's vLLM is started the same way. While training,
`exited()` notices at once when a launched server has died, a HealthDeadline kills a launched vLLM
that hangs alive (supervision.hang_timeout_s) so that it counts as one, and `restart_exited()` starts
it again (supervision.on_server_exit).
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

from gymtrl.net import server_root
from gymtrl.config.schema import Config
from gymtrl.errors import ServerError
from gymtrl.gym.discovery import wait_ready
from gymtrl.servers.gym import check_gym_requirements, gym_command
from gymtrl.servers.process import HealthDeadline, ManagedProcess, http_ok
from gymtrl.servers.vllm import (RECEIVER_STRATEGIES, judge_vllm_command, judge_vllm_env, served_model_name, vllm_command, vllm_env,
                                 vllm_python)
from gymtrl.servers.vllm_control import VLLMControl, configure_retries
from gymtrl.vllm_plugin.install import ensure_installed
from gymtrl.vllm_plugin.protocol import ENV_SWITCH

log = logging.getLogger(__name__)


def ensure_port_free(url: str, key: str) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise ServerError(
                f"cannot launch a server on {host}:{port} ({key}): the port is taken, perhaps by a server "
                "left from an earlier run",
                hint="stop that process, or choose another port in the config",
            ) from None


def wait_port_free(url: str, timeout_s: float = 30.0) -> None:
    """Until nothing listens on the URL's port any more (a server that exited may leave children
    holding it for a moment)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ensure_port_free(url, "restart")
            return
        except ServerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class ServerStack:
    def __init__(self, cfg: Config, log_dir: Path, strategy: str = "reload", launch: bool = True):
        self.cfg = cfg
        # False on the processes of a multi-process run other than the main one: they wait for the
        # servers the main process launches.
        self.launch = launch
        self.log_dir = Path(log_dir)
        self.strategy = strategy  # the weight sync's: how a launched vLLM must be started
        self.processes: list[ManagedProcess] = []
        self.vllm: ManagedProcess | None = None
        self.judge: ManagedProcess | None = None
        self.gym: ManagedProcess | None = None
        self.health_deadline = HealthDeadline(cfg.supervision.hang_timeout_s)
        configure_retries(cfg.vllm.request_retries, cfg.vllm.request_retry_max_s)

    def __enter__(self) -> "ServerStack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if not self.launch:
            self._wait_for_main_process_servers()
            return
        cfg = self.cfg
        # A server left over from an earlier run would answer our health checks in place of the one
        # we start (which then fails to bind): refuse to start on a port that is taken.
        if cfg.vllm.launch.enabled:
            ensure_port_free(cfg.vllm.base_url, "vllm.base_url")
        if cfg.gym.launch.enabled:
            ensure_port_free(cfg.gym.head_server_url, "gym.head_server_url")
        if cfg.judge.server == "launch":
            ensure_port_free(cfg.judge.base_url, "judge.base_url")  # type: ignore[arg-type]
        if cfg.gym.launch.enabled:
            check_gym_requirements(cfg, self.log_dir)  # installs or refuses before any server starts
        needs_plugin = cfg.vllm.prefix_correction or self.strategy in RECEIVER_STRATEGIES
        if cfg.vllm.launch.enabled and needs_plugin and vllm_python(cfg):
            if ensure_installed(vllm_python(cfg)):
                log.info("installed gymtrl's vLLM plugin into %s", cfg.vllm.launch.venv)
        if cfg.vllm.launch.enabled:
            self.vllm = self._launch(ManagedProcess("vLLM server", vllm_command(cfg, self.strategy),
                                                    self.log_dir / "vllm.log", env=vllm_env(cfg)))
        if cfg.judge.server == "launch":
            self.judge = self._launch(ManagedProcess("judge vLLM server", judge_vllm_command(cfg),
                                                     self.log_dir / "judge_vllm.log", env=judge_vllm_env(cfg)))
        if cfg.gym.launch.enabled:
            self.gym = self._launch(ManagedProcess("NeMo Gym servers", gym_command(cfg, self.log_dir / "gym"),
                                                   self.log_dir / "gym.log", env=dict(cfg.gym.launch.env)))

        if self.vllm is not None:
            self._wait_vllm()
        elif not http_ok(cfg.vllm.base_url.rstrip("/") + "/health", timeout_s=10.0):
            raise ServerError(
                f"no vLLM server answers at {cfg.vllm.base_url}",
                hint="start one (see README: 'Your own run') or set vllm.launch.enabled=true",
            )
        self._check_served_model()
        self._check_prefix_correction()
        if self.judge is not None:
            self._wait_judge()
        if cfg.judge.server in ("url", "launch"):
            self._check_judge(launched=self.judge is not None)
        if self.gym is not None:
            self._wait_gym()
        else:
            wait_ready(cfg.gym.head_server_url, 120.0, unreachable_after_s=3.0)
        if self.vllm is not None:
            self.health_deadline.watch(self.vllm, cfg.vllm.base_url.rstrip("/") + "/health")
        if self.judge is not None:
            self.health_deadline.watch(self.judge, server_root(cfg.judge.base_url) + "/health")  # type: ignore[arg-type]
        self.health_deadline.start()

    def _wait_for_main_process_servers(self) -> None:
        cfg = self.cfg
        patience = 30.0 + sum(c.launch.startup_timeout_s for c in (cfg.vllm, cfg.gym) if c.launch.enabled)
        deadline = time.monotonic() + patience
        urls = [cfg.vllm.base_url.rstrip("/") + "/health"]
        if cfg.judge.server == "launch":
            urls.append(server_root(cfg.judge.base_url) + "/health")  # type: ignore[arg-type]
        for url in urls:
            while not http_ok(url):
                if time.monotonic() > deadline:
                    raise ServerError(f"{url} did not answer within {patience:g}s",
                                      hint="the main process (rank 0) starts the servers: see its log")
                time.sleep(1.0)
        wait_ready(cfg.gym.head_server_url, max(10.0, deadline - time.monotonic()))

    def _launch(self, process: ManagedProcess) -> ManagedProcess:
        process.start()
        self.processes.append(process)
        return process

    def _wait_vllm(self) -> None:
        health = self.cfg.vllm.base_url.rstrip("/") + "/health"
        self.vllm.wait_healthy(lambda: http_ok(health), self.cfg.vllm.launch.startup_timeout_s, health)  # type: ignore[union-attr]

    def _wait_judge(self) -> None:
        url = server_root(self.cfg.judge.base_url) + "/health"  # type: ignore[arg-type]
        self.judge.wait_healthy(lambda: http_ok(url), self.cfg.judge.launch.startup_timeout_s, url)  # type: ignore[union-attr]

    def _wait_gym(self) -> None:
        gym = self.gym
        wait_ready(self.cfg.gym.head_server_url, self.cfg.gym.launch.startup_timeout_s,
                   is_alive=lambda: gym.alive() or bool(gym.raise_if_exited()))  # type: ignore[union-attr]

    def restart_exited(self) -> list[str]:
        """Start again every launched server that has exited, and wait until each is ready as at
        start-up (a new vLLM serves the weights on disk: the caller re-syncs). Returns their names."""
        restarted = []
        for process, wait, url in ((self.vllm, self._wait_vllm, self.cfg.vllm.base_url),
                                   (self.judge, self._wait_judge, self.cfg.judge.base_url),
                                   (self.gym, self._wait_gym, self.cfg.gym.head_server_url)):
            if process is None or process.alive():
                continue
            process.stop()  # whatever is left of its process group (vLLM's engine, Gym's servers)
            wait_port_free(url)  # type: ignore[arg-type]
            process.start()
            wait()
            if process is self.vllm:
                self._check_served_model()
            restarted.append(process.name)
        return restarted

    def _served_models(self, url: str, api_key_env: str) -> list[str]:
        control = VLLMControl(url, self.cfg.vllm.request_timeout_s, api_key_env)
        try:
            return control.served_models()
        finally:
            control.close()

    def _check_served_model(self) -> None:
        served = self._served_models(self.cfg.vllm.base_url, self.cfg.vllm.api_key_env)
        want = served_model_name(self.cfg)
        if want not in served:
            raise ServerError(
                f"the vLLM server at {self.cfg.vllm.base_url} serves {served}, not '{want}'",
                hint="set vllm.served_model_name to the name the server uses (NeMo Gym's policy_model_name)",
            )

    def _check_judge(self, launched: bool) -> None:
        """The judge answers and serves judge.model: found now rather than at the first judged answer."""
        judge = self.cfg.judge
        url = server_root(judge.base_url)  # type: ignore[arg-type]
        try:
            served = self._served_models(url, judge.api_key_env)
        except ServerError as e:
            raise ServerError(f"no judge answers at judge.base_url={url}: {e.message}",
                              hint="start it, or fix judge.base_url / judge.api_key_env") from None
        if judge.model in served:
            log.info("LLM judge: %s at %s for %s", judge.model, url, ", ".join(judge.resources_servers))
        elif launched:
            raise ServerError(f"the judge server at {url} serves {served}, not '{judge.model}'")
        else:  # some gateways list fewer models than they serve
            log.warning("the judge server at %s does not list '%s' (it lists %s)", url, judge.model, served)

    def _check_prefix_correction(self) -> None:
        vllm = self.cfg.vllm
        control = VLLMControl(vllm.base_url, vllm.request_timeout_s, vllm.api_key_env)
        try:
            active = control.prefix_correction_active(served_model_name(self.cfg))
        finally:
            control.close()
        if vllm.prefix_correction and not active:
            raise ServerError(
                f"the vLLM server at {vllm.base_url} does not run gymtrl's prefix correction "
                "(vllm.prefix_correction is true)",
                hint=f"install it with `gymtrl vllm-plugin install --python <vLLM's python>` and start vLLM with "
                f"{ENV_SWITCH}=1, or set vllm.prefix_correction=false to train without it",
            )
        log.info("vLLM prefix correction: %s", "on" if active else "off")

    def raise_if_any_exited(self) -> None:
        for p in self.processes:
            p.raise_if_exited()

    def exited(self) -> ServerError | None:
        """The error describing a launched server that has exited, if one has."""
        try:
            self.raise_if_any_exited()
        except ServerError as e:
            return e
        return None

    def wait_for_exit(self, timeout_s: float) -> ServerError | None:
        """exited(), waiting up to `timeout_s` for a server that is going down to be gone."""
        deadline = time.monotonic() + timeout_s
        while True:
            died = self.exited()
            if died is not None or time.monotonic() >= deadline or not self.processes:
                return died
            time.sleep(0.2)

    def stop(self) -> None:
        self.health_deadline.stop()
        for p in reversed(self.processes):
            p.stop()
