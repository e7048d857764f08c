"""Transient server faults must not end a run (issue 23): idempotent vLLM control calls are asked
again after a failed connection (vllm.request_retries), collective halves never are; a launched
server that hangs alive is killed after supervision.hang_timeout_s and handled as one that exited.

Fault injectors (named so): `ResettingTransport` (an httpx transport whose first calls fail as a
reset connection would) and `ResettingProxy` (a TCP proxy in front of the real vLLM that resets the
first connections it accepts)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from gymtrl.errors import ServerError
from gymtrl.servers.process import HealthDeadline, ManagedProcess
from gymtrl.servers.vllm_control import RetryPolicy, VLLMControl
from gymtrl.vllm_plugin.protocol import COMMIT_METHOD, JOIN_METHOD, RECEIVE_METHOD, STAMP_METHOD

FAST = RetryPolicy(retries=3, max_s=10.0, backoff_s=0.01)


class ResettingTransport(httpx.BaseTransport):
    """Fault injector: the first `resets` requests fail with ECONNRESET; the rest answer 200."""

    def __init__(self, resets: int):
        self.resets = resets
        self.calls: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request.url.path)
        if len(self.calls) <= self.resets:
            raise httpx.ReadError("[Errno 104] Connection reset by peer", request=request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "tiny"}]})
        return httpx.Response(200, json={"results": [{"push": "p1", "tensors": 3}]})


def control_with(transport: httpx.BaseTransport, policy: RetryPolicy = FAST) -> VLLMControl:
    control = VLLMControl("http://vllm.invalid:1", 5.0, retry=policy)
    control._http = httpx.Client(base_url=control.base_url, transport=transport)
    return control


def test_idempotent_calls_are_asked_again_after_a_reset_connection():
    for call in (lambda c: c.reset_prefix_cache(), lambda c: c.collective_rpc(STAMP_METHOD, {}),
                 lambda c: c.collective_rpc(COMMIT_METHOD, {"push": "p1"}), lambda c: c.served_models(),
                 lambda c: c.reload_weights("/w")):
        transport = ResettingTransport(resets=2)
        call(control_with(transport))
        assert len(transport.calls) == 3  # two resets, then the answer


def test_collective_halves_are_never_asked_again():
    for method in (RECEIVE_METHOD, JOIN_METHOD):
        transport = ResettingTransport(resets=1)
        with pytest.raises(ServerError, match="unreachable: ReadError"):
            control_with(transport).collective_rpc(method, {})
        assert len(transport.calls) == 1


def test_retries_are_bounded_by_count_and_by_time():
    transport = ResettingTransport(resets=100)
    with pytest.raises(ServerError, match=r"unreachable \(tried 4 times\): ReadError"):
        control_with(transport).collective_rpc(STAMP_METHOD, {})
    assert len(transport.calls) == 4  # 1 + retries=3
    transport = ResettingTransport(resets=100)
    start = time.monotonic()
    with pytest.raises(ServerError):
        control_with(transport, RetryPolicy(retries=50, max_s=1.0, backoff_s=0.2)).reset_prefix_cache()
    # 50 retries at >= 0.2 s each would take >= 10 s: max_s=1.0 cut them short, in time and in count
    assert time.monotonic() - start < 10 and len(transport.calls) < 10


def test_committing_the_stamped_push_again_answers_as_the_first_commit():
    import torch

    from gymtrl.vllm_plugin.load_stamp import LoadStamp

    worker = LoadStamp()
    worker._gymtrl_note_loaded("p1", [("w", torch.ones(3))])
    first = worker.gymtrl_commit_push("p1")
    assert worker.gymtrl_commit_push("p1") == first == {"push": "p1", "tensors": 1}
    with pytest.raises(ValueError, match="received no weights for push 'p2'"):
        worker.gymtrl_commit_push("p2")  # a push it never saw is still refused


HEALTH_SERVER = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health_server(tmp_path):
    port = _free_port()
    process = ManagedProcess("vLLM server", [sys.executable, "-c", HEALTH_SERVER, str(port)], tmp_path / "h.log")
    process.start()
    url = f"http://127.0.0.1:{port}/health"
    process.wait_healthy(lambda: _answers(url), 20, url)
    return process, url


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
        return True
    except httpx.HTTPError:
        return False


def test_a_server_paused_past_the_hang_deadline_is_killed_and_reads_as_hung(tmp_path):
    """A real process (a tiny /health server): paused shorter than the deadline it lives on; paused
    past it, it is killed and its error says it hung, naming the setting."""
    process, url = _health_server(tmp_path)
    deadline = HealthDeadline(timeout_s=3.0, interval_s=0.3)
    deadline.watch(process, url)
    deadline.start()
    try:
        os.killpg(process.proc.pid, signal.SIGSTOP)
        time.sleep(1.5)
        os.killpg(process.proc.pid, signal.SIGCONT)
        time.sleep(1.0)
        assert process.alive() and process.hung is None
        os.killpg(process.proc.pid, signal.SIGSTOP)
        end = time.monotonic() + 15
        while process.alive() and time.monotonic() < end:
            time.sleep(0.2)
        assert not process.alive()
        error = process.died_error()
        assert error.message.startswith("vLLM server hung: ") and "supervision.hang_timeout_s=3" in error.message
    finally:
        deadline.stop()
        process.stop()


class ResettingProxy:
    """Fault injector: a TCP proxy to `target`; the first `resets` connections whose request line
    starts with one of `paths` are reset (RST) after the request arrived; everything else is relayed."""

    def __init__(self, target_port: int, resets: int, paths: tuple[str, ...]):
        self.target_port, self.resets, self.paths = target_port, resets, paths
        self.reset_done = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        first = client.recv(65536)
        line = first.split(b"\r\n", 1)[0].decode(errors="replace")
        if self.reset_done < self.resets and any(f" {p} " in line for p in self.paths):
            self.reset_done += 1
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            client.close()  # RST: "Connection reset by peer"
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        upstream.sendall(first)

        def pipe(a, b):
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)

    def close(self):
        self.sock.close()


@pytest.mark.servers
def test_reset_connections_to_the_real_vllm_are_retried(servers):
    """Against the session's real CPU vLLM behind ResettingProxy: the stamp query, a cache reset,
    the model list and the prefix-correction probe each survive two reset connections."""
    from gymtrl.servers.vllm import served_model_name
    from gymtrl.sync.receiver import load_stamps

    port = int(servers.vllm_url.rsplit(":", 1)[1])
    for path, call in (("/collective_rpc", lambda c: load_stamps(c)), ("/reset_prefix_cache", lambda c: c.reset_prefix_cache()),
                       ("/v1/models", lambda c: c.served_models()),
                       ("/tokenize", lambda c: c.prefix_correction_active(served_model_name(servers.cfg)))):
        proxy = ResettingProxy(port, resets=2, paths=(path,))
        control = VLLMControl(proxy.url, 60, retry=RetryPolicy(retries=3, max_s=30, backoff_s=0.1))
        try:
            call(control)
        finally:
            control.close()
            proxy.close()
        assert proxy.reset_done == 2, path


def _wait_for_step(metrics, run: subprocess.Popen, step: int, timeout_s: float = 600) -> None:
    from gymtrl.metrics import read_metrics

    deadline = time.monotonic() + timeout_s
    while not (metrics.exists() and any("reward" in m and int(m["step"]) >= step for m in read_metrics(metrics))):
        assert run.poll() is None, run.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.3)


@pytest.mark.servers
def test_a_vllm_paused_mid_run_and_resumed_does_not_end_the_run(servers, tmp_path):
    """The session's real vLLM (its API server and engine) is stopped with SIGSTOP for 8 s after
    step 1, then continued: the run finishes every step, every push checked."""
    from conftest import REPO
    from gymtrl.metrics import read_metrics

    config = tmp_path / "c.yaml"
    config.write_text(f"""
model: {{name_or_path: {servers.model}, dtype: float32}}
vllm: {{dtype: float32}}
data: {{train: [{REPO / 'src/gymtrl/envs/resources_servers/digit_reply/data/train.jsonl'}]}}
grpo: {{max_steps: 4, per_device_train_batch_size: 8, num_generations: 4, max_completion_length: 8,
        save_strategy: "no", learning_rate: 1.0e-4}}
output: {{dir: {tmp_path / 'run'}}}
""")
    run = subprocess.Popen([sys.executable, "-m", "gymtrl.cli", "train", "--config", str(config),
                            *servers.connect_overrides()], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    group = os.getpgid(servers.stack.vllm.proc.pid)
    try:
        _wait_for_step(tmp_path / "run/metrics.jsonl", run, 1)
        os.killpg(group, signal.SIGSTOP)
        time.sleep(8)
        os.killpg(group, signal.SIGCONT)
        _, stderr = run.communicate(timeout=600)
    finally:
        os.killpg(group, signal.SIGCONT)
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, stderr[-3000:]
    steps = [m for m in read_metrics(tmp_path / "run/metrics.jsonl") if "reward" in m]
    assert len(steps) == 4 and all(m["sync/exact_tensors_checked"] > 0 for m in steps)


@pytest.mark.servers
def test_a_launched_vllm_paused_past_the_hang_deadline_stops_the_run_with_one_line(servers, tmp_path):
    """gymtrl launches vLLM with supervision.hang_timeout_s=20. Paused 6 s after step 1 it lives on
    (the run trains step 3); paused for good after that, it is killed once /health has been silent
    for 20 s, and the run stops with one line saying it hung: the hang deadline stopped it, not the
    600 s rollout deadline (which the 300 s wait below could not reach). How long the stop takes after
    the kill depends on the machine's load, so it is printed, not bounded."""
    from test_train_runs import _launching_config, _pid_listening_as

    from conftest import free_port

    vllm_port, head_port = free_port(), free_port()
    config = _launching_config(tmp_path, servers.model, vllm_port, head_port, """
supervision: {hang_timeout_s: 20}
rollout: {timeout_s: 600}
grpo: {max_steps: 200, per_device_train_batch_size: 8, num_generations: 4, max_completion_length: 8,
       save_strategy: "no", learning_rate: 1.0e-4}
""")
    config.write_text(config.read_text().replace("  served_model_name: tiny\n",
                                                 "  served_model_name: tiny\n  request_retry_max_s: 10\n"))
    run = subprocess.Popen([sys.executable, "-m", "gymtrl.cli", "train", "--config", str(config)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run/metrics.jsonl"
    try:
        _wait_for_step(metrics, run, 1)
        group = os.getpgid(_pid_listening_as(vllm_port, "serve"))
        os.killpg(group, signal.SIGSTOP)
        time.sleep(6)
        os.killpg(group, signal.SIGCONT)
        _wait_for_step(metrics, run, 3)
        os.killpg(group, signal.SIGSTOP)
        paused_at = time.monotonic()
        _, stderr = run.communicate(timeout=300)
        stopped_after = time.monotonic() - paused_at
    finally:
        if run.poll() is None:
            run.kill()
    print(f"vLLM paused for good: the run stopped {stopped_after:.1f} s later")
    assert run.returncode == 3, stderr[-3000:]
    assert stopped_after >= 20, "killed before /health had been silent for supervision.hang_timeout_s"
    [line] = [l for l in stderr.splitlines() if l.startswith("gymtrl: error:")]
    assert "vLLM server hung:" in line and "supervision.hang_timeout_s=20" in line, stderr[-3000:]
    assert "Traceback" not in stderr
    with socket.socket() as sock:  # the killed vLLM is gone
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", vllm_port))
