"""Install the prefix-correction plugin into a vLLM environment.

The plugin runs inside vLLM's processes, which usually live in their own venv (vLLM and TRL pin
different transformers), so it is packaged as its own tiny distribution, `gymtrl-vllm-plugin`:
a wheel built here from splice.py and plugin.py, with the `vllm.general_plugins` entry point, and
installed with that environment's own pip (offline, no dependencies). Its version carries a hash
of the sources, so an installed copy that differs from this gymtrl's is replaced.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import tempfile
import zipfile
from pathlib import Path

from gymtrl import __version__
from gymtrl.errors import ServerError

DIST = "gymtrl_vllm_plugin"
SOURCES = ("protocol.py", "splice.py", "plugin.py", "weight_receiver.py", "broadcast_receiver.py", "load_stamp.py", "receivers.py")
ENTRY_POINTS = "[vllm.general_plugins]\ngymtrl_prefix_correction = gymtrl_vllm_plugin.plugin:register\n"


def plugin_version() -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(Path(__file__).with_name(name).read_bytes())
    return f"{__version__}+g{digest.hexdigest()[:10]}"


def _record_line(path: str, data: bytes) -> str:
    sha = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={sha},{len(data)}"


def build_wheel(out_dir: Path) -> Path:
    version = plugin_version()
    info = f"{DIST}-{version}.dist-info"
    files = {f"{DIST}/__init__.py": b'"""gymtrl\'s on-policy prefix correction for vLLM (see plugin.py)."""\n'}
    for name in SOURCES:
        files[f"{DIST}/{name}"] = Path(__file__).with_name(name).read_bytes()
    files[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: gymtrl-vllm-plugin\nVersion: {version}\n"
                                 "Summary: gymtrl's on-policy prefix correction for vLLM\n").encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: gymtrl\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{info}/entry_points.txt"] = ENTRY_POINTS.encode()
    record = [_record_line(p, d) for p, d in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = Path(out_dir) / f"{DIST}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


def installed_version(python: str) -> str | None:
    proc = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('gymtrl-vllm-plugin'))"],
        capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_installed(python: str) -> bool:
    """Install (or replace) the plugin in the environment of `python`; False if it was current."""
    if not Path(python).exists():
        raise ServerError(f"cannot install gymtrl's vLLM plugin: {python} does not exist",
                          hint="give the Python of the environment vLLM is installed in "
                          "(for a server gymtrl launches: vllm.launch.venv)")
    if installed_version(python) == plugin_version():
        return False
    with tempfile.TemporaryDirectory() as tmp:
        wheel = build_wheel(Path(tmp))
        proc = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                               "--force-reinstall", str(wheel)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ServerError(f"installing gymtrl's vLLM plugin with {python} -m pip failed: "
                          f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    return True
