"""The gymtrl training recipe: one config in, a GRPO-trained model out. Reads top to bottom.

  config -> servers up -> agents discovered -> rows read and routed -> GRPOTrainer(rollout_func)
  -> per step: push weights and check them exactly, rollouts through NeMo Gym, TRL's loss (with its
     importance-sampling correction against the sampling logprobs, under every sync) and optimizer step
  -> metrics.jsonl, checkpoints, final model.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from gymtrl.checkpoints import GracefulStop, MarkCompleteCheckpoints, resolve_resume, save_now
from gymtrl.config import Config, write_resolved_config
from gymtrl.config.batch import check_batch_geometry
from gymtrl.config.load import export_env_yaml_api_key
from gymtrl.data.read import read_split
from gymtrl.data.rows import build_split
from gymtrl.distributed import rank_and_world
from gymtrl.errors import (ConfigError, GymtrlError, RolloutFailureBoundError, ServerError, StoppedBySignal,
                           WeightSyncError)
from gymtrl.evaluation.callback import EvalCallback
from gymtrl.gym.discovery import check_routes, discover
from gymtrl.metrics import MetricsJsonlWriter, StepChannel
from gymtrl.rewards import build_reward_functions
from gymtrl.rollout.engine import ROLLOUT_BATCH_SLACK_S, RolloutEngine
from gymtrl.rollout.fd_limit import ensure_open_files
from gymtrl.rollout.rollout_func import GymRolloutFunc, make_env_reward
from gymtrl.servers.stack import ServerStack
from gymtrl.servers.supervisor import Supervisor
from gymtrl.servers.vllm_control import VLLMControl
from gymtrl.sync.factory import build_publisher, build_sync, check_strategy, choose_strategy, vllm_shares_trainer_gpu
from gymtrl.sync.nccl import NcclSync, bound_nccl_join
from gymtrl import trl_seam

log = logging.getLogger(__name__)
# Created by anyone (slurm/submit.sh at the time limit): the run checkpoints and stops at the step's end.
STOP_FILE = "STOP"


def build_grpo_config(cfg: Config, strategy: str, cuda: bool):
    from trl import GRPOConfig

    out_dir = Path(cfg.output.dir)
    kwargs: dict = {
        # Defaults that suit NeMo Gym agents; any of them can be overridden in the grpo section.
        "logging_steps": 1,
        "report_to": ["wandb"] if cfg.logging.wandb else "none",
        "disable_tqdm": not cfg.logging.progress_bar,
        "save_strategy": "steps",
        "save_steps": 50,
        # Multi-turn episodes end on a tool result or a step limit as often as on EOS.
        "mask_truncated_completions": False,
    }
    if not cuda:
        kwargs.update(use_cpu=True, bf16=False)
    if cfg.model.dtype != "auto":
        kwargs["model_init_kwargs"] = {"dtype": cfg.model.dtype}
    # Ranks meet in collectives after every batch, and one rank's rollouts may take the whole batch
    # deadline while the others wait: torch's default watchdog (1800 s) would kill a run whose
    # episodes are long. It gets at least twice the batch deadline.
    batch_deadline_s = cfg.rollout.timeout_s + ROLLOUT_BATCH_SLACK_S
    kwargs["ddp_timeout"] = max(1800, int(2 * batch_deadline_s))
    kwargs.update(cfg.grpo)
    if kwargs["ddp_timeout"] < batch_deadline_s:
        log.warning(
            "grpo.ddp_timeout=%ss is shorter than a rollout batch may take (rollout.timeout_s + %ss): with "
            "several processes a long batch would trip the distributed watchdog", kwargs["ddp_timeout"],
            ROLLOUT_BATCH_SLACK_S)
    kwargs["output_dir"] = str(out_dir / "checkpoints")
    kwargs["reward_weights"] = [cfg.rewards.env_weight] + [f.weight for f in cfg.rewards.functions]
    # Only TRL's own sync (nccl) builds TRL's vLLM client; every other strategy gets the same loss,
    # importance-sampling correction included, through gymtrl.trl_seam.use_sampler_correction.
    if strategy == "nccl":
        kwargs.update(use_vllm=True, vllm_mode="server", vllm_server_base_url=cfg.vllm.base_url)
    else:
        kwargs["use_vllm"] = False
    check_batch_geometry(kwargs, rank_and_world()[1])
    try:
        args = GRPOConfig(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"grpo section rejected by trl.GRPOConfig: {e}") from None
    warning = trl_seam.check_sampling_settings(args)
    if warning:
        log.warning(warning)
    return args


class _DropUnscorableSampleDumps(logging.Filter):
    """TRL warns for every step with an excluded rollout and prints that sample's whole row and
    completion. gymtrl already counts each excluded rollout by kind (failures/<kind>) and logs a line per batch, so
    the dump is noise that can run to megabytes per step."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "All reward functions returned None" not in str(record.msg)  # accelerate prefixes "[RANK n] "


def train(cfg: Config, resume: str | None = None, stop_file: str | None = None) -> Path:
    import torch
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    logging.getLogger("trl.trainer.grpo_trainer").addFilter(_DropUnscorableSampleDumps())
    export_env_yaml_api_key(cfg)
    out_dir = Path(cfg.output.dir)
    stopper = GracefulStop(Path(stop_file) if stop_file else out_dir / STOP_FILE)
    stopper.install()
    rank, world = rank_and_world()
    if rank == 0:
        write_resolved_config(cfg, out_dir)
        stopper.clear_stop_file()
    _wandb_env(cfg, out_dir)

    # --- data, checked before anything is started --------------------------------------------
    train_rows = read_split(cfg.data.train, cfg.data.max_train_rows)
    eval_rows = read_split(cfg.data.eval, cfg.data.max_eval_rows) if cfg.data.eval else []
    custom_rewards = build_reward_functions(cfg.rewards.functions)

    # --- the weight sync this machine allows, and TRL's arguments ----------------------------
    cuda = torch.cuda.is_available()
    shares_gpu = cuda and vllm_shares_trainer_gpu(cfg.vllm.launch.enabled, cfg.vllm.launch.env, dict(os.environ),
                                                  torch.cuda.device_count())
    strategy = choose_strategy(cfg.sync.strategy, cuda, shares_gpu, lora=cfg.model.lora.r > 0)
    check_strategy(strategy, cuda, shares_gpu, world)
    args = build_grpo_config(cfg, strategy, cuda)
    resume = resolve_resume(resume, Path(args.output_dir))  # <output.dir>/checkpoints

    # --- servers up, agents found, every row routed ----------------------------------------
    ensure_open_files(cfg.rollout.max_concurrency)  # before launching: the servers inherit it
    # The main process launches the servers; the others wait for them (and never launch any).
    with ServerStack(cfg, out_dir / "logs", strategy=strategy, launch=rank == 0) as servers:
        def find_agents():
            return discover(cfg.gym.head_server_url, cfg.gym.rewrite_loopback_hosts)

        topo = find_agents()
        log.info("NeMo Gym agents: %s", topo.describe())
        check_routes(train_rows + eval_rows, topo)
        store: dict[str, dict] = {}
        train_ds = build_split("train", train_rows, topo, store)
        eval_ds = build_split("eval", eval_rows, topo, store) if eval_rows else None

        # --- the pieces of a step: push + check, rollouts, TRL's batch -------------------------
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
        control = VLLMControl(cfg.vllm.base_url, cfg.vllm.request_timeout_s, cfg.vllm.api_key_env)
        sync = build_sync(cfg, strategy, control, out_dir)
        if isinstance(sync, NcclSync):
            bound_nccl_join(cfg.vllm.request_timeout_s, lambda: _nccl_join_timed_out(cfg, servers))
        publisher = build_publisher(cfg, sync, control, tokenizer)
        supervisor = Supervisor.from_config(cfg, servers, world, strategy)
        engine = RolloutEngine.from_config(cfg, topo, args, model_vocab_size(cfg), watch=supervisor.watch)
        channel = StepChannel()
        placeholder = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
        rollout_func = GymRolloutFunc(engine, store, publisher, placeholder, channel, supervisor, rediscover=find_agents,
                                      max_staleness=cfg.rollout.max_staleness)
        evaluator = EvalCallback.from_config(cfg, rollout_func, eval_ds)  # TRL gets no eval rows: see its docstring
        trainer = evaluator.bind(GRPOTrainer(
            model=cfg.model.name_or_path, reward_funcs=[make_env_reward(channel), *custom_rewards], args=args,
            train_dataset=train_ds, processing_class=tokenizer, rollout_func=rollout_func,
            callbacks=_callbacks(out_dir, supervisor, stopper, evaluator), peft_config=lora_config(cfg),
        ))
        trl_seam.attach(trainer, strategy, sync, channel)  # sampler correction under every sync; gap metrics

        # --- train --------------------------------------------------------------------------
        try:
            trainer.train(resume_from_checkpoint=resume)
        except (ServerError, RolloutFailureBoundError, WeightSyncError) as e:
            # A launched server that died explains the error best (with its log); a request can
            # fail a moment before its process is seen to exit.
            died = servers.wait_for_exit(5.0) if isinstance(e, ServerError) else servers.exited()
            raise _with_checkpoint(died or e, trainer) from None
        finally:
            rollout_func.close()  # a batch generated ahead for a step that will not run
            engine.close()
            control.close()
        return _finish(trainer, tokenizer, stopper, out_dir, rank, merged=cfg.model.lora.r > 0 and cfg.model.lora.save_merged)


def _callbacks(out_dir: Path, supervisor, stopper, evaluator) -> list:
    return [MetricsJsonlWriter(out_dir / "metrics.jsonl"), supervisor.watch_callback(), MarkCompleteCheckpoints(),
            stopper, evaluator]


def _wandb_env(cfg: Config, out_dir: Path) -> None:
    if cfg.logging.wandb:
        os.environ.setdefault("WANDB_PROJECT", cfg.logging.wandb_project)
        os.environ.setdefault("WANDB_MODE", cfg.logging.wandb_mode)
        os.environ.setdefault("WANDB_DIR", str(out_dir))


def _finish(trainer, tokenizer, stopper, out_dir: Path, rank: int, merged: bool = False) -> Path:
    """A stopped run: a checkpoint and the line that says how to continue. A finished one: final/
    (and final/merged: the adapter merged into the base model, when asked)."""
    if stopper.stopped:
        path = save_now(trainer)
        raise StoppedBySignal(
            f"stopped by {stopper.reason} at step {trainer.state.global_step}; "
            f"checkpoint: {path}", hint="continue with the same command and --resume auto")
    final = out_dir / "final"
    merged_dir = final / "merged" if merged else None
    trainer.save_model(str(final))  # collective under ZeRO-3; the main process writes (the adapter, with model.lora)
    if rank == 0:
        tokenizer.save_pretrained(str(final))
        if merged_dir is not None:
            save_merged(trainer, tokenizer, merged_dir)
    return final


def lora_config(cfg: Config):
    """PEFT's LoraConfig for model.lora (None: train every weight)."""
    lora = cfg.model.lora
    if lora.r <= 0:
        return None
    from peft import LoraConfig

    modules = lora.target_modules[0] if list(lora.target_modules) == ["all-linear"] else list(lora.target_modules)
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha or 2 * lora.r, lora_dropout=lora.dropout,
                      target_modules=modules, task_type="CAUSAL_LM")


def save_merged(trainer, tokenizer, directory: Path) -> None:
    """The base model with the trained adapter merged in, as a plain checkpoint (model.lora.save_merged)."""
    from gymtrl.atomic import replace_dir

    model = trainer.accelerator.unwrap_model(trainer.model)
    with replace_dir(directory) as partial:
        merged = model.merge_and_unload()
        merged.save_pretrained(str(partial))
        tokenizer.save_pretrained(str(partial))
    log.info("adapter merged into the base model: %s", directory)


def _nccl_join_timed_out(cfg: Config, servers) -> None:
    """The trainer's side of the NCCL weight-sync group waits forever for a vLLM that never joins
    (nothing can interrupt it): say why, stop the servers gymtrl launched, and exit."""
    error = ServerError(
        f"the vLLM server at {cfg.vllm.base_url} did not join the NCCL weight-sync group within "
        f"{cfg.vllm.request_timeout_s:g}s (vllm.request_timeout_s)",
        hint="a vLLM that already took weights from another trainer over NCCL cannot take a new one: restart it "
        "(or let gymtrl launch it: vllm.launch.enabled=true), and check that the trainer and the server reach "
        "each other on TRL's group port (51216)")
    sys.stderr.write(f"gymtrl: error: {error}\n")
    sys.stderr.flush()
    servers.stop()
    os._exit(error.exit_code)


def model_vocab_size(cfg: Config) -> int | None:
    """The policy's embedding rows (from its config): token ids beyond it cannot be trained on."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    text = getattr(config, "text_config", None) or config
    return getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None)


def _with_checkpoint(error: GymtrlError, trainer) -> GymtrlError:
    """The error, its hint extended by where the last finished step was saved."""
    from gymtrl.checkpoints import save_now

    if rank_and_world()[1] > 1:  # a save is collective, and only this process is failing
        note = "the last periodic checkpoint stands (one process cannot save a multi-process run alone)"
        error.hint = f"{error.hint}; {note}" if error.hint else note
        return error
    try:
        path = save_now(trainer)
    except Exception as e:  # the run is already failing: report the save problem, keep the cause
        note = f"saving a checkpoint failed too ({type(e).__name__}: {e})"
    else:
        note = (f"step {trainer.state.global_step} is saved in {path}; continue with --resume auto"
                if path else "no step had finished, so there is no checkpoint")
    error.hint = f"{error.hint}; {note}" if error.hint else note
    return error
