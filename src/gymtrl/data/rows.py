"""The dataset TRL sees, and the row store the rollout function reads.

TRL hands `rollout_func` only each row's `prompt`, but an agent's `/run` needs the whole NeMo Gym
row (tools, ground truth, verifier fields). So each row is kept here under a key ("train:17"), and
the TRL dataset's `prompt` column holds that key; `gym_env` names the row's environment.
"""

from __future__ import annotations

from datasets import Dataset

from gymtrl.data.read import DatasetRow
from gymtrl.gym.discovery import GymTopology


def build_split(split: str, rows: list[DatasetRow], topo: GymTopology, store: dict[str, dict]) -> Dataset:
    keys, envs = [], []
    for i, row in enumerate(rows):
        key = f"{split}:{i}"
        store[key] = row.data
        keys.append(key)
        envs.append(topo.route(row.data) or "")
    return Dataset.from_dict({"prompt": keys, "gym_env_of_row": envs})
