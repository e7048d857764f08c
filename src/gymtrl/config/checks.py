"""The rules a config's values must follow, beyond the types the schema gives them. Each broken
rule is one ConfigError naming the key and what it may be."""

from __future__ import annotations

from gymtrl.config.schema import Config, PrepareConfig
from gymtrl.net import same_server
from gymtrl.errors import ConfigError

SYNC_STRATEGIES = ("auto", "nccl", "broadcast", "ipc", "reload", "lora", "none")
PROMPT_ID_SOURCES = ("generation", "tokenize")
GYM_REQUIREMENTS = ("install", "check", "ignore")
DTYPES = ("auto", "float32", "bfloat16", "float16")
JUDGE_SERVERS = ("none", "policy", "url", "launch")
PREPARE_SOURCE_KINDS = ("path", "hf", "gym_dataset", "reasoning_gym")
# The fields each reference environment's /verify reads from the row (its VerifyRequest in 0.7.0).
# "a|b" means either location; dotted names are nested keys.
VERIFIER_FIELDS: dict[str, list[str]] = {
    "workplace_assistant": ["ground_truth", "id", "category", "environment_name"],
    "reasoning_gym": ["question", "answer", "metadata.source_dataset"],
    "mcqa": ["expected_answer|metadata.expected_answer"],
    "math_with_judge": ["question", "expected_answer"],
}


def check_prepare(prep: PrepareConfig, source: str, where: str) -> None:
    """The prepare section's values; `where` is where prepare.sources is (file and line)."""
    if not prep.sources:
        raise ConfigError(f"{source}: prepare.sources lists no sources",
                          hint="add at least one {path: ...}, {hf: ...}, {gym_dataset: ...} or {reasoning_gym: ...}")
    for i, s in enumerate(prep.sources):
        key = f"prepare.sources[{i}]"
        kinds = [k for k in PREPARE_SOURCE_KINDS if getattr(s, k) is not None]
        if len(kinds) != 1:
            raise ConfigError(f"{where}: {key} must have exactly one of {', '.join(PREPARE_SOURCE_KINDS)}"
                              f" (it has {', '.join(kinds) or 'none'})")
        if s.ratio is not None and s.count is not None:
            raise ConfigError(f"{where}: {key} sets both ratio and count; choose one")
        if s.ratio is not None and s.ratio <= 0:
            raise ConfigError(f"{where}: {key}.ratio must be > 0, got {s.ratio}")
        if s.count is not None and s.count < 0:
            raise ConfigError(f"{where}: {key}.count must be >= 0, got {s.count}")
        if s.validation_count is not None and s.validation_count < 0:
            raise ConfigError(f"{where}: {key}.validation_count must be >= 0, got {s.validation_count}")
        if not 0.0 <= s.validation_fraction < 1.0:
            raise ConfigError(f"{where}: {key}.validation_fraction must be in [0, 1), got {s.validation_fraction}")
        if s.env is not None and s.env not in VERIFIER_FIELDS:
            raise ConfigError(f"{where}: {key}.env '{s.env}' is not one gymtrl knows the verifier fields of",
                              hint=f"one of {', '.join(VERIFIER_FIELDS)}, or leave it unset")
        if s.reasoning_gym is not None and (not s.reasoning_gym.tasks or s.reasoning_gym.size < 1):
            raise ConfigError(f"{where}: {key}.reasoning_gym needs tasks and size >= 1")
    if prep.max_rows is not None and prep.max_rows < 1:
        raise ConfigError(f"{source}: prepare.max_rows must be >= 1, got {prep.max_rows}")


def check_lora(cfg: Config, source: str) -> None:
    lora = cfg.model.lora
    if lora.r < 0 or (lora.alpha is not None and lora.alpha < 1) or not 0.0 <= lora.dropout < 1.0 or not lora.target_modules:
        raise ConfigError(f"{source}: model.lora needs r >= 0 (0: no adapter), alpha >= 1, 0 <= dropout < 1 and "
                          "at least one target module")
    strategy = cfg.sync.strategy
    if lora.r and strategy == "nccl":
        raise ConfigError(f"{source}: model.lora trains an adapter, and sync.strategy=nccl is TRL's own sync, which "
                          "gymtrl does not hand a merged model", hint="use sync.strategy=lora (or auto), or broadcast "
                          "(the adapter merged into whole weights)")
    if strategy == "lora" and not lora.r:
        raise ConfigError(f"{source}: sync.strategy=lora pushes a LoRA adapter, and model.lora.r is 0 (no adapter)",
                          hint="set model.lora.r (for example 16), or another sync.strategy")


def check_values(cfg: Config, source: str) -> None:
    """The values a config may hold, beyond their types; `source` names the file in each message."""
    if cfg.gym.launch.prompt_ids not in PROMPT_ID_SOURCES:
        raise ConfigError(f"{source}: gym.launch.prompt_ids must be one of {', '.join(PROMPT_ID_SOURCES)}, "
                          f"got '{cfg.gym.launch.prompt_ids}'")
    if cfg.gym.launch.requirements not in GYM_REQUIREMENTS:
        raise ConfigError(f"{source}: gym.launch.requirements must be one of {', '.join(GYM_REQUIREMENTS)}, "
                          f"got '{cfg.gym.launch.requirements}'")
    if cfg.sync.strategy not in SYNC_STRATEGIES:
        raise ConfigError(f"{source}: sync.strategy must be one of {', '.join(SYNC_STRATEGIES)}, got '{cfg.sync.strategy}'")
    check_lora(cfg, source)
    if cfg.sync.bucket_mb < 1:
        raise ConfigError(f"{source}: sync.bucket_mb must be >= 1, got {cfg.sync.bucket_mb}")
    for key, value in (("model.dtype", cfg.model.dtype), ("vllm.dtype", cfg.vllm.dtype)):
        if value not in DTYPES:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(DTYPES)}, got '{value}'")
    if not cfg.data.train:
        raise ConfigError(f"{source}: data.train lists no files")
    if cfg.gym.launch.copies < 1:
        raise ConfigError(f"{source}: gym.launch.copies must be >= 1, got {cfg.gym.launch.copies}")
    if cfg.vllm.tensor_parallel_size < 1:
        raise ConfigError(f"{source}: vllm.tensor_parallel_size must be >= 1, got {cfg.vllm.tensor_parallel_size}")
    r = cfg.rollout
    if r.max_concurrency < 1 or r.timeout_s <= 0 or r.retries < 0:
        raise ConfigError(f"{source}: rollout.max_concurrency >= 1, rollout.timeout_s > 0 and rollout.retries >= 0 are required")
    if not 0.0 <= r.max_failure_rate <= 1.0:
        raise ConfigError(f"{source}: rollout.max_failure_rate must be between 0 and 1, got {r.max_failure_rate}")
    if r.max_staleness not in (0, 1):
        raise ConfigError(f"{source}: rollout.max_staleness must be 0 (synchronous) or 1 (one-step-off), "
                          f"got {r.max_staleness}", hint="staleness above 1 is not supported yet")
    sup = cfg.supervision
    if sup.on_server_exit not in ("stop", "restart") or sup.max_restarts < 0:
        raise ConfigError(f"{source}: supervision.on_server_exit must be stop or restart (got '{sup.on_server_exit}'), "
                          f"and supervision.max_restarts >= 0 (got {sup.max_restarts})")
    if sup.hang_timeout_s < 0 or cfg.vllm.request_retries < 0 or cfg.vllm.request_retry_max_s < 0:
        raise ConfigError(f"{source}: supervision.hang_timeout_s, vllm.request_retries and "
                          "vllm.request_retry_max_s must be >= 0")
    check_eval(cfg, source)
    j = cfg.judge
    if j.server not in JUDGE_SERVERS:
        raise ConfigError(f"{source}: judge.server must be one of {', '.join(JUDGE_SERVERS)}, got '{j.server}'")
    if j.server != "none" and not cfg.gym.launch.enabled:
        raise ConfigError(f"{source}: judge.server={j.server} takes effect only when gymtrl launches NeMo Gym",
                          hint="set the judge in your NeMo Gym config (judge_model_server), or gym.launch.enabled=true")
    if j.server in ("url", "launch"):
        if not j.base_url or not j.model:
            raise ConfigError(f"{source}: judge.server={j.server} needs judge.base_url and judge.model",
                              hint="e.g. judge.base_url=http://127.0.0.1:8001 judge.model=Qwen/Qwen2.5-7B-Instruct")
        if same_server(j.base_url, cfg.vllm.base_url):
            raise ConfigError(
                f"{source}: judge.base_url is the policy's vLLM server ({cfg.vllm.base_url}): the judge would "
                "change with every weight update",
                hint="point it at another server, or set judge.server=policy to judge with the policy on purpose",
            )
        if j.connection_retries < 1:
            raise ConfigError(f"{source}: judge.connection_retries must be >= 1, got {j.connection_retries}")
    if j.server == "launch" and not (j.launch.venv or cfg.vllm.launch.venv):
        raise ConfigError(f"{source}: judge.server=launch needs a vLLM venv to start the judge from",
                          hint="set judge.launch.venv (or vllm.launch.venv)")


def check_eval(cfg: Config, source: str) -> None:
    """The eval section, and TRL's own evaluation kept off (gymtrl's eval section replaces it)."""
    e = cfg.eval
    if e.samples < 1:
        raise ConfigError(f"{source}: eval.samples must be >= 1, got {e.samples}")
    if e.every_steps < 0:
        raise ConfigError(f"{source}: eval.every_steps must be >= 0 (0: only at the start and end), got {e.every_steps}")
    if e.max_rows is not None and e.max_rows < 1:
        raise ConfigError(f"{source}: eval.max_rows must be >= 1 (or null: all rows), got {e.max_rows}")
    if e.temperature is not None and e.temperature < 0:
        raise ConfigError(f"{source}: eval.temperature must be >= 0 (or null: the training temperature), got {e.temperature}")
    if str(cfg.grpo.get("eval_strategy", "no")) not in ("no", "IntervalStrategy.NO"):
        raise ConfigError(f"{source}: grpo.eval_strategy must stay 'no': TRL's evaluation would compute a loss on "
                          "data.eval's rows, not rewards", hint="set eval.every_steps (gymtrl's evaluation) instead")
