"""`gymtrl doctor --config C`: everything `gymtrl train` checks before it starts a server, and what a
user wants to know before a run, without starting anything.

The checks are train's own functions (read_split, build_reward_functions, choose_strategy,
check_strategy, build_grpo_config with its batch arithmetic), so doctor passes exactly when train
would get as far as launching servers. Then it reports: rows per split and per route, the versions
of torch / transformers / TRL / vLLM / NeMo Gym against the ones gymtrl pins and tests
(requirements/*.txt), the vLLM plugin, the GPU plan and a rough memory estimate.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from importlib import metadata
from pathlib import Path

from gymtrl.config import Config
from gymtrl.distributed import rank_and_world

REPO = Path(__file__).resolve().parents[2]  # a source checkout: requirements/ and scripts/ beside src/


def pinned_versions(repo: Path = REPO) -> dict[str, str]:
    """The versions gymtrl pins and tests: requirements/*.txt (and the torch pin of setup_venvs.sh)."""
    pins: dict[str, str] = {}
    for name in ("trainer.txt", "vllm-cpu.txt", "nemo-gym.txt"):
        path = repo / "requirements" / name
        if path.is_file():
            for line in path.read_text().splitlines():
                m = re.match(r"^\s*([A-Za-z0-9_.-]+)==([^\s#;]+)", line)
                if m:
                    pins[m.group(1).lower()] = m.group(2)
    setup = repo / "scripts" / "setup_venvs.sh"
    if setup.is_file():
        m = re.search(r"torch==([0-9][^\s}\"']*)", setup.read_text())
        if m:
            pins["torch"] = m.group(1)
    if "vllm-cpu" in pins:
        pins.setdefault("vllm", pins["vllm-cpu"])
    return pins


def _version_in(python: str | None, *dists: str) -> str | None:
    """The first of `dists` installed in the environment of `python` (this one when None)."""
    if python is None:
        for dist in dists:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return None
    if not Path(python).exists():
        return None
    code = ("import importlib.metadata as m, sys\nfor d in sys.argv[1:]:\n    try:\n        print(m.version(d)); break\n"
            "    except m.PackageNotFoundError: pass")
    try:
        out = subprocess.run([python, "-c", code, *dists], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out or None


def _venv_python(venv: str | None) -> str | None:
    return str(Path(venv).expanduser() / "bin" / "python") if venv else None


def versions(cfg: Config) -> list[tuple[str, str | None, str | None, str]]:
    """(package, installed, pinned, where) for the five that matter."""
    pins = pinned_versions()
    vllm_py = _venv_python(cfg.vllm.launch.venv) if cfg.vllm.launch.enabled else None
    gym_py = _venv_python(cfg.gym.launch.venv) if cfg.gym.launch.enabled else None
    rows = [(d, _version_in(None, d), pins.get(d), "trainer") for d in ("torch", "transformers", "trl")]
    if vllm_py:
        rows.append(("vllm", _version_in(vllm_py, "vllm-cpu", "vllm"), pins.get("vllm"), vllm_py))
    else:
        rows.append(("vllm", None, pins.get("vllm"), "not launched (the server at vllm.base_url)"))
    if gym_py:
        rows.append(("nemo-gym", _version_in(gym_py, "nemo-gym", "nemo_gym"), pins.get("nemo-gym"), gym_py))
    else:
        rows.append(("nemo-gym", None, pins.get("nemo-gym"), "not launched (the servers at gym.head_server_url)"))
    return rows


def _same(installed: str | None, pinned: str | None) -> bool:
    return installed is not None and pinned is not None and installed.split("+")[0] == pinned


def count_params(model: str, trust_remote_code: bool = False) -> int | None:
    """The policy's parameter count: from a local checkpoint's safetensors headers when there is
    one (exact), else estimated from its config.json (a decoder-only transformer)."""
    path = Path(model).expanduser()
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if files:
        total = 0
        for f in files:
            with f.open("rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            for name, info in header.items():
                if name != "__metadata__":
                    n = 1
                    for d in info["shape"]:
                        n *= d
                    total += n
        return total
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception:
        return None
    text = getattr(config, "text_config", None) or config
    h, layers = getattr(text, "hidden_size", None), getattr(text, "num_hidden_layers", None)
    vocab, inter = getattr(text, "vocab_size", None), getattr(text, "intermediate_size", None) or 4 * (h or 0)
    if not (h and layers and vocab):
        return None
    heads = getattr(text, "num_attention_heads", 1) or 1
    kv = getattr(text, "num_key_value_heads", heads) or heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    attn = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    embed = vocab * h * (1 if getattr(config, "tie_word_embeddings", True) else 2)
    return embed + layers * (attn + 3 * h * inter + 2 * h)


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def memory_estimate(params: int, dtype: str) -> dict[str, float]:
    """GiB per training process, before activations: weights and gradients in the training dtype,
    and Adam's two float32 moments (AdamW, TRL's default; ZeRO shards divide this across processes)."""
    b = DTYPE_BYTES.get(dtype, 4)
    gib = 1024 ** 3
    out = {"weights": params * b / gib, "gradients": params * b / gib, "adam_states": params * 8 / gib}
    out["total"] = sum(out.values())
    return out


def _size(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 0.1 else f"{gib * 1024:.1f} MiB"


def gpu_plan(cfg: Config, cuda: bool, device_count: int, strategy: str, shares_gpu: bool) -> list[str]:
    trainer_cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    lines = [f"CUDA devices seen: {device_count if cuda else 0}"
             + (f" (CUDA_VISIBLE_DEVICES={trainer_cvd})" if trainer_cvd is not None else "")]
    world = rank_and_world()[1]
    lines.append(f"trainer: {world} process(es), " + ("GPU " + (trainer_cvd or "0..") if cuda else "CPU"))
    if cfg.vllm.launch.enabled:
        vllm_cvd = cfg.vllm.launch.env.get("CUDA_VISIBLE_DEVICES", trainer_cvd)
        where = ("CPU" if not cuda else f"CUDA_VISIBLE_DEVICES={vllm_cvd}" if vllm_cvd is not None
                 else "the same GPUs as the trainer (CUDA_VISIBLE_DEVICES inherited)")
        lines.append(f"vLLM (launched, tensor_parallel_size={cfg.vllm.tensor_parallel_size}): {where}"
                     + (", shares the trainer's GPU" if shares_gpu else ""))
    else:
        lines.append(f"vLLM: not launched (the server at {cfg.vllm.base_url})")
    if cfg.judge.server == "launch":
        lines.append(f"judge vLLM (launched): CUDA_VISIBLE_DEVICES="
                     f"{cfg.judge.launch.env.get('CUDA_VISIBLE_DEVICES', trainer_cvd)}")
    chosen = f"{strategy} (sync.strategy=auto picks it here)" if cfg.sync.strategy == "auto" else strategy
    lines.append(f"weight sync: {chosen}")
    return lines


def gym_requirements_lines(cfg: Config) -> list[str]:
    """What the launched NeMo Gym servers' requirements.txt files name that the Gym venv lacks
    (checked by gym_launcher.py in the Gym venv, which installs nothing here and starts no server)."""
    from gymtrl.servers.gym import unmet_gym_requirements

    launch = cfg.gym.launch
    if not launch.enabled or launch.command:
        return ["environment requirements: NeMo Gym is not launched by gymtrl"]
    if launch.requirements == "ignore":
        return ["environment requirements: not checked (gym.launch.requirements=ignore)"]
    with tempfile.TemporaryDirectory() as tmp:
        report = unmet_gym_requirements(cfg, Path(tmp), install=False)
    if report is None:
        return [f"environment requirements: every launched server's requirements.txt is met by {launch.venv}"]
    action = ("`gymtrl train` installs them with pip first" if launch.requirements == "install"
              else "`gymtrl train` refuses to start (gym.launch.requirements=check)")
    return [f"environment requirements: missing from the Gym venv ({action}):"] + [
        f"  {s['server']}: {', '.join(s['missing'])}" for s in report["servers"]]


def doctor(cfg: Config) -> list[str]:
    """Check the config as `train` does before starting servers (raises the first problem as a
    GymtrlError) and return the report's lines. Starts nothing."""
    import torch

    from gymtrl.data.read import read_split
    from gymtrl.gym.discovery import route_name
    from gymtrl.rewards import build_reward_functions
    from gymtrl.servers.vllm import vllm_python
    from gymtrl.sync.factory import check_strategy, choose_strategy, vllm_shares_trainer_gpu
    from gymtrl.train import build_grpo_config
    from gymtrl.vllm_plugin.install import installed_version, plugin_version

    # --- train's own checks, in train's order -------------------------------------------------
    splits = {"train": read_split(cfg.data.train, cfg.data.max_train_rows)}
    if cfg.data.eval:
        splits["eval"] = read_split(cfg.data.eval, cfg.data.max_eval_rows)
    build_reward_functions(cfg.rewards.functions)
    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    shares_gpu = cuda and vllm_shares_trainer_gpu(cfg.vllm.launch.enabled, cfg.vllm.launch.env, dict(os.environ), count)
    strategy = choose_strategy(cfg.sync.strategy, cuda, shares_gpu, lora=cfg.model.lora.r > 0)
    check_strategy(strategy, cuda, shares_gpu, rank_and_world()[1])
    args = build_grpo_config(cfg, strategy, cuda)

    lines = ["config: ok (the checks `gymtrl train` makes before starting servers passed)"]
    lines.append(f"batch: {args.per_device_train_batch_size} rows a process a step, {args.num_generations} "
                 f"generations a prompt, max_steps={args.max_steps}")
    lines.append("data:")
    for split, rows in splits.items():
        lines.append(f"  {split}: {len(rows)} rows")
        for route, n in sorted(Counter(route_name(r.data) for r in rows).items()):
            lines.append(f"    {route}: {n}")

    lines.append("versions (installed / pinned and tested by gymtrl):")
    all_pinned = True
    for name, installed, pinned, where in versions(cfg):
        ok = _same(installed, pinned)
        all_pinned &= ok or installed is None
        mark = "ok" if ok else "unknown" if installed is None else "NOT the tested version"
        lines.append(f"  {name}: {installed or '?'} / {pinned or '?'}  [{mark}]  ({where})")
    lines.append("  this combination is " + ("the one gymtrl pins and tests" if all_pinned
                                             else "not the one gymtrl pins and tests (see requirements/*.txt)"))

    python = vllm_python(cfg) if cfg.vllm.launch.enabled else None
    if python:
        have, want = installed_version(python) if Path(python).exists() else None, plugin_version()
        state = ("installed, current" if have == want else
                 f"installed at {have}, not this gymtrl's {want}: `gymtrl train` reinstalls it" if have else
                 f"not installed: `gymtrl train` installs {want}")
        lines.append(f"vLLM plugin in {python}: {state}")
    else:
        lines.append("vLLM plugin: vLLM is not launched by gymtrl (the server must run `gymtrl vllm-plugin install`)")

    lines += gym_requirements_lines(cfg)
    lines.append("GPU plan:")
    lines += [f"  {line}" for line in gpu_plan(cfg, cuda, count, strategy, shares_gpu)]
    params = count_params(cfg.model.name_or_path, cfg.model.trust_remote_code)
    if params is None:
        lines.append(f"memory: unknown (no config.json for {cfg.model.name_or_path})")
    else:
        dtype = cfg.model.dtype if cfg.model.dtype != "auto" else "float32"
        mem = memory_estimate(params, dtype)
        lines.append(f"memory (per training process, before activations): {params / 1e6:.1f}M params x {dtype}: "
                     f"weights {_size(mem['weights'])} + gradients {_size(mem['gradients'])} + Adam states "
                     f"{_size(mem['adam_states'])} = {_size(mem['total'])}")
    return lines
