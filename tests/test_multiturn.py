"""Multi-turn tool use through the real NeMo Gym agent loop, with a tiny model taught the Hermes
tool-call format (scripts/teach_tool_calls.py): the stitched sequence must be exactly the
tokenizer's rendering of the conversation, the mask exactly the model's own tokens, and the
logprobs the sampling ones."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from gymtrl.gym.discovery import discover
from gymtrl.metrics import read_metrics
from gymtrl.rollout.engine import RolloutEngine, SamplingParams
from gymtrl.rollout.failures import FailureBound, FailureLedger
from gymtrl.sync.strategies import ReloadSync
from gymtrl.sync.verify import trainer_logprobs
from gymtrl.sync.vllm_control import VLLMControl

pytestmark = pytest.mark.servers
AGENT = "example_multi_step_simple_agent"


@pytest.fixture(scope="module")
def rows_file(gym_site):
    return gym_site / "resources_servers/example_multi_step/data/example.jsonl"


@pytest.fixture(scope="module")
def taught_model(tiny_model, rows_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("taught") / "model"
    subprocess.run([sys.executable, str(REPO / "scripts/teach_tool_calls.py"), str(tiny_model), str(out),
                    "--rows", str(rows_file), "--steps", "120"], check=True, capture_output=True)
    return out


def rendered_with_mask(tokenizer, messages, tools):
    """Token ids of the conversation as the chat template renders it, and 1 for every token the
    assistant wrote: its turn from after the '<|im_start|>assistant\\n' header up to and including
    its <|im_end|>; the newline the template puts after <|im_end|> is glue (0), like all the rest."""
    header = len(tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids, mask = [], []
    for i in range(1, len(messages) + 1):
        text = tokenizer.apply_chat_template(messages[:i], tools=tools, tokenize=False)
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert full[: len(ids)] == ids
        delta = full[len(ids):]
        if messages[i - 1]["role"] == "assistant":
            end = len(delta) - delta[::-1].index(im_end)  # just past the turn's <|im_end|>
            mask += [0] * header + [1] * (end - header) + [0] * (len(delta) - end)
        else:
            mask += [0] * len(delta)
        ids += delta
    return ids, mask


def conversation_of(row, reply):
    """The chat messages of a finished episode, rebuilt from the row and the agent's output items."""
    messages = list(row["responses_create_params"]["input"])
    for item in reply["response"]["output"]:
        if item["type"] == "function_call":
            messages.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": item["name"], "arguments": json.loads(item["arguments"])}}]})
        elif item["type"] == "function_call_output":
            messages.append({"role": "tool", "content": item["output"]})
        elif item["type"] == "message":
            messages.append({"role": "assistant", "content": "".join(c["text"] for c in item["content"])})
    return messages


def test_multi_turn_trajectory_matches_the_rendering_token_by_token(servers, taught_model, rows_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(taught_model)
    model = AutoModelForCausalLM.from_pretrained(taught_model, dtype=torch.float32)
    control = VLLMControl(servers.vllm_url, 60)
    ReloadSync(control, tmp_path / "sync").push(model)
    rows = [{**json.loads(l), "agent_ref": {"name": AGENT}} for l in rows_file.read_text().splitlines()]
    engine = RolloutEngine(discover(servers.head_url), SamplingParams(1.0, 1.0, 64),
                           FailureLedger(FailureBound(1.0, 100, 1)), 8, 180.0, 0, 0.1)
    try:
        rows = rows * 3  # free sampling (constraints lifted) breaks the taught JSON now and then
        outcomes = engine.run(rows)
    finally:
        engine.close()
        control.close()
    assert all(o.failure is None for o in outcomes), [(o.failure, o.detail) for o in outcomes]
    multi = [(row, o) for row, o in zip(rows, outcomes) if o.trajectory and o.trajectory.num_turns >= 2]
    assert len(multi) >= 2, [o.trajectory.num_turns for o in outcomes]
    for row, o in multi:
        t = o.trajectory
        calls = [i for i in o.reply["response"]["output"] if i["type"] == "function_call"]
        assert calls and any(i["type"] == "function_call_output" for i in o.reply["response"]["output"])
        tools = [{"type": "function", "function": {k: v for k, v in tool.items() if k in ("name", "description", "parameters")}}
                 for tool in row["responses_create_params"]["tools"]]
        ids, mask = rendered_with_mask(tokenizer, conversation_of(row, o.reply), tools)
        sequence = t.prompt_ids + t.completion_ids
        # The episode ends on the model's <|im_end|>; the rendering adds the template's newline after it.
        assert sequence == ids[: len(sequence)] and ids[len(sequence):] == tokenizer("\n", add_special_tokens=False)["input_ids"]
        assert t.env_mask == mask[len(t.prompt_ids): len(sequence)]
        assert 0 in t.env_mask  # the tool response is in the sequence, masked
        # Model tokens carry the sampling logprobs (the trainer's model agrees); env tokens carry 0.
        ours = trainer_logprobs(model, sequence)[len(t.prompt_ids) - 1:]
        for k, (lp, ref, m) in enumerate(zip(t.logprobs, ours, t.env_mask)):
            assert ((abs(lp - ref) < 1e-3) if m else lp == 0.0), (k, lp, ref, m)


def test_multi_turn_training_run(servers, taught_model, rows_file, tmp_path):
    """`gymtrl train` on the multi-step tool environment: real tool calls, no dropped episodes, and
    wandb in offline mode (no account) beside metrics.jsonl."""
    config = tmp_path / "c.yaml"
    config.write_text(f"""
model: {{name_or_path: {taught_model}, dtype: float32}}
data: {{train: [{{path: {rows_file}, agent: {AGENT}}}]}}
grpo: {{max_steps: 2, per_device_train_batch_size: 4, num_generations: 4, max_completion_length: 64,
        save_strategy: "no", learning_rate: 1.0e-4}}
logging: {{wandb: true, wandb_mode: offline}}
output: {{dir: {tmp_path / 'run'}}}
""")
    overrides = [o for o in servers.connect_overrides() if not o.startswith("model.")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run([sys.executable, "-m", "gymtrl.cli", "train", "--config", str(config), *overrides],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "run/wandb").glob("offline-run-*/run-*.wandb"))
    steps = [m for m in read_metrics(tmp_path / "run/metrics.jsonl") if "reward" in m]
    assert len(steps) == 2
    # Free sampling (constraints lifted) sometimes breaks the taught model's JSON: then the episode
    # is a one-turn message. Tool calls must still happen, and nothing may be dropped.
    assert max(m["env/example_multi_step_simple_agent/turns"] for m in steps) > 1.0
    for m in steps:
        assert m["failures/total"] == 0
        assert m["sync/verify_max_logprob_diff"] < 1e-3
