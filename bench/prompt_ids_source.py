#!/usr/bin/env python3
"""Where NeMo Gym's model server gets each call's prompt token ids, and what it costs.

  python bench/prompt_ids_source.py --model MODEL_DIR --vllm-venv VENV --gym-venv VENV \
      [--rollouts 128] [--concurrency 64] [--max-tokens 16] [--rounds 3] [--vllm-arg=--enforce-eager ...]

NeMo Gym 0.7's `vllm_model` (as `vllm_model_for_training.yaml` configures it) sends each model call
to vLLM's chat endpoint and then a second request, a chat `/tokenize` of the same messages, for the
prompt's token ids: vLLM's API server renders the chat template twice per call. With
`request_prompt_and_generation_token_ids: true` it asks the generation itself for them (vLLM's
`return_token_ids`) and skips `/tokenize`; gymtrl sets it (`gym.launch.prompt_ids: generation`). On the GPU the API server's CPU is what limits a batch
of rollouts through Gym (bench/results/gpu-bench/generation-2xh200.md), so the second request matters there.

One vLLM server, two NeMo Gym stacks in front of it (`gym.launch.prompt_ids` tokenize and
generation), the same digit_reply rows through gymtrl's rollout engine, the two
interleaved round by round. Reports rollouts/s, CPU seconds per rollout of vLLM's API server and of
Gym's model server, and whether both give every row the same prompt token ids.
Writes a Markdown table to --out (default bench/results/prompt_ids_source.md) and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_generation import CpuMeter, interesting_processes  # noqa: E402  (bench/gpu_generation.py)
from prefix_correction import versions  # noqa: E402  (bench/prefix_correction.py)

from gymtrl.net import free_port  # noqa: E402
from gymtrl.servers.gym_launcher import INLINE_IDS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROWS = REPO / "src/gymtrl/envs/resources_servers/digit_reply/data/train.jsonl"
INLINE_KEY = f"policy_model.responses_api_models.vllm_model.{INLINE_IDS}"
# gym.launch.prompt_ids for each mode
MODES = {"a second request, `/tokenize` (NeMo Gym's default)": "tokenize", "the generation (gymtrl's default)": "generation"}


def stack_config(args, vllm_url: str, launch_vllm: bool, prompt_ids: str, out: Path):
    from gymtrl.config.load import load_config

    out.mkdir(parents=True, exist_ok=True)
    path = out / "servers.yaml"
    path.write_text(json.dumps({
        "model": {"name_or_path": str(args.model), "dtype": "float32"},
        "data": {"train": [str(ROWS)]},
        "gym": {"head_server_url": f"http://127.0.0.1:{free_port()}",
                "launch": {"enabled": True, "venv": args.gym_venv, "prompt_ids": prompt_ids,
                           "config_paths": ["responses_api_models/vllm_model/configs/vllm_model_for_training.yaml",
                                            "resources_servers/digit_reply/configs/digit_reply.yaml"]}},
        "vllm": {"base_url": vllm_url, "dtype": "float32", "max_model_len": 2048,
                 "launch": {"enabled": launch_vllm, "venv": args.vllm_venv, "extra_args": args.vllm_arg}},
        "output": {"dir": str(out)},
    }))
    return load_config(path)


def check_setting(head_url: str, want: bool) -> None:
    """The model server's resolved config must hold the setting this mode is about: a --set that the
    config file overrode would measure the default twice."""
    import httpx
    import yaml

    text = httpx.get(head_url + "/global_config_dict_yaml", timeout=10, trust_env=False).json()
    node = yaml.safe_load(text)
    for part in INLINE_KEY.split("."):
        node = (node or {}).get(part)
    if bool(node) != want:
        raise SystemExit(f"prompt_ids_source.py: {INLINE_KEY} is {node!r} in the running Gym config, expected {want}")


def load_rows(n: int) -> list[dict]:
    base = [json.loads(line) for line in ROWS.read_text().split("\n") if line.strip()]
    return [base[i % len(base)] for i in range(n)]


def one_round(engine, rows, procs) -> dict:
    with CpuMeter(procs) as meter:
        outcomes = engine.run(rows)
    return {"wall": meter.wall, "cpu": meter.by_label, "outcomes": outcomes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--vllm-venv", required=True)
    ap.add_argument("--gym-venv", required=True)
    ap.add_argument("--rollouts", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vllm-arg", action="append", default=[])
    ap.add_argument("--work", type=Path, default=Path("/tmp/gymtrl-bench-prompt-ids"))
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "prompt_ids_source.md")
    ap.add_argument("--device-label", default="")
    args = ap.parse_args()

    from gymtrl.gym.discovery import discover
    from gymtrl.rollout.engine import RolloutEngine, SamplingParams
    from gymtrl.failures import FailureBound, FailureLedger
    from gymtrl.servers.stack import ServerStack

    rows = load_rows(args.rollouts)
    vllm_url = f"http://127.0.0.1:{free_port()}"
    stacks, engines, procs, rounds = [], {}, {}, {mode: [] for mode in MODES}
    try:
        for i, (mode, prompt_ids) in enumerate(MODES.items()):
            cfg = stack_config(args, vllm_url, i == 0, prompt_ids, args.work / f"mode{i}")
            stack = ServerStack(cfg, args.work / f"mode{i}" / "logs")
            stack.__enter__()  # from the main thread: launched servers die with the thread that started them
            stacks.append(stack)
            # greedy: both modes must render the same prompts and may as well generate the same tokens
            engines[mode] = RolloutEngine(discover(cfg.gym.head_server_url), SamplingParams(0.0, 1.0, args.max_tokens),
                                          FailureLedger(FailureBound(1.0, 10**6, 1)), args.concurrency, 600.0, 0, 0.1)
            check_setting(cfg.gym.head_server_url, prompt_ids == "generation")
            head_port = int(cfg.gym.head_server_url.rsplit(":", 1)[1])
            procs[mode] = interesting_processes(int(vllm_url.rsplit(":", 1)[1]), head_port)
        for mode, engine in engines.items():
            one_round(engine, rows[: args.concurrency], procs[mode])  # warm-up
        for r in range(args.rounds):
            order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
            for mode in order:
                rounds[mode].append(one_round(engines[mode], rows, procs[mode]))
                res = rounds[mode][-1]
                print(f"round {r} {mode}: {res['wall']:.2f} s, failed "
                      f"{sum(o.failure is not None for o in res['outcomes'])}", flush=True)
    finally:
        for engine in engines.values():
            engine.close()
        for stack in reversed(stacks):
            stack.__exit__(None, None, None)

    text = report(args, rows, rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


def report(args, rows, rounds) -> str:
    n = len(rows)

    def per_rollout_ms(res, label_part: str) -> float:
        return 1000 * sum(v for k, v in res["cpu"].items() if label_part in k) / n

    lines = [f"# Prompt token ids from `/tokenize` or from the generation ({datetime.date.today()})", "",
             f"device: {args.device_label or platform.node()}; model: {args.model.name} (float32); {n} digit_reply "
             f"rollouts a round, {args.concurrency} in flight, greedy, at most {args.max_tokens} tokens; "
             f"{args.rounds} rounds, the two modes interleaved, after one warm-up batch each; one vLLM server "
             f"behind both; versions: {versions(args)}", "",
             "| NeMo Gym's model server takes the prompt ids from | median s a round (min-max) | rollouts/s | "
             "vLLM API server CPU ms a rollout | Gym model server CPU ms a rollout | every watched process, CPU ms "
             "a rollout | failed rollouts |",
             "|---|---|---|---|---|---|---|"]
    for mode, results in rounds.items():
        wall = statistics.median(r["wall"] for r in results)
        api = statistics.median(per_rollout_ms(r, "vLLM API server") for r in results)
        model = statistics.median(per_rollout_ms(r, "responses_api_models") for r in results)
        total = statistics.median(per_rollout_ms(r, "") for r in results)
        walls = [r["wall"] for r in results]
        failed = sum(o.failure is not None for r in results for o in r["outcomes"])
        lines.append(f"| {mode} | {wall:.2f} ({min(walls):.2f}-{max(walls):.2f}) | {n / wall:.1f} | {api:.1f} | "
                     f"{model:.1f} | {total:.1f} | {failed} |")
    (a, ra), (b, rb) = rounds.items()
    same = differ = 0
    for oa, ob in zip(ra[-1]["outcomes"], rb[-1]["outcomes"]):
        if oa.trajectory and ob.trajectory:
            if oa.trajectory.prompt_ids == ob.trajectory.prompt_ids:
                same += 1
            else:
                differ += 1
    lines += ["", f"Prompt token ids of the last round, row by row: {same} identical, {differ} different "
              f"({n - same - differ} without a trajectory on one side)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
