"""TRL's NCCL join (VLLMClient.init_communicator) waits with no timeout; gymtrl bounds it. NCCL needs
CUDA, so the hang is injected: a fake init_communicator (named as one) that blocks like the real
one did against a vLLM 0.26 that had already served another trainer."""

import threading
import time

from trl.generation.vllm_client import VLLMClient

from gymtrl.sync.strategies import bound_nccl_join


def test_a_join_that_never_completes_gives_up_after_the_bound(monkeypatch):
    released = threading.Event()

    def fake_hanging_init_communicator(self, device=0):
        released.wait(30)

    monkeypatch.setattr(VLLMClient, "init_communicator", fake_hanging_init_communicator)
    gave_up = threading.Event()
    bound_nccl_join(0.5, gave_up.set)
    client = object.__new__(VLLMClient)  # no server: only the method's wrapper runs
    joining = threading.Thread(target=client.init_communicator, daemon=True)
    t0 = time.monotonic()
    joining.start()
    assert gave_up.wait(5) and 0.4 < time.monotonic() - t0 < 3
    assert joining.is_alive()  # still stuck: only the timer can act, which is why give_up exits the process
    released.set()


def test_a_join_that_completes_in_time_is_left_alone(monkeypatch):
    def fake_quick_init_communicator(self, device=0):
        return "joined"

    monkeypatch.setattr(VLLMClient, "init_communicator", fake_quick_init_communicator)
    gave_up = threading.Event()
    bound_nccl_join(0.3, gave_up.set)
    bound_nccl_join(0.3, gave_up.set)  # wrapping twice does not nest
    assert object.__new__(VLLMClient).init_communicator() == "joined"
    assert not gave_up.wait(0.6)
