"""`gymtrl train` under `accelerate launch` with two processes and DeepSpeed ZeRO-3, on CPU (gloo),
against real vLLM CPU and NeMo Gym servers that the main process launches: the quickstart's task
and global batch, the rollouts split between the processes, and every step's weights gathered from
the shards, pushed, and checked on the server.

The reward is printed, not asserted: over these 40 steps it rose from 0.025 to 0.405 in one run and
only from 0.019 to 0.037 in another (the single-process quickstart rises every time), a difference
still to be explained."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, free_port
from gymtrl.metrics import read_metrics

pytestmark = pytest.mark.servers


def mean(xs):
    return sum(xs) / len(xs)


def test_two_processes_with_zero3_train_the_quickstart_with_every_sync_verified(tiny_model, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "GYMTRL_TINY_MODEL": str(tiny_model), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    proc = subprocess.run(
        [accelerate, "launch", "--config_file", "configs/accelerate/zero3.yaml", "--num_processes", "2",
         "-m", "gymtrl.cli", "train", "--config", "configs/quickstart.yaml",
         "grpo.per_device_train_batch_size=8",  # x 2 processes: the quickstart's 16 rollouts a step
         f"vllm.base_url=http://127.0.0.1:{free_port()}", f"gym.head_server_url=http://127.0.0.1:{free_port()}",
         f"output.dir={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "reward" in m]
    assert len(steps) == 40
    # The main process's ledger counts only its own half of each step's 16 rollouts.
    assert [m["rollouts/total"] for m in steps] == [8.0 * (i + 1) for i in range(40)]
    # Every step: the weights gathered from the ZeRO-3 shards are what vLLM serves.
    assert all(m["sync/verify_max_logprob_diff"] < 1e-3 for m in steps)
    assert all(m["failures/total"] == 0 for m in steps)
    digit = [m["env/digit_reply_simple_agent/reward"] for m in steps]
    print(f"2 processes, ZeRO-3: digit_reply reward first 5 steps {mean(digit[:5]):.3f}, "
          f"last 5 steps {mean(digit[-5:]):.3f}")
    assert all(m["grad_norm"] > 0 for m in steps)  # every step trained
    assert (out / "final" / "model.safetensors").exists()
    saved = [p for p in (out / "checkpoints").glob("checkpoint-*") if (p / "gymtrl-complete.json").exists()]
    assert {p.name for p in saved} == {"checkpoint-20", "checkpoint-40"}  # collective ZeRO-3 saves, marked
    assert "Traceback" not in proc.stderr
