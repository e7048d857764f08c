"""Start a server process, stream its output to a log file, wait for it to be healthy, notice at
once when it dies, and stop it (and its children) on exit."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from gymtrl.errors import ServerError

log = logging.getLogger(__name__)


def tail(path: Path, lines: int = 20) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _own_group_and_die_with_parent() -> None:
    """Run in the child before exec: its own process group (stop() signals the whole tree), and
    SIGTERM from the kernel if gymtrl itself dies, even by SIGKILL, so no server is left behind.
    The kernel ties this to the *thread* that started the child: start servers from a thread that
    lives as long as they should (gymtrl starts them from the main thread)."""
    import ctypes

    os.setsid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ManagedProcess:
    def __init__(self, name: str, command: list[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: str | None = None):
        self.name = name
        self.command = command
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.hung: str | None = None  # why gymtrl killed it as hung (HealthDeadline), if it did

    def start(self) -> None:
        self.hung = None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = self.log_path.open("ab")
        logf.write(f"$ {' '.join(self.command)}\n".encode())
        logf.flush()
        try:
            self.proc = subprocess.Popen(
                self.command, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, **(self.env or {})},
                cwd=self.cwd, preexec_fn=_own_group_and_die_with_parent,
            )
        except OSError as e:
            raise ServerError(f"cannot start {self.name}: {e}", hint=f"command: {' '.join(self.command)}") from None
        finally:
            logf.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def died_error(self) -> ServerError:
        code = self.proc.returncode if self.proc else None
        if self.hung:
            return ServerError(f"{self.name} hung: {self.hung}, so gymtrl killed it; last lines of "
                               f"{self.log_path}:\n{tail(self.log_path)}",
                               hint="a busy host can be slow to answer: raise supervision.hang_timeout_s if it was "
                               "only slow (0 switches the check off)")
        return ServerError(
            f"{self.name} exited (code {code}); last lines of {self.log_path}:\n{tail(self.log_path)}"
        )

    def kill_as_hung(self, why: str) -> None:
        """Kill the whole process group (SIGKILL reaches a stopped process too): from now on it is a
        server that exited, and its error says it hung."""
        self.hung = why
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def raise_if_exited(self) -> None:
        """Raise at once if the process has died."""
        if self.proc is not None and self.proc.poll() is not None:
            raise self.died_error()

    def wait_healthy(self, probe: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.raise_if_exited()
            if probe():
                return
            time.sleep(0.5)
        raise ServerError(
            f"{self.name} not healthy after {timeout_s:g}s ({what}); last lines of {self.log_path}:\n"
            f"{tail(self.log_path)}",
            hint="raise the launch.startup_timeout_s of this server if it is just slow",
        )

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is None:
            return
        if not self.alive():
            # The leader is gone; its children (vLLM's engine core, Gym's servers) may not be. The
            # group's id cannot be reused while any member lives, so this reaches only them.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        except ProcessLookupError:
            pass


class HealthDeadline:
    """The liveness check sees exits only; a server can hang alive (stopped, deadlocked, swapped out).
    This thread asks each watched server's health URL every few seconds, and kills one that has been
    answered healthy since its start but has not answered for `timeout_s` (ManagedProcess.kill_as_hung):
    the exit is then handled as any other (stop with its log tail, or restart). A server that was
    never healthy since its (re)start is not measured: its startup_timeout_s covers that."""

    def __init__(self, timeout_s: float, interval_s: float | None = None):
        self.timeout_s = timeout_s
        self.interval_s = interval_s or min(5.0, max(0.5, timeout_s / 5))
        self._watched: list[tuple[ManagedProcess, str]] = []
        self._state: dict[int, tuple[object, float | None]] = {}  # id(process) -> (its Popen, unanswered since)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, process: ManagedProcess, health_url: str) -> None:
        self._watched.append((process, health_url))

    def start(self) -> None:
        if self.timeout_s > 0 and self._watched and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gymtrl-health-deadline", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for process, url in self._watched:
                self.check(process, url)

    def check(self, process: ManagedProcess, url: str) -> None:
        if not process.alive():
            return
        proc, since = self._state.get(id(process), (None, None))
        fresh = proc is not process.proc  # (re)started since the last look: not yet seen healthy
        if http_ok(url, timeout_s=min(5.0, self.interval_s)):
            self._state[id(process)] = (process.proc, None)
            return
        if fresh:
            return
        now = time.monotonic()
        since = since if since is not None else now
        self._state[id(process)] = (proc, since)
        if now - since >= self.timeout_s and process.alive():
            why = f"{url} did not answer for {now - since:.0f} s (supervision.hang_timeout_s={self.timeout_s:g})"
            log.warning("%s %s; killing it", process.name, why)
            process.kill_as_hung(why)


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout_s, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False
