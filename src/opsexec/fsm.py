"""The execution lifecycle (R-FSM): which status moves are legal. Pure, no I/O.

The store performs moves as compare-and-set (``store/executions.py``); this module only
answers whether a move may happen at all.
"""

from __future__ import annotations

from enum import StrEnum

from opsexec.errors import FSMError


class ExecutionStatus(StrEnum):
    PENDING = "pending"
    AWAITING_APPROVAL = "awaiting_approval"
    APPROVED = "approved"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


S = ExecutionStatus

LEGAL_MOVES: dict[ExecutionStatus, frozenset[ExecutionStatus]] = {
    S.PENDING: frozenset({S.AWAITING_APPROVAL, S.APPROVED, S.RUNNING, S.CANCELLED}),
    S.AWAITING_APPROVAL: frozenset({S.APPROVED, S.REJECTED, S.CANCELLED}),
    S.APPROVED: frozenset({S.RUNNING, S.CANCELLED}),
    # running → awaiting_approval parks an execution at a level-3 step gate.
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.AWAITING_APPROVAL}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
    S.REJECTED: frozenset(),
}

TERMINAL: frozenset[ExecutionStatus] = frozenset(s for s, nxt in LEGAL_MOVES.items() if not nxt)
ACTIVE: frozenset[ExecutionStatus] = frozenset(ExecutionStatus) - TERMINAL


def is_legal(current: ExecutionStatus, target: ExecutionStatus) -> bool:
    return target in LEGAL_MOVES[current]


def check_move(current: ExecutionStatus | str, target: ExecutionStatus | str) -> None:
    """Raise ``FSMError`` unless ``current → target`` is a legal move."""
    current, target = ExecutionStatus(current), ExecutionStatus(target)
    if not is_legal(current, target):
        raise FSMError(
            f"an execution cannot move from {current} to {target}",
            extra={"from": current.value, "to": target.value},
        )
