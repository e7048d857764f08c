"""What a benchmark table names about where it ran: the GPUs and the package versions."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess


def versions(*distributions: str) -> str:
    """'name version' for each installed distribution, then Python's version."""
    found = []
    for name in distributions:
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(found) + f"; Python {platform.python_version()}"


def gpus() -> str:
    """nvidia-smi's index, name, memory and driver of every GPU, or what the machine is without one."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip().replace("\n", "; ")
    except Exception:
        return f"no GPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
