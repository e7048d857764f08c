"""rollout.max_staleness=1 (one-step-off), against the session's real vLLM and NeMo Gym servers and a
real GRPOTrainer: the next step's batch is generated while this one trains. Two runs with the same
seed, synchronous and one-step-off, record which rows each step trained on (tests/row_recorder.py):
the one-step-off run trains, at each step, the rows TRL drew for the step before."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from gymtrl.metrics import read_metrics
from test_eval import digit_rows, write_rows
from test_resume import wait_until_held

pytestmark = pytest.mark.servers


def command(servers, tmp_path, staleness: int, out: Path, grpo: str = 'save_strategy: "no"', evals: bool = True) -> list[str]:
    data = write_rows(tmp_path / "train.jsonl", digit_rows(0, 32))
    held_out = write_rows(tmp_path / "eval.jsonl", digit_rows(48, 4, tag="HELD-OUT"))
    config = tmp_path / f"c-{out.name}.yaml"
    config.write_text(f"""
model: {{name_or_path: {servers.model}, dtype: float32}}
vllm: {{dtype: float32}}
data: {{train: [{data}], eval: [{held_out}]}}
rewards: {{functions: [{{function: "{REPO / 'tests/row_recorder.py'}:record_rows", weight: 0.0}}]}}
rollout: {{max_staleness: {staleness}}}
eval: {{every_steps: 2, samples: 1, at_start: {str(evals).lower()}, at_end: {str(evals).lower()}}}
grpo: {{max_steps: 4, per_device_train_batch_size: 8, num_generations: 4, max_completion_length: 8,
        learning_rate: 1.0e-3, seed: 0, {grpo}}}
output: {{dir: {out}}}
""")
    return [sys.executable, "-m", "gymtrl.cli", "train", "--config", str(config), *servers.connect_overrides()]


def trained_rows(row_log: Path) -> list[list[str]]:
    return [json.loads(line)["rows"] for line in row_log.read_text().splitlines()]


def train(servers, tmp_path, staleness: int) -> tuple[list[dict], list[list[str]], str]:
    out, row_log = tmp_path / f"run-{staleness}", tmp_path / f"rows-{staleness}.log"
    run = subprocess.run(command(servers, tmp_path, staleness, out), capture_output=True, text=True, timeout=600,
                         env={**os.environ, "GYMTRL_TEST_ROW_LOG": str(row_log)})
    assert run.returncode == 0, run.stderr[-3000:]
    return read_metrics(out / "metrics.jsonl"), trained_rows(row_log), run.stderr


@pytest.fixture(scope="module")
def synchronous(servers, tmp_path_factory):
    """The same run with rollout.max_staleness=0: the rows TRL draws for each step, in order."""
    return train(servers, tmp_path_factory.mktemp("synchronous"), 0)


def test_one_step_off_trains_each_batch_one_step_after_it_was_drawn(servers, synchronous, tmp_path):
    sync_metrics, sync_rows, _ = synchronous
    ahead_metrics, ahead_rows, log = train(servers, tmp_path, 1)
    assert len(sync_rows) == len(ahead_rows) == 4
    # Step 1 has nothing generated ahead: its own batch, generated while the trainer waits, and a second
    # draw of the same prompts for step 2. From then on each step trains the rows drawn for the step before.
    assert ahead_rows[0] == ahead_rows[1] == sync_rows[0]
    assert ahead_rows[2:] == sync_rows[1:3]
    assert "nothing was generated ahead" in log
    # The batch drawn at the last step is generated but never trained on, and the run says so.
    assert "rollouts generated ahead for a step that did not run were not trained on" in log

    steps = [m for m in ahead_metrics if "reward" in m]
    assert [m["rollout/policy_lag_steps"] for m in steps] == [0, 1, 1, 1]
    for m in steps[1:]:
        # Generated while the trainer trained: the trainer waited less than the batch took.
        assert m["rollout/wait_seconds"] < m["rollout/batch_seconds"], m
        assert m["rollout/failure_rate"] == 0
        assert "sampler_gap/masked_fraction" in m and "sampling/importance_sampling_ratio/mean" in m
    for m in (m for m in sync_metrics if "reward" in m):
        assert m["rollout/wait_seconds"] == m["rollout/batch_seconds"] and "rollout/policy_lag_steps" not in m
    # Every push was made with no episode in flight and checked exactly; its figures are logged with the
    # batch it was made for or the evaluation that made it: steps 0, 1, 2 and 4 (step 3's went with the
    # batch that was dropped).
    pushes = [m for m in ahead_metrics if "sync/seconds" in m]
    assert len(pushes) == 4 and all(m.get("sync/exact_tensors_checked", 0) > 0 for m in pushes), pushes
    assert [m["step"] for m in ahead_metrics if "eval/reward" in m] == [0, 2, 4]


def test_a_stopped_one_step_off_run_resumes_without_training_any_batch_twice(servers, synchronous, tmp_path):
    """Stopped (SIGTERM, a preemption) while step 3 trains and step 4's batch is generated ahead: the
    checkpoint holds no rollouts, the batch in flight is dropped and the run says so; the resumed run
    generates its first batch afresh from the rows TRL draws for step 4, and no batch is trained twice."""
    _, sync_rows, _ = synchronous
    out, row_log = tmp_path / "run", tmp_path / "rows.log"
    env = {**os.environ, "GYMTRL_TEST_ROW_LOG": str(row_log)}
    argv = command(servers, tmp_path, 1, out, grpo="save_strategy: steps, save_steps: 1", evals=False)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, "GYMTRL_TEST_HOLD_AT_STEP": "3"})
    wait_until_held(proc, row_log, 3)  # step 3's batch scored; the batch for step 4 generating ahead
    proc.send_signal(signal.SIGTERM)
    _, stopped = proc.communicate(timeout=300)
    assert proc.returncode == 143, stopped[-3000:]
    assert "stopped by SIGTERM at step 3;" in stopped
    assert "rollouts generated ahead for a step that did not run were not trained on" in stopped, stopped[-3000:]
    before = trained_rows(row_log)
    assert before == [sync_rows[0], sync_rows[0], sync_rows[1]]  # steps 1-3 as in the first test

    resumed = subprocess.run([*argv, "--resume", "auto"], capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-3'}" in resumed.stderr
    assert "step 4: nothing was generated ahead" in resumed.stderr, resumed.stderr[-3000:]
    after = trained_rows(row_log)[len(before):]
    # Step 4 trains the rows TRL draws for step 4 (generated now), step 5 does not exist (max_steps 4):
    # the rows drawn for step 3, generated ahead before the stop, are never trained, and the batch
    # step 3 trained on (drawn for step 2) is not trained again.
    assert after == [sync_rows[3]], (after, sync_rows)
    assert sync_rows[1] not in after and sync_rows[2] not in before + after
    metrics = read_metrics(out / "metrics.jsonl")
    steps = [m for m in metrics if "reward" in m]
    assert [m["rollout/policy_lag_steps"] for m in steps] == [0, 1, 1, 0]
    # The resumed run pushed the checkpoint's weights before its first rollout, and every push was checked.
    assert steps[-1]["sync/exact_tensors_checked"] > 0
    assert all(m["sync/exact_tensors_checked"] > 0 for m in metrics if "sync/seconds" in m)
