"""The `gymtrl` command line. Thin: parse, call, and turn user errors into one line and an exit code."""

from __future__ import annotations

import sys
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


def _fail(e: GymtrlError) -> None:
    if state["debug"]:
        raise e
    typer.secho(f"gymtrl: error: {e}", fg=typer.colors.RED, err=True)
    sys.exit(e.exit_code)


@app.command(context_settings={"allow_extra_args": True})
def train(
    config: str = typer.Option(..., "--config", "-c", help="YAML config file."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. grpo.max_steps=10"),
    resume: Optional[str] = typer.Option(None, "--resume", help="Checkpoint directory to resume from."),
) -> None:
    """Train a policy with GRPO on NeMo Gym environments."""
    from gymtrl.config import load_config

    try:
        cfg = load_config(config, overrides or [])
        from gymtrl.train import train as run_training

        final = run_training(cfg, resume=resume)
    except GymtrlError as e:
        _fail(e)
    except KeyboardInterrupt:
        typer.secho("gymtrl: interrupted; servers stopped", err=True)
        sys.exit(130)
    typer.echo(f"gymtrl: training finished; final model in {final}")


if __name__ == "__main__":
    app()
