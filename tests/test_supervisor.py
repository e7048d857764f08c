"""supervision.on_server_exit decides what an exited server means; the policy is checked here with a
stand-in stack (FakeExitingStack: a fake, named as one), and for real in
test_train_runs.py::test_with_restart_on_a_launched_server_exit_the_run_survives_vllm_and_gym_dying."""

import pytest

from gymtrl.errors import ServerError
from gymtrl.servers.supervisor import ServersRestarted, Supervisor


class FakeProcess:
    def __init__(self, name):
        self.name = name
        self.up = True

    def alive(self):
        return self.up


class FakeExitingStack:
    def __init__(self):
        self.vllm, self.judge, self.gym = FakeProcess("vLLM server"), None, FakeProcess("NeMo Gym servers")
        self.processes = [self.vllm, self.gym]

    def exited(self):
        dead = [p for p in self.processes if not p.alive()]
        return ServerError(f"{dead[0].name} exited (code -9)") if dead else None

    def restart_exited(self):
        names = [p.name for p in self.processes if not p.alive()]
        for p in self.processes:
            p.up = True
        return names


def test_stop_raises_the_exit_and_restart_brings_the_server_back_until_the_budget_is_spent():
    stack = FakeExitingStack()
    assert Supervisor(stack, "stop", 3).handle_exits() is False  # all alive: nothing to do
    stack.gym.up = False
    with pytest.raises(ServerError, match="NeMo Gym servers exited"):
        Supervisor(stack, "stop", 3).handle_exits()

    sup = Supervisor(stack, "restart", 2)
    assert sup.handle_exits() is True and stack.gym.alive() and sup.restarts == 1 and sup.generation == 1
    stack.vllm.up = False
    with pytest.raises(ServersRestarted, match="vLLM server"):
        sup.watch()  # inside a batch: the batch is abandoned and redone
    assert sup.restarts == 2
    stack.gym.up = False
    with pytest.raises(ServerError, match=r"after 2 restarts in this run: supervision.max_restarts=2"):
        sup.handle_exits()


def test_a_vllm_exit_stops_the_run_when_the_weights_cannot_be_resynced():
    stack = FakeExitingStack()
    sup = Supervisor(stack, "restart", 3, can_resync_vllm=False)
    stack.gym.up = False
    assert sup.handle_exits() is True  # Gym holds no weights: it may come back
    stack.vllm.up = False
    with pytest.raises(ServerError, match="cannot restart vLLM with the nccl weight sync") as e:
        sup.handle_exits()
    assert "sync.strategy=reload" in e.value.hint
