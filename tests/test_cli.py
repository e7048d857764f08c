"""`gymtrl` from the command line: version, help, and one clear line per bad input (no traceback,
non-zero exit). The cases that need servers use the session's real ones."""

import json
import os
import subprocess
import sys

import pytest

from conftest import free_port

GYMTRL = [sys.executable, "-m", "gymtrl.cli"]


def run(args, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(GYMTRL + args, capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_clear_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("gymtrl: error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_version_and_help():
    out = run(["--version"])
    assert out.returncode == 0 and out.stdout.startswith("gymtrl ")
    assert "--config" in run(["train", "--help"]).stdout


def test_missing_config_file(tmp_path):
    assert_one_clear_error(run(["train", "--config", str(tmp_path / "nope.yaml")]), "config file not found")


def test_invalid_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  name_or_path: [x\n")
    assert_one_clear_error(run(["train", "--config", str(p)]), f"{p}:3:1: invalid YAML")


def test_unknown_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {name_or_path: m}\ndata: {train: x.jsonl}\nrolout: {}\n")
    assert_one_clear_error(run(["train", "--config", str(p)]), f"{p}:3: unknown key 'rolout'", "did you mean 'rollout'")


def test_malformed_jsonl_line(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"responses_create_params": {"input": "hi"}}\n{oops\n')
    p = tmp_path / "c.yaml"
    p.write_text(f"model: {{name_or_path: m}}\ndata: {{train: {data}}}\n")
    assert_one_clear_error(run(["train", "--config", str(p)]), f"{data}:2: malformed JSON")


def test_debug_shows_the_traceback(tmp_path):
    proc = run(["--debug", "train", "--config", str(tmp_path / "nope.yaml")])
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.servers
def test_unreachable_head_server(servers, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"responses_create_params": {"input": "hi"}, "agent_ref": {"name": "x"}}) + "\n")
    p = tmp_path / "c.yaml"
    p.write_text(f"model: {{name_or_path: m}}\ndata: {{train: {data}}}\noutput: {{dir: {tmp_path / 'run'}}}\n")
    port = free_port()
    proc = run(["train", "--config", str(p), *servers.connect_overrides(), f"gym.head_server_url=http://127.0.0.1:{port}"])
    assert_one_clear_error(proc, f"http://127.0.0.1:{port}")


@pytest.mark.servers
def test_row_with_unknown_agent(servers, tmp_path):
    data = tmp_path / "rows.jsonl"
    row = {"responses_create_params": {"input": "hi"}}
    lines = [{**row, "agent_ref": {"name": "digit_reply_simple_agent"}}, {**row, "agent_ref": {"name": "no_such_agent"}},
             {**row, "task_source": "nowhere"}]
    data.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    p = tmp_path / "c.yaml"
    p.write_text(f"model: {{name_or_path: m}}\ndata: {{train: {data}}}\noutput: {{dir: {tmp_path / 'run'}}}\n")
    proc = run(["train", "--config", str(p), *servers.connect_overrides()])
    assert_one_clear_error(proc, "2 row(s) route to no running agent", f"agent_ref.name=no_such_agent: 1 row(s), first at {data}:2",
                           f"task_source=nowhere: 1 row(s), first at {data}:3")


def test_launch_on_a_taken_port_is_refused(tmp_path):
    import socket

    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"responses_create_params": {"input": "hi"}, "agent_ref": {"name": "x"}}) + "\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = tmp_path / "c.yaml"
        p.write_text(f"model: {{name_or_path: m}}\ndata: {{train: {data}}}\noutput: {{dir: {tmp_path / 'run'}}}\n"
                     f"vllm: {{base_url: 'http://127.0.0.1:{port}', launch: {{enabled: true, venv: /nonexistent}}}}\n")
        proc = run(["train", "--config", str(p)])
    assert_one_clear_error(proc, f"cannot launch a server on 127.0.0.1:{port} (vllm.base_url): the port is taken")


def test_vllm_plugin_install_into_a_fresh_environment(tmp_path):
    """`gymtrl vllm-plugin install` puts the plugin, with its vLLM entry point, into another Python
    environment (offline), replaces nothing when it is current, and says so."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    first = run(["vllm-plugin", "install", "--python", python])
    assert first.returncode == 0 and " installed for " in first.stdout, first.stderr
    again = run(["vllm-plugin", "install", "--python", python])
    assert again.returncode == 0 and "is already installed" in again.stdout
    probe = subprocess.run([python, "-c", (
        "import importlib.metadata as m; "
        "print([e.value for e in m.entry_points(group='vllm.general_plugins')]); "
        "import gymtrl_vllm_plugin.plugin as p; print(p.ENV_SWITCH); "
        "import gymtrl_vllm_plugin.receivers as r; print(r.WeightReceiver.gymtrl_load_packed.__name__, "
        "r.WeightReceiver.gymtrl_receive_bucket.__name__)")],
        capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split("\n")[:3] == ["['gymtrl_vllm_plugin.plugin:register']", "GYMTRL_PREFIX_CORRECTION",
                                            "gymtrl_load_packed gymtrl_receive_bucket"]
    assert_one_clear_error(run(["vllm-plugin", "install", "--python", str(tmp_path / "nope")]), "does not exist")
