"""Hold a vLLM server and NeMo Gym's servers up, launched exactly as `gymtrl train` launches them,
so several benchmarks (and several trainer runs in connect mode) can share them.

    python bench/gpu_servers.py --config configs/bench-gpu.yaml --ready-file /tmp/srv.json [key=value ...]

Starts gymtrl's ServerStack (vLLM with the NCCL weight-transfer config and gymtrl's prefix-correction
plugin, NeMo Gym's head server + simple_agent + vllm_model + digit_reply through gymtrl's
gym_launcher), waits until both are healthy, writes --ready-file (URLs, pids, seconds to start) and
then stays up until SIGTERM/SIGINT, when it stops both. Start it with `setsid` so that it outlives
the shell that started it (bench/device/device_bench.sh does).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# GYMTRL_BENCH_SRC: the gymtrl src/ to run (bench/device/device_bench.sh sets it)
sys.path.insert(0, os.environ.get("GYMTRL_BENCH_SRC") or str(REPO / "src"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--log-dir", default=None, help="default: <output.dir>/logs")
    ap.add_argument("--nccl", action=argparse.BooleanOptionalAction, default=True,
                    help="start vLLM with --weight-transfer-config nccl (TRL's server-mode sync)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    from gymtrl.config.load import load_config
    from gymtrl.servers.stack import ServerStack
    from gymtrl.servers.vllm import RECEIVER_STRATEGIES, served_model_name

    cfg = load_config(args.config, args.overrides)
    log_dir = Path(args.log_dir or Path(cfg.output.dir) / "logs")
    ready = Path(args.ready_file)
    ready.unlink(missing_ok=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    t0 = time.monotonic()
    # gymtrl's own syncs (ipc, broadcast) need vLLM started with gymtrl's worker extension
    strategy = cfg.sync.strategy if cfg.sync.strategy in RECEIVER_STRATEGIES else ("nccl" if args.nccl else "reload")
    with ServerStack(cfg, log_dir, strategy=strategy) as stack:
        info = {
            "vllm_url": cfg.vllm.base_url, "head_url": cfg.gym.head_server_url, "model": cfg.model.name_or_path,
            "served_model_name": served_model_name(cfg), "log_dir": str(log_dir),
            "pids": {p.name: p.proc.pid for p in stack.processes if p.proc is not None},
            "startup_s": round(time.monotonic() - t0, 1),
        }
        tmp = ready.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=1))
        tmp.replace(ready)
        print(f"SERVERS READY in {info['startup_s']} s: {json.dumps(info)}", flush=True)
        while not stop.wait(1.0):
            try:
                stack.raise_if_any_exited()
            except Exception as e:  # a server died: say so, and take the others down
                print(f"SERVER EXITED: {e}", flush=True)
                ready.unlink(missing_ok=True)
                return 1
    ready.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
