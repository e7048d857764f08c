"""Shared, session-scoped real servers: one vLLM CPU server and one set of NeMo Gym servers, started
once through gymtrl's own launcher code and shared by every integration test.

The venvs come from scripts/setup_venvs.sh through scripts/env.sh (scripts/test.sh sources it).
Without them the integration tests fail loudly rather than skip: a green run must mean they ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gymtrl.net import free_port  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parents[1]


def require_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run the tests through scripts/test.sh (it builds and exports the venvs)")
    return value


@pytest.fixture(scope="session")
def gym_site() -> Path:
    return Path(require_env("GYMTRL_GYM_SITE"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, gym_site) -> Path:
    out = tmp_path_factory.mktemp("model") / "tiny"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), str(out),
         "--corpus", str(gym_site / "resources_servers/workplace_assistant/data/example.jsonl"),
         "--corpus", str(gym_site / "resources_servers/example_multi_step/data/example.jsonl")],
        check=True, capture_output=True,
    )
    return out


@pytest.fixture(scope="session")
def taught_model(tiny_model, gym_site, tmp_path_factory) -> Path:
    """The tiny model after a short SFT on the Hermes tool-call format, on the rows of both tool
    environments (example_multi_step, workplace_assistant): it calls tools, so episodes have turns."""
    out = tmp_path_factory.mktemp("taught") / "model"
    subprocess.run([sys.executable, str(REPO / "tests/teach_tool_calls.py"), str(tiny_model), str(out),
                    "--rows", str(gym_site / "resources_servers/example_multi_step/data/example.jsonl"),
                    "--rows", str(gym_site / "resources_servers/workplace_assistant/data/example.jsonl"),
                    "--steps", "300"], check=True, capture_output=True)
    return out


GYM_CONFIGS = [
    "responses_api_models/vllm_model/configs/vllm_model_for_training.yaml",
    "resources_servers/workplace_assistant/configs/workplace_assistant.yaml",
    "resources_servers/example_multi_step/configs/example_multi_step.yaml",
    "resources_servers/digit_reply/configs/digit_reply.yaml",
    "resources_servers/price_lookup/configs/price_lookup.yaml",
    "resources_servers/reasoning_gym/configs/reasoning_gym.yaml",
    "resources_servers/mcqa/configs/mcqa.yaml",
    "resources_servers/math_with_judge/configs/math_with_judge.yaml",
]


def server_config(model: Path, vllm_port: int, head_port: int, out_dir: Path, launch: bool = True,
                  prefix_correction: bool = True, vllm_args: tuple[str, ...] = (),
                  gym_configs: list[str] = GYM_CONFIGS, policy_base_url: str | None = None):
    """A gymtrl Config for test servers (default: vLLM + gymtrl's digit_reply and price_lookup + NeMo Gym's
    workplace_assistant, example_multi_step, reasoning_gym, mcqa, math_with_judge).
    `policy_base_url` points NeMo Gym's model server elsewhere (a proxy)."""
    from gymtrl.config.load import load_config

    overrides = f"{{policy_base_url: {policy_base_url}}}" if policy_base_url else "{}"
    text = f"""
model: {{name_or_path: {model}, dtype: float32}}
data: {{train: [unused.jsonl]}}
gym:
  head_server_url: http://127.0.0.1:{head_port}
  launch:
    enabled: {str(launch).lower()}
    venv: {require_env('GYMTRL_GYM_VENV')}
    config_paths: {json.dumps(gym_configs)}
    overrides: {overrides}
vllm:
  base_url: http://127.0.0.1:{vllm_port}
  served_model_name: tiny
  dtype: float32
  max_model_len: 8192
  prefix_correction: {str(prefix_correction).lower()}
  launch:
    enabled: {str(launch).lower()}
    venv: {require_env('GYMTRL_VLLM_VENV')}
    extra_args: {json.dumps(["--enforce-eager", "--kv-cache-memory-bytes", "268435456", *vllm_args])}
output: {{dir: {out_dir}}}
"""
    path = out_dir / "servers.yaml"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return load_config(path)


@contextlib.contextmanager
def gym_beside(servers, model: Path, out_dir: Path, **launch):
    """A NeMo Gym of its own (digit_reply and workplace_assistant) generating with the session's vLLM,
    with the given gym.launch settings (copies=2, prompt_ids="tokenize", ...)."""
    from gymtrl.servers.stack import ServerStack

    cfg = server_config(model, int(servers.vllm_url.rsplit(":", 1)[1]), free_port(), out_dir,
                        gym_configs=["responses_api_models/vllm_model/configs/vllm_model_for_training.yaml",
                                     "resources_servers/workplace_assistant/configs/workplace_assistant.yaml",
                                     "resources_servers/digit_reply/configs/digit_reply.yaml"])
    cfg.vllm.launch.enabled = False
    for key, value in launch.items():
        setattr(cfg.gym.launch, key, value)
    with ServerStack(cfg, out_dir / "logs"):
        yield cfg


class Servers:
    def __init__(self, cfg, stack, model: Path):
        self.cfg = cfg
        self.stack = stack
        self.model = model
        self.vllm_url = cfg.vllm.base_url
        self.head_url = cfg.gym.head_server_url

    def connect_overrides(self) -> list[str]:
        """Overrides that point a `gymtrl train` run at these servers (connect mode)."""
        return [f"vllm.base_url={self.vllm_url}", "vllm.served_model_name=tiny",
                f"gym.head_server_url={self.head_url}", f"model.name_or_path={self.model}"]


@pytest.fixture(scope="session")
def servers(tiny_model, tmp_path_factory):
    from gymtrl.servers.stack import ServerStack

    out = tmp_path_factory.mktemp("servers")
    cfg = server_config(tiny_model, free_port(), free_port(), out)
    # vLLM started as for the one-GPU sync (its worker extension loaded: test_ipc_sync.py); the
    # trainers here use the reload sync, which any vLLM takes.
    with ServerStack(cfg, out / "logs", strategy="ipc") as stack:
        yield Servers(cfg, stack, tiny_model)
