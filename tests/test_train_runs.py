"""Whole `gymtrl train` runs as a user starts them: the quickstart must learn, and a run whose
environment dies must stop with a message that says which and why."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, server_config
from gymtrl.evaluation.stats import curve_rise
from gymtrl.metrics import read_metrics
from gymtrl.servers.gym import gym_command
from gymtrl.servers.process import ManagedProcess

pytestmark = pytest.mark.servers
DIGIT_ROWS = REPO / "src/gymtrl/envs/resources_servers/digit_reply/data/train.jsonl"


def mean(xs):
    return sum(xs) / len(xs)


# The quickstart's learning check. What is fixed: the tiny model's weights (make_tiny_model.py, seed
# 0) and grpo.seed, hence the data order and which prompts share a step. What is not: vLLM's sampling
# (concurrent rollouts are batched as they arrive, so even a seeded server never draws the same
# samples twice, and gymtrl sends no per-request seed), so the step where the digit reward takes off
# varies. At 2 prompts a step that made the outcome luck: 40-step runs ended anywhere from 0.04 to
# 0.86. The quickstart now samples 4 prompts x 8 a step (configs/quickstart.yaml), twice the signal.
# The check compares the mean digit reward of the last K steps with that of the first K, and asks:
# - a rise of at least RISE: what a user sees as "it learns". Measured at 4 prompts a step (K=10):
#   0.024 -> 0.871 and 0.030 -> 0.976; with two processes x 16 rows, which train exactly as one
#   process x 32 (tests/test_multiprocess.py), last-5 means of 0.87 and 0.91 from 0.02. At 2 prompts
#   a step one run rose 0.55 and another only 0.02;
# - a rise of at least Z standard errors of "no learning": if the policy did not change, every step's
#   reward would be drawn like the first K steps', whose spread (~0.01 around ~0.02) gives the
#   standard error of the difference of two K-step means. A run that does not learn gives z ~ N(0, 1)
#   (P(z > 6) ~ 1e-9); a steep late rise is not penalised, as a two-window (Welch) error would be.
# RISE is 20 times the per-step spread of an untrained policy, so the two together fail only a run
# that did not learn.
K, RISE, Z = 10, 0.2, 6.0  # the rise and z of gymtrl.evaluation.stats.curve_rise


def test_the_learning_check_tells_learning_from_noise():
    """The statistic above on made-up curves: noise around a flat or slowly drifting reward (the
    worst old run: 0.02 -> 0.04) fails; an early or a late take-off passes."""
    import random

    rng = random.Random(0)
    flat = [0.02 + rng.gauss(0, 0.01) for _ in range(40)]
    drifting = [0.02 + 0.0005 * i + rng.gauss(0, 0.01) for i in range(40)]
    early = [min(0.9, 0.02 * 1.15 ** i) + rng.gauss(0, 0.03) for i in range(40)]
    late = [0.02 + (0.05 * (i - 30) if i > 30 else 0) + rng.gauss(0, 0.01) for i in range(40)]
    for curve in (flat, drifting):
        rise, z = curve_rise(curve, K)
        assert not (rise > RISE and z > Z), (rise, z)
    for curve in (early, late):
        rise, z = curve_rise(curve, K)
        assert rise > RISE and z > Z, (rise, z)


def test_quickstart_learns(tmp_path):
    """configs/quickstart.yaml through scripts/quickstart.sh (servers launched by gymtrl): reward
    rises on digit_reply (see K, RISE, Z above), both environments are trained on, every push was
    checked exactly, and the loss ran with the sampler correction."""
    out = tmp_path / "quickstart"
    env = {**os.environ, "GYMTRL_TINY_MODEL": str(tmp_path / "tiny-model")}
    proc = subprocess.run(["bash", str(REPO / "scripts/quickstart.sh"), f"output.dir={out}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "reward" in m]
    assert len(steps) == 40
    key = "env/digit_reply_simple_agent/reward"
    digit = [m[key] for m in steps if key in m]  # a step may hold no digit_reply prompt (not with seed 0)
    assert len(digit) >= 36, len(digit)
    rise, z = curve_rise(digit, K)
    print(f"digit_reply reward: first {K} steps {mean(digit[:K]):.3f}, last {K} steps {mean(digit[-K:]):.3f}; "
          f"rise {rise:.3f} = {z:.1f} standard errors")
    assert rise > RISE and z > Z, (rise, z, digit)
    assert any("env/workplace_assistant_simple_agent/reward" in m for m in steps)
    assert all(m["sync/verify_max_logprob_diff"] < 1e-3 for m in steps)
    # Every push was checked exactly: vLLM's stamp matched the digest of every tensor the trainer wrote.
    assert all(m["sync/exact_tensors_checked"] > 0 for m in steps)
    # The loss used the sampler correction under this reload sync, as under TRL's own (float32 on both
    # sides: the gap is float noise and nothing is masked), and the gap was logged per environment.
    assert all(abs(m["sampling/importance_sampling_ratio/mean"] - 1) < 1e-2 for m in steps)
    assert all(m["sampler_gap/masked_fraction"] == 0 for m in steps)
    assert all(m["sampler_gap/digit_reply_simple_agent/mean"] < 1e-3 for m in steps if key in m)
    assert all(m["rollouts/total"] > 0 and m["failures/total"] == 0 for m in steps)
    assert (out / "final" / "model.safetensors").exists() and (out / "config.yaml").exists()
    assert "Traceback" not in proc.stderr
    # The servers gymtrl launched are gone: their ports are free again.
    for port in (8000, 11000):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine; a listener is not
            sock.bind(("127.0.0.1", port))


def test_dead_agent_server_ends_the_run_with_a_clear_message(servers, tmp_path):
    # A Gym of its own (digit_reply only), so that killing it leaves the session's servers alone.
    gym_cfg = server_config(servers.model, int(servers.vllm_url.rsplit(":", 1)[1]), free_port(), tmp_path / "gym",
                            launch=True)
    gym_cfg.gym.launch.config_paths = ["responses_api_models/vllm_model/configs/vllm_model_for_training.yaml",
                                       "resources_servers/digit_reply/configs/digit_reply.yaml"]
    gym = ManagedProcess("gym", gym_command(gym_cfg, tmp_path / "gym/logs"), tmp_path / "gym.log")
    gym.start()
    config = tmp_path / "c.yaml"
    config.write_text(f"""
model: {{name_or_path: {servers.model}, dtype: float32}}
data: {{train: [{DIGIT_ROWS}]}}
rollout: {{max_failure_rate: 0.5, failure_window: 16, failure_min_rollouts: 8, retries: 1, retry_backoff_s: 0.1}}
grpo: {{max_steps: 200, per_device_train_batch_size: 8, num_generations: 4, max_completion_length: 8,
        save_strategy: "no", learning_rate: 1.0e-4}}
output: {{dir: {tmp_path / 'run'}}}
""")
    try:
        from gymtrl.gym.discovery import wait_ready

        wait_ready(gym_cfg.gym.head_server_url, 300, is_alive=gym.alive)
        overrides = [o for o in servers.connect_overrides() if not o.startswith("gym.head_server_url")]
        run = subprocess.Popen([sys.executable, "-m", "gymtrl.cli", "train", "--config", str(config), *overrides,
                                f"gym.head_server_url={gym_cfg.gym.head_server_url}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        metrics = tmp_path / "run/metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().strip()):
            assert run.poll() is None, run.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.5)
        os.killpg(gym.proc.pid, signal.SIGKILL)  # the agent (and the rest of that Gym) dies mid-run
        _, stderr = run.communicate(timeout=300)
    finally:
        gym.stop()
    assert run.returncode == 4, stderr[-2000:]
    assert "Traceback" not in stderr
    [line] = [l for l in stderr.splitlines() if l.startswith("gymtrl: error:")]
    assert "environment 'digit_reply_simple_agent'" in line and "connection_error" in line
    # Before the bound tripped, batches with lost rollouts were reported by gymtrl, one line each,
    # and TRL's dump of every unscorable sample's kwargs was kept out of the log.
    assert "rollouts excluded (connection_error@digit_reply_simple_agent" in stderr, stderr[-3000:]
    assert "All reward functions returned None" not in stderr


def _pid_listening_as(port: int, marker: str) -> int:
    """The first process whose command line names `marker` and `--port <port>`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in b" ".join(argv) and b"--port" in argv and argv[argv.index(b"--port") + 1] == str(port).encode():
            found.append(int(entry.name))
    assert found, f"no process with {marker} --port {port}"
    return min(found)


def _launching_config(tmp_path: Path, model: Path, vllm_port: int, head_port: int, rest: str) -> Path:
    """A run config in which gymtrl launches vLLM and a digit_reply-only NeMo Gym; `rest` adds sections."""
    config = tmp_path / "c.yaml"
    config.write_text(f"""
model: {{name_or_path: {model}, dtype: float32}}
data: {{train: [{DIGIT_ROWS}]}}
gym:
  head_server_url: http://127.0.0.1:{head_port}
  launch: {{enabled: true, venv: {os.environ['GYMTRL_GYM_VENV']},
           config_paths: [responses_api_models/vllm_model/configs/vllm_model_for_training.yaml,
                          resources_servers/digit_reply/configs/digit_reply.yaml]}}
vllm:
  base_url: http://127.0.0.1:{vllm_port}
  served_model_name: tiny
  dtype: float32
  max_model_len: 4096
  launch: {{enabled: true, venv: {os.environ['GYMTRL_VLLM_VENV']},
           extra_args: [--enforce-eager, --kv-cache-memory-bytes, "268435456"]}}
output: {{dir: {tmp_path / 'run'}}}
{rest}""")
    return config


def test_a_launched_vllm_that_dies_mid_run_stops_it_at_once_with_a_checkpoint(servers, tmp_path):
    """gymtrl launches vLLM and NeMo Gym; vLLM is killed while the run trains. NeMo Gym would retry
    the vanished server until every rollout's 600 s deadline: instead the run notices the death
    within seconds, saves its last finished step, and stops with the server's log tail. The liveness
    check stopped it, not the 600 s rollout deadline: its line says the server exited, and the 300 s
    wait below is shorter than that deadline. How long the stop took is printed, not bounded."""
    vllm_port, head_port = free_port(), free_port()
    config = _launching_config(tmp_path, servers.model, vllm_port, head_port, """
rollout: {timeout_s: 600}
grpo: {max_steps: 200, per_device_train_batch_size: 8, num_generations: 4, max_completion_length: 8,
        save_strategy: "no", learning_rate: 1.0e-4}
""")
    run = subprocess.Popen([sys.executable, "-m", "gymtrl.cli", "train", "--config", str(config)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run/metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and metrics.read_text().strip()):
        assert run.poll() is None, run.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.5)
    os.killpg(os.getpgid(_pid_listening_as(vllm_port, "serve")), signal.SIGKILL)  # vLLM and its engine
    killed_at = time.monotonic()
    _, stderr = run.communicate(timeout=300)
    stopped_after = time.monotonic() - killed_at
    print(f"vLLM killed: the run stopped {stopped_after:.1f} s later")
    assert run.returncode == 3, stderr[-3000:]
    [line] = [l for l in stderr.splitlines() if l.startswith("gymtrl: error:")]
    assert "vLLM server exited" in line and "Traceback" not in stderr, stderr[-3000:]
    saved = [p for p in (tmp_path / "run/checkpoints").glob("checkpoint-*") if (p / "gymtrl-complete.json").exists()]
    assert saved and "is saved in" in stderr, stderr[-3000:]
    for port in (vllm_port, head_port):  # everything gymtrl launched is gone
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))


def _group_of_process_naming(*markers: str) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if all(m.encode() in argv for m in markers):
                return os.getpgid(int(entry.name))
    raise AssertionError(f"no process naming {markers}")


def _wait_for_metric(path: Path, run: subprocess.Popen, ok, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and any(ok(m) for m in read_metrics(path))):
        assert run.poll() is None, run.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_with_restart_on_a_launched_server_exit_the_run_survives_vllm_and_gym_dying(servers, tmp_path):
    """supervision.on_server_exit=restart: vLLM is killed after the first step, NeMo Gym after the
    next; each is started again, the batch in flight is run again, the new vLLM is given the
    trained weights (checked every step), and the run finishes every step."""
    vllm_port, head_port = free_port(), free_port()
    config = _launching_config(tmp_path, servers.model, vllm_port, head_port, """
supervision: {on_server_exit: restart, max_restarts: 2}
grpo: {max_steps: 6, per_device_train_batch_size: 8, num_generations: 4, max_completion_length: 8,
       save_strategy: "no", learning_rate: 1.0e-3}
""")
    run = subprocess.Popen([sys.executable, "-m", "gymtrl.cli", "train", "--config", str(config)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run/metrics.jsonl"
    try:
        _wait_for_metric(metrics, run, lambda m: "reward" in m)
        os.killpg(os.getpgid(_pid_listening_as(vllm_port, "serve")), signal.SIGKILL)
        _wait_for_metric(metrics, run, lambda m: m.get("servers/restarts") == 1)
        os.killpg(_group_of_process_naming("gym_launcher.py", str(head_port)), signal.SIGKILL)
        _, stderr = run.communicate(timeout=900)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, stderr[-3000:]
    steps = [m for m in read_metrics(metrics) if "reward" in m]
    assert len(steps) == 6 and steps[-1]["servers/restarts"] == 2
    # Every step's weights were checked on the server, the ones after the restarts included.
    assert all(m["sync/verify_max_logprob_diff"] < 1e-3 for m in steps)
    assert all(m["failures/total"] == 0 for m in steps), "the abandoned batches were run again, not dropped"
    assert "restarting it (restart 1 of at most 2)" in stderr and "vLLM server exited" in stderr
    assert "restarting it (restart 2 of at most 2)" in stderr and "NeMo Gym servers exited" in stderr
    assert "Traceback" not in stderr


def test_a_server_that_misses_a_sync_stops_the_run_before_its_batch_is_trained_on(servers, tmp_path):
    """sync.strategy=none plays a sync that silently does nothing. The check of each push runs beside
    the batch's rollouts; when it fails, the run stops before TRL trains on that batch."""
    import torch
    from transformers import AutoModelForCausalLM

    from gymtrl.sync.reload import ReloadSync
    from gymtrl.servers.vllm_control import VLLMControl

    # The session's vLLM serves whatever the last test pushed: give it the model's own weights, so
    # that the run's first check (before any step) passes and step 1 trains.
    control = VLLMControl(servers.vllm_url, 60)
    try:
        ReloadSync(control, tmp_path / "sync").push(AutoModelForCausalLM.from_pretrained(servers.model, dtype=torch.float32))
    finally:
        control.close()
    config = tmp_path / "c.yaml"
    config.write_text(f"""
model: {{name_or_path: {servers.model}, dtype: float32}}
vllm: {{dtype: float32}}
data: {{train: [{DIGIT_ROWS}]}}
sync: {{strategy: none}}
grpo: {{max_steps: 5, per_device_train_batch_size: 8, num_generations: 4, max_completion_length: 8,
        save_strategy: "no", learning_rate: 1.0e-2}}
output: {{dir: {tmp_path / 'run'}}}
""")
    run = subprocess.run([sys.executable, "-m", "gymtrl.cli", "train", "--config", str(config),
                          *servers.connect_overrides()], capture_output=True, text=True, timeout=600)
    assert run.returncode == 5, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    [line] = [l for l in run.stderr.splitlines() if l.startswith("gymtrl: error:")]
    assert "after step 1, the vLLM server's logprobs differ from the trainer's" in line, line
    # Step 1 (on the weights vLLM loaded from disk, checked before its batch) was trained on; the
    # batch of step 2, sampled from the stale server, was not.
    steps = [m for m in read_metrics(tmp_path / "run/metrics.jsonl") if "reward" in m]
    assert [int(m["step"]) for m in steps] == [1]
    assert steps[0]["sync/verify_max_logprob_diff"] < 1e-3
