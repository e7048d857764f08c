"""A reward function (loaded from config by file path) that records which rows each step trained
on, so tests can compare data order across runs. It adds 0 to every reward.

With GYMTRL_TEST_HOLD_AT_STEP=N it also holds the run at a fixed point, so that a test can interrupt
it there and nowhere else: in step N, once the step's rollouts are scored and recorded (checkpoint
N-1 complete, step N's update and checkpoint not begun), it writes `<row log>.held-N` and waits.
A SIGKILL ends it there; a SIGTERM is handed to the run's own handler (gymtrl's graceful stop) and
releases the hold, so the step finishes and the run stops at the end of step N."""

import json
import os
import signal
import time
from pathlib import Path


def record_rows(prompts, row, trainer_state, **kwargs):
    texts = sorted(r["responses_create_params"]["input"][-1]["content"] for r in row)
    step = trainer_state.global_step + 1
    log = os.environ["GYMTRL_TEST_ROW_LOG"]
    with open(log, "a") as f:
        f.write(json.dumps({"step": step, "rows": texts}) + "\n")
    if os.environ.get("GYMTRL_TEST_HOLD_AT_STEP") == str(step):
        hold(Path(f"{log}.held-{step}"))
    return [0.0] * len(prompts)


def hold(marker: Path) -> None:
    """Wait until a SIGTERM arrives (passed on to the handler installed before), or forever."""
    released = []
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        if callable(previous):
            previous(signum, frame)
        released.append(signum)

    signal.signal(signal.SIGTERM, on_sigterm)  # reward functions run in the trainer's main thread
    marker.write_text(str(os.getpid()))
    try:
        while not released:
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, previous)
