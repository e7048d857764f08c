"""Every place gymtrl reaches into TRL's GRPOTrainer beyond its public arguments, in one file.

1. The sampler correction under every sync (`use_sampler_correction`). TRL gates its
   importance-sampling correction on `use_vllm`, and with `use_vllm=True` it also builds its own
   vLLM client and NCCL sync. gymtrl generates through NeMo Gym and pushes weights itself, so for
   reload / ipc / broadcast it builds the trainer with `use_vllm=False` and then switches the
   attribute on, with a stand-in for TRL's generation backend whose `sync_weights` does nothing
   (gymtrl's publisher pushes before each batch). The loss is then TRL's own, with the same
   correction as under nccl: the trainer recomputes each completion's logprobs (the "old" ones) and
   weighs the loss by exp(old - sampling), truncated or masked as `grpo.vllm_importance_sampling_mode`
   says (TRL's default, kept: sequence_mask with clip_max 3.0; a sample whose sequence ratio leaves
   [clip_min, clip_max] is dropped from the loss rather than reweighted).
2. Timing TRL's own NCCL sync (`time_trl_sync`), for sync.strategy=nccl.
3. The sampler-gap metrics (`log_sampler_gap`): per environment and per model turn, the mean
   |trainer logprob - sampling logprob| over model tokens, and the share of the batch the correction
   masked, read from what TRL's `_generate_and_score_completions` returns.
Each seam checks that TRL still has what it relies on and fails with one line if not.
"""

from __future__ import annotations

from collections import defaultdict

from gymtrl.errors import ConfigError
from gymtrl.metrics import StepChannel
from gymtrl.sync.nccl import NcclSync, timed

MAX_TURN_METRICS = 8  # turns past this are logged together as turn8+


class _GymtrlGeneration:
    """Stands in for TRL's vLLM generation backend: gymtrl's publisher has already pushed."""

    def sync_weights(self) -> None:
        return None


def _require(trainer, *names: str) -> None:
    missing = [n for n in names if not hasattr(trainer, n)]
    if missing:
        import trl

        raise ConfigError(f"TRL {trl.__version__}'s GRPOTrainer has no {', '.join(missing)}: gymtrl's sampler "
                          "correction is written against TRL 1.16", hint="install the TRL version gymtrl pins "
                          "(requirements/trainer.txt)")


def check_sampling_settings(grpo_args) -> str | None:
    """A warning when the sampling settings bias the correction's ratio, else None. vLLM's sampling
    logprobs (processed_logprobs) are renormalised over the tokens top_p / top_k / min_p keep, while
    the trainer's cover the whole vocabulary: every kept token then reads as more likely to the
    sampler than to the trainer, so the ratio is biased below 1 and the correction down-weights
    good samples."""
    if not getattr(grpo_args, "vllm_importance_sampling_correction", False):
        return None
    biased = []
    if getattr(grpo_args, "top_p", 1.0) < 1.0:
        biased.append(f"top_p={grpo_args.top_p}")
    if (getattr(grpo_args, "top_k", 0) or 0) > 0:
        biased.append(f"top_k={grpo_args.top_k}")
    if (getattr(grpo_args, "min_p", None) or 0) > 0:
        biased.append(f"min_p={grpo_args.min_p}")
    if not biased:
        return None
    return (f"grpo {', '.join(biased)} truncates the sampling distribution: its logprobs are renormalised over the "
            "kept tokens while the trainer's cover the whole vocabulary, so the importance-sampling ratio is biased "
            "below 1; sample with top_p=1.0 and no top_k/min_p, or set grpo.vllm_importance_sampling_correction=false")


def attach(trainer, strategy: str, sync, channel: StepChannel) -> None:
    """All of gymtrl's seams on a freshly built trainer."""
    use_sampler_correction(trainer, strategy)
    log_sampler_gap(trainer, channel)
    if isinstance(sync, NcclSync):
        time_trl_sync(trainer, sync)


def use_sampler_correction(trainer, strategy: str) -> None:
    """Turn on TRL's importance-sampling correction for a trainer built with use_vllm=False (every
    sync but nccl, where TRL built its own backend). No-op when the config turned it off."""
    if strategy == "nccl" or not trainer.args.vllm_importance_sampling_correction:
        return
    _require(trainer, "use_vllm", "vllm_importance_sampling_correction", "vllm_importance_sampling_mode")
    if trainer.loss_type == "vespo" and trainer.vllm_importance_sampling_mode not in ("token_truncate", "token_mask"):
        raise ConfigError("grpo.loss_type=vespo needs grpo.vllm_importance_sampling_mode token_truncate or token_mask",
                          hint="set grpo.vllm_importance_sampling_mode=token_truncate")
    trainer.use_vllm = True
    trainer.vllm_mode = "server"  # (TRL's colocate-only paths stay off)
    trainer.vllm_generation = _GymtrlGeneration()
    trainer._last_loaded_step = -1


def time_trl_sync(trainer, sync: NcclSync) -> None:
    """Record how long each of TRL's own weight syncs takes, so sync/seconds is not a constant 0."""
    generation = getattr(trainer, "vllm_generation", None)
    original = getattr(generation, "sync_weights", None)
    if original is not None:
        generation.sync_weights = timed(sync, original)


def sampler_gap_metrics(output: dict, samples: list[tuple[str, list[tuple[int, int]]]],
                        mode: str | None) -> dict[str, float]:
    """Per environment and per model turn, the mean |old - sampling| logprob over model tokens; and
    the share of samples (sequence modes) or model tokens (token modes) the correction masked."""
    old, sampling = output.get("old_per_token_logps"), output.get("sampling_per_token_logps")
    if old is None or sampling is None or len(samples) != old.shape[0]:
        return {}
    gap = (old - sampling).abs().float().cpu()
    mask = output["completion_mask"].cpu()
    if output.get("tool_mask") is not None:
        mask = mask * output["tool_mask"].cpu()
    by_env: dict[str, list[float]] = defaultdict(list)
    by_turn: dict[str, list[float]] = defaultdict(list)
    for i, (env, spans) in enumerate(samples):
        for turn, (start, end) in enumerate(spans, start=1):
            span_mask = mask[i, start:end].bool()
            values = gap[i, start:end][span_mask]
            values = values[~values.isnan()]
            if values.numel():
                by_env[env] += values.tolist()
                key = f"turn{turn}" if turn < MAX_TURN_METRICS else f"turn{MAX_TURN_METRICS}+"
                by_turn[key] += values.tolist()
    metrics = {f"sampler_gap/{env}/mean": sum(v) / len(v) for env, v in by_env.items()}
    metrics.update({f"sampler_gap/{turn}/mean": sum(v) / len(v) for turn, v in by_turn.items()})
    ratio = output.get("importance_sampling_ratio")
    if ratio is not None and mode is not None:
        ratio = ratio.float().cpu()
        scored = mask.sum(dim=1) > 0  # failed rollouts (all-zero mask) are not in the loss anyway
        if ratio.shape[1] == 1:  # sequence modes: one ratio per sample
            kept = ratio[scored, 0]
        else:
            kept = ratio[mask.bool()]
        if kept.numel():
            metrics["sampler_gap/masked_fraction"] = float((kept == 0).float().mean()) if mode.endswith("mask") else 0.0
            metrics["sampler_gap/ratio_mean"] = float(kept.mean())
    return metrics


def log_sampler_gap(trainer, channel: StepChannel) -> None:
    """After TRL scored each generation batch, add the sampler-gap metrics to TRL's own (the main
    process's batch: per-environment sets differ across processes, so they are not gathered)."""
    _require(trainer, "_generate_and_score_completions", "_metrics")
    original = trainer._generate_and_score_completions

    def scored_with_gap_metrics(inputs):
        output = original(inputs)
        mode = "train" if trainer.model.training else "eval"
        is_mode = trainer.vllm_importance_sampling_mode if trainer.use_vllm else None
        for name, value in sampler_gap_metrics(output, channel.samples, is_mode).items():
            trainer._metrics[mode][name].append(value)
        return output

    trainer._generate_and_score_completions = scored_with_gap_metrics
