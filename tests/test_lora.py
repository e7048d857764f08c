"""model.lora: a PEFT adapter trained against real servers (vLLM on CPU started with LoRA, NeMo Gym's
digit_reply), only the adapter pushed and loaded in place every step, each push checked with the
adapter; a vLLM that kept the old adapter is caught; a stopped run resumes from its adapter checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, free_port, server_config
from gymtrl.errors import ConfigError, WeightSyncError
from gymtrl.metrics import read_metrics
from gymtrl.servers.vllm import LORA_ADAPTER_NAME
from gymtrl.servers.vllm_control import VLLMControl
from gymtrl.sync.check import ProbeCheck, probe_token_ids
from gymtrl.sync.lora import LoraSync
from test_resume import wait_until_held
from test_sync_check import adam_step

pytestmark = pytest.mark.servers
RANK = 8
DIGIT_ROWS = REPO / "src/gymtrl/envs/resources_servers/digit_reply/data/train.jsonl"


@pytest.fixture(scope="module")
def lora_servers(tiny_model, tmp_path_factory):
    """vLLM started as gymtrl starts it for model.lora (--enable-lora, runtime adapter loading), and a
    NeMo Gym whose model server asks vLLM for the adapter."""
    from gymtrl.servers.stack import ServerStack

    out = tmp_path_factory.mktemp("lora-servers")
    cfg = server_config(tiny_model, free_port(), free_port(), out, gym_configs=[
        "responses_api_models/vllm_model/configs/vllm_model_for_training.yaml",
        "resources_servers/digit_reply/configs/digit_reply.yaml"])
    cfg.model.lora.r = RANK
    with ServerStack(cfg, out / "logs", strategy="lora"):
        yield cfg


def peft_model(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear"))


def test_an_adapter_push_is_checked_and_a_vllm_that_kept_the_old_adapter_is_caught(lora_servers, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    control = VLLMControl(lora_servers.vllm.base_url, 120.0)
    model = peft_model(tiny_model)
    sync = LoraSync(control, tmp_path / "sync", LORA_ADAPTER_NAME)
    probe = ProbeCheck(control, LORA_ADAPTER_NAME, probe_token_ids(AutoTokenizer.from_pretrained(tiny_model)), 1e-3)

    sync.push(model)
    assert probe.check(model, step=1) < 1e-4
    # Only the adapter travels: its files, a small fraction of the model's bytes.
    [folder] = list((tmp_path / "sync").glob("adapter-*"))
    assert sorted(p.name for p in folder.iterdir() if p.suffix in (".json", ".safetensors")) == \
        ["adapter_config.json", "adapter_model.safetensors"]
    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
    assert sync.phases["adapter_bytes"] < base_bytes / 4

    # One optimizer step on the adapter; its push writes the new adapter but vLLM is never asked to
    # load it (a fault injected in place of the load): vLLM keeps serving the old adapter, and is caught.
    assert adam_step(model, 1e-2) > 0
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    _fault_write_adapter_without_loading(model, tmp_path / "sync-missed")
    with pytest.raises(WeightSyncError, match="not serving the weights being trained|still serves the weights of step 1"):
        probe.check(model, step=2)

    # The push that arrives passes, and the one before the last is all that stays on disk beside it.
    sync.push(model)
    assert probe.check(model, step=2) < 1e-4
    sync.push(model)
    assert len(list((tmp_path / "sync").glob("adapter-*"))) == 2
    control.close()


def test_a_whole_weight_sync_pushes_the_adapter_merged_and_leaves_the_model_as_it_was(servers, tiny_model, tmp_path):
    """model.lora with sync.strategy=reload (or ipc, broadcast): vLLM gets the base weights with the
    adapter merged in, under the base model's names, checked exactly; the trainer's model is not changed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gymtrl.sync.check import StampCheck
    from gymtrl.sync.merged import as_pushed
    from gymtrl.sync.reload import ReloadSync

    plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    names = {n for n, _ in plain.named_parameters()}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                           LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    control = VLLMControl(servers.vllm_url, 120.0)
    sync = ReloadSync(control, tmp_path / "sync")
    view = as_pushed(model, "reload")
    assert {n for n, _ in view.named_parameters()} == names
    sync.push(view)
    assert StampCheck(control).check(sync.expected, step=1) >= len(names)  # (and a tied head under its own name)
    # vLLM's logprobs are the adapter model's (random, non-zero adapter: far from the base model's).
    probe = ProbeCheck(control, "tiny", probe_token_ids(AutoTokenizer.from_pretrained(tiny_model)), 1e-3)
    assert probe.check(model, step=1) < 1e-3
    with pytest.raises(WeightSyncError):
        ProbeCheck(control, "tiny", probe.probe_ids, 1e-3).check(plain, step=1)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    sync.push(plain)  # the session's vLLM serves the tiny model again
    control.close()


def _fault_write_adapter_without_loading(model, directory) -> None:
    """Fault injection: the trainer's side of an adapter push, and no call to vLLM."""
    model.save_pretrained(str(directory / "adapter-unsent"))


def train_command(cfg, tmp_path, run_dir, *extra: str) -> list[str]:
    config = tmp_path / "lora.yaml"
    config.write_text(f"""
model: {{name_or_path: {cfg.model.name_or_path}, dtype: float32, lora: {{r: {RANK}, save_merged: true}}}}
vllm: {{base_url: {cfg.vllm.base_url}, served_model_name: tiny, dtype: float32}}
gym: {{head_server_url: {cfg.gym.head_server_url}}}
data: {{train: [{DIGIT_ROWS}]}}
rewards: {{functions: [{{function: "{REPO / 'tests/row_recorder.py'}:record_rows", weight: 0.0}}]}}
grpo: {{max_steps: 3, per_device_train_batch_size: 8, num_generations: 4, max_completion_length: 8,
        learning_rate: 5.0e-2, save_strategy: steps, save_steps: 1, seed: 3}}
output: {{dir: {run_dir}}}
""")
    return [sys.executable, "-m", "gymtrl.cli", "train", "--config", str(config), *extra]


def test_a_lora_run_pushes_its_adapter_every_step_and_resumes_from_its_adapter(lora_servers, tmp_path):
    run_dir, row_log = tmp_path / "run", tmp_path / "rows.log"
    env = {**os.environ, "GYMTRL_TEST_ROW_LOG": str(row_log)}
    argv = train_command(lora_servers, tmp_path, run_dir)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, "GYMTRL_TEST_HOLD_AT_STEP": "2"})
    wait_until_held(proc, row_log, 2)
    proc.send_signal(signal.SIGTERM)  # a preemption: step 2 finishes, checkpoint-2 holds the adapter
    _, stopped = proc.communicate(timeout=300)
    assert proc.returncode == 143, stopped[-3000:]
    checkpoint = run_dir / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists() and not (checkpoint / "model.safetensors").exists()

    resumed = subprocess.run([*argv, "--resume", "auto"], capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoint}" in resumed.stderr
    steps = [m for m in read_metrics(run_dir / "metrics.jsonl") if "reward" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    # Every step pushed the adapter (and only it) and the probe, asking vLLM for the adapter, found the
    # trainer's logprobs; the resumed run pushed the checkpoint's adapter before its first rollout.
    for m in steps:
        assert m["sync/seconds"] > 0 and 0 < m["sync/adapter_bytes"] < 1e6, m
        assert m["sync/verify_max_logprob_diff"] < 1e-3, m
        assert m["rollouts/total"] > 0 and m["failures/total"] == 0
    # The adapter moved what vLLM serves: the adapter's logprobs differ from the base model's.
    control = VLLMControl(lora_servers.vllm.base_url, 120.0)
    ids = list(range(5, 40))
    moved = max(abs(a - b) for a, b in zip(control.prompt_logprobs(LORA_ADAPTER_NAME, ids), control.prompt_logprobs("tiny", ids)))
    control.close()
    assert moved > 1e-3
    # final/ holds the adapter; final/merged the base model with it merged in, loadable as a plain model.
    final = run_dir / "final"
    assert json.loads((final / "adapter_config.json").read_text())["r"] == RANK
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    assert not any("lora_" in n for n, _ in merged.named_parameters())


def test_lora_settings_that_cannot_work_are_refused(tmp_path):
    from gymtrl.config.load import load_config

    path = tmp_path / "c.yaml"
    for body, message in (
        ("model: {name_or_path: m, lora: {r: 8}}\nsync: {strategy: nccl}", "sync.strategy=lora"),
        ("model: {name_or_path: m}\nsync: {strategy: lora}", "model.lora.r"),
        ("model: {name_or_path: m, lora: {r: -1}}", "model.lora needs r >= 0"),
    ):
        path.write_text(body + "\ndata: {train: [x.jsonl]}\n")
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert message in f"{e.value} {e.value.hint}", (body, str(e.value), e.value.hint)
