"""Where fetched models live: the cache directory (GYMTRL_MODEL_CACHE or ~/.cache/gymtrl/models), a
model's ready directory (marked by its provenance file, written last) and how one is built: beside its
final place, then renamed into it, under a per-model lock, so a directory is complete or not there."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from gymtrl.errors import GymtrlError

if TYPE_CHECKING:
    from gymtrl.models.registry import ModelSpec

PROVENANCE = "gymtrl-model.json"


class ModelFetchError(GymtrlError):
    """A model could not be downloaded, verified or converted."""


def default_cache() -> Path:
    env = os.environ.get("GYMTRL_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gymtrl" / "models"


def model_dir(cache: Path, name: str) -> Path:
    return Path(cache) / name


def gguf_path(cache: Path, spec: ModelSpec) -> Path:
    return Path(cache) / "gguf" / spec.gguf_file


def read_provenance(directory: Path) -> dict | None:
    """The provenance of a ready model directory; None when it is not (completely) there."""
    try:
        return json.loads((Path(directory) / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None


def ready_dir(name: str, cache: Path | None = None) -> Path | None:
    d = model_dir(cache or default_cache(), name)
    return d if read_provenance(d) is not None else None



@contextlib.contextmanager
def model_lock(cache: Path, name: str) -> Iterator[None]:
    """One fetch of a model at a time per cache (a second waits, then finds it done)."""
    Path(cache).mkdir(parents=True, exist_ok=True)
    with open(Path(cache) / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_dir(final: Path, build: Callable[[Path], dict], provenance: dict) -> Path:
    """Build into a temporary directory beside `final`, add the provenance file last, then rename.
    On any failure the temporary directory is removed and `final` is left as it was."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        info = build(tmp)
        (tmp / PROVENANCE).write_text(json.dumps({**provenance, **info}, indent=2) + "\n")
        mode = 0o666 & ~_umask()
        for p in tmp.rglob("*"):  # some writers create 0600 files; a shared cache wants the umask's mode
            if p.is_file():
                p.chmod(mode)
        if final.exists():  # --force: swap the old one out, then remove it
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def dir_size(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file())
