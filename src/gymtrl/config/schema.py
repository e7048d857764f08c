"""The config schema. Every key a user can write is a field here, with its default and meaning.

Sections: model, data, gym, vllm, rollout, sync, grpo (passed through to TRL's GRPOConfig),
rewards, judge, eval, prepare (gymtrl prepare-data), logging, output. docs/configuration.md is generated
from these field comments (`python -m gymtrl.config.reference`; a test checks it is current).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class LoraConfig:
    # Rank of the LoRA adapter (PEFT) trained instead of the full model; 0 trains every weight. With
    # an adapter, only the adapter is trained, held in the optimizer, checkpointed and pushed to vLLM
    # (sync.strategy=lora, which auto picks): vLLM serves it as an adapter loaded in place each step;
    # reload, ipc and broadcast push it merged into whole weights instead.
    r: int = 0
    # LoRA's scaling numerator (None: 2 * r).
    alpha: Optional[int] = None
    # Dropout on the adapter's input during training.
    dropout: float = 0.0
    # Modules that get an adapter: PEFT's "all-linear" (every linear layer but the output head), or names.
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # Also write the base model with the adapter merged into it to <output.dir>/final/merged.
    save_merged: bool = False


@dataclass
class ModelConfig:
    # Hugging Face hub id or local directory of the policy to train (and serve from vLLM).
    name_or_path: str = MISSING
    # Trainer dtype: auto | float32 | bfloat16 | float16.
    dtype: str = "auto"
    trust_remote_code: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataSource:
    # A NeMo Gym JSONL file (one row per line: responses_create_params, agent_ref/task_source, fields).
    path: str = MISSING
    # Agent instance for rows that carry neither agent_ref nor task_source (e.g. NeMo Gym's
    # example.jsonl files). A row that names a different agent is an error.
    agent: Optional[str] = None


@dataclass
class DataConfig:
    # Each entry: a path, or {path, agent}.
    train: list[DataSource] = MISSING
    eval: list[DataSource] = field(default_factory=list)
    # Keep only the first N rows of each split (None: all).
    max_train_rows: Optional[int] = None
    max_eval_rows: Optional[int] = None


@dataclass
class ProcessLaunchConfig:
    # Start this server from gymtrl (true) or connect to one already running (false).
    enabled: bool = False
    # The server's own virtual environment (its bin/ holds the executables).
    venv: Optional[str] = None
    # A full command line that replaces the one gymtrl builds (list of arguments).
    command: Optional[list[str]] = None
    # Arguments appended to the built command.
    extra_args: list[str] = field(default_factory=list)
    # Extra environment variables for the server process.
    env: dict[str, str] = field(default_factory=dict)
    # How long to wait for the server's health endpoint before giving up.
    startup_timeout_s: float = 600.0


@dataclass
class VLLMConfig:
    # OpenAI-compatible vLLM server the environments generate with (also the weight-sync target).
    base_url: str = "http://127.0.0.1:8000"
    # Name the server serves the model under (NeMo Gym's policy_model_name). Default: model path.
    served_model_name: Optional[str] = None
    # Environment variable holding the server's API key, if it needs one.
    api_key_env: str = "GYMTRL_VLLM_API_KEY"
    # Timeout for each control request (health, reload, verify).
    request_timeout_s: float = 120.0
    # Retries of an idempotent control request (weight-push commits and checks, reloads, prefix-cache
    # resets, probes) whose connection failed (reset, refused, dropped), with backoff from 0.5 s
    # doubling to 8 s; at most request_retry_max_s seconds of retrying per request. A bucket transfer
    # or a join of the broadcast group is never retried (the other side would wait forever).
    request_retries: int = 4
    request_retry_max_s: float = 60.0
    # Server dtype when gymtrl launches it (float32 makes trainer/server logprobs match tightly).
    dtype: str = "auto"
    max_model_len: int = 4096
    # GPUs one launched vLLM spreads the model over (--tensor-parallel-size).
    tensor_parallel_size: int = 1
    # On-policy prefix correction for multi-turn episodes (gymtrl's vLLM plugin; docs/guide.md: "Multi-turn
    # on-policy"). When gymtrl launches vLLM it installs and switches it on; a server you start
    # yourself must run it, or the run stops at start-up. false: serve without it (episodes whose
    # re-rendered history differs from the sampled tokens are then dropped as prefix_mismatch).
    prefix_correction: bool = True
    launch: ProcessLaunchConfig = field(default_factory=ProcessLaunchConfig)


@dataclass
class GymLaunchConfig(ProcessLaunchConfig):
    # NeMo Gym config files (relative ones are looked up in NeMo Gym's install, then here).
    config_paths: list[str] = field(default_factory=list)
    # Extra NeMo Gym config values, as in `gym env start ++key=value`.
    overrides: dict[str, Any] = field(default_factory=dict)
    # Copies of every NeMo Gym server (agents, resources servers, model adapters: each is a single
    # Python process, and one copy becomes the bottleneck with many rollouts in flight). Rollouts
    # spread over an agent's copies; a rollout stays on one copy of everything it calls.
    copies: int = 1
    # Where NeMo Gym's model servers (vllm_model, with return_token_id_information) get a call's
    # prompt token ids: "generation" (vLLM returns them with the completion: one request a call) or
    # "tokenize" (NeMo Gym's default: a second request, a chat /tokenize, which renders the chat
    # template again in vLLM's API server). A request_prompt_and_generation_token_ids you set in
    # `overrides` wins. bench/results/prompt_ids_source.md measures both.
    prompt_ids: str = "generation"
    # What a launched server's requirements.txt names that the Gym venv lacks (NeMo Gym's own launcher
    # gives each server a venv built from it; gymtrl runs them all in this one): "install" it with pip
    # before any server starts, "check" (refuse to start, naming the server and the packages) or
    # "ignore". pip_args go to that pip install, e.g. [--no-index, --find-links, /path/to/wheels].
    requirements: str = "install"
    pip_args: list[str] = field(default_factory=list)


@dataclass
class GymConfig:
    # The NeMo Gym head server; agents are discovered from its /global_config_dict_yaml.
    head_server_url: str = "http://127.0.0.1:11000"
    # Rewrite loopback agent hosts to the head server's host (agents on another node).
    rewrite_loopback_hosts: bool = True
    # A NeMo Gym env.yaml: its policy_base_url and policy_model_name fill vllm.base_url and
    # vllm.served_model_name (unless set here), its policy_api_key becomes the API key.
    env_yaml: Optional[str] = None
    launch: GymLaunchConfig = field(default_factory=GymLaunchConfig)


@dataclass
class RolloutConfig:
    # Most agent /run requests in flight at once (per trainer process).
    max_concurrency: int = 64
    # Deadline for one whole rollout (all its turns), retries included.
    timeout_s: float = 600.0
    # Retries for connection errors and 5xx replies, with exponential backoff.
    retries: int = 2
    retry_backoff_s: float = 0.5
    # Send tools with strict=false and parallel_tool_calls=true: vLLM enforces both by constrained
    # decoding and then reports logprobs the trainer's model cannot reproduce (off-policy samples).
    lift_tool_constraints: bool = True
    # Stop the run when an environment's failure rate over its last `failure_window` rollouts
    # exceeds this (after at least `failure_min_rollouts`).
    max_failure_rate: float = 0.5
    failure_window: int = 64
    failure_min_rollouts: int = 8
    # 0: each batch is generated from the weights of the step that trains on it, while the trainer
    # waits. 1 (one-step-off): the next batch is generated while this one trains, from weights one
    # generation batch older (lag logged as rollout/policy_lag_steps, corrected for by the sampler
    # correction). The push happens between batches, with no episode in flight, under every sync.
    max_staleness: int = 0


@dataclass
class SupervisionConfig:
    # When a server gymtrl launched exits mid-run: stop (save the last finished step and stop with
    # its log tail) | restart (start it again, re-sync the weights to a new vLLM, redo the batch).
    on_server_exit: str = "stop"
    # Restarts allowed in one run, all servers together; one more exit then stops the run.
    max_restarts: int = 3
    # A launched vLLM (or judge vLLM) whose /health has not answered for this many seconds is hung:
    # gymtrl kills it and handles it as one that exited (on_server_exit). Generous, because a busy
    # CPU host can keep vLLM's API server from answering for a while; 0 switches the check off.
    hang_timeout_s: float = 300.0


@dataclass
class SyncConfig:
    # How new weights reach vLLM after each optimizer step: broadcast (vLLM on its own GPUs; gymtrl's
    # packed NCCL buckets) | nccl (vLLM on its own GPUs; TRL's sync) | ipc (vLLM on the trainer's GPU;
    # CUDA IPC, one training process) | reload (through the disk; CPU) | lora (model.lora: only the
    # adapter, through the disk, loaded in place by vLLM's LoRA support) | none (never syncs: debugging
    # only) | auto (lora with model.lora; else reload on CPU; ipc when a launched vLLM gets the
    # trainer's only GPU; else broadcast).
    strategy: str = "auto"
    # Check after every push that vLLM serves the trainer's weights; fail the run if not. Two checks:
    # exact (every vLLM worker's stamp names this push and the digest of every tensor it loaded equals
    # the trainer's; reload, ipc and broadcast, through gymtrl's worker extension) and behavioural (a
    # probe's logprobs equal the trainer's within verify_tolerance; every strategy, the only one for nccl
    # and lora).
    verify: bool = True
    # Largest allowed |logprob difference| per token (None: 1e-3 for float32, 5e-2 otherwise).
    verify_tolerance: Optional[float] = None
    # Where the reload strategy writes weights (None: <output.dir>/weight_sync).
    dir: Optional[str] = None
    # The ipc strategy's shared GPU buffer: the weights cross in buckets of this many MiB.
    bucket_mb: int = 1024


@dataclass
class JudgeLaunchConfig:
    # Venv holding vLLM for the judge (None: vllm.launch.venv).
    venv: Optional[str] = None
    # Added to the judge's `vllm serve` command, e.g. [--gpu-memory-utilization, "0.3"].
    extra_args: list[str] = field(default_factory=list)
    # Extra environment for the judge, e.g. {CUDA_VISIBLE_DEVICES: "1"} to give it its own GPU.
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 900.0


@dataclass
class JudgeConfig:
    # Where environments' LLM judges (math_with_judge's judge_model_server) send their calls:
    # none (judges stay as their NeMo Gym config says) | policy (the policy's vLLM: it judges with
    # the weights being trained) | url (any OpenAI-compatible server: a fixed judge) | launch (a
    # second vLLM that gymtrl starts at base_url serving `model`; never sent weight updates).
    server: str = "none"
    # For url and launch: the server's root URL (without /v1) and the model name it serves
    # (for launch, the weights to serve: a hub id or a local path).
    base_url: Optional[str] = None
    model: Optional[str] = None
    # Environment variable holding the judge's API key (never written to configs or logs).
    api_key_env: str = "GYMTRL_JUDGE_API_KEY"
    # Resources server instances whose judge to switch on and point at it.
    resources_servers: list[str] = field(default_factory=lambda: ["math_with_judge"])
    # Connection attempts (0.5 s apart) to a url/launch judge before its call fails as judge_failed
    # (NeMo Gym's own default is to retry a refused connection forever).
    connection_retries: int = 8
    launch: JudgeLaunchConfig = field(default_factory=JudgeLaunchConfig)


@dataclass
class RewardFunctionConfig:
    # "package.module:function", or "path/to/file.py:function" (relative to the working directory).
    function: str = MISSING
    weight: float = 1.0
    # Apply only to these agents' rollouts (None: all).
    envs: Optional[list[str]] = None
    # Metric name (default: the function's name): rewards/<name>/... and env/<agent>/reward_<name>.
    name: Optional[str] = None


@dataclass
class RewardsConfig:
    # Weight of the environment's own reward in the total.
    env_weight: float = 1.0
    # Extra TRL-style reward functions (see gymtrl/rewards.py and docs/guide.md).
    functions: list[RewardFunctionConfig] = field(default_factory=list)


@dataclass
class EvalConfig:
    # Validation of data.eval's rows (never trained on), in training and in `gymtrl eval`, through
    # the same servers and rollout path as training. Logged as eval/<env>/reward, reward_se, pass@1,
    # failures, turns, and eval/reward overall (docs/guide.md: "Evaluation"). Without data.eval, none.
    # Evaluate before the first optimizer step (the baseline; a resumed run does not repeat it).
    at_start: bool = True
    # Evaluate every N optimizer steps (0: only at the start and at the end).
    every_steps: int = 0
    # Evaluate once training finished (a run stopped early by a signal or STOP file skips it).
    at_end: bool = True
    # Samples per row: pass@k is reported for k = 1 and k = samples. `gymtrl eval --samples` overrides it.
    samples: int = 4
    # A sample passes when its reward is at least this (for pass@k).
    pass_threshold: float = 1.0
    # Evaluate only the first N rows of data.eval (None: all; data.max_eval_rows applies first).
    max_rows: Optional[int] = None
    # Sampling temperature of evaluation rollouts (None: the training temperature, grpo.temperature).
    temperature: Optional[float] = None
    # Base of the per-sample seeds (sent to vLLM with every model call): every evaluation, and
    # both models of `gymtrl eval --compare`, sample row r's sample j with the same seed.
    seed: int = 0


@dataclass
class LoggingConfig:
    # Also log to Weights & Biases (WANDB_API_KEY from the environment; wandb_mode offline needs none).
    wandb: bool = False
    wandb_project: str = "gymtrl"
    wandb_mode: str = "online"  # online | offline | disabled
    # Show a progress bar on the terminal.
    progress_bar: bool = True


@dataclass
class OutputConfig:
    # Run directory: resolved config, metrics.jsonl, server logs, checkpoints.
    dir: str = "outputs/run"


@dataclass
class HFSource:
    # A dataset repo on the Hugging Face hub, e.g. nvidia/Nemotron-RL-agent-workplace_assistant.
    repo: str = MISSING
    # One file of the repo (JSONL or Parquet); without it, the repo's files for `split`.
    file: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    # Environment variable with a token; not needed for public sets.
    token_env: str = "HF_TOKEN"


@dataclass
class GymDatasetSource:
    # A NeMo Gym server config that declares `datasets:` (a path, or relative to the NeMo Gym install).
    config: str = MISSING
    # The declared dataset's name or type (train | validation | example).
    dataset: str = MISSING
    # Fetch it from the hub (its `huggingface_identifier` / `source`) when the file is not on disk.
    download: bool = True


@dataclass
class ReasoningGymSource:
    # reasoning-gym task names, e.g. [mini_sudoku, basic_arithmetic]: several make a composite set.
    tasks: list[str] = MISSING
    size: int = 500
    seed: int = 42
    # Per-task generator settings: {task_name: {key: value}}.
    config: dict[str, Any] = field(default_factory=dict)
    # A system message before each question: one of reasoning-gym's named prompts (default, simple,
    # direct, DeepSeekZero: each asks for the answer in <answer></answer> tags, which the verifier
    # extracts) or your own text. None: the question alone; the verifier then scores the whole reply,
    # which is exact only when the reply is nothing but the answer.
    system_prompt: Optional[str] = None


@dataclass
class PrepareSource:
    # Label in the report (default: derived from the source).
    name: Optional[str] = None
    # Agent instance its rows route to (written as agent_ref). None: the rows' own agent_ref, or
    # their task_source resolved with NeMo Gym's rule against prepare.gym_configs.
    agent: Optional[str] = None
    # Environment whose verifier fields each row must carry (workplace_assistant | reasoning_gym |
    # mcqa | math_with_judge); None: inferred from the agent's name, else not checked.
    env: Optional[str] = None
    # Exactly one of these four.
    path: Optional[str] = None
    hf: Optional[HFSource] = None
    gym_dataset: Optional[GymDatasetSource] = None
    reasoning_gym: Optional[ReasoningGymSource] = None
    # Its share of the training set: `ratio` (relative to the other ratio sources) or an exact
    # `count` (down-sampled, or up-sampled by repeating). Neither: all of its rows.
    ratio: Optional[float] = None
    count: Optional[int] = None
    # Rows held out for validation: a fraction of the source, or a count.
    validation_fraction: float = 0.0
    validation_count: Optional[int] = None


@dataclass
class PrepareConfig:
    sources: list[PrepareSource] = field(default_factory=list)
    # Where train.jsonl, validation.jsonl and report.json are written.
    output_dir: str = "data/prepared"
    seed: int = 0
    # Most training rows in all (None: no cap). With ratio sources, the training set's size.
    max_rows: Optional[int] = None
    # Drop rows whose content repeats an earlier row (in any source).
    dedupe: bool = True
    # Stop at the first bad row (default: skip it and count it by reason).
    strict: bool = False
    # Tokenizer (hub id or path) for prompt lengths in the report (None: no token counts).
    tokenizer: Optional[str] = None
    # NeMo Gym configs that resolve rows' task_source to agents (None: gym.launch.config_paths).
    gym_configs: Optional[list[str]] = None
    # The NeMo Gym install (its site-packages) that relative config and data paths resolve under
    # (None: found in gym.launch.venv).
    gym_root: Optional[str] = None
    progress_bar: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    gym: GymConfig = field(default_factory=GymConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    # Passed to trl.GRPOConfig (validated against its real fields). temperature, top_p and
    # max_completion_length also become the rollouts' sampling settings.
    grpo: dict[str, Any] = field(default_factory=dict)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    # `gymtrl prepare-data`: builds training/validation JSONL (see gymtrl/prepare/).
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
