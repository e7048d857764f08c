"""What NeMo Gym 0.7's own collector (`ng_collect_rollouts`) needs to run next to gymtrl's servers.
Runs in the NeMo Gym environment (its python and PYTHONPATH), not in the trainer's.

    python bench/collector_relay.py --head http://127.0.0.1:11000 --agent digit_reply_simple_agent \
        --port 11100 [--legacy-dir DIR]

NeMo Gym 0.7's collector posts each row's `/run` to an *environment server* (`legacy_agent`, a relay
in front of the agent), never to the agent itself. gymtrl's launcher (and the GPU bundle's) drops
those relays, because `legacy_agent` does not declare `ray_enabled` and so starts Ray, which neither
needs: gymtrl calls the agent's `/run` directly. For the collector this starts, beside the running
servers and without touching them:
  1. one `legacy_agent` relay for --agent, with Ray off (its class attribute `ray_enabled = False`;
     the relay uses no Ray: it forwards `/run` and `/aggregate_metrics` over HTTP);
  2. a second head server on --port whose config is the running head's plus that relay, so that
     `ng_collect_rollouts +head_server.port=<port>` finds the agent's environment server.
Prints `RELAY READY <relay url>` and stays up until SIGTERM/SIGINT.
`--legacy-dir`: the folder holding legacy_agent's app.py, when the Gym install lacks it (the GPU
bundle's pruned install does; bench/device/device_bench.sh carries a copy from the CPU Gym venv).
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except Exception:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--head", default="http://127.0.0.1:11000")
    ap.add_argument("--agent", default="digit_reply_simple_agent")
    ap.add_argument("--port", type=int, default=11100)
    ap.add_argument("--legacy-dir", default=None)
    ap.add_argument("--log", default="/tmp/collector_relay.log")
    args = ap.parse_args()

    with urllib.request.urlopen(args.head.rstrip("/") + "/global_config_dict_yaml", timeout=10) as r:
        text = json.loads(r.read())  # a JSON string holding the YAML
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(text)
    relay_name = f"{args.agent}_collector_relay"
    relay_port = free_port()
    cfg[relay_name] = {"environment_servers": {"legacy_agent": {
        "entrypoint": "app.py", "agent_server": {"type": "responses_api_agents", "name": args.agent},
        "host": "127.0.0.1", "port": relay_port,
        "max_concurrent_episodes": None, "queue_timeout_seconds": None,
        "default_episode_timeout_seconds": 21600, "cleanup_timeout_seconds": 180}}}
    cfg["head_server"]["port"] = args.port
    config_yaml = OmegaConf.to_yaml(cfg)
    os.environ["NEMO_GYM_CONFIG_DICT"] = config_yaml

    if args.legacy_dir:
        legacy = Path(args.legacy_dir)
    else:
        import nemo_gym

        legacy = Path(nemo_gym.__file__).resolve().parents[1] / "environment_servers" / "legacy_agent"
    code = ("import sys; sys.path.insert(0, '.'); import app; "
            "app.LegacyAgentEnvironmentServer.ray_enabled = False; app.LegacyAgentEnvironmentServer.run_webserver()")
    env = dict(os.environ, NEMO_GYM_CONFIG_PATH=relay_name,
               PYTHONPATH=os.pathsep.join(p for p in (str(legacy), os.environ.get("PYTHONPATH", "")) if p))
    logf = open(args.log, "ab")
    relay = subprocess.Popen([sys.executable, "-c", code], cwd=legacy, env=env, stdout=logf, stderr=subprocess.STDOUT)

    from nemo_gym.server_utils import HeadServer

    _, _, head = HeadServer.run_webserver()
    url = f"http://127.0.0.1:{relay_port}"
    head.set_server_instances([{"name": "legacy_agent", "process_name": relay_name, "server_type": "environment_servers",
                                "dir_path": str(legacy), "entrypoint": "app.py", "host": "127.0.0.1", "port": relay_port,
                                "url": url, "pid": relay.pid, "config_path": relay_name, "start_time": time.time()}])
    deadline = time.monotonic() + 120
    while not up(url + "/"):
        if relay.poll() is not None or time.monotonic() > deadline:
            print(f"relay did not start (exit {relay.poll()}); see {args.log}", flush=True)
            return 1
        time.sleep(0.3)
    head.mark_ready()
    print(f"RELAY READY {url} head http://127.0.0.1:{args.port}", flush=True)

    def stop(*_):
        relay.terminate()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while relay.poll() is None:
        time.sleep(0.5)
    print(f"relay exited {relay.returncode}", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
