"""The failure ledger: counts by environment and kind, and the bound that stops a run."""

import pytest

from gymtrl.errors import RolloutFailureBoundError
from gymtrl.failures import FailureBound, FailureKind, FailureLedger


def test_counts_by_env_and_kind():
    ledger = FailureLedger(FailureBound(max_rate=1.0, window=10, min_rollouts=1))
    ledger.record_ok("a")
    ledger.record_failure("a", FailureKind.TIMEOUT)
    ledger.record_failure("b", FailureKind.HTTP_ERROR)
    ledger.record_failure("b", FailureKind.HTTP_ERROR)
    snap = ledger.snapshot()
    assert snap["failures/a/timeout"] == 1
    assert snap["failures/b/http_error"] == 2
    assert snap["failures/http_error"] == 2
    assert snap["failures/total"] == 3
    assert snap["rollouts/total"] == 4


def test_bound_names_the_environment_and_the_kind():
    ledger = FailureLedger(FailureBound(max_rate=0.5, window=4, min_rollouts=4))
    for _ in range(4):
        ledger.record_ok("healthy")
    ledger.record_ok("sick")
    for _ in range(3):
        ledger.record_failure("sick", FailureKind.CONNECTION_ERROR, "ConnectError: refused")
    with pytest.raises(RolloutFailureBoundError) as e:
        ledger.check_bound()
    msg = str(e.value)
    assert "'sick'" in msg and "75%" in msg and "connection_error=3" in msg and "refused" in msg


def test_no_verdict_before_min_rollouts_and_window_forgets():
    ledger = FailureLedger(FailureBound(max_rate=0.5, window=4, min_rollouts=3))
    ledger.record_failure("e", FailureKind.TIMEOUT)
    ledger.record_failure("e", FailureKind.TIMEOUT)
    ledger.check_bound()  # 2 < min_rollouts: no verdict yet
    for _ in range(4):
        ledger.record_ok("e")
    ledger.check_bound()  # the failures left the window
    assert ledger.window_rate("e") == 0.0
