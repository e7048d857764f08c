"""`gymtrl train` under `accelerate launch` with two processes and DeepSpeed ZeRO-3, on CPU (gloo),
against real vLLM CPU and NeMo Gym servers that the main process launches: the quickstart's task,
the rollouts split between the processes, and every step's weights gathered from the shards,
pushed, and checked on the server; and the digit reward rises.

Two processes train exactly as one does: on the same rollouts, one step of GRPOTrainer under
ZeRO-3 with 2 x 8 rows gives the loss, grad norm and weights of 1 x 16 rows (weights within 5e-5
after 5 steps, loss and grad norm to 5 digits). What differs from run to run is the sampling: at the
quickstart's 2 prompts a step, the step where the reward takes off varies so much that a 40-step run
ends anywhere from 0.04 to 0.86, with one process or two. With 4 prompts a step (2 x 16 rows) every
step carries twice the signal and the rise is reliable."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, free_port
from gymtrl.metrics import read_metrics

pytestmark = pytest.mark.servers

# The least rise of the digit reward (mean of the last 5 steps over the first 5) that counts as
# learning. Measured at 2 x 16 rows: 0.017 -> 0.866 and 0.020 -> 0.912; at 2 x 8 rows the rise
# ranged from 0.02 to 0.79 over four runs, and one process at 16 rows from 0.52 to 0.84 over three.
MARGIN = 0.25


def mean(xs):
    return sum(xs) / len(xs)


def launch_two_zero3_processes(tiny_model, out, *overrides: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of `gymtrl train` on the quickstart config: 2 processes, ZeRO-3, on CPU;
    the main process launches its own vLLM and NeMo Gym servers."""
    env = {**os.environ, "GYMTRL_TINY_MODEL": str(tiny_model), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    return subprocess.run(
        [accelerate, "launch", "--config_file", "configs/accelerate/zero3.yaml", "--num_processes", "2",
         "-m", "gymtrl.cli", "train", "--config", "configs/quickstart.yaml",
         f"vllm.base_url=http://127.0.0.1:{free_port()}", f"gym.head_server_url=http://127.0.0.1:{free_port()}",
         f"output.dir={out}", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)


def test_two_processes_with_zero3_train_the_quickstart_with_every_sync_verified(tiny_model, tmp_path):
    out = tmp_path / "run"
    # x 2 processes: 32 rollouts (4 prompts x 8) a step. At the quickstart's 16 the rise is a lottery.
    proc = launch_two_zero3_processes(tiny_model, out, "grpo.per_device_train_batch_size=16")
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "reward" in m]
    assert len(steps) == 40
    # The main process's ledger counts only its own half of each step's 32 rollouts.
    assert [m["rollouts/total"] for m in steps] == [16.0 * (i + 1) for i in range(40)]
    # Every step: the weights gathered from the ZeRO-3 shards are what vLLM serves.
    assert all(m["sync/verify_max_logprob_diff"] < 1e-3 for m in steps)
    assert all(m["failures/total"] == 0 for m in steps)
    digit = [m["env/digit_reply_simple_agent/reward"] for m in steps if "env/digit_reply_simple_agent/reward" in m]
    print(f"2 processes, ZeRO-3: digit_reply reward first 5 steps {mean(digit[:5]):.3f}, "
          f"last 5 steps {mean(digit[-5:]):.3f}")
    assert mean(digit[-5:]) > mean(digit[:5]) + MARGIN  # it learns (measured rises: see MARGIN)
    assert all(m["grad_norm"] > 0 for m in steps)  # every step trained
    assert (out / "final" / "model.safetensors").exists()
    saved = [p for p in (out / "checkpoints").glob("checkpoint-*") if (p / "gymtrl-complete.json").exists()]
    assert {p.name for p in saved} == {"checkpoint-20", "checkpoint-40"}  # collective ZeRO-3 saves, marked
    assert "Traceback" not in proc.stderr


def test_two_zero3_processes_push_with_the_broadcast_sync_and_every_push_is_served(tiny_model, tmp_path):
    """The sync `auto` picks when vLLM has GPUs of its own, under several training processes: all
    gather the ZeRO-3 shards, the main process broadcasts them to vLLM's workers (gloo here, NCCL
    between GPUs) over a group formed once, and vLLM serves exactly the trained weights."""
    out = tmp_path / "run"
    proc = launch_two_zero3_processes(tiny_model, out, "sync.strategy=broadcast", "grpo.max_steps=4",
                                      "grpo.learning_rate=1.0e-3", "grpo.save_strategy=no")
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "reward" in m]
    assert len(steps) == 4
    # Each step after the first pushes (step 1 serves the weights vLLM loaded), and after each push
    # vLLM's logprobs on the probe equal the trainer's (a server left on older weights sits nearer
    # those, which the check also catches).
    assert all(m["sync/seconds"] > 0 for m in steps[1:])
    assert all(m["sync/join_seconds"] == 0 for m in steps[2:])  # the group is formed once
    assert all(m["sync/verify_max_logprob_diff"] < 1e-3 for m in steps)
    assert all(m["failures/total"] == 0 and m["grad_norm"] > 0 for m in steps)
    assert "Traceback" not in proc.stderr


def test_two_zero3_processes_generate_one_step_off(tiny_model, tmp_path):
    """rollout.max_staleness=1 under several training processes: each process generates its share of
    the next step's batch while all of them train this one, and every push between batches (all
    processes gather the ZeRO-3 shards for it) is checked."""
    out = tmp_path / "run"
    proc = launch_two_zero3_processes(tiny_model, out, "rollout.max_staleness=1", "grpo.max_steps=3",
                                      "grpo.learning_rate=1.0e-3", "grpo.save_strategy=no")
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "reward" in m]
    assert [m["rollout/policy_lag_steps"] for m in steps] == [0, 1, 1]
    # Step 1 generated its batch while the trainer waited; steps 2 and 3 got theirs generated during
    # the step before: the trainer waited less than the batch took.
    assert steps[0]["rollout/wait_seconds"] == steps[0]["rollout/batch_seconds"]
    assert all(m["rollout/wait_seconds"] < m["rollout/batch_seconds"] for m in steps[1:])
    # Each logged check passed: the weights gathered from the shards are what vLLM served.
    checks = [m["sync/verify_max_logprob_diff"] for m in steps if "sync/verify_max_logprob_diff" in m]
    assert len(checks) >= 2 and all(d < 1e-3 for d in checks)
    assert all(m["failures/total"] == 0 and m["grad_norm"] > 0 for m in steps)
    assert "sampling/importance_sampling_ratio/mean" in steps[-1]
    # Both processes had nothing ahead at step 1, and both dropped the batch drawn at the last step.
    assert proc.stderr.count("nothing was generated ahead") == 2
    assert proc.stderr.count("rollouts generated ahead for a step that did not run were not trained on") == 2
    assert (out / "final" / "model.safetensors").exists()
    assert "Traceback" not in proc.stderr, proc.stderr[max(0, proc.stderr.find("Traceback") - 1500):][:8000]


def test_two_zero3_processes_train_a_lora_adapter_and_push_it_whole(tiny_model, tmp_path):
    """model.lora under several training processes: the adapter is sharded by ZeRO-3 like any weight,
    every process gathers it for each push, and what vLLM loads is the whole trained adapter, the one
    final/ and the checkpoints hold (a push of one process's shard would differ, and fail to load)."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    proc = launch_two_zero3_processes(tiny_model, out, "model.lora.r=8", "sync.strategy=lora", "grpo.max_steps=3",
                                      "grpo.learning_rate=1.0e-3", "grpo.save_strategy=steps", "grpo.save_steps=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "reward" in m]
    assert len(steps) == 3
    assert all(m["sync/adapter_bytes"] > 0 and m["sync/verify_max_logprob_diff"] < 1e-3 for m in steps)
    assert all(m["failures/total"] == 0 and m["grad_norm"] > 0 for m in steps)

    # The adapter-only checkpoints are complete (marked after every process saved).
    assert {p.name for p in (out / "checkpoints").glob("checkpoint-*") if (p / "gymtrl-complete.json").exists()} \
        == {"checkpoint-2", "checkpoint-3"}
    after_2 = load_file(out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    after_3 = load_file(out / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors")
    assert after_2 and all(t.numel() > 0 for t in after_2.values())
    # The last push (for step 3's rollouts) carried the weights after step 2, whole: every tensor as
    # checkpoint-2 holds it; final/ holds the weights after step 3.
    pushed = sorted((out / "weight_sync").glob("adapter-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    last_push = load_file(pushed[-1] / "adapter_model.safetensors")
    assert last_push.keys() == after_2.keys() and all(t.equal(last_push[k]) for k, t in after_2.items())
    final = load_file(out / "final" / "adapter_model.safetensors")
    assert all(t.equal(final[k]) for k, t in after_3.items())
    # Trained: PEFT starts every lora_B at zero, and step 3 moved the adapter.
    assert any(t.abs().max() > 0 for k, t in after_2.items() if "lora_B" in k)
    assert not all(t.equal(after_3[k]) for k, t in after_2.items())
    assert "Traceback" not in proc.stderr
