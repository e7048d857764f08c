"""The batch arithmetic TRL's GRPOConfig demands, checked before anything starts, with the fix spelled out.

GRPO compares the `num_generations` completions of each prompt, so every generation batch must hold
whole groups: per_device_train_batch_size x processes x steps_per_generation (or
generation_batch_size) must be a multiple of num_generations. TRL checks this too, but some
mistakes reach it as a ZeroDivisionError or a TypeError, and none of its messages names the fix.
"""

from __future__ import annotations

from gymtrl.errors import ConfigError

TRL_DEFAULTS = {"per_device_train_batch_size": 8, "num_generations": 8, "gradient_accumulation_steps": 1,
                "per_device_eval_batch_size": 8}


def check_batch_geometry(grpo: dict, world: int) -> None:
    """Raise a ConfigError naming the keys and a working value when the batch cannot hold whole groups."""
    get = lambda key: grpo.get(key) if grpo.get(key) is not None else TRL_DEFAULTS.get(key)  # noqa: E731
    per_device, groups = get("per_device_train_batch_size"), get("num_generations")
    spg, gen_batch = grpo.get("steps_per_generation"), grpo.get("generation_batch_size")
    if groups < 2:
        raise ConfigError(f"grpo.num_generations={groups}: GRPO needs at least 2 completions per prompt to compare",
                          hint="set grpo.num_generations to 2 or more (8 is TRL's default)")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if get(key) < 1:
            raise ConfigError(f"grpo.{key}={get(key)}: must be at least 1")
    if spg is not None and gen_batch is not None:
        raise ConfigError("grpo.steps_per_generation and grpo.generation_batch_size are both set: TRL takes one",
                          hint="keep one of them")
    across = per_device * world
    if gen_batch is not None:
        if gen_batch % across:
            raise ConfigError(f"grpo.generation_batch_size={gen_batch} is not a multiple of per_device_train_batch_size "
                              f"x processes = {per_device} x {world} = {across}",
                              hint=f"use a multiple of {across}, e.g. {-(-gen_batch // across) * across}")
        spg = gen_batch // across
    spg = spg or get("gradient_accumulation_steps")
    total = across * spg
    if total % groups:
        fits = next(b for b in range(per_device, per_device * groups + 1) if (b * world * spg) % groups == 0)
        raise ConfigError(
            f"grpo: a generation batch of {total} completions (per_device_train_batch_size {per_device} x {world} "
            f"process{'es' if world > 1 else ''} x steps_per_generation {spg}) does not hold whole groups of "
            f"num_generations={groups}",
            hint=f"set grpo.per_device_train_batch_size={fits}, or a num_generations that divides {total}")
    eval_groups = grpo.get("num_generations_eval") or groups
    eval_total = get("per_device_eval_batch_size") * world
    if grpo.get("eval_strategy") not in (None, "no") and eval_total % eval_groups:
        raise ConfigError(f"grpo: an evaluation batch of {eval_total} completions does not hold whole groups of "
                          f"{eval_groups}", hint="set grpo.per_device_eval_batch_size to a multiple of it")
