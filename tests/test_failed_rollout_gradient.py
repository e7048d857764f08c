"""A failed rollout, encoded as gymtrl encodes it (to_trl_batch: one placeholder token as prompt and
completion, logprobs [0.0], env_mask [0], env reward None), goes through TRL 1.16's own
GRPOTrainer._generate_and_score_completions and compute_loss: it gets advantage 0, it is left out of
its group's baseline, and it contributes no gradient. No servers: the rollout function is a stub
that returns fixed outcomes (STUB_rollout_func_returning_fixed_outcomes), the model a tiny random
Qwen2 built by scripts/make_tiny_model.py's own functions.

Two paths:
- The correction off (grpo.vllm_importance_sampling_correction=false): TRL keeps no
  importance-sampling ratio; the failed row is out of the loss because its env_mask is 0.
- The importance-sampling correction on (gymtrl's default under every sync, trl_seam): TRL multiplies
  the loss by exp(sum over the loss mask of trainer logprob - sampling logprob). The failed row's
  mask is all 0, so its ratio is exactly 1 whatever its placeholder logprob [0.0] says, and it is
  still out of the loss. Without the mask, the placeholder's logprob 0.0 against the trainer's
  ~-log(vocab) would give the row a ratio of about 1/vocab; with it, nothing about the row matters
  (checked by changing its token and logprob).

Loss types: TRL's default (dapo, which gymtrl keeps) and bnpo divide by the number of loss tokens, so
a batch with the failed row gives exactly the gradient of the batch without it. grpo and dr_grpo
divide by the number of rows (or rows x max length): there the failed row adds nothing but still
counts in the divisor, so the other rows' gradient is scaled by (B-1)/B -- checked here as such.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from conftest import REPO
from gymtrl import trl_seam
from gymtrl.metrics import StepChannel
from gymtrl.rollout.engine import RolloutOutcome
from gymtrl.failures import FailureKind
from gymtrl.rollout.rollout_func import make_env_reward, to_trl_batch
from gymtrl.rollout.trajectory import Trajectory

G = 4  # num_generations
FAILED = 1  # the failed rollout: second of the first group


def _load_make_tiny_model():
    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO / "scripts/make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    mtm = _load_make_tiny_model()
    tokenizer = mtm.build_tokenizer(mtm.read_corpus([]), 512)
    return tokenizer, mtm.build_model(tokenizer, seed=0, max_positions=256)


def outcomes(vocab: int):
    """Two groups of G rollouts; rollout FAILED failed (a timeout). Rewards chosen so that both groups
    have spread. One successful rollout is multi-turn (env_mask 0 on the environment's tokens)."""
    g = torch.Generator().manual_seed(1)
    rewards = [1.0, None, 0.0, 0.5, 0.2, 0.9, 0.4, 0.6]
    out = []
    for i, reward in enumerate(rewards):
        if reward is None:
            out.append(RolloutOutcome(env="digit_reply_simple_agent", reward=None, trajectory=None,
                                      failure=FailureKind.TIMEOUT, detail="rollout passed its deadline",
                                      latency_s=1.0, reply=None))
            continue
        n_prompt, n_completion = 5 + i % 3, 4 + i % 4
        completion = torch.randint(10, vocab, (n_completion,), generator=g).tolist()
        env_mask = [1] * n_completion if i != 5 else [1, 1, 0, 0] + [1] * (n_completion - 4)
        out.append(RolloutOutcome(
            env="digit_reply_simple_agent", reward=reward,
            trajectory=Trajectory(prompt_ids=torch.randint(10, vocab, (n_prompt,), generator=g).tolist(),
                                  completion_ids=completion,
                                  logprobs=(-torch.rand(n_completion, generator=g) * 8).tolist(),
                                  env_mask=env_mask, num_turns=2 if i == 5 else 1),
            failure=None, detail="", latency_s=1.0, reply={"reward": reward}))
    return out


def make_trainer(tiny, tmp_path, batch: dict, loss_type: str | None = None, importance_sampling: bool = False):
    from trl import GRPOTrainer
    from datasets import Dataset

    from gymtrl.config.load import load_config
    from gymtrl.train import build_grpo_config

    tokenizer, model = tiny
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "c.yaml"
    extra = f", loss_type: {loss_type}" if loss_type else ""
    if not importance_sampling:
        extra += ", vllm_importance_sampling_correction: false"
    config.write_text(f"""
model: {{name_or_path: unused, dtype: float32}}
data: {{train: [unused.jsonl]}}
grpo: {{max_steps: 1, per_device_train_batch_size: {2 * G}, num_generations: {G}, max_completion_length: 8,
        learning_rate: 1.0e-3, seed: 0{extra}}}
output: {{dir: {tmp_path / 'run'}}}
""")
    args = build_grpo_config(load_config(config), "reload", cuda=False)  # the trainer gymtrl builds on CPU
    assert args.use_vllm is False

    def STUB_rollout_func_returning_fixed_outcomes(prompts, trainer):
        assert len(prompts) == len(batch["prompt_ids"])
        return {k: list(v) for k, v in batch.items()}

    env_reward = make_env_reward(StepChannel())  # gymtrl's reward function
    trainer = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=[env_reward], args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["row-a", "row-b"]}),
                          processing_class=tokenizer, rollout_func=STUB_rollout_func_returning_fixed_outcomes)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop for each step; one here
    if importance_sampling:
        trl_seam.use_sampler_correction(trainer, "reload")  # as gymtrl's recipe does for every sync but nccl
        assert trainer.use_vllm and trainer.vllm_importance_sampling_correction
    return trainer


def scored(trainer):
    """TRL's scoring of the stub's batch (two prompts, each G times, as TRL's sampler hands them):
    the dict compute_loss takes."""
    inputs = [{"prompt": "row-a"} for _ in range(G)] + [{"prompt": "row-b"} for _ in range(G)]
    return trainer._generate_and_score_completions(inputs)


def gradient(trainer, inputs) -> torch.Tensor:
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    trainer.model.zero_grad(set_to_none=True)
    return grads


def assert_same_gradient(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float32 summation order (a batch of 7 rows is not summed as one of 8): within
    1e-5 of the gradient's largest entry. A real contribution of a row is far above that (checked)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())


def without_row(inputs: dict, row: int) -> dict:
    """The scored batch with one row dropped from every per-row tensor (num_items_in_batch kept: it
    counts loss tokens, of which the failed row has none -- asserted by the caller)."""
    keep = [i for i in range(inputs["advantages"].shape[0]) if i != row]
    return {k: (v[keep] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == len(keep) + 1 else v)
            for k, v in inputs.items()}


def build(tiny, tmp_path, placeholder: int, placeholder_logprob: float = 0.0, **kw):
    tokenizer, _ = tiny
    outs = outcomes(len(tokenizer))
    batch = to_trl_batch(outs, placeholder, [{"id": i} for i in range(len(outs))])
    batch["logprobs"][FAILED] = [placeholder_logprob]
    trainer = make_trainer(tiny, tmp_path, batch, **kw)
    return trainer, outs, batch


@pytest.mark.parametrize("importance_sampling", [False, True], ids=["correction_off", "correction_on"])
def test_a_failed_rollout_gets_advantage_0_and_contributes_no_gradient(tiny, tmp_path, importance_sampling):
    tokenizer, _ = tiny
    eos = tokenizer.eos_token_id  # gymtrl's placeholder (train.py: eos, else pad)
    trainer, outs, batch = build(tiny, tmp_path, eos, importance_sampling=importance_sampling)
    # gymtrl's encoding of the failed rollout, as TRL receives it
    assert (batch["prompt_ids"][FAILED], batch["completion_ids"][FAILED], batch["logprobs"][FAILED],
            batch["env_mask"][FAILED], batch["env_reward"][FAILED]) == ([eos], [eos], [0.0], [0], None)
    inputs = scored(trainer)

    # 1. Advantage 0, and the group's baseline is taken over its three scored rollouts only.
    adv = inputs["advantages"]
    assert adv[FAILED].item() == 0.0
    ok = torch.tensor([1.0, 0.0, 0.5])
    expected = (ok - ok.mean()) / (ok.std() + 1e-4)
    torch.testing.assert_close(adv[[0, 2, 3]], expected)
    # Its tokens are outside the loss mask, and count nowhere in the loss's token count.
    mask = inputs["completion_mask"] * inputs["tool_mask"]
    assert mask[FAILED].sum().item() == 0
    assert inputs["num_items_in_batch"].item() == sum(sum(o.trajectory.env_mask) for o in outs if o.trajectory)
    if importance_sampling:
        ratio = inputs["importance_sampling_ratio"]
        assert ratio[FAILED].eq(1.0).all()  # the placeholder's logprob 0.0 is not compared with anything

    # 2. The batch's gradient is the gradient of the batch without the failed row.
    full = gradient(trainer, inputs)
    assert full.abs().max() > 1e-4  # a real gradient: the check below can see a difference
    assert_same_gradient(full, gradient(trainer, without_row(inputs, FAILED)))
    # ... while dropping a scored rollout does change it, by far more than that tolerance (not blind)
    assert (full - gradient(trainer, without_row(inputs, 0))).abs().max() > 0.01 * full.abs().max()

    # 3. Whatever the failed row holds (another placeholder token, another logprob), nothing changes.
    other, outs2, _ = build(tiny, tmp_path / "other", placeholder=17, placeholder_logprob=-3.0,
                            importance_sampling=importance_sampling)
    other.model.load_state_dict(trainer.model.state_dict())
    inputs2 = scored(other)
    assert inputs2["advantages"][FAILED].item() == 0.0
    assert_same_gradient(gradient(other, inputs2), full)


@pytest.mark.parametrize("loss_type", ["bnpo", "grpo", "dr_grpo"])
def test_other_loss_types_take_no_gradient_from_it_but_grpo_counts_its_row(tiny, tmp_path, loss_type):
    """bnpo normalises by loss tokens like dapo: exactly the batch without the row. grpo and dr_grpo
    average over rows: the failed row adds zero to the sum but one to the divisor."""
    tokenizer, _ = tiny
    trainer, outs, _ = build(tiny, tmp_path, tokenizer.eos_token_id, loss_type=loss_type)
    assert trainer.loss_type == loss_type
    inputs = scored(trainer)
    assert inputs["advantages"][FAILED].item() == 0.0
    full, without = gradient(trainer, inputs), gradient(trainer, without_row(inputs, FAILED))
    scale = 1.0 if loss_type == "bnpo" else (len(outs) - 1) / len(outs)
    assert_same_gradient(full, without * scale)
