"""Enough file descriptors for the rollouts a run keeps in flight.

Every rollout in flight holds a socket in the trainer, and NeMo Gym's agent holds one towards the
trainer and one towards each server it calls. Many clusters start jobs with a soft limit of 1,024
open files, so a run with rollout.max_concurrency in the thousands would fail mid-batch with
"Too many open files". The soft limit may be raised up to the hard one without privileges; servers
gymtrl launches inherit it.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

# Files a process needs besides rollout sockets: libraries, logs, tokenizer, checkpoints, NCCL.
BASE_OPEN_FILES = 1024
# Sockets per rollout in the busiest process (a NeMo Gym agent: caller, model server, resources server).
SOCKETS_PER_ROLLOUT = 3


def ensure_open_files(max_concurrency: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards what `max_concurrency` needs; warn if the hard limit is lower.
    Returns the soft limit now in force."""
    need = BASE_OPEN_FILES + SOCKETS_PER_ROLLOUT * max_concurrency
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return soft
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("raised the open-file limit from %d to %d for rollout.max_concurrency=%d", soft, target, max_concurrency)
    if target < need:
        log.warning("rollout.max_concurrency=%d may need %d open files, but the hard limit is %d: rollouts may fail "
                    "with 'Too many open files'. Raise it (ulimit -Hn, or the cluster's limits) or lower "
                    "rollout.max_concurrency", max_concurrency, need, hard)
    return target
