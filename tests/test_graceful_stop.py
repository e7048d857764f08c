"""How a run is asked to stop with a checkpoint: a signal, a repeated signal, a stop file."""

import os
import signal
import time
from types import SimpleNamespace

import pytest

from gymtrl.checkpoints import GracefulStop

ARGS = SimpleNamespace(device="cpu")


def step_end(stopper):
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    return stopper.on_step_end(ARGS, None, control)


@pytest.fixture
def stopper(tmp_path):
    s = GracefulStop(tmp_path / "STOP")
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    s.install()
    s.on_train_begin(ARGS, None, None)
    yield s
    for sig, handler in old.items():
        signal.signal(sig, handler)


def test_nothing_asked_training_goes_on(stopper):
    control = step_end(stopper)
    assert not control.should_save and not control.should_training_stop and not stopper.stopped


def test_a_signal_stops_at_the_step_end_with_a_checkpoint(stopper):
    os.kill(os.getpid(), signal.SIGTERM)
    control = step_end(stopper)
    assert control.should_save and control.should_training_stop
    assert stopper.reason == "SIGTERM"


def test_the_same_signal_delivered_twice_at_once_is_one_request(stopper):
    # Slurm signals every process of the step and torchrun passes the signal on to its workers.
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    assert step_end(stopper).should_save


def test_a_second_signal_later_stops_at_once(stopper):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(GracefulStop.DUPLICATE_SIGNAL_S + 0.1)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


def test_a_signal_before_training_stops_at_once(tmp_path):
    s = GracefulStop(tmp_path / "STOP")
    with pytest.raises(KeyboardInterrupt):
        s._handle(signal.SIGTERM, None)


def test_a_stop_file_stops_at_the_step_end_and_names_itself(stopper, tmp_path):
    assert not step_end(stopper).should_save
    (tmp_path / "STOP").touch()
    control = step_end(stopper)
    assert control.should_save and control.should_training_stop
    assert stopper.reason == f"stop file {tmp_path / 'STOP'}"


def test_a_stop_file_left_by_an_earlier_run_is_cleared_at_start(tmp_path):
    (tmp_path / "STOP").touch()
    s = GracefulStop(tmp_path / "STOP")
    s.clear_stop_file()
    assert not (tmp_path / "STOP").exists()
    assert not step_end(s).should_save
