"""What a NeMo Gym server's requirements.txt asks for that the Gym venv lacks. Imported by
gym_launcher.py *inside the NeMo Gym venv* (and by tests); it imports nothing from gymtrl.

NeMo Gym's own launcher gives every server a venv of its own built from its requirements.txt.
gymtrl runs all servers in one venv, so before starting any it checks each launched server's
requirements (and what those need in turn, as `pip check` would) against what that venv has
installed, and installs the missing ones with pip or reports them.

Lines understood: `name[extras] <specifier> ; marker`, `name @ url`, a bare wheel or archive URL,
a `git+` URL (named by its `#egg=` or its last path part), `-e`/`--editable` (NeMo Gym itself,
`-e nemo-gym[dev] @ ../../`, is skipped) and `-r other.txt`. Other pip options are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

# The launcher's output line for requirements it could not meet (JSON follows); gymtrl reads it.
UNMET_PREFIX = "GYM REQUIREMENTS UNMET: "
# NeMo Gym itself: every server's requirements start with it, and it is what this venv is.
SELF_NAMES = {"nemo-gym", "nemo_gym"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Requirement:
    line: str  # as written, what pip is given
    name: str  # normalized distribution name
    specifier: str = ""  # version specifier, "" for any
    extras: tuple[str, ...] = ()
    marker: str = ""


@dataclass
class ServerNeeds:
    server: str  # "resources_servers/instruction_following"
    requirements_file: Path
    missing: list[str] = field(default_factory=list)  # "defusedxml (needed by verifiable-instructions)"
    install: list[str] = field(default_factory=list)  # what to hand pip: the missing requirements only
    other_versions: list[str] = field(default_factory=list)  # "pillow==12.3.0, installed 13.0.0"
    pip_error: str | None = None  # pip's last ERROR line, when installing them failed


def name_from_url(url: str) -> str | None:
    egg = re.search(r"[#&]egg=([A-Za-z0-9._-]+)", url)
    if egg:
        return normalize(egg.group(1))
    path = url.split("#", 1)[0].split("?", 1)[0].rstrip("/")
    last = path.rsplit("/", 1)[-1]
    if last.endswith(".whl"):
        return normalize(last.split("-", 1)[0])
    for suffix in (".tar.gz", ".zip", ".tar.bz2", ".git"):
        if last.endswith(suffix):
            last = last[: -len(suffix)]
            break
    if "@" in last:  # repo.git@ref
        last = last.split("@", 1)[0].removesuffix(".git")
    # an sdist is name-version: drop a trailing version
    last = re.sub(r"-\d[\w.]*$", "", last)
    return normalize(last) if last else None


def parse_line(line: str) -> Requirement | None:
    """One requirement, or None for a line that asks for nothing checkable (NeMo Gym itself, options)."""
    from packaging.requirements import InvalidRequirement
    from packaging.requirements import Requirement as PkgRequirement

    text = line.split(" #", 1)[0].strip()
    if not text or text.startswith("#"):
        return None
    for prefix in ("-e ", "--editable ", "--editable="):
        if text.startswith(prefix):
            text = text[len(prefix):].strip()
            break
    else:
        if text.startswith("-"):
            return None  # --index-url, --find-links, ...: pip's business
    if text.rstrip("/") in ("../..", "./../.."):  # NeMo Gym's own checkout, as `-e ../../`
        return None
    try:
        req = PkgRequirement(text)
    except InvalidRequirement:
        name = name_from_url(text) if "://" in text or text.startswith(("git+", ".", "/")) else None
        if name is None:
            return Requirement(line=text, name=normalize(text))
        return Requirement(line=text, name=name)
    name = normalize(req.name)
    if name in {normalize(n) for n in SELF_NAMES}:
        return None
    return Requirement(line=text, name=name, specifier=str(req.specifier), extras=tuple(sorted(req.extras)),
                       marker=str(req.marker) if req.marker else "")


def read_requirements(path: Path, seen: set[Path] | None = None) -> list[Requirement]:
    seen = set() if seen is None else seen
    path = path.resolve()
    if path in seen or not path.is_file():
        return []
    seen.add(path)
    out = []
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stripped = raw.strip()
        include = re.match(r"^(?:-r|--requirement)[ =]\s*(\S+)", stripped)
        if include:
            out += read_requirements(path.parent / include.group(1), seen)
            continue
        req = parse_line(stripped)
        if req is not None:
            out.append(req)
    return out


def marker_applies(marker: str, extras: tuple[str, ...] = ()) -> bool:
    if not marker:
        return True
    from packaging.markers import Marker

    m = Marker(marker)
    return any(m.evaluate({"extra": e}) for e in (extras or ("",)))


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def version_ok(version: str, specifier: str) -> bool:
    if not specifier:
        return True
    from packaging.specifiers import SpecifierSet

    try:
        return SpecifierSet(specifier).contains(version, prereleases=True)
    except Exception:
        return True  # a version packaging cannot read: pip installed it, trust it


def unmet(requirements: list[Requirement]) -> tuple[list[tuple[str, str]], list[str]]:
    """What is not installed at all, as (requirement for pip, description), following installed
    distributions' own dependencies; and what is installed at another version than asked. Another
    version is only reported: installing the asked one would change it under every other server."""
    from packaging.requirements import Requirement as PkgRequirement

    missing: dict[str, tuple[str, str]] = {}
    other_versions: list[str] = []
    checked: set[tuple[str, tuple[str, ...]]] = set()
    queue: list[tuple[Requirement, str]] = [(r, "") for r in requirements]
    while queue:
        req, parent = queue.pop(0)
        if not marker_applies(req.marker):
            continue
        version = installed_version(req.name)
        if version is None:
            needed_by = f" (needed by {parent})" if parent else ""
            missing.setdefault(req.name, (req.line, f"{req.name}{req.specifier}{needed_by}"))
            continue
        if not version_ok(version, req.specifier):
            other_versions.append(f"{req.name}{req.specifier}, installed {version}")
        key = (req.name, req.extras)
        if key in checked:
            continue
        checked.add(key)
        for dep in metadata.requires(req.name) or []:
            try:
                d = PkgRequirement(dep)
            except Exception:
                continue
            if d.marker and not marker_applies(str(d.marker), req.extras):
                continue
            line = f"{d.name}{d.specifier}" if not d.url else f"{d.name} @ {d.url}"
            queue.append((Requirement(line=line, name=normalize(d.name), specifier=str(d.specifier),
                                      extras=tuple(sorted(d.extras))), req.name))
    return list(missing.values()), list(dict.fromkeys(other_versions))


def server_needs(server_dirs: dict[str, Path]) -> list[ServerNeeds]:
    """Every server (label -> its directory) whose requirements.txt names something this venv lacks,
    or installs at another version."""
    out = []
    for label, directory in server_dirs.items():
        path = Path(directory) / "requirements.txt"
        missing, other_versions = unmet(read_requirements(path))
        if missing or other_versions:
            out.append(ServerNeeds(server=label, requirements_file=path, missing=[m[1] for m in missing],
                                   install=[m[0] for m in missing], other_versions=other_versions))
    return out
