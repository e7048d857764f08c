"""`gymtrl eval`: one model, or two compared on the same rows with the same seeds.

The servers are the config's (launched or connected, as for training). A vLLM that gymtrl launches
is started once, for the first model (--model, default model.name_or_path). The second model
(--compare) reaches it through the reload weight sync, checked exactly (StampCheck) and by its
logprobs (ProbeCheck), as every training step is: so the two models must share an architecture and
a tokenizer. A vLLM that gymtrl connects to is sent the first model's weights too (it may serve
anything), and keeps the last model's weights afterwards.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

from gymtrl.atomic import write_text_atomic
from gymtrl.config import Config
from gymtrl.config.load import export_env_yaml_api_key
from gymtrl.config.schema import DataSource
from gymtrl.data.read import read_split
from gymtrl.data.rows import build_split
from gymtrl.errors import ConfigError
from gymtrl.evaluation.run import Evaluator, report
from gymtrl.gym.discovery import check_routes, discover

log = logging.getLogger(__name__)

# Config fields that fix the shape of the weights: a push needs them all equal.
SHAPE_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")


def check_compatible(first: str, second: str, trust_remote_code: bool) -> None:
    """Refuse (one line) a second model whose weights cannot be pushed into the vLLM serving the first."""
    from transformers import AutoConfig, AutoTokenizer

    def shape(path):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        text = getattr(config, "text_config", None) or config
        return {k: getattr(text, k, getattr(config, k, None)) for k in SHAPE_KEYS}

    try:
        a, b = shape(first), shape(second)
        ta = AutoTokenizer.from_pretrained(first, trust_remote_code=trust_remote_code)
        tb = AutoTokenizer.from_pretrained(second, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--compare: cannot read the models' configs and tokenizers: {str(e).splitlines()[0]}") from None
    differ = [k for k in SHAPE_KEYS if a[k] != b[k]]
    if ta.get_vocab() != tb.get_vocab():
        differ.append("tokenizer vocabulary")
    if getattr(ta, "chat_template", None) != getattr(tb, "chat_template", None):
        differ.append("chat template")
    if differ:
        raise ConfigError(f"--compare {second}: the two models must share an architecture and a tokenizer (the second is "
                          f"pushed into the vLLM serving the first), but they differ in {', '.join(differ)}")


class _OneProcess:
    """What WeightPublisher.publish reads of a trainer, for a model outside any trainer (one process)."""

    is_main_process = True

    def __init__(self, model, step: int):
        self.model = model
        self.state = SimpleNamespace(global_step=step)
        self.accelerator = self

    @staticmethod
    def unwrap_model(model):
        return model

    def wait_for_everyone(self) -> None:
        pass


def load_model(cfg: Config, path: str):
    from transformers import AutoModelForCausalLM

    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else "auto"
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)


def evaluate(cfg: Config, model: str | None = None, compare: str | None = None, rows_file: str | None = None,
             samples: int | None = None, out: str | None = None) -> tuple[dict, Path]:
    """Evaluate and write the JSON report; returns it and its path."""
    import torch
    from transformers import AutoTokenizer

    from gymtrl.rollout.engine import RolloutEngine
    from gymtrl.rollout.fd_limit import ensure_open_files
    from gymtrl.servers.stack import ServerStack
    from gymtrl.servers.vllm_control import VLLMControl
    from gymtrl.sync.factory import build_publisher, build_sync
    from gymtrl.train import build_grpo_config, model_vocab_size

    if model:
        cfg.model.name_or_path = model
    first = cfg.model.name_or_path
    for path in (first, compare):
        if path and (Path(path) / "adapter_config.json").exists():
            raise ConfigError(f"{path} is a LoRA adapter; gymtrl eval evaluates whole models",
                              hint="evaluate the merged model (model.lora.save_merged writes <output.dir>/final/merged)")
    cfg.model.lora.r = 0  # whole models, served as they are: no adapter to load
    if samples is not None and samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    samples = samples or cfg.eval.samples
    sources = [DataSource(path=rows_file)] if rows_file else cfg.data.eval
    if not sources:
        raise ConfigError("nothing to evaluate: the config's data.eval lists no files",
                          hint="give --rows FILE.jsonl, or set data.eval")
    rows = read_split(sources, None if rows_file else cfg.data.max_eval_rows)[:cfg.eval.max_rows]
    if compare:
        check_compatible(first, compare, cfg.model.trust_remote_code)
    export_env_yaml_api_key(cfg)
    out_dir = Path(cfg.output.dir)
    out_path = Path(out) if out else out_dir / "eval.json"
    args = build_grpo_config(cfg, "reload", torch.cuda.is_available())  # the training sampling settings
    ensure_open_files(cfg.rollout.max_concurrency)
    with ServerStack(cfg, out_dir / "eval_logs", strategy="reload") as servers:
        topo = discover(cfg.gym.head_server_url, cfg.gym.rewrite_loopback_hosts)
        check_routes(rows, topo)
        store: dict[str, dict] = {}
        keys = list(build_split("eval", rows, topo, store)["prompt"])
        tokenizer = AutoTokenizer.from_pretrained(first, trust_remote_code=cfg.model.trust_remote_code)
        control = VLLMControl(cfg.vllm.base_url, cfg.vllm.request_timeout_s, cfg.vllm.api_key_env)
        engine = RolloutEngine.from_config(cfg, topo, args, model_vocab_size(cfg), watch=lambda: _raise_if_exited(servers))
        evaluator = Evaluator(engine, store, keys, samples, cfg.eval.pass_threshold, cfg.eval.seed, cfg.eval.temperature)
        try:
            publisher = build_publisher(cfg, build_sync(cfg, "reload", control, out_dir / "eval"), control, tokenizer)
            results = []
            for step, path in enumerate([first] + ([compare] if compare else [])):
                # A launched vLLM serves the first model from disk already; anything else is pushed and checked.
                if step > 0 or not cfg.vllm.launch.enabled:
                    log.info("pushing %s into the vLLM server at %s (reload sync, checked)", path, cfg.vllm.base_url)
                    holder = _OneProcess(load_model(cfg, path), step)
                    _, check = publisher.publish(holder)
                    publisher.settle(check)
                log.info("evaluating %s: %d rows x %d samples", path, len(keys), samples)
                results.append((str(path), evaluator.run()))
        finally:
            evaluator.close()
            control.close()
    settings = {"rows": len(keys), "samples": samples, "pass_threshold": cfg.eval.pass_threshold,
                "temperature": evaluator.engine.sampling.temperature, "seed": cfg.eval.seed,
                "source": rows_file or [s.path for s in cfg.data.eval]}
    rep = report(results, settings)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_path, json.dumps(rep, indent=2) + "\n")
    return rep, out_path


def _raise_if_exited(servers) -> None:
    """A launched server that died ends the evaluation at once, with its log tail."""
    died = servers.exited()
    if died is not None:
        raise died
