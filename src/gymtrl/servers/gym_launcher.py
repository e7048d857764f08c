"""Start NeMo Gym servers without Ray or uv. Runs *inside the NeMo Gym venv* (Python 3.13), never
in the trainer: gymtrl starts it as `<gym venv>/bin/python gym_launcher.py ...` and talks to the
result over HTTP only. It imports nothing from gymtrl.

What `gym env start` does, minus the Ray cluster and the per-server uv venvs (neither is needed by
the agents, model adapter and resources servers gymtrl uses, and neither works offline):
  1. resolve the global config with NeMo Gym's own parser (config files, then --set values);
     every server gets its host and port there;
  2. drop environment-server relays (legacy_agent starts Ray; gymtrl calls agents' /run directly);
     with --copies K, add K-1 copies of every server (each NeMo Gym server is one Python process);
  3. serve the head server (HeadServer: /global_config_dict_yaml, /server_instances, /readyz)
     from this process;
  4. start each server as `python app.py` in its directory with NEMO_GYM_CONFIG_DICT and
     NEMO_GYM_CONFIG_PATH, one log file each;
  5. poll every server's `/`, then mark the head ready (GET /readyz -> 200);
  6. stay up until SIGTERM/SIGINT; if any server dies, stop the rest and exit 1 so the trainer
     sees it at once.
Custom servers (gymtrl's own environments) are found through --extra-root, which NeMo Gym
searches before its install root (NEMO_GYM_EXTRA_ROOTS).
"""

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

SERVER_TYPES = ("responses_api_models", "resources_servers", "responses_api_agents")


def log(msg: str) -> None:
    print(f"[gym_launcher {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception:
        return None


def die_with_parent() -> None:
    """Run in each child before exec: the kernel sends it SIGTERM when the launcher dies, even by
    SIGKILL, so no server outlives the launcher that gymtrl supervises."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def resolve_config(args):
    from omegaconf import OmegaConf

    from nemo_gym.global_config import GlobalConfigDictParserConfig, get_global_config_dict

    initial = {"config_paths": list(args.config), "head_server": {"host": args.head_host, "port": args.head_port}}
    for item in args.set:
        key, _, value = item.partition("=")
        node = initial
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = parse_value(value)
    config = get_global_config_dict(
        GlobalConfigDictParserConfig(
            initial_global_config_dict=OmegaConf.create(initial),
            skip_load_from_cli=True,
            skip_load_from_dotenv=not args.use_env_yaml,
        )
    )
    return config


def wire_judge(config, instance: str, judge_server: str) -> None:
    """Point a resources server's LLM judge (judge_model_server, as math_with_judge has) at a model
    server instance, and switch it on."""
    blocks = (config.get(instance) or {}).get("resources_servers") if instance in config else None
    if not blocks or len(blocks) != 1:
        raise SystemExit(f"gym_launcher: --judge-for {instance}: no such resources server in the config")
    block = next(iter(blocks.values()))
    if "judge_model_server" not in block:
        raise SystemExit(f"gym_launcher: --judge-for {instance}: this resources server has no judge_model_server")
    block["judge_model_server"] = {"type": "responses_api_models", "name": judge_server}
    block["should_use_judge"] = True


def ensure_requirements(server_dirs: dict, install: bool, pip_args: list[str]) -> None:
    """Every launched server's requirements.txt met by this venv, installing what is missing when
    `install`; otherwise print what is missing (one JSON line) and exit 3 before starting anything.
    A package installed at another version than a server pins is left as it is, and logged."""
    import json

    from gym_requirements import UNMET_PREFIX, server_needs

    needs = server_needs(server_dirs)
    for need in needs:
        if need.other_versions:
            log(f"{need.server} pins other versions than this venv has (left as they are): "
                f"{'; '.join(need.other_versions)}")
    needs = [n for n in needs if n.missing]
    if needs and install:
        for need in needs:
            log(f"{need.server} needs {', '.join(need.missing)} (from {need.requirements_file}): installing")
            cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *pip_args, *need.install]
            done = subprocess.run(cmd, cwd=need.requirements_file.parent, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
            print(done.stdout, flush=True)
            if done.returncode != 0:
                errors = [ln.strip() for ln in done.stdout.splitlines() if ln.strip().startswith("ERROR")]
                need.pip_error = errors[-1] if errors else f"pip exited with code {done.returncode}"
        failed = {n.server: n.pip_error for n in needs}
        needs = [n for n in server_needs(server_dirs) if n.missing]
        for need in needs:
            need.pip_error = failed.get(need.server)
    if needs:
        report = [{"server": n.server, "requirements_file": str(n.requirements_file), "missing": n.missing,
                   "install": n.install, "pip_error": n.pip_error} for n in needs]
        print(UNMET_PREFIX + json.dumps({"venv": sys.prefix, "installed": install, "servers": report}), flush=True)
        sys.exit(3)


def server_blocks(config):
    """(instance name, server type, implementation dir, block) for every startable server."""
    from omegaconf import DictConfig

    for name, value in config.items():
        if not isinstance(value, DictConfig):
            continue
        for server_type in SERVER_TYPES:
            impls = value.get(server_type)
            if isinstance(impls, DictConfig):
                for impl, block in impls.items():
                    if isinstance(block, DictConfig) and "entrypoint" in block:
                        yield name, server_type, impl, block


INLINE_IDS = "request_prompt_and_generation_token_ids"


def choose_prompt_ids(config, inline: bool, settings: list[str]) -> list[str]:
    """Set vllm_model's request_prompt_and_generation_token_ids on every model server that reports
    token ids, except where a --set names it. Inline, vLLM returns the prompt's ids with the
    completion; otherwise the model server asks /tokenize for them in a second request (vLLM renders
    the chat template twice a call). Returns the instances changed."""
    named = {item.partition("=")[0].split(".")[0] for item in settings if item.partition("=")[0].endswith("." + INLINE_IDS)}
    changed = []
    for name, server_type, impl, block in server_blocks(config):
        if server_type != "responses_api_models" or not impl.startswith("vllm_model") or name in named:
            continue
        if block.get("return_token_id_information") and bool(block.get(INLINE_IDS)) != inline:
            block[INLINE_IDS] = inline
            changed.append(name)
    return changed


COPY_SUFFIX = "__copy"  # gymtrl's discovery groups "<name>__copy<k>" under <name>


def os_free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_port(host: str, taken: set[int]) -> int:
    """A port free on `host` and not in `taken`, which it joins. The OS may hand a port it just gave out
    (and that was closed again) out once more, so two copies could otherwise share one."""
    for _ in range(1000):
        port = os_free_port(host)
        if port not in taken:
            taken.add(port)
            return port
    raise RuntimeError(f"no free port on {host} outside the {len(taken)} already given to NeMo Gym's servers")


def replicate(config, copies: int) -> list[str]:
    """Add copies 1..copies-1 of every server instance: copy k's references to other instances
    (an agent's resources_server and model_server, a resources server's judge) name their copy k,
    so a rollout sent to one copy of an agent stays on that copy of everything it calls. Copies
    get their own ports and no datasets (those stay declared once). Returns the names added."""
    from omegaconf import OmegaConf

    names = sorted({name for name, *_ in server_blocks(config)})
    taken = {int(block["port"]) for *_, block in server_blocks(config) if block.get("port")}
    head_port = (config.get("head_server") or {}).get("port")
    if head_port:
        taken.add(int(head_port))

    def renamed(node, k: int):
        if isinstance(node, dict):
            if node.get("type") in SERVER_TYPES and node.get("name") in names:
                return {**node, "name": f"{node['name']}{COPY_SUFFIX}{k}"}
            return {key: renamed(value, k) for key, value in node.items()}
        if isinstance(node, list):
            return [renamed(value, k) for value in node]
        return node

    added = []
    for k in range(1, copies):
        for name in names:
            # (unresolved: ${oc.env:...} secrets must not be written out resolved)
            copy = renamed(OmegaConf.to_container(config[name], resolve=False), k)
            for server_type in SERVER_TYPES:
                for block in (copy.get(server_type) or {}).values():
                    if isinstance(block, dict) and "entrypoint" in block:
                        block["port"] = free_port(str(block.get("host") or "127.0.0.1"), taken)
                        block.pop("datasets", None)
            config[f"{name}{COPY_SUFFIX}{k}"] = OmegaConf.create(copy)
            added.append(f"{name}{COPY_SUFFIX}{k}")
    return added


def main() -> int:
    ap = argparse.ArgumentParser(description="Start NeMo Gym servers without Ray (gymtrl).")
    ap.add_argument("--config", action="append", default=[], help="NeMo Gym config YAML (repeatable)")
    ap.add_argument("--set", action="append", default=[], help="config value key=value (repeatable)")
    ap.add_argument("--extra-root", action="append", default=[], help="directory with extra servers")
    ap.add_argument("--head-host", default="127.0.0.1")
    ap.add_argument("--head-port", type=int, default=11000)
    ap.add_argument("--log-dir", required=True)
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--use-env-yaml", action="store_true", help="also read env.yaml like gym env start")
    ap.add_argument("--judge-for", action="append", default=[],
                    help="resources server instance whose LLM judge to switch on (repeatable)")
    ap.add_argument("--judge-server", default="policy_model", help="model server instance the judge calls")
    ap.add_argument("--prompt-ids", choices=("generation", "tokenize"), default="tokenize",
                    help="where model servers that report token ids get a call's prompt ids: from the "
                         "generation itself, or from a second, /tokenize, request (NeMo Gym's default)")
    ap.add_argument("--copies", type=int, default=1,
                    help="run this many copies of every server; rollouts spread over the agents' copies")
    ap.add_argument("--requirements", choices=("install", "check", "ignore"), default="install",
                    help="what a launched server's requirements.txt asks for that this venv lacks: install it "
                         "with pip, refuse to start (exit 3), or start anyway")
    ap.add_argument("--pip-arg", action="append", default=[], help="an argument for that pip install (repeatable)")
    ap.add_argument("--requirements-only", action="store_true",
                    help="resolve the config and handle the requirements, then exit without starting a server")
    args = ap.parse_args()

    roots = [str(Path(r).resolve()) for r in args.extra_root]
    if roots:
        old = os.environ.get("NEMO_GYM_EXTRA_ROOTS")
        os.environ["NEMO_GYM_EXTRA_ROOTS"] = os.pathsep.join(roots + ([old] if old else []))
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)

    from omegaconf import OmegaConf

    from nemo_gym import _resolve_under_cwd_or_install
    from nemo_gym.server_utils import HeadServer

    def _resolve_server_dir(rel_path: Path) -> Path:
        # NeMo Gym's rule (nemo_gym.cli.env._resolve_server_dir), without importing its CLI module,
        # whose extra dependencies (devtools, ...) a pruned server-only install lacks.
        return _resolve_under_cwd_or_install(
            rel_path, validator=lambda d: (d / "requirements.txt").exists() or (d / "pyproject.toml").exists())

    config = resolve_config(args)
    # Environment-server relays (legacy_agent) need Ray; agents are called directly instead.
    for name in [n for n, v in config.items() if OmegaConf.is_dict(v) and "environment_servers" in v]:
        del config[name]
    for name in args.judge_for:
        wire_judge(config, name, args.judge_server)
    changed = choose_prompt_ids(config, args.prompt_ids == "generation", args.set)
    if changed:
        log(f"prompt token ids from the {args.prompt_ids} for {', '.join(changed)}")
    if args.copies > 1:
        added = replicate(config, args.copies)
        log(f"{args.copies} copies of every server: added {len(added)} instances")
    if args.requirements != "ignore":
        dirs = {f"{t}/{impl}": _resolve_server_dir(Path(t, impl)) for _, t, impl, _ in server_blocks(config)}
        ensure_requirements(dirs, install=args.requirements == "install", pip_args=args.pip_arg)
    if args.requirements_only:
        return 0
    config_yaml = OmegaConf.to_yaml(config)
    os.environ["NEMO_GYM_CONFIG_DICT"] = config_yaml  # HeadServer and children read it from here
    (log_dir / "gym_config.yaml").write_text(config_yaml)

    _, _, head = HeadServer.run_webserver()
    log(f"head server on http://{args.head_host}:{args.head_port}")

    procs: dict[str, subprocess.Popen] = {}
    urls: dict[str, str] = {}
    instances = []
    for name, server_type, impl, block in server_blocks(config):
        server_dir = _resolve_server_dir(Path(server_type, impl))
        pythonpath = os.pathsep.join(p for p in (".", os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, NEMO_GYM_CONFIG_DICT=config_yaml, NEMO_GYM_CONFIG_PATH=name, PYTHONPATH=pythonpath)
        logf = open(log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, str(block["entrypoint"])],
            # Same process group as the launcher (gymtrl stops the whole group) and dies with it.
            cwd=server_dir, env=env, stdout=logf, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )
        procs[name] = proc
        urls[name] = f"http://{block['host']}:{block['port']}"
        instances.append({
            "name": impl, "process_name": name, "server_type": server_type, "dir_path": str(server_dir),
            "entrypoint": str(block["entrypoint"]), "host": block["host"], "port": block["port"],
            "url": urls[name], "pid": proc.pid, "config_path": name, "start_time": time.time(),
        })
        log(f"started {name} ({server_type}/{impl}) pid {proc.pid} at {urls[name]}")
    head.set_server_instances(instances)

    def stop_all(code: int) -> None:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        sys.exit(code)

    signal.signal(signal.SIGTERM, lambda *_: stop_all(0))
    signal.signal(signal.SIGINT, lambda *_: stop_all(0))

    def check_children() -> None:
        for name, proc in procs.items():
            if proc.poll() is not None:
                log(f"server {name} exited with code {proc.returncode}; see {log_dir / (name + '.log')}")
                stop_all(1)

    pending = set(urls)
    deadline = time.monotonic() + args.startup_timeout
    while pending:
        check_children()
        pending = {n for n in pending if http_status(urls[n] + "/") != 200}
        if time.monotonic() > deadline:
            log(f"servers not up after {args.startup_timeout:g}s: {sorted(pending)}")
            stop_all(1)
        time.sleep(0.3)
    head.mark_ready()
    log(f"GYM READY: {len(procs)} servers")
    while True:
        check_children()
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
