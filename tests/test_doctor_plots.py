"""`gymtrl doctor` (checks and reports, starts nothing) and `gymtrl plot` (PNG curves and the summary
table from a run's metrics.jsonl), from the command line."""

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

from conftest import REPO

GYMTRL = [sys.executable, "-m", "gymtrl.cli"]
FIXTURE = Path(__file__).parent / "data" / "plot_metrics.jsonl"


def run(args, timeout=300, **env):
    return subprocess.run(GYMTRL + args, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


def _quickstart_env(tiny_model) -> dict:
    """The quickstart's model (configs/quickstart.yaml reads GYMTRL_TINY_MODEL): the session's tiny model,
    built by scripts/make_tiny_model.py as the quickstart builds it (a fresh clone has no runs/tiny-model)."""
    assert (Path(tiny_model) / "config.json").exists()
    return {"GYMTRL_TINY_MODEL": str(tiny_model)}


def test_doctor_reports_the_quickstart_and_starts_nothing(tmp_path, tiny_model):
    env = _quickstart_env(tiny_model)
    proc = run(["doctor", "--config", "configs/quickstart.yaml", f"output.dir={tmp_path / 'run'}"], **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "config: ok" in out
    digit = sum(1 for l in (REPO / "src/gymtrl/envs/resources_servers/digit_reply/data/train.jsonl").open() if l.strip())
    assert f"agent_ref.name=digit_reply_simple_agent: {digit}" in out, out
    assert "agent_ref.name=digit_reply_simple_agent:" in out and "agent_ref.name=workplace_assistant_simple_agent:" in out
    for name in ("torch:", "transformers:", "trl:", "vllm:", "nemo-gym:"):
        assert name in out, out
    assert "this combination is the one gymtrl pins and tests" in out, out
    assert "vLLM plugin in" in out
    assert "environment requirements: every launched server's requirements.txt is met by" in out, out
    assert "weight sync: reload (sync.strategy=auto picks it here)" in out and "CUDA devices seen: 0" in out
    from gymtrl.doctor import count_params

    params = count_params(env["GYMTRL_TINY_MODEL"])  # exact: the checkpoint's safetensors headers
    adam_mib = params * 8 / 2 ** 20
    assert f"{params / 1e6:.1f}M params x float32" in out and f"Adam states {adam_mib:.1f} MiB" in out, out
    assert "gradient_checkpointing" not in proc.stderr, "transformers' FutureWarning is filtered in gymtrl's runs"
    assert not (tmp_path / "run").exists(), "doctor wrote nothing and started nothing"
    for port in (8000, 11000):  # nothing listens where the quickstart's servers would
        import socket

        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))


def test_doctor_stops_at_the_first_problem_with_one_line(tmp_path, tiny_model):
    env = _quickstart_env(tiny_model)
    proc = run(["doctor", "--config", "configs/quickstart.yaml", "grpo.num_generations=7"], **env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len([l for l in proc.stderr.splitlines() if l.startswith("gymtrl: error:")]) == 1, proc.stderr
    proc = run(["doctor", "--config", "configs/quickstart.yaml", f"data.train=[{tmp_path / 'missing.jsonl'}]"], **env)
    assert proc.returncode == 2 and "dataset file not found" in proc.stderr, proc.stderr[-3000:]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_plot_writes_valid_pngs_and_prints_the_summary(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(FIXTURE, run_dir / "metrics.jsonl")
    proc = run(["plot", str(run_dir)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in (run_dir / "plots").iterdir())
    assert names == ["eval_reward.png", "failure_rate.png", "reward.png", "step_time.png", "sync_seconds.png"], names
    for p in (run_dir / "plots").iterdir():
        w, h = _png_size(p)
        assert w > 100 and h > 100
    from matplotlib import image

    assert image.imread(run_dir / "plots" / "reward.png").shape[:2] == (400, 700)
    assert "6 steps" in proc.stdout and "digit_reply_simple_agent" in proc.stdout
    assert "failures: 3 of 192 rollouts (timeout=2, connection_error=1)" in proc.stdout, proc.stdout
    assert "mean step time:" in proc.stdout and "mean sync time:" in proc.stdout


def test_plot_of_a_directory_without_metrics_is_one_line(tmp_path):
    proc = run(["plot", str(tmp_path)])
    assert proc.returncode == 2 and "no metrics.jsonl in" in proc.stderr and "Traceback" not in proc.stderr


def test_a_failing_plot_never_fails_a_finished_run(tmp_path, caplog):
    from gymtrl.plots import finish_run

    (tmp_path / "metrics.jsonl").write_text("{not json\n")
    finish_run(tmp_path)  # warns, does not raise
    assert any("could not write the run's summary or plots" in r.getMessage() for r in caplog.records)
