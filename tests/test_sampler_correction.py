"""The same loss under every weight sync: TRL's importance-sampling correction against the sampling
logprobs gymtrl stitches from every turn, for reload / ipc / broadcast as for TRL's own nccl sync.

TRL's real GRPOTrainer scores a fixed batch (the rollout function is a stub that returns it, named
as one; no servers): the correction is on, a sample whose sampler disagrees with the trainer by 2
nats a token is masked out of the loss (TRL's default sequence_mask, clip_max 3), the others keep a
ratio of 1, and gymtrl logs the gap per environment and per turn and the share masked.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from conftest import REPO
from gymtrl.config.load import load_config
from gymtrl.metrics import StepChannel
from gymtrl.rollout.rollout_func import make_env_reward
from gymtrl.sync.check import trainer_logprobs
from gymtrl.train import build_grpo_config
from gymtrl import trl_seam

G = 4
LOSS_FIELDS = ("loss_type", "epsilon", "epsilon_high", "beta", "importance_sampling_level", "scale_rewards",
               "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
               "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min")


def config(tmp_path, grpo: str = ""):
    path = tmp_path / "c.yaml"
    path.write_text(f"""
model: {{name_or_path: unused, dtype: float32}}
data: {{train: [unused.jsonl]}}
grpo: {{max_steps: 1, per_device_train_batch_size: {2 * G}, num_generations: {G}, max_completion_length: 8, seed: 0{grpo}}}
output: {{dir: {tmp_path / 'run'}}}
""")
    return load_config(path)


@pytest.fixture(scope="module")
def tiny():
    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO / "scripts/make_tiny_model.py")
    mtm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mtm)
    tokenizer = mtm.build_tokenizer(mtm.read_corpus([]), 512)
    return tokenizer, mtm.build_model(tokenizer, seed=0, max_positions=256)


def test_every_sync_gets_the_loss_settings_of_trls_own(tmp_path):
    cfg = config(tmp_path)
    nccl = build_grpo_config(cfg, "nccl", cuda=False)
    assert nccl.use_vllm and nccl.vllm_importance_sampling_correction
    for strategy in ("reload", "ipc", "broadcast"):
        args = build_grpo_config(cfg, strategy, cuda=False)
        assert args.use_vllm is False  # no TRL vLLM client: gymtrl pushes the weights itself...
        assert {f: getattr(args, f) for f in LOSS_FIELDS} == {f: getattr(nccl, f) for f in LOSS_FIELDS}
    assert nccl.vllm_importance_sampling_mode == "sequence_mask" and nccl.vllm_importance_sampling_clip_max == 3.0


def test_sampling_settings_that_bias_the_ratio_are_named(tmp_path):
    assert trl_seam.check_sampling_settings(build_grpo_config(config(tmp_path), "reload", cuda=False)) is None
    warning = trl_seam.check_sampling_settings(
        build_grpo_config(config(tmp_path, ", top_p: 0.9, top_k: 20"), "reload", cuda=False))
    assert "top_p=0.9" in warning and "top_k=20" in warning and "biased below 1" in warning
    off = build_grpo_config(config(tmp_path, ", top_p: 0.9, vllm_importance_sampling_correction: false"), "reload",
                            cuda=False)
    assert trl_seam.check_sampling_settings(off) is None


def batch_with_one_mismatched_sampler(model, vocab: int, mismatched: int):
    """Two groups of G single- or two-turn samples whose sampling logprobs are the trainer's own,
    except sample `mismatched`, whose sampler saw each of its tokens as 2 nats less likely."""
    g = torch.Generator().manual_seed(3)
    out = {k: [] for k in ("prompt_ids", "completion_ids", "logprobs", "env_mask", "env_reward")}
    samples = []
    for i in range(2 * G):
        prompt = torch.randint(10, vocab, (6,), generator=g).tolist()
        completion = torch.randint(10, vocab, (6,), generator=g).tolist()
        mask = [1, 1, 1, 0, 1, 1] if i % 2 else [1] * 6  # odd samples: two model turns around a tool token
        spans = [(0, 3), (4, 6)] if i % 2 else [(0, 6)]
        logps = trainer_logprobs(model, prompt + completion)[len(prompt) - 1:]
        logps = [lp if m else 0.0 for lp, m in zip(logps, mask)]
        if i == mismatched:
            logps = [lp - 2.0 if m else 0.0 for lp, m in zip(logps, mask)]
        out["prompt_ids"].append(prompt)
        out["completion_ids"].append(completion)
        out["logprobs"].append(logps)
        out["env_mask"].append(mask)
        out["env_reward"].append(float(i % 3) / 2)
        samples.append(("env_a" if i < G else "env_b", spans))
    return out, samples


def test_under_reload_a_mismatched_sampler_is_masked_and_the_gap_is_logged(tiny, tmp_path):
    from datasets import Dataset
    from trl import GRPOTrainer

    tokenizer, model = tiny
    model = copy.deepcopy(model).float()
    mismatched = 5
    batch, samples = batch_with_one_mismatched_sampler(model, len(tokenizer), mismatched)
    channel = StepChannel()

    def STUB_rollout_func_returning_a_fixed_batch(prompts, trainer):
        channel.put({}, samples)
        return {k: list(v) for k, v in batch.items()}

    args = build_grpo_config(config(tmp_path), "reload", cuda=False)
    trainer = GRPOTrainer(model=model, reward_funcs=[make_env_reward(channel)], args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}), processing_class=tokenizer,
                          rollout_func=STUB_rollout_func_returning_a_fixed_batch)
    trl_seam.attach(trainer, "reload", sync=None, channel=channel)
    trainer.model.train()
    out = trainer._generate_and_score_completions([{"prompt": "a"}] * G + [{"prompt": "b"}] * G)

    ratio = out["importance_sampling_ratio"]  # the correction ran: TRL computed the ratio...
    assert ratio.shape == (2 * G, 1)  # ...per sequence (sequence_mask)
    assert ratio[mismatched].item() == 0.0  # exp(2 nats x 5 tokens) > clip_max 3: masked out of the loss
    others = [i for i in range(2 * G) if i != mismatched]
    torch.testing.assert_close(ratio[others], torch.ones(len(others), 1), atol=1e-4, rtol=0)

    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert metrics["sampler_gap/masked_fraction"] == pytest.approx(1 / (2 * G))
    assert metrics["sampler_gap/env_b/mean"] == pytest.approx(2.0 * 5 / 22, abs=1e-3)  # 5 of env_b's 22 model tokens, 2 nats
    assert metrics["sampler_gap/env_a/mean"] < 1e-4
    assert metrics["sampler_gap/turn1/mean"] > 0 and metrics["sampler_gap/turn2/mean"] > 0
    assert metrics["sampling/sampling_logp_difference/max"] == pytest.approx(2.0, abs=1e-3)  # TRL's own metric


def test_the_correction_can_be_turned_off(tiny, tmp_path):
    from datasets import Dataset
    from trl import GRPOTrainer

    tokenizer, model = tiny
    args = build_grpo_config(config(tmp_path, ", vllm_importance_sampling_correction: false"), "reload", cuda=False)
    trainer = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=[make_env_reward(StepChannel())], args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a"]}), processing_class=tokenizer,
                          rollout_func=lambda prompts, trainer: {})
    trl_seam.use_sampler_correction(trainer, "reload")
    assert trainer.use_vllm is False
