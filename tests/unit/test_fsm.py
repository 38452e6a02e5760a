"""The lifecycle table itself (R-FSM), without a database."""

from __future__ import annotations

import itertools

import pytest

from opsexec.errors import FSMError
from opsexec.fsm import ACTIVE, TERMINAL, ExecutionStatus, check_move, is_legal

S = ExecutionStatus

EXPECTED_LEGAL = {
    (S.PENDING, S.AWAITING_APPROVAL),
    (S.PENDING, S.APPROVED),
    (S.PENDING, S.RUNNING),
    (S.PENDING, S.CANCELLED),
    (S.AWAITING_APPROVAL, S.APPROVED),
    (S.AWAITING_APPROVAL, S.REJECTED),
    (S.AWAITING_APPROVAL, S.CANCELLED),
    (S.APPROVED, S.RUNNING),
    (S.APPROVED, S.CANCELLED),
    (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.CANCELLED),
    (S.RUNNING, S.AWAITING_APPROVAL),
}


@pytest.mark.parametrize(("current", "target"), list(itertools.product(S, S)))
def test_every_pair(current: ExecutionStatus, target: ExecutionStatus) -> None:
    legal = (current, target) in EXPECTED_LEGAL
    assert is_legal(current, target) is legal
    if legal:
        check_move(current, target)
    else:
        with pytest.raises(FSMError) as info:
            check_move(current, target)
        assert info.value.status == 409
        assert info.value.extra == {"from": current.value, "to": target.value}


def test_terminal_and_active_partition_the_statuses() -> None:
    assert {S.SUCCEEDED, S.FAILED, S.CANCELLED, S.REJECTED} == TERMINAL
    assert set(S) == TERMINAL | ACTIVE
    assert not TERMINAL & ACTIVE
