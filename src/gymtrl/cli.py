"""The `gymtrl` command line. Thin: parse, call, and turn user errors into one line and an exit code."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from gymtrl import __version__
from gymtrl.errors import GymtrlError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="GRPO training on NeMo Gym environments with Hugging Face TRL.")
state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gymtrl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                           help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks."),
) -> None:
    state["debug"] = debug
    # transformers 5 renamed gradient checkpointing to activation checkpointing and warns on every
    # GRPOConfig TRL builds and every call TRL makes to the old methods, whether or not the user set
    # it: noise on every run (the key and the methods still work).
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated", category=FutureWarning)
    # gymtrl's own progress lines (servers started, plugin installed); other libraries keep theirs.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("gymtrl: %(message)s"))
    logger = logging.getLogger("gymtrl")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _fail(e: GymtrlError) -> None:
    if state["debug"]:
        raise e
    typer.secho(f"gymtrl: error: {e}", fg=typer.colors.RED, err=True)
    sys.exit(e.exit_code)


@app.command(context_settings={"allow_extra_args": True})
def train(
    config: str = typer.Option(..., "--config", "-c", help="YAML config file."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. grpo.max_steps=10"),
    resume: Optional[str] = typer.Option(
        None, "--resume", help="auto (the newest complete checkpoint in output.dir; none: start fresh) "
        "or a checkpoint directory."),
    servers: Optional[Path] = typer.Option(
        None, "--servers", help="Use the servers a `gymtrl serve --ready-file` reported (waiting for the "
        "file) instead of launching any."),
    stop_file: Optional[str] = typer.Option(
        None, "--stop-file", help="A file whose appearance makes the run checkpoint and stop at the end of "
        "the step (default: <output.dir>/STOP; removed at start)."),
) -> None:
    """Train a policy with GRPO on NeMo Gym environments."""
    from gymtrl.config import load_config

    try:
        cfg = load_config(config, overrides or [])
        if servers is not None:
            from gymtrl.serve import attach_servers

            attach_servers(cfg, servers)
        from gymtrl.train import train as run_training

        final = run_training(cfg, resume=resume, stop_file=stop_file)
        from gymtrl.distributed import rank_and_world
        from gymtrl.plots import finish_run

        finish_run(cfg.output.dir, rank_and_world()[0])  # summary table and plots; only warns on failure
    except GymtrlError as e:
        _fail(e)
    except KeyboardInterrupt:
        typer.secho("gymtrl: interrupted; servers stopped", err=True)
        sys.exit(130)
    typer.echo(f"gymtrl: training finished; final model in {final}")


@app.command(context_settings={"allow_extra_args": True})
def serve(
    config: str = typer.Option(..., "--config", "-c", help="YAML config file (the one the trainers use)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides"),
    host: Optional[str] = typer.Option(None, "--host", help="Address the servers listen on and trainers "
                                       "reach them at (default: this machine's short hostname)."),
    ready_file: Optional[Path] = typer.Option(None, "--ready-file", help="Where to write the servers' URLs "
                                              "once all are healthy (for `gymtrl train --servers`)."),
) -> None:
    """Start the config's servers (vLLM, judge, NeMo Gym) and hold them up for trainers on other
    nodes, until SIGTERM; exits non-zero as soon as one of them dies."""
    from gymtrl.config import load_config
    from gymtrl.serve import default_host, serve as run_servers

    try:
        cfg = load_config(config, overrides or [])
        run_servers(cfg, host or default_host(), ready_file)
    except GymtrlError as e:
        _fail(e)
    except KeyboardInterrupt:
        pass
    typer.echo("gymtrl: servers stopped")


@app.command("eval", context_settings={"allow_extra_args": True})
def eval_(
    config: str = typer.Option(..., "--config", "-c", help="YAML config file (the training one)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. eval.pass_threshold=0.5"),
    model: Optional[str] = typer.Option(None, "--model", help="Model to evaluate (default: model.name_or_path)."),
    compare: Optional[str] = typer.Option(
        None, "--compare", help="A second model, evaluated on the same rows with the same seeds; it must share "
        "the first one's architecture and tokenizer (its weights are pushed into the same vLLM)."),
    rows: Optional[str] = typer.Option(None, "--rows", help="A JSONL file of rows (default: the config's data.eval)."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Samples per row (default: eval.samples)."),
    out: Optional[str] = typer.Option(None, "--out", help="JSON report (default: <output.dir>/eval.json)."),
) -> None:
    """Evaluate a model (or compare two) on held-out rows through the training rollout path: per
    environment mean reward with its standard error, pass@k, failures by kind, turns, tokens."""
    from gymtrl.config import load_config
    from gymtrl.evaluation.command import evaluate
    from gymtrl.evaluation.run import table

    try:
        cfg = load_config(config, overrides or [])
        rep, path = evaluate(cfg, model=model, compare=compare, rows_file=rows, samples=samples, out=out)
    except GymtrlError as e:
        _fail(e)
    except KeyboardInterrupt:
        typer.secho("gymtrl: interrupted; servers stopped", err=True)
        sys.exit(130)
    typer.echo(table(rep))
    typer.echo(f"gymtrl: evaluation written to {path}")


@app.command(context_settings={"allow_extra_args": True})
def doctor(
    config: str = typer.Option(..., "--config", "-c", help="YAML config file."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, as for train"),
) -> None:
    """Check a config as `train` would before starting servers, and report the data rows per split and
    route, the versions against the tested ones, the vLLM plugin, the GPU plan and a memory estimate.
    Starts nothing; exits 0, or 2 with the first problem."""
    from gymtrl.config import load_config
    from gymtrl.doctor import doctor as run_doctor

    try:
        cfg = load_config(config, overrides or [])
        lines = run_doctor(cfg)
    except GymtrlError as e:
        e.exit_code = 2
        _fail(e)
    typer.echo("\n".join(lines))


@app.command()
def plot(run_dir: Path = typer.Argument(..., help="A run's output.dir (it holds metrics.jsonl).")) -> None:
    """Draw a run's curves (reward and failure rate per environment, eval reward, sync and step time)
    as PNG files into RUN_DIR/plots/, and print its summary table."""
    from gymtrl.plots import plot_run, summary_table

    try:
        written = plot_run(run_dir)
        typer.echo(summary_table(run_dir))
    except GymtrlError as e:
        _fail(e)
    for path in written:
        typer.echo(f"gymtrl: wrote {path}")


@app.command("prepare-data", context_settings={"allow_extra_args": True})
def prepare_data(
    config: str = typer.Option(..., "--config", "-c", help="YAML config file with a `prepare:` section."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. prepare.seed=1"),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first bad row instead of skipping it."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
) -> None:
    """Build train.jsonl, validation.jsonl and report.json from the config's prepare.sources."""
    from gymtrl.config.load import load_prepare_config
    from gymtrl.prepare.pipeline import prepare

    try:
        prep = load_prepare_config(config, overrides or [])
        prep.strict = prep.strict or strict
        prep.progress_bar = prep.progress_bar and not no_progress
        report = prepare(prep)
    except GymtrlError as e:
        _fail(e)
    typer.echo(report.table())
    typer.echo(f"gymtrl: wrote {report.totals['train']} training and {report.totals['validation']} validation rows "
               f"to {report.output_dir} (report.json has the details)")


plugin_app = typer.Typer(no_args_is_help=True, help="gymtrl's vLLM plugin: on-policy prefix correction.")
app.add_typer(plugin_app, name="vllm-plugin")


@plugin_app.command("install")
def plugin_install(
    python: str = typer.Option(sys.executable, "--python",
                               help="The Python of the environment vLLM runs in (default: this one)."),
) -> None:
    """Install the prefix-correction plugin into a vLLM environment (offline, no dependencies).
    Serve with GYMTRL_PREFIX_CORRECTION=1 to switch it on."""
    from gymtrl.vllm_plugin.install import ensure_installed, plugin_version

    try:
        changed = ensure_installed(python)
    except GymtrlError as e:
        _fail(e)
    state_ = "installed" if changed else "is already installed"
    typer.echo(f"gymtrl: gymtrl-vllm-plugin {plugin_version()} {state_} for {python}")


from gymtrl.models.cli import models_app  # noqa: E402

app.add_typer(models_app, name="models")


if __name__ == "__main__":
    app()
