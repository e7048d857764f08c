"""Evaluation: the estimators (pass@k, standard errors, paired differences), the eval section's
checks, `gymtrl eval` telling a better model from a worse one on the same rows, and evaluation
inside a training run (step 0, every eval.every_steps, the end; eval rows never trained on)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gymtrl.config import load_config
from gymtrl.errors import ConfigError, DataError
from gymtrl.evaluation.callback import check_disjoint
from gymtrl.evaluation.run import sample_seed, with_seed
from gymtrl.evaluation.stats import RowResult, mean_se, paired_difference, pass_at_k, summarize
from gymtrl.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
DIGIT_ROWS = REPO / "src/gymtrl/envs/resources_servers/digit_reply/data/train.jsonl"
ENV = "digit_reply_simple_agent"


# --- estimators --------------------------------------------------------------------------------

def brute_pass_at_k(outcomes: list[bool], k: int) -> float:
    """The chance that k of the samples, drawn without replacement, hold a pass: by enumeration."""
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_pass_at_k_is_the_unbiased_estimator(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(outcomes, k), abs=1e-12), (n, c, k)
    assert pass_at_k(n, 0, 1) == 0.0 and pass_at_k(n, n, n) == 1.0
    if n > 1:
        assert pass_at_k(n, 1, 1) == pytest.approx(1 / n)  # pass@1 is the pass rate
        assert pass_at_k(n, 1, n) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(n, 0, n + 1)


def test_standard_error_is_the_sample_sd_over_root_n():
    m, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5
    assert se == pytest.approx(math.sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3 / 4))
    assert mean_se([5.0])[0] == 5.0 and math.isnan(mean_se([5.0])[1])
    assert all(math.isnan(x) for x in mean_se([]))


def test_summary_treats_the_row_as_the_unit_and_leaves_failures_out():
    rows = [RowResult("eval:0", "e", [1.0, 0.0, 1.0, 1.0], 0, [1] * 4, [3] * 4),
            RowResult("eval:1", "e", [0.0, 0.0], 2, [2, 2], [5, 5])]
    s = summarize(rows, samples=4, threshold=1.0)
    assert s["rows"] == 2 and s["rollouts"] == 8 and s["failed"] == 2
    assert s["reward"] == pytest.approx((0.75 + 0.0) / 2)
    assert s["reward_se"] == pytest.approx(mean_se([0.75, 0.0])[1])
    assert s["pass@1"] == pytest.approx((0.75 + 0.0) / 2)
    assert s["pass@4"] == pytest.approx(1.0)  # only row 0 has 4 scored samples
    assert s["turns"] == pytest.approx(8 / 6) and s["model_tokens"] == pytest.approx(22 / 6)


def test_paired_difference_is_over_rows_both_models_scored():
    a = [RowResult("r0", "e", [0.0, 0.2]), RowResult("r1", "e", [0.5]), RowResult("r2", "e", [])]
    b = [RowResult("r0", "e", [1.0, 0.8]), RowResult("r1", "e", [0.7]), RowResult("r2", "e", [1.0])]
    d, se, n = paired_difference(a, b)
    assert n == 2 and d == pytest.approx((0.8 + 0.2) / 2)
    assert se == pytest.approx(mean_se([0.8, 0.2])[1])


def test_seeds_are_fixed_per_row_and_sample_and_reach_extra_body():
    assert sample_seed(0, "eval:3", 1) == sample_seed(0, "eval:3", 1) != sample_seed(0, "eval:3", 2)
    row = {"responses_create_params": {"input": "hi", "metadata": {"extra_body": '{"top_k": 5}', "x": "y"}}}
    sent = with_seed(row, 42)["responses_create_params"]["metadata"]
    assert json.loads(sent["extra_body"]) == {"top_k": 5, "seed": 42} and sent["x"] == "y"
    assert row["responses_create_params"]["metadata"]["extra_body"] == '{"top_k": 5}'  # the stored row is untouched


def test_eval_rows_must_be_kept_apart_from_training_rows():
    train_row, eval_row = {"a": 1}, {"a": 2}
    check_disjoint({"train:0": train_row, "eval:0": eval_row}, ["eval:0"])
    with pytest.raises(DataError):
        check_disjoint({"train:0": train_row, "eval:0": train_row}, ["eval:0"])  # the same object
    with pytest.raises(DataError):
        check_disjoint({"train:0": train_row, "eval:0": eval_row}, ["train:0"])  # a training key


# --- config ------------------------------------------------------------------------------------

CONFIG = """
model: {name_or_path: m}
data: {train: [t.jsonl]}
"""


@pytest.mark.parametrize("override, key", [
    ("eval.samples=0", "eval.samples"), ("eval.every_steps=-1", "eval.every_steps"),
    ("eval.max_rows=0", "eval.max_rows"), ("eval.temperature=-0.5", "eval.temperature"),
    ("grpo.eval_strategy=steps", "grpo.eval_strategy"),
])
def test_eval_values_are_checked_with_one_line_naming_the_key(tmp_path, override, key):
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG)
    cfg = load_config(path)
    assert (cfg.eval.samples, cfg.eval.every_steps, cfg.eval.at_start, cfg.eval.at_end) == (4, 0, True, True)
    with pytest.raises(ConfigError) as e:
        load_config(path, [override])
    assert key in e.value.message and "\n" not in e.value.message


def test_compare_refuses_a_model_of_another_architecture_in_one_line(tiny_model, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    config["intermediate_size"] = config["intermediate_size"] * 2
    (other / "config.json").write_text(json.dumps(config))
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {{name_or_path: {tiny_model}}}\ndata: {{train: [{DIGIT_ROWS}]}}\n")
    run = subprocess.run([sys.executable, "-m", "gymtrl.cli", "eval", "--config", str(path), "--rows", str(DIGIT_ROWS),
                          "--compare", str(other)], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("gymtrl: error:")]
    assert len(errors) == 1 and "must share an architecture and a tokenizer" in errors[0], run.stderr[-2000:]
    assert "intermediate_size" in errors[0] and "Traceback" not in run.stderr


# --- with the session's servers ------------------------------------------------------------------

def digit_rows(first: int, count: int, tag: str = "") -> list[dict]:
    rows = [json.loads(line) for line in DIGIT_ROWS.read_text().splitlines() if line.strip()][first:first + count]
    for r in rows:
        if tag:
            r["responses_create_params"]["input"][-1]["content"] = f"{tag} {r['responses_create_params']['input'][-1]['content']}"
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def teach_digits(model_dir: Path, out: Path, rows: list[dict], steps: int = 60) -> Path:
    """A short SFT of the tiny model: every digit_reply prompt answered by digits only."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    rng = random.Random(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    examples = []
    for r in rows:
        messages = r["responses_create_params"]["input"]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        for _ in range(2):
            answer = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 5)))
            full = tok.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
            ids = tok(full, add_special_tokens=False)["input_ids"]
            examples.append((ids, [-100] * len(p_ids) + ids[len(p_ids):]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = [examples[(step * 8 + i) % len(examples)] for i in range(8)]
        width = max(len(ids) for ids, _ in batch)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.servers
def test_gymtrl_eval_tells_the_digit_trained_model_from_the_base_on_the_same_rows(servers, tmp_path):
    rows = write_rows(tmp_path / "rows.jsonl", digit_rows(0, 16))
    better = teach_digits(servers.model, tmp_path / "digits", digit_rows(16, 48))
    config = tmp_path / "c.yaml"
    config.write_text(f"""
model: {{name_or_path: {servers.model}, dtype: float32}}
vllm: {{dtype: float32}}
data: {{train: [{DIGIT_ROWS}]}}
grpo: {{max_completion_length: 8, temperature: 1.0}}
eval: {{samples: 4, pass_threshold: 0.99}}
output: {{dir: {tmp_path / 'run'}}}
""")
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "gymtrl.cli", "eval", "--config", str(config), *servers.connect_overrides(),
                          "--model", str(servers.model), "--compare", str(better), "--rows", str(rows), "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "B - A, paired by row" in run.stdout and ENV in run.stdout
    rep = json.loads(out.read_text())
    assert rep["samples"] == 4 and rep["rows"] == 16
    base, taught = rep["models"]
    assert base["model"] == str(servers.model) and taught["model"] == str(better)
    for m in (base, taught):
        env = m["envs"][ENV]
        assert env["rollouts"] == 64 and env["failed"] == 0 and env["failures"] == {}
        assert set(env) >= {"reward", "reward_se", "pass@1", "pass@4", "turns", "model_tokens"}
        assert env["turns"] == 1.0 and 0 < env["model_tokens"] <= 8
        assert env["pass@1"] <= env["pass@4"]
    diff = rep["compare"]["all"]
    assert diff["rows"] == 16
    assert taught["overall"]["reward"] > base["overall"]["reward"]
    # The paired difference is well clear of its standard error.
    assert diff["reward_diff"] > 5 * diff["reward_diff_se"] and diff["reward_diff"] > 0.2, diff


@pytest.mark.servers
def test_training_evaluates_at_step_0_every_n_steps_and_at_the_end_on_rows_it_never_trains_on(servers, tmp_path):
    train = write_rows(tmp_path / "train.jsonl", digit_rows(0, 16))
    held_out = digit_rows(48, 6, tag="HELD-OUT")
    evals = write_rows(tmp_path / "eval.jsonl", held_out)
    row_log = tmp_path / "rows.log"
    config = tmp_path / "c.yaml"
    config.write_text(f"""
model: {{name_or_path: {servers.model}, dtype: float32}}
vllm: {{dtype: float32}}
data: {{train: [{train}], eval: [{evals}]}}
rewards: {{functions: [{{function: "{REPO / 'tests/row_recorder.py'}:record_rows", weight: 0.0}}]}}
eval: {{every_steps: 2, samples: 2}}
grpo: {{max_steps: 3, per_device_train_batch_size: 8, num_generations: 4, max_completion_length: 8,
        save_strategy: "no", learning_rate: 1.0e-3, seed: 0}}
output: {{dir: {tmp_path / 'run'}}}
""")
    run = subprocess.run([sys.executable, "-m", "gymtrl.cli", "train", "--config", str(config), *servers.connect_overrides()],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "GYMTRL_TEST_ROW_LOG": str(row_log)})
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run/metrics.jsonl")
    evals_logged = [m for m in metrics if f"eval/{ENV}/reward" in m]
    assert [m["step"] for m in evals_logged] == [0, 2, 3]
    for m in evals_logged:
        for key in ("reward", "reward_se", "pass@1", "failures", "turns"):
            assert f"eval/{ENV}/{key}" in m, (key, m)
        assert m[f"eval/{ENV}/rollouts"] == 12 and m[f"eval/{ENV}/failures"] == 0
        assert m["eval/reward"] == m[f"eval/{ENV}/reward"]
        # The weights pushed for the evaluation, and their check, are logged with it.
        assert m["sync/seconds"] > 0 and "sync/verify_wait_seconds" in m, m
    # Training's own log lines keep their metrics (the eval lines are separate records).
    assert [m["step"] for m in metrics if "reward" in m] == [1, 2, 3]
    trained = [json.loads(line) for line in row_log.read_text().splitlines()]
    assert len(trained) == 3
    texts = {t for step in trained for t in step["rows"]}
    assert texts and not any("HELD-OUT" in t for t in texts)
    assert texts <= {r["responses_create_params"]["input"][-1]["content"] for r in digit_rows(0, 16)}
