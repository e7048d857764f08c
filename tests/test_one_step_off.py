"""rollout.max_staleness=1 (one-step-off), against the session's real vLLM and NeMo Gym servers and a
real GRPOTrainer: the next step's batch is generated while this one trains. Two runs with the same
seed, synchronous and one-step-off, record which rows each step trained on (tests/row_recorder.py):
the one-step-off run trains, at each step, the rows TRL drew for the step before."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from gymtrl.metrics import read_metrics
from test_eval import digit_rows, write_rows

pytestmark = pytest.mark.servers


def train(servers, tmp_path, staleness: int) -> tuple[list[dict], list[list[str]], str]:
    data = write_rows(tmp_path / "train.jsonl", digit_rows(0, 32))
    evals = write_rows(tmp_path / "eval.jsonl", digit_rows(48, 4, tag="HELD-OUT"))
    out = tmp_path / f"run-{staleness}"
    row_log = tmp_path / f"rows-{staleness}.log"
    config = tmp_path / f"c-{staleness}.yaml"
    config.write_text(f"""
model: {{name_or_path: {servers.model}, dtype: float32}}
vllm: {{dtype: float32}}
data: {{train: [{data}], eval: [{evals}]}}
rewards: {{functions: [{{function: "{REPO / 'tests/row_recorder.py'}:record_rows", weight: 0.0}}]}}
rollout: {{max_staleness: {staleness}}}
eval: {{every_steps: 2, samples: 1}}
grpo: {{max_steps: 4, per_device_train_batch_size: 8, num_generations: 4, max_completion_length: 8,
        save_strategy: "no", learning_rate: 1.0e-3, seed: 0}}
output: {{dir: {out}}}
""")
    run = subprocess.run([sys.executable, "-m", "gymtrl.cli", "train", "--config", str(config), *servers.connect_overrides()],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "GYMTRL_TEST_ROW_LOG": str(row_log)})
    assert run.returncode == 0, run.stderr[-3000:]
    trained = [json.loads(line)["rows"] for line in row_log.read_text().splitlines()]
    return read_metrics(out / "metrics.jsonl"), trained, run.stderr


def test_one_step_off_trains_each_batch_one_step_after_it_was_drawn(servers, tmp_path):
    sync_metrics, sync_rows, _ = train(servers, tmp_path, 0)
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
