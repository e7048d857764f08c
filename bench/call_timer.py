"""Wrap a method so that each call's duration is reported: how the GPU benchmarks time TRL's and
gymtrl's phases without changing either (bench/gpu_step_vs_trl.py, bench/device/device_train.sh)."""

from __future__ import annotations

import time
from typing import Callable


def time_calls(owner, attr: str, report: Callable[[float], None]) -> None:
    """Replace `owner.attr` by a wrapper that calls `report(seconds)` after every call, raised or not."""
    original = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            report(time.perf_counter() - t0)

    setattr(owner, attr, wrapper)
