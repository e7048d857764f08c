"""gymtrl prepare-data without servers: sources (files, a local Hugging Face cache, NeMo Gym dataset
declarations, reasoning-gym), validation and routing, mixing, determinism, and its errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gymtrl.config.load import load_prepare_config
from gymtrl.errors import ConfigError, DataError
from gymtrl.prepare.mix import largest_remainder, plan_train_counts
from gymtrl.prepare.pipeline import prepare

REPO = Path(__file__).resolve().parents[1]
GYM_CONFIGS = ["resources_servers/workplace_assistant/configs/workplace_assistant.yaml",
               "resources_servers/mcqa/configs/mcqa.yaml",
               "resources_servers/reasoning_gym/configs/reasoning_gym.yaml",
               "resources_servers/math_with_judge/configs/math_with_judge.yaml"]


def row(text, **fields):
    return {"responses_create_params": {"input": [{"role": "user", "content": text}]}, **fields}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def config(tmp_path, sources, **prepare_keys):
    gym_venv = os.environ["GYMTRL_GYM_VENV"]
    body = {"gym": {"launch": {"venv": gym_venv, "config_paths": GYM_CONFIGS}},
            "prepare": {"output_dir": str(tmp_path / "out"), "progress_bar": False, "sources": sources, **prepare_keys}}
    path = tmp_path / "prep.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def run(tmp_path, sources, overrides=(), **prepare_keys):
    report = prepare(load_prepare_config(config(tmp_path, sources, **prepare_keys), list(overrides)))
    out = tmp_path / "out"
    read = lambda name: [json.loads(l) for l in (out / name).read_text().splitlines()]  # noqa: E731
    return report, read("train.jsonl"), read("validation.jsonl")


def digits(n, agent="digit_reply_simple_agent", prefix="q"):
    return [row(f"{prefix}{i}", agent_ref={"type": "responses_api_agents", "name": agent}) for i in range(n)]


# --- mixing ----------------------------------------------------------------------------------
def test_largest_remainder_is_exact_and_within_one_row():
    for total, weights in [(10, [1, 1, 1]), (101, [0.7, 0.2, 0.1]), (7, [5, 1]), (1000, [1, 2, 3, 4])]:
        got = largest_remainder(total, weights)
        assert sum(got) == total
        assert all(abs(g - total * w / sum(weights)) < 1 for g, w in zip(got, weights))


def test_plan_counts_ratios_caps_and_exact_counts():
    labels = ["a", "b", "c"]
    # Ratios without a cap: the largest mix in which no ratio source is up-sampled (b limits it).
    assert plan_train_counts([100, 10, 50], [3, 1, None], [None, None, None], None, labels) == [30, 10, 50]
    # With a cap, ratio sources fill what the others leave, up-sampling if they must.
    assert plan_train_counts([100, 10, 50], [3, 1, None], [None, None, 20], 100, labels) == [60, 20, 20]
    # No ratios: the cap takes rows in proportion to each source's size.
    assert plan_train_counts([300, 100, 0], [None, None, None], [None, None, None], 40, labels) == [30, 10, 0]
    with pytest.raises(DataError, match="no rows left"):
        plan_train_counts([0, 5], [None, None], [3, None], None, ["a", "b"])


def test_ratios_counts_and_upsampling_are_honoured(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", digits(50, prefix="a"))
    b = write_jsonl(tmp_path / "b.jsonl", digits(7, prefix="b"))
    c = write_jsonl(tmp_path / "c.jsonl", digits(30, prefix="c"))
    report, train, validation = run(tmp_path, [
        {"path": str(a), "ratio": 3, "validation_count": 5},
        {"path": str(b), "ratio": 1},
        {"path": str(c), "count": 12},
    ], max_rows=52)
    by_source = {s.label.split("/")[-1]: s for s in report.sources}
    assert [by_source[n].train for n in ("a.jsonl", "b.jsonl", "c.jsonl")] == [30, 10, 12]
    assert by_source["b.jsonl"].upsampled and not by_source["a.jsonl"].upsampled
    texts = [r["responses_create_params"]["input"][0]["content"] for r in train]
    assert sum(t.startswith("a") for t in texts) == 30 and sum(t.startswith("b") for t in texts) == 10
    assert len(set(t for t in texts if t.startswith("b"))) == 7  # every b row, then some again
    held_out = {r["responses_create_params"]["input"][0]["content"] for r in validation}
    assert len(validation) == 5 and not held_out & set(texts)  # validation rows never train


def test_same_config_and_seed_give_the_same_bytes(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", digits(200))
    sources = [{"path": str(src), "ratio": 1, "validation_fraction": 0.1},
               {"reasoning_gym": {"tasks": ["mini_sudoku", "basic_arithmetic"], "size": 40, "seed": 5},
                "agent": "reasoning_gym_simple_agent", "ratio": 1}]
    run(tmp_path, sources, seed=7)
    first = [(tmp_path / "out" / n).read_bytes() for n in ("train.jsonl", "validation.jsonl")]
    run(tmp_path, sources, seed=7)
    assert [(tmp_path / "out" / n).read_bytes() for n in ("train.jsonl", "validation.jsonl")] == first
    run(tmp_path, sources, seed=8)
    assert (tmp_path / "out/train.jsonl").read_bytes() != first[0]


def test_duplicates_across_sources_are_dropped_once(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", digits(10))
    # The same rows again, with other ids: still the same tasks.
    b = write_jsonl(tmp_path / "b.jsonl", [dict(r, id=100 + i) for i, r in enumerate(digits(10))] + digits(3, prefix="new"))
    report, train, _ = run(tmp_path, [{"path": str(a)}, {"path": str(b)}])
    assert [s.duplicates for s in report.sources] == [0, 10]
    assert len(train) == 13
    report, train, _ = run(tmp_path, [{"path": str(a)}, {"path": str(b)}], dedupe=False)
    assert len(train) == 23


# --- validation and routing ------------------------------------------------------------------
def test_bad_rows_are_skipped_counted_and_located(tmp_path):
    wa = {"type": "responses_api_agents", "name": "workplace_assistant_simple_agent"}
    good = row("ok", ground_truth=[], id=1, category="c", environment_name="e", agent_ref=wa)
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        good,                                                             # line 1
        "{not json",                                                      # line 2
        {"responses_create_params": {"input": "hi", "top_k": 5}, "agent_ref": wa},  # line 3: strict keys
        row("no truth", id=2, category="c", environment_name="e", agent_ref=wa),    # line 4: verifier field
        row("elsewhere", agent_ref={"name": "mcqa_simple_agent"}, expected_answer="A"),  # line 5: conflict
        row("via mcqa", task_source="mcqa", expected_answer="A"),         # line 6: conflict too
    ])
    report, train, _ = run(tmp_path, [{"path": str(path), "agent": "workplace_assistant_simple_agent"}])
    [s] = report.sources
    assert (s.read, s.good, s.train) == (6, 1, 1)
    assert s.skipped_by_reason == {"malformed_json": 1, "schema": 1, "missing_field": 1, "agent_conflict": 2}
    examples = [e for es in s.examples.values() for e in es]
    for line, words in [(2, "malformed_json"), (3, "top_k"), (4, "ground_truth"), (5, "mcqa_simple_agent"),
                        (6, "task_source 'mcqa'")]:
        assert any(e.startswith(f"{path}:{line}: ") and words in e for e in examples), (line, examples)
    saved = json.loads((tmp_path / "out/report.json").read_text())
    assert saved["sources"][0]["skipped"] == 5 and saved["totals"]["train"] == 1


def test_rows_route_by_agent_ref_source_agent_or_task_source(tmp_path):
    path = write_jsonl(tmp_path / "routes.jsonl", [
        row("by task_source of a resources server", task_source="mcqa", expected_answer="B"),
        row("by task_source of an agent", task_source="math_with_judge_simple_agent", question="q", expected_answer="1"),
        row("unroutable", task_source="nowhere"),
    ])
    report, train, _ = run(tmp_path, [{"path": str(path)}])
    routed = sorted((r["agent_ref"]["name"], r["task_source"]) for r in train)
    assert routed == [("math_with_judge_simple_agent", "math_with_judge_simple_agent"), ("mcqa_simple_agent", "mcqa")]
    assert report.sources[0].skipped_by_reason == {"unroutable": 1}


def test_strict_stops_at_the_first_bad_row_with_its_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", digits(2) + ["[1, 2]"])
    cfg = config(tmp_path, [{"path": str(path)}])
    proc = subprocess.run([sys.executable, "-m", "gymtrl.cli", "prepare-data", "--config", str(cfg), "--strict"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"gymtrl: error: {path}:3: not_an_object" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out/train.jsonl").exists()  # nothing half-written


@pytest.mark.parametrize("case", ["missing file", "corrupt parquet", "unknown task", "no sources", "two kinds"])
def test_a_missing_or_corrupt_source_is_one_clear_error(tmp_path, case):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    sources = {
        "missing file": [{"path": str(tmp_path / "nope.jsonl")}],
        "corrupt parquet": [{"path": str(bad), "agent": "a"}],
        "unknown task": [{"reasoning_gym": {"tasks": ["no_such_task"], "size": 3}, "agent": "a"}],
        "no sources": [],
        "two kinds": [{"path": "x.jsonl", "reasoning_gym": {"tasks": ["mini_sudoku"]}}],
    }[case]
    expected = {"missing file": "file not found", "corrupt parquet": "not a readable Parquet file",
                "unknown task": "reasoning-gym cannot build", "no sources": "lists no sources",
                "two kinds": "exactly one of"}[case]
    cfg = config(tmp_path, sources)
    proc = subprocess.run([sys.executable, "-m", "gymtrl.cli", "prepare-data", "--config", str(cfg)],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("gymtrl: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


# --- the kinds of source -----------------------------------------------------------------------
def fake_hub_cache(root: Path, repo: str, files: dict[str, object]) -> None:
    """A Hugging Face hub cache holding one dataset repo, laid out as huggingface_hub writes it."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    base = root / ("datasets--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs/main").write_text(sha)
    for name, content in files.items():
        target = base / "snapshots" / sha / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, pa.Table):
            pq.write_table(content, target)
        else:
            write_jsonl(target, content)


def test_hugging_face_sources_load_through_the_hub_cache_offline(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    rows = [row(f"w{i}", ground_truth=[], id=i, category="c", environment_name="e") for i in range(4)]
    fake_hub_cache(cache, "nvidia/Nemotron-RL-agent-workplace_assistant", {"train.jsonl": rows})
    table = pa.Table.from_pylist([{"responses_create_params": {"input": f"m{i}"}, "expected_answer": "A"} for i in range(3)])
    fake_hub_cache(cache, "nvidia/Nemotron-RL-knowledge-mcqa", {"data/train-00000-of-00001.parquet": table,
                                                                "data/validation-00000-of-00001.parquet": table})
    import huggingface_hub.constants as hub

    # huggingface_hub reads these once, at import (which an earlier test may have done).
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    report, train, _ = run(tmp_path, [
        {"hf": {"repo": "nvidia/Nemotron-RL-agent-workplace_assistant", "file": "train.jsonl"},
         "agent": "workplace_assistant_simple_agent"},
        {"hf": {"repo": "nvidia/Nemotron-RL-knowledge-mcqa", "split": "train"}, "agent": "mcqa_simple_agent"},
        # NeMo Gym declares workplace_assistant's train set with a hub identifier and no file in the
        # wheel: fetched as NeMo Gym would fetch it (here: found in the cache).
        {"gym_dataset": {"config": GYM_CONFIGS[0], "dataset": "train"}},
    ], dedupe=False)
    assert [s.train for s in report.sources] == [4, 3, 4]
    assert report.sources[2].label == "workplace_assistant:train"
    assert sorted({r["agent_ref"]["name"] for r in train}) == ["mcqa_simple_agent", "workplace_assistant_simple_agent"]
    with pytest.raises(DataError, match="not in the local Hugging Face cache"):
        run(tmp_path, [{"hf": {"repo": "nvidia/absent", "file": "train.jsonl"}, "agent": "x"}])


def test_a_nemo_gym_dataset_declaration_is_a_source(tmp_path):
    report, train, _ = run(tmp_path, [
        {"gym_dataset": {"config": "resources_servers/workplace_assistant/configs/workplace_assistant.yaml",
                         "dataset": "example"}}])
    assert len(train) == 5 and report.sources[0].skipped == 0
    # Routed as NeMo Gym routes it (the declaring agent), and stamped as its collate would.
    assert {(r["agent_ref"]["name"], r["task_source"]) for r in train} == \
        {("workplace_assistant_simple_agent", "workplace_assistant_simple_agent")}
    with pytest.raises(DataError, match="declares no dataset 'nope'.*") as e:
        run(tmp_path, [{"gym_dataset": {"config": GYM_CONFIGS[0], "dataset": "nope"}}])
    assert "example (example)" in str(e.value)


def test_reasoning_gym_rows_are_generated_in_the_verifiers_format(tmp_path):
    report, train, validation = run(tmp_path, [
        {"reasoning_gym": {"tasks": ["mini_sudoku", "basic_arithmetic"], "size": 30, "seed": 1},
         "agent": "reasoning_gym_simple_agent", "validation_fraction": 0.2}])
    assert (len(train), len(validation)) == (24, 6)
    tasks = {r["metadata"]["source_dataset"] for r in train + validation}
    assert tasks == {"mini_sudoku", "basic_arithmetic"}
    for r in train:
        assert r["responses_create_params"]["input"] == [{"role": "user", "content": r["question"]}]
        assert isinstance(r["answer"], str) and r["agent_ref"]["name"] == "reasoning_gym_simple_agent"


def test_reasoning_gym_system_prompt_and_non_json_metadata(tmp_path):
    # gsm_symbolic's metadata holds a Fraction: written as its text, not dropped as a generator error.
    report, train, _ = run(tmp_path, [
        {"reasoning_gym": {"tasks": ["gsm_symbolic"], "size": 6, "seed": 1, "system_prompt": "direct"},
         "agent": "reasoning_gym_simple_agent"},
        {"reasoning_gym": {"tasks": ["basic_arithmetic"], "size": 4, "seed": 1, "system_prompt": "Reply in <answer> tags."},
         "agent": "reasoning_gym_simple_agent"}])
    assert len(train) == 10
    from reasoning_gym.utils import SYSTEM_PROMPTS
    systems = {r["responses_create_params"]["input"][0]["content"] for r in train}
    assert systems == {SYSTEM_PROMPTS["direct"], "Reply in <answer> tags."}
    for r in train:
        system, user = r["responses_create_params"]["input"]
        assert system["role"] == "system" and user == {"role": "user", "content": r["question"]}


def test_prompt_tokens_are_reported_with_a_tokenizer(tmp_path, tiny_model):
    src = write_jsonl(tmp_path / "a.jsonl", digits(6))
    report, _, _ = run(tmp_path, [{"path": str(src)}], tokenizer=str(tiny_model))
    tokens = report.environments["digit_reply_simple_agent"]["prompt_tokens"]
    assert 0 < tokens["mean"] <= tokens["max"]
    assert "prompt tokens" in report.table()


def test_prepare_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="ratio and count"):
        load_prepare_config(config(tmp_path, [{"path": "a.jsonl", "ratio": 1, "count": 3}]))
    with pytest.raises(ConfigError, match="unknown key 'prepare.sources'|unknown key 'prepare.sourcez'"):
        path = tmp_path / "typo.yaml"
        path.write_text("prepare: {sourcez: []}\n")
        load_prepare_config(path)
