"""The benchmark scripts under bench/ run on lent GPUs or for minutes, so no test runs them in full.
These checks keep them from breaking silently: every script imports and answers `--help`, and every
`gymtrl` name a script imports (many import inside functions, which `--help` never reaches) exists
in src/. No servers; a few seconds."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SRC = REPO / "src"
SCRIPTS = sorted(BENCH.glob("*.py"))
# Scripts that run in NeMo Gym's venv (they need its aiohttp), not the trainer's.
GYM_VENV_SCRIPTS = {"fake_fast_generation_backend.py"}


def is_cli(path: Path) -> bool:
    """A script with a `if __name__ == "__main__":` block (the rest are helper modules)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return True
    return False


def interpreter(path: Path) -> str:
    if path.name in GYM_VENV_SCRIPTS:
        venv = os.environ.get("GYMTRL_GYM_VENV")
        if not venv or not Path(venv, "bin/python").exists():
            pytest.skip("NeMo Gym's venv is not set up (source scripts/env.sh)")
        return str(Path(venv, "bin/python"))
    return sys.executable


def run(args: list[str], python: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(BENCH), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([python, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_there_are_bench_scripts():
    assert len(SCRIPTS) >= 10 and any(is_cli(p) for p in SCRIPTS)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_bench_script_answers_help(path):
    """A script with a main block answers --help; a helper module imports."""
    python = interpreter(path)
    if is_cli(path):
        done = run([str(path.relative_to(REPO)), "--help"], python)
        assert done.returncode == 0, f"{path.name} --help exited {done.returncode}:\n{done.stderr[-3000:]}"
        assert done.stdout.strip(), f"{path.name} --help printed nothing"
    else:
        done = run(["-c", f"import {path.stem}"], python)
        assert done.returncode == 0, f"import {path.stem} failed:\n{done.stderr[-3000:]}"


def defined_names(module_file: Path) -> set[str]:
    """Names a module defines at its top level (functions, classes, assignments, imports)."""
    names = set()
    for node in ast.walk(ast.parse(module_file.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def module_file(name: str) -> Path | None:
    """src/ file of a gymtrl module, found without importing it (no torch, no vLLM)."""
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_bench_script_gymtrl_imports_exist(path):
    missing = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "gymtrl" and module_file(alias.name) is None:
                    missing.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gymtrl":
            f = module_file(node.module)
            if f is None:
                missing.append(f"line {node.lineno}: from {node.module} (no such module)")
                continue
            have = defined_names(f)
            for alias in node.names:
                if alias.name not in have and module_file(f"{node.module}.{alias.name}") is None:
                    missing.append(f"line {node.lineno}: from {node.module} import {alias.name}")
    assert not missing, f"{path.name} imports gymtrl names that do not exist:\n" + "\n".join(missing)


def test_gymtrl_is_importable_from_src():
    assert importlib.util.find_spec("gymtrl") is not None
