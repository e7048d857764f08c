"""Runs that are killed, preempted and resumed: the resumed run trains on the same data, in the same
order, as an uninterrupted one; no checkpoint resume would pick is unreadable; and no secret from
the environment reaches anything the run writes."""

import json
import os
import random
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


def wait_for_checkpoint(proc, run_dir, step, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while not (run_dir / "checkpoints" / f"checkpoint-{step}" / MARKER).exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
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
    # 1. SIGKILL at a random moment after the first complete checkpoint: mid-step or mid-save.
    proc = start(servers, tmp_path, run_dir, log)
    wait_for_checkpoint(proc, run_dir, 1)
    time.sleep(random.uniform(0.0, 2.0))
    proc.kill()
    proc.communicate()
    # A save cut short (fault injected by hand, so that this case is always exercised): the newest
    # checkpoint directory, without its completion marker and with its weights truncated.
    saved = checkpoints(run_dir / "checkpoints")
    newest = saved[-1][1]
    broken = run_dir / "checkpoints" / f"checkpoint-{saved[-1][0] + 1}"
    shutil.copytree(newest, broken)
    (broken / MARKER).unlink(missing_ok=True)
    (broken / "model.safetensors").write_bytes(b"truncated")

    # 2. Resume, then SIGTERM (preemption): it saves a checkpoint and stops with one line.
    lines_before = len(log.read_text().splitlines())
    proc = start(servers, tmp_path, run_dir, log, "--resume", "auto")
    deadline = time.monotonic() + 300
    while len(log.read_text().splitlines()) == lines_before:  # until the resumed run is mid-step
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    assert f"skipping {broken}" in stderr
    [line] = [l for l in stderr.splitlines() if l.startswith("gymtrl: error:")]
    assert "stopped by SIGTERM at step" in line and "Traceback" not in stderr
    stopped_at = int(line.split("at step ")[1].split(";")[0])
    assert (run_dir / "checkpoints" / f"checkpoint-{stopped_at}" / MARKER).exists()

    # 3. Resume again and finish.
    proc = start(servers, tmp_path, run_dir, log, "--resume", "auto")
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / f'checkpoint-{stopped_at}'}" in stderr

    _, expected = uninterrupted
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert rows_by_step(log) == expected  # every step, after every interruption, saw the same rows
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
