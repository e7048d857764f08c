"""A launched NeMo Gym environment's requirements.txt: what the Gym venv lacks is installed before any
server starts, or the run is refused naming the environment and the packages. Real launcher, real Gym
venv, real pip; the environment is a copy of gymtrl's digit_reply under another name whose
requirements.txt asks for a package made here (a wheel built in the test, installed offline from a
local folder and removed again)."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, free_port, require_env
from gymtrl.servers.gym_requirements import parse_line, read_requirements, unmet

ENVS = REPO / "src/gymtrl/envs/resources_servers"
PROBE = "gymtrl-requirements-probe"


def test_requirement_lines_are_read_as_pip_reads_them(tmp_path):
    (tmp_path / "more.txt").write_text("pytest>=1\n")
    (tmp_path / "requirements.txt").write_text(
        "-e nemo-gym[dev] @ ../../\n"
        "# a comment\n"
        "-e ../../\n"
        "--index-url https://example.invalid/simple\n"
        "packaging>=1  # inline comment\n"
        "packaging==0.1\n"
        f"{PROBE}==1.0 ; python_version >= '3'\n"
        "absent-only-on-windows ; sys_platform == 'win32'\n"
        "git+https://github.com/abukharin-nv/verifiable-instructions.git\n"
        "https://github.com/explosion/spacy-models/releases/download/en_core_web_sm-3.8.0/en_core_web_sm-3.8.0-py3-none-any.whl\n"
        "tale-suite-x @ git+https://example.invalid/tale.git@main\n"
        "-r more.txt\n")
    reqs = read_requirements(tmp_path / "requirements.txt")
    assert [r.name for r in reqs] == ["packaging", "packaging", PROBE, "absent-only-on-windows", "verifiable-instructions",
                                      "en-core-web-sm", "tale-suite-x", "pytest"]
    missing, other_versions = unmet(reqs)
    # Not installed: asked for by the line that names it, which is what pip is given.
    assert missing == [(f"{PROBE}==1.0 ; python_version >= '3'", f"{PROBE}==1.0"),
                       ("git+https://github.com/abukharin-nv/verifiable-instructions.git", "verifiable-instructions"),
                       (reqs[5].line, "en-core-web-sm"),
                       ("tale-suite-x @ git+https://example.invalid/tale.git@main", "tale-suite-x")]
    # Installed at another version: reported, never "fixed" under the other servers.
    assert other_versions == [f"packaging==0.1, installed {__import__('packaging').__version__}"]
    assert parse_line("nemo_gym") is None and parse_line("--find-links x") is None


def test_a_dependency_an_installed_package_lacks_is_found(tmp_path, monkeypatch):
    """`pip check` on the servers' requirements: the package is there but one of its own dependencies is not."""
    from importlib import metadata

    from gymtrl.servers import gym_requirements

    real = metadata.requires
    monkeypatch.setattr(gym_requirements.metadata, "requires",
                        lambda name: ["defusedxml-absent>=0.7"] if name == "pytest" else real(name))
    (tmp_path / "requirements.txt").write_text("pytest\n")
    missing, _ = unmet(read_requirements(tmp_path / "requirements.txt"))
    assert missing == [("defusedxml-absent>=0.7", "defusedxml-absent>=0.7 (needed by pytest)")]


def probe_environment(root: Path, requirement: str) -> Path:
    """gymtrl's digit_reply as `needs_probe`, whose requirements.txt asks for `requirement`; its NeMo Gym config."""
    env = root / "resources_servers/needs_probe"
    shutil.copytree(ENVS / "digit_reply", env)
    (env / "requirements.txt").write_text(f"-e nemo-gym[dev] @ ../../\n{requirement}\n")
    config = (env / "configs/digit_reply.yaml").read_text().replace("digit_reply", "needs_probe")
    path = env / "configs/needs_probe.yaml"
    path.write_text(config)
    return path


def build_wheel(folder: Path) -> Path:
    """A pure-Python wheel of PROBE 1.0 (module gymtrl_requirements_probe), written by hand: no network."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = "gymtrl_requirements_probe-1.0"
    files = {
        "gymtrl_requirements_probe/__init__.py": b"VALUE = 42\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: 1.0\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{dist}.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def gym_python() -> str:
    return str(Path(require_env("GYMTRL_GYM_VENV")) / "bin/python")


def uninstall_probe() -> None:
    subprocess.run([gym_python(), "-m", "pip", "uninstall", "-y", "-q", PROBE], capture_output=True)


def write_config(tmp_path: Path, env_config: Path, requirements: str, pip_args: list[str]) -> Path:
    (tmp_path / "train.jsonl").write_text(json.dumps({"agent_ref": {"name": "needs_probe_simple_agent"},
                                                      "responses_create_params": {"input": "1"}}) + "\n")
    path = tmp_path / "config.yaml"
    path.write_text(f"""
model: {{name_or_path: {tmp_path / 'no-model-needed'}}}
data: {{train: [{tmp_path / 'train.jsonl'}]}}
gym:
  head_server_url: http://127.0.0.1:{free_port()}
  launch:
    enabled: true
    venv: {require_env('GYMTRL_GYM_VENV')}
    config_paths: [responses_api_models/vllm_model/configs/vllm_model_for_training.yaml, {env_config}]
    extra_args: [--extra-root, {env_config.parents[3]}]
    requirements: {requirements}
    pip_args: {json.dumps(pip_args)}
vllm:
  base_url: http://127.0.0.1:{free_port()}
  launch: {{enabled: true, venv: {require_env('GYMTRL_VLLM_VENV')}}}
output: {{dir: {tmp_path / 'run'}}}
""")
    return path


def serve(config: Path) -> subprocess.CompletedProcess:
    """`gymtrl serve`: starts the servers of a config (and would serve them until stopped)."""
    return subprocess.run([sys.executable, "-m", "gymtrl.cli", "serve", "--config", str(config), "--host", "127.0.0.1"],
                          capture_output=True, text=True, timeout=300, cwd=config.parent)


@pytest.mark.parametrize("requirements", ["check", "install"])
def test_a_missing_requirement_is_refused_before_any_server_starts(tmp_path, requirements):
    """check: refused at once. install with nothing to install from (an empty wheel folder, no index):
    pip fails and the run is refused with pip's reason. Either way no server was started."""
    uninstall_probe()
    env_config = probe_environment(tmp_path / "envs", f"{PROBE}==1.0")
    empty = tmp_path / "wheels"
    empty.mkdir()
    config = write_config(tmp_path, env_config, requirements, ["--no-index", f"--find-links={empty}"])
    done = serve(config)
    assert done.returncode == 3, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("gymtrl: error:")]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"resources_servers/needs_probe needs {PROBE}==1.0" in lines[0], lines[0]
    if requirements == "check":
        assert "gym.launch.requirements=check installs nothing" in lines[0]
        assert "gym.launch.requirements=install" in done.stderr  # the fix
    else:
        assert "pip could not install them" in lines[0] and "No matching distribution" in lines[0], lines[0]
        assert "pip_args" in done.stderr
    logs = tmp_path / "run/logs"
    assert (logs / "gym_requirements.log").exists()
    assert not (logs / "vllm.log").exists() and not (logs / "gym.log").exists()  # nothing was started


def test_a_missing_requirement_is_installed_before_the_servers_start(tmp_path):
    """install, with the package in a local wheel folder: installed into the Gym venv by the check that
    runs before any server starts, and importable there afterwards."""
    from gymtrl.config.load import load_config
    from gymtrl.servers.gym import check_gym_requirements

    uninstall_probe()
    wheels = tmp_path / "wheels"
    build_wheel(wheels)
    env_config = probe_environment(tmp_path / "envs", f"{PROBE}==1.0")
    cfg = load_config(write_config(tmp_path, env_config, "install", ["--no-index", f"--find-links={wheels}"]))
    try:
        check_gym_requirements(cfg, tmp_path / "logs")
        imported = subprocess.run([gym_python(), "-c", "import gymtrl_requirements_probe as p; print(p.VALUE)"],
                                  capture_output=True, text=True)
        # Met now: a second check installs nothing.
        check_gym_requirements(cfg, tmp_path / "logs2")
    finally:
        uninstall_probe()
    assert imported.stdout.strip() == "42", imported.stderr
    log = (tmp_path / "logs/gym_requirements.log").read_text()
    assert f"resources_servers/needs_probe needs {PROBE}==1.0" in log and "Successfully installed" in log, log
    assert "needs_probe needs" not in (tmp_path / "logs2/gym_requirements.log").read_text()


def test_doctor_names_what_an_environment_lacks_and_installs_nothing(tmp_path):
    uninstall_probe()
    wheels = tmp_path / "wheels"
    build_wheel(wheels)  # there to install from: doctor still installs nothing
    env_config = probe_environment(tmp_path / "envs", f"{PROBE}==1.0")
    config = write_config(tmp_path, env_config, "install", ["--no-index", f"--find-links={wheels}"])
    done = subprocess.run([sys.executable, "-m", "gymtrl.cli", "doctor", "--config", str(config)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "missing from the Gym venv (`gymtrl train` installs them with pip first)" in done.stdout, done.stdout
    assert f"resources_servers/needs_probe: {PROBE}==1.0" in done.stdout, done.stdout
    installed = subprocess.run([gym_python(), "-m", "pip", "show", PROBE], capture_output=True, text=True)
    assert installed.returncode != 0, "doctor installed nothing"
    assert not (tmp_path / "run").exists()
