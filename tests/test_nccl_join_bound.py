"""TRL's NCCL join (VLLMClient.init_communicator) waits with no timeout; gymtrl bounds it. NCCL needs
CUDA, so the hang is injected: a fake init_communicator (named as one) that blocks like the real
one did against a vLLM 0.26 that had already served another trainer.

No assertion here depends on how fast the machine is: the timer bound_nccl_join arms is replaced by
a manual one (ManualTimer) that the test fires itself, so "the bound passed" is an event the test
causes, not a wall-clock window. One test keeps the real threading.Timer, with only a generous
"it did not wait forever" ceiling."""

import threading
import types

import pytest
from trl.generation.vllm_client import VLLMClient

from gymtrl.sync import nccl as strategies
from gymtrl.sync.nccl import bound_nccl_join

WAIT_S = 60  # "did not hang": a ceiling for thread hand-offs only, never reached when things work


class ManualTimer:
    """Stands in for threading.Timer inside bound_nccl_join: records how it was armed and cancelled;
    fires only when the test calls fire()."""

    made: list["ManualTimer"] = []

    def __init__(self, interval, function, args=None, kwargs=None):
        self.interval, self.function = interval, function
        self.daemon = False
        self.started = threading.Event()
        self.cancelled = False
        ManualTimer.made.append(self)

    def start(self):
        self.started.set()

    def cancel(self):
        self.cancelled = True

    def fire(self):
        if not self.cancelled:
            self.function()


@pytest.fixture
def manual_timer(monkeypatch):
    ManualTimer.made = []
    # Only strategies' view of `threading` changes: every other module keeps the real one.
    monkeypatch.setattr(strategies, "threading", types.SimpleNamespace(Timer=ManualTimer))
    return ManualTimer


def test_a_join_that_never_completes_gives_up_when_the_bound_passes(monkeypatch, manual_timer):
    entered, released = threading.Event(), threading.Event()

    def fake_hanging_init_communicator(self, device=0):
        entered.set()
        released.wait(WAIT_S)

    monkeypatch.setattr(VLLMClient, "init_communicator", fake_hanging_init_communicator)
    gave_up = threading.Event()
    bound_nccl_join(0.5, gave_up.set)
    client = object.__new__(VLLMClient)  # no server: only the method's wrapper runs
    joining = threading.Thread(target=client.init_communicator, daemon=True)
    joining.start()
    assert entered.wait(WAIT_S)  # the join is under way, and blocked
    [timer] = manual_timer.made
    assert timer.started.is_set() and timer.interval == 0.5 and timer.daemon  # armed with the bound, before the wait
    assert not gave_up.is_set()  # nothing happens before the bound passes
    timer.fire()  # the bound passes while the join is still blocked
    assert gave_up.is_set()
    assert joining.is_alive()  # still stuck: only the timer can act, which is why give_up exits the process
    released.set()
    joining.join(WAIT_S)
    assert not joining.is_alive() and timer.cancelled  # a join that returns disarms its timer


def test_a_join_that_completes_in_time_is_left_alone(monkeypatch, manual_timer):
    def fake_quick_init_communicator(self, device=0):
        return "joined"

    monkeypatch.setattr(VLLMClient, "init_communicator", fake_quick_init_communicator)
    gave_up = threading.Event()
    bound_nccl_join(0.3, gave_up.set)
    bound_nccl_join(0.3, gave_up.set)  # wrapping twice does not nest
    assert object.__new__(VLLMClient).init_communicator() == "joined"
    [timer] = manual_timer.made  # one timer: the second wrap did not nest
    assert timer.started.is_set() and timer.cancelled  # armed, then disarmed when the join returned
    timer.fire()  # a bound that passes after the join returned does nothing
    assert not gave_up.is_set()


def test_the_real_timer_fires_on_a_hung_join(monkeypatch):
    """With threading.Timer itself: give_up runs while the join still hangs. Only a ceiling, no window:
    how late a timer thread runs on a loaded machine is not what this checks."""
    released = threading.Event()

    def fake_hanging_init_communicator(self, device=0):
        released.wait(WAIT_S)

    monkeypatch.setattr(VLLMClient, "init_communicator", fake_hanging_init_communicator)
    gave_up = threading.Event()
    bound_nccl_join(0.2, gave_up.set)
    joining = threading.Thread(target=object.__new__(VLLMClient).init_communicator, daemon=True)
    joining.start()
    assert gave_up.wait(WAIT_S)
    assert joining.is_alive()
    released.set()
