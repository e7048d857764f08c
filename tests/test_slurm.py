"""slurm/submit.sh under a real Slurm (Debian's packages, scripts/slurm_local.sh): a controller and a
node daemon on this machine, so the job's one node plays every role (servers and trainer, as
submit.sh does for a one-node job); the multi-node layout differs only in which node each srun
step names. The trainer runs on CPU through accelerate, the servers are the real vLLM CPU and NeMo
Gym ones started by `gymtrl serve`.

Needs root (apt-get, slurmd); outside CI, a machine without Slurm and without root skips it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port
from gymtrl.checkpoints import MARKER
from gymtrl.metrics import read_metrics

pytestmark = pytest.mark.servers
SUBMIT = REPO / "slurm" / "submit.sh"
SLURM_LOCAL = REPO / "scripts" / "slurm_local.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0 and not shutil.which("sbatch"):
        if os.environ.get("CI"):
            pytest.fail("the Slurm tests need root (to apt-get Slurm and run slurmd) or Slurm installed")
        pytest.skip("Slurm is not installed and this is not root")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(tmp_path_factory.mktemp("slurm-local"))}
    for action in ("install", "start"):
        done = subprocess.run(["bash", str(SLURM_LOCAL), action], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"slurm_local.sh {action} failed:\n{done.stdout}\n{done.stderr}"
    yield env
    subprocess.run(["bash", str(SLURM_LOCAL), "stop"], env=env, capture_output=True, timeout=300)


def submit(slurm, tiny_model, tmp_path, steps: int, *extra_overrides: str) -> tuple[str, Path, Path]:
    """sbatch slurm/submit.sh for a one-node CPU job on the quickstart; returns (job id, logs, run dir)."""
    logs, run = tmp_path / "logs", tmp_path / "run"
    logs.mkdir()
    overrides = [f"grpo.max_steps={steps}", "grpo.save_steps=1000", f"output.dir={run}",
                 f"vllm.base_url=http://127.0.0.1:{free_port()}", f"gym.head_server_url=http://127.0.0.1:{free_port()}",
                 *extra_overrides]
    env = {**slurm, "GYMTRL_TINY_MODEL": str(tiny_model), "GYMTRL_CONFIG": "configs/quickstart.yaml",
           "GYMTRL_OVERRIDES": " ".join(overrides), "ACCELERATE_CONFIG": "configs/accelerate/ddp.yaml",
           "LOG_ROOT": str(logs), "STOP_TIMEOUT_S": "60"}
    # The script's #SBATCH lines ask for 2 nodes with 8 GPUs each: this cluster has one CPU node.
    done = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", f"--output={logs}/slurm-%j.out",
                           str(SUBMIT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0], logs, run


def job_field(slurm, job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=slurm, capture_output=True, text=True).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else ""


def wait_for(predicate, what: str, timeout_s: float, slurm=None, job=None, logs=None):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            detail = ""
            if logs is not None:
                for f in sorted(logs.rglob("*.log")) + sorted(logs.glob("slurm-*.out")):
                    detail += f"\n----- {f.name} -----\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:])
            state = job_field(slurm, job, "JobState") if job else ""
            pytest.fail(f"timed out waiting for {what} (job state {state}){detail}")
        time.sleep(2)


def phases(logs: Path, job: str) -> list[str]:
    """Each phase line's name: its text up to a colon or a parenthesis."""
    return [re.split(r": | \(|;", line.split("phase: ", 1)[1])[0]
            for line in (logs / job / "job.log").read_text().splitlines() if "phase: " in line]


def test_a_preempted_job_checkpoints_requeues_resumes_and_completes(slurm, tiny_model, tmp_path):
    job, logs, run = submit(slurm, tiny_model, tmp_path, steps=6)
    metrics = run / "metrics.jsonl"

    def trained_steps() -> int:
        return len([m for m in read_metrics(metrics) if "reward" in m]) if metrics.exists() else 0

    wait_for(lambda: trained_steps() >= 2, "two training steps", 900, slurm, job, logs)
    # What Slurm sends at the time limit (#SBATCH --signal=B:TERM@600): SIGTERM to the batch shell.
    subprocess.run(["scancel", "--signal=TERM", "--batch", job], env=slurm, check=True)
    wait_for(lambda: job_field(slurm, job, "Restarts") == "1", "the job to requeue itself", 600, slurm, job, logs)
    # A requeued job starts again once its old credential expires (slurm_local.sh sets cred_expire=10).
    # Forcing an earlier start (scontrol update StartTime=now) races the old batch script's exit: Slurm
    # then kills the new start ("Job credential revoked") and the job never runs again.
    wait_for(lambda: job_field(slurm, job, "JobState") == "COMPLETED", "the requeued job to complete", 900,
             slurm, job, logs)
    assert job_field(slurm, job, "ExitCode") == "0:0"

    job_log = (logs / job / "job.log").read_text()
    first, second = job_log.split("phase: start:")[1:]
    assert "restart 0" in first and "restart 1" in second
    assert phases(logs, job) == [
        "start", "servers starting", "servers ready", "training", "servers stopping", "servers stopped",
        "checkpoint saved",
        "start", "servers starting", "servers ready", "training", "servers stopping", "servers stopped",
        "training finished"]
    assert re.search(rf"checkpoint saved: stopped by stop file \S+ at step \d+; checkpoint: \S+; requeueing job {job}",
                     job_log)
    train_log = (logs / job / "train-0.log").read_text()
    [stopped] = re.findall(r"stopped by stop file \S+ at step (\d+); checkpoint: (\S+)", train_log)
    step, checkpoint = int(stopped[0]), Path(stopped[1])
    assert step >= 2 and (checkpoint / MARKER).exists()
    assert f"resuming from {checkpoint} (step {step})" in train_log
    assert "attached to servers from" in train_log and "training finished; final model in" in train_log
    # The servers went down with a signal each time (not a kill), and took their ready file with them.
    serve_log = (logs / job / "serve.log").read_text()
    assert serve_log.count("servers ready in") == 2 and serve_log.count("gymtrl: servers stopped") == 2
    assert not (logs / job / "servers.json").exists()
    steps = [m for m in read_metrics(metrics) if "reward" in m]
    assert [int(m["step"]) for m in steps][-1] == 6 and all(m["failures/total"] == 0 for m in steps)
    assert (run / "final" / "model.safetensors").exists()


def test_the_job_fails_fast_when_the_servers_die(slurm, tiny_model, tmp_path):
    job, logs, run = submit(slurm, tiny_model, tmp_path, steps=200)
    wait_for(lambda: (logs / job / "servers.json").exists(), "the servers to be ready", 900, slurm, job, logs)
    record = json.loads((logs / job / "servers.json").read_text())
    os.kill(record["pid"], 9)  # gymtrl serve dies (its servers follow: they die with their launcher)
    wait_for(lambda: job_field(slurm, job, "JobState") in ("FAILED", "COMPLETED", "CANCELLED"), "the job to end",
             300, slurm, job, logs)
    assert job_field(slurm, job, "JobState") == "FAILED"
    assert "ERROR: the servers exited" in (logs / job / "job.log").read_text()
    # Nothing of the trainer is left behind.
    leftovers = subprocess.run(["pgrep", "-f", f"--stop-file {logs / job / 'STOP'}"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""
