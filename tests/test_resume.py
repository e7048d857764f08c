"""Runs that are killed, preempted and resumed: the resumed run trains on the same data, in the same
order, as an uninterrupted one; no checkpoint resume would pick is unreadable; and no secret from
the environment reaches anything the run writes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from gymtrl.checkpoints import MARKER, checkpoints

pytestmark = pytest.mark.servers
DIGIT_ROWS = REPO / "src/gymtrl/envs/resources_servers/digit_reply/data/train.jsonl"
STEPS = 5
SECRETS = {"WANDB_API_KEY": "wandb-secret-0c9f2e7a", "HF_TOKEN": "hf_secret_5b1d9e44",
           "GYMTRL_TEST_VLLM_KEY": "vllm-secret-77aa31"}


def start(servers, tmp_path, run_dir, row_log, *extra, env=None):
    config = tmp_path / "c.yaml"
    config.write_text(f"""
model: {{name_or_path: {servers.model}, dtype: float32}}
data: {{train: [{DIGIT_ROWS}]}}
rewards: {{functions: [{{function: "{REPO / 'tests/row_recorder.py'}:record_rows", weight: 0.0}}]}}
grpo: {{max_steps: {STEPS}, per_device_train_batch_size: 4, num_generations: 2, max_completion_length: 8,
        save_strategy: steps, save_steps: 1, learning_rate: 1.0e-4, seed: 11}}
output: {{dir: {run_dir}}}
""")
    env = {**os.environ, "GYMTRL_TEST_ROW_LOG": str(row_log), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "gymtrl.cli", "train", "--config", str(config),
                             *servers.connect_overrides(), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def rows_by_step(row_log):
    """The rows of each step; a step redone after a resume replaces the killed run's attempt."""
    steps = {}
    for line in Path(row_log).read_text().splitlines():
        record = json.loads(line)
        steps[record["step"]] = record["rows"]
    return steps


def wait_until_held(proc, row_log, step, timeout_s=300):
    """Until the run holds in `step` (tests/row_recorder.py, GYMTRL_TEST_HOLD_AT_STEP): that step's
    rollouts are scored, its update and checkpoint not begun. The deadline only catches a hang."""
    marker = Path(f"{row_log}.held-{step}")
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"the run did not reach step {step} in time"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def uninterrupted(servers, tmp_path_factory):
    """A whole run with secrets in its environment and wandb logging (offline)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    run_dir, log = tmp / "run", tmp / "rows.jsonl"
    proc = start(servers, tmp, run_dir, log, "logging.wandb=true", "logging.wandb_mode=offline",
                 "vllm.api_key_env=GYMTRL_TEST_VLLM_KEY", env=SECRETS)
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    return run_dir, rows_by_step(log)


def test_killed_preempted_and_resumed_runs_see_the_same_data_order(servers, uninterrupted, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "rows.jsonl"
    # Every interruption happens at a fixed point (tests/row_recorder.py holds the run there), so each
    # run of this test checks the same thing.
    # 1. SIGKILL in the middle of step 2: checkpoint 1 complete, step 2's batch scored, its update not made.
    proc = start(servers, tmp_path, run_dir, log, env={"GYMTRL_TEST_HOLD_AT_STEP": "2"})
    wait_until_held(proc, log, 2)
    proc.kill()
    proc.communicate()
    saved = checkpoints(run_dir / "checkpoints")
    assert [step for step, path in saved if (path / MARKER).exists()] == [1], saved
    # A save cut short (fault injected by hand, so that this case is always exercised): the next
    # checkpoint directory, without its completion marker and with its weights truncated.
    broken = run_dir / "checkpoints" / "checkpoint-2"
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(run_dir / "checkpoints" / "checkpoint-1", broken)
    (broken / MARKER).unlink(missing_ok=True)
    (broken / "model.safetensors").write_bytes(b"truncated")

    # 2. Resume (from checkpoint 1: it redoes step 2), then SIGTERM in the middle of step 3
    # (preemption): the step finishes, it saves checkpoint 3 and stops with one line.
    proc = start(servers, tmp_path, run_dir, log, "--resume", "auto", env={"GYMTRL_TEST_HOLD_AT_STEP": "3"})
    wait_until_held(proc, log, 3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    assert f"skipping {broken}" in stderr
    assert f"resuming from {run_dir / 'checkpoints' / 'checkpoint-1'}" in stderr, stderr[-3000:]
    [line] = [l for l in stderr.splitlines() if l.startswith("gymtrl: error:")]
    assert "stopped by SIGTERM at step 3;" in line and "Traceback" not in stderr, line
    stopped_at = 3
    assert (run_dir / "checkpoints" / f"checkpoint-{stopped_at}" / MARKER).exists()

    # 3. Resume again and finish.
    proc = start(servers, tmp_path, run_dir, log, "--resume", "auto")
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / f'checkpoint-{stopped_at}'}" in stderr

    _, expected = uninterrupted
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert rows_by_step(log) == expected  # every step, after every interruption, saw the same rows
    # Each resumed run pushed the resumed weights before its first rollout, and every push was checked
    # exactly (vLLM's stamp against the trainer's digests): a resume never trusts what vLLM holds.
    from gymtrl.metrics import read_metrics

    steps = [m for m in read_metrics(run_dir / "metrics.jsonl") if "reward" in m]
    assert len(steps) >= STEPS and all(m["sync/exact_tensors_checked"] > 0 and m["sync/seconds"] > 0 for m in steps)
    # Every checkpoint resume could pick loads.
    from safetensors.torch import load_file

    for _, path in checkpoints(run_dir / "checkpoints"):
        if (path / MARKER).exists():
            assert load_file(path / "model.safetensors")
            json.loads((path / "trainer_state.json").read_text())


def test_resuming_from_an_incomplete_checkpoint_is_refused(servers, uninterrupted, tmp_path):
    run_dir, _ = uninterrupted
    broken = tmp_path / "checkpoint-7"
    shutil.copytree(checkpoints(run_dir / "checkpoints")[-1][1], broken)
    (broken / MARKER).unlink()
    proc = start(servers, tmp_path, tmp_path / "run", tmp_path / "rows.jsonl", "--resume", str(broken))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "this checkpoint is incomplete" in stderr and "Traceback" not in stderr


def test_no_secret_reaches_logs_configs_or_checkpoints(uninterrupted):
    run_dir, _ = uninterrupted
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any("wandb" in p.parts for p in files)
    assert any(p.name == "trainer_state.json" for p in files)
    leaks = [(str(p), name) for p in files for name, value in SECRETS.items() if value.encode() in p.read_bytes()]
    assert leaks == []
