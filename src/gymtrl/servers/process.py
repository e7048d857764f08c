"""Start a server process, stream its output to a log file, wait for it to be healthy, notice at
once when it dies, and stop it (and its children) on exit."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from gymtrl.errors import ServerError


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

    def start(self) -> None:
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
        return ServerError(
            f"{self.name} exited (code {code}); last lines of {self.log_path}:\n{tail(self.log_path)}"
        )

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


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout_s, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False
