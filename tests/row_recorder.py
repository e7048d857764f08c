"""A reward function (loaded from config by file path) that records which rows each step trained
on, so tests can compare data order across runs. It adds 0 to every reward."""

import json
import os


def record_rows(prompts, row, trainer_state, **kwargs):
    texts = sorted(r["responses_create_params"]["input"][-1]["content"] for r in row)
    with open(os.environ["GYMTRL_TEST_ROW_LOG"], "a") as f:
        f.write(json.dumps({"step": trainer_state.global_step + 1, "rows": texts}) + "\n")
    return [0.0] * len(prompts)
