"""Every shell script of the repository passes shellcheck at its default settings (all severities,
style and info included): the tracked *.sh and *.sbatch files, .ci/run, and the scripts under slurm/.

A deliberate exception is a `# shellcheck disable=SCxxxx` directive in the script, with a comment
saying why. Without shellcheck: as root it is installed from Debian (apt-get); otherwise the test
fails in CI and skips elsewhere."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO


SHEBANG = re.compile(rb"#!\s*\S*(/|env\s+)(ba|da|k)?sh\b")


def shell_scripts() -> list[str]:
    """Repository-relative paths: tracked *.sh/*.sbatch, .ci/run, and the shell scripts under slurm/."""
    tracked = subprocess.run(["git", "ls-files", "-z", "--", "*.sh", "*.sbatch"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split("\0")
    scripts = {p for p in tracked if p} | {".ci/run"}
    # slurm/ holds batch scripts whether or not git tracks them yet: any file named *.sh or *.sbatch
    # or starting with a sh/bash shebang.
    slurm = REPO / "slurm"
    for f in sorted(slurm.rglob("*")) if slurm.is_dir() else []:
        if f.is_file() and (f.suffix in (".sh", ".sbatch") or SHEBANG.match(f.read_bytes()[:128])):
            scripts.add(f.relative_to(REPO).as_posix())
    return sorted(p for p in scripts if (REPO / p).is_file())


def apt_install_shellcheck() -> str:
    """apt-get install shellcheck (retrying once after apt-get update); returns the log."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = ""
    for attempt in range(2):
        if attempt:
            done = subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=600)
            log += done.stdout + done.stderr
        done = subprocess.run(["apt-get", "install", "-y", "-q", "shellcheck"], env=env, capture_output=True, text=True,
                              timeout=600)
        log += done.stdout + done.stderr
        if done.returncode == 0 and shutil.which("shellcheck"):
            break
    return log


@pytest.fixture(scope="module")
def shellcheck() -> str:
    path = shutil.which("shellcheck")
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log = apt_install_shellcheck()
        path = shutil.which("shellcheck")
        assert path, f"apt-get install -y -q shellcheck did not install shellcheck:\n{log[-3000:]}"
        return path
    if os.environ.get("CI"):
        pytest.fail("shellcheck is not installed and this is not root (to apt-get it): install the Debian package "
                    "'shellcheck'")
    pytest.skip("shellcheck is not installed and this is not root")


def test_shell_scripts_pass_shellcheck(shellcheck):
    scripts = shell_scripts()
    assert scripts, "found no shell scripts to check"
    done = subprocess.run([shellcheck, *scripts], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (f"shellcheck found problems (exit {done.returncode}) in "
                                  f"{len(scripts)} scripts:\n{done.stdout}{done.stderr}")


def test_a_missing_python_is_named_with_what_to_install(tmp_path):
    """setup_venvs.sh looks for each interpreter on PATH and under pyenv; one it cannot find stops the
    build of the venv that needs it with what to install (here: a Python 3.13 that is not there)."""
    env = {**os.environ, "GYMTRL_VENV_ROOT": str(tmp_path), "GYMTRL_PYTHON313": str(tmp_path / "no-python3.13")}
    done = subprocess.run(["bash", str(REPO / "scripts/setup_venvs.sh"), "gym"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert "no Python 3.13 found" in done.stderr and "GYMTRL_PYTHON313" in done.stderr, done.stderr
    assert not list(tmp_path.glob("nemo-gym-*/.ready"))
