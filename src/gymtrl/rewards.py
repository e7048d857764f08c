"""Custom reward functions from config, combined with the environment's reward.

A user function is TRL-style: called with `prompts`, `completions` (decoded text; for multi-turn
episodes it includes the tool results), `completion_ids`, and, per sample, `env_reward` (the
environment's reward, None for a failed rollout), `gym_env` (the agent), `row` (the NeMo Gym
dataset row), `verifier` (the verifier's reply without the episode), `num_turns`; it returns one
float (or None: not applicable) per sample. gymtrl wraps it so that:
- a failed rollout stays excluded (None from every function: TRL leaves it out of the baseline);
- `envs` limits it to some environments (None elsewhere);
- a wrong return (length, type, NaN) stops the run with the function's name, not a TRL traceback;
- its mean is logged per environment as `env/<agent>/reward_<name>`.
TRL sums the functions with `reward_weights` = [rewards.env_weight, each function's weight].
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Callable

from gymtrl.config.schema import RewardFunctionConfig
from gymtrl.errors import ConfigError, GymtrlError


class RewardFunctionError(GymtrlError):
    """A custom reward function returned something TRL cannot use."""


def load_function(spec: str, key: str) -> Callable:
    """`package.module:function` or `path/to/file.py:function`."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key}: '{spec}' is not of the form package.module:function or file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"{key}: reward function file not found: {path}")
            loader_spec = importlib.util.spec_from_file_location(f"gymtrl_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(loader_spec)  # type: ignore[arg-type]
            loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any import-time error is the user's module's
        raise ConfigError(f"{key}: cannot import '{module_name}': {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{key}: '{module_name}' has no function '{attr}'")
    return fn


class ConfiguredReward:
    def __init__(self, fn: Callable, name: str, envs: list[str] | None):
        self.fn = fn
        self.__name__ = name  # TRL logs each function as rewards/<__name__>/...
        self.envs = set(envs) if envs else None

    def __call__(self, prompts, completions, completion_ids, env_reward, gym_env, log_metric=None, prompt_key=None,
                 **kwargs):
        if prompt_key is not None:  # the rows this batch was generated from (one-step-off: not TRL's `prompts`)
            prompts = list(prompt_key)
        values = self.fn(prompts=prompts, completions=completions, completion_ids=completion_ids,
                         env_reward=env_reward, gym_env=gym_env, **kwargs)
        if not isinstance(values, (list, tuple)) or len(values) != len(prompts):
            raise RewardFunctionError(
                f"reward function '{self.__name__}' returned {type(values).__name__}"
                f"{f' of length {len(values)}' if isinstance(values, (list, tuple)) else ''}; "
                f"expected a list of {len(prompts)} numbers (or None)")
        out: list[float | None] = []
        for i, value in enumerate(values):
            if env_reward[i] is None or (self.envs is not None and gym_env[i] not in self.envs) or value is None:
                out.append(None)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RewardFunctionError(f"reward function '{self.__name__}' returned {value!r} for sample {i}; "
                                          "expected a finite number or None")
            out.append(float(value))
        if log_metric is not None:
            per_env: dict[str, list[float]] = defaultdict(list)
            for env, value in zip(gym_env, out):
                if value is not None:
                    per_env[env].append(value)
            for env, vals in per_env.items():
                log_metric(f"env/{env}/reward_{self.__name__}", mean(vals))
        return out


def build_reward_functions(specs: list[RewardFunctionConfig]) -> list[ConfiguredReward]:
    functions, names = [], set()
    for i, spec in enumerate(specs):
        key = f"rewards.functions[{i}].function"
        fn = load_function(spec.function, key)
        name = spec.name or re.sub(r"\W", "_", spec.function.rpartition(":")[2])
        if name in names or name == "env_reward":
            raise ConfigError(f"rewards.functions[{i}]: the name '{name}' is taken", hint="give it another `name`")
        names.add(name)
        functions.append(ConfiguredReward(fn, name, spec.envs))
    return functions
