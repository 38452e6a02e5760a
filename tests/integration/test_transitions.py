"""Status moves against the real database: compare-and-set, audit stamp, event (R-FSM)."""

from __future__ import annotations

import asyncio
import itertools
import uuid

import asyncpg
import pytest

from opsexec.errors import FSMError
from opsexec.fsm import LEGAL_MOVES, ExecutionStatus
from opsexec.store import transaction
from opsexec.store.executions import transition
from tests.conftest import TenantFixture

pytestmark = pytest.mark.postgres
S = ExecutionStatus


async def _execution_in(pool: asyncpg.Pool, tenant: TenantFixture, status: S) -> uuid.UUID:
    execution_id: uuid.UUID = await pool.fetchval(
        """
        INSERT INTO executions (tenant_id, actor_id, idempotency_key, plan_hash, plan_snapshot,
            plan_size_bytes, step_count, target_count, execution_mode, approval_level,
            sla_class, status, started_at)
        VALUES ($1, $2, $3, repeat('0', 64), '{"steps": []}', 2, 1, 0, 'immediate', 0,
            'fast', $4::execution_status,
            CASE WHEN $4::execution_status = 'pending' THEN NULL ELSE now() END)
        RETURNING id
        """,
        tenant.id,
        tenant.admin_id,
        uuid.uuid4().hex,
        status.value,
    )
    return execution_id


async def _events(pool: asyncpg.Pool, execution_id: uuid.UUID) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT event_kind, payload FROM execution_events WHERE execution_id = $1 ORDER BY seq",
        execution_id,
    )


@pytest.mark.parametrize(("current", "target"), list(itertools.product(S, S)))
async def test_all_64_pairs(
    pool: asyncpg.Pool, tenant: TenantFixture, current: S, target: S
) -> None:
    execution_id = await _execution_in(pool, tenant, current)
    before = await pool.fetchrow("SELECT * FROM executions WHERE id = $1", execution_id)
    if target in LEGAL_MOVES[current]:
        async with transaction(pool) as connection:
            row = await transition(
                connection,
                execution_id,
                tenant.id,
                expected=current,
                to=target,
                actor_id=tenant.admin_id,
                reason="test",
            )
        assert row["status"] == target.value
        assert row["last_transition_from"] == current.value
        assert row["last_transition_by"] == tenant.admin_id
        assert row["last_transition_at"] is not None
        events = await _events(pool, execution_id)
        assert [e["event_kind"] for e in events] == ["status_transition"]
        assert events[0]["payload"] == {
            "from": current.value,
            "to": target.value,
            "by": str(tenant.admin_id),
            "reason": "test",
        }
    else:
        with pytest.raises(FSMError):
            async with transaction(pool) as connection:
                await transition(
                    connection,
                    execution_id,
                    tenant.id,
                    expected=current,
                    to=target,
                    actor_id=tenant.admin_id,
                )
        after = await pool.fetchrow("SELECT * FROM executions WHERE id = $1", execution_id)
        assert dict(after) == dict(before)
        assert await _events(pool, execution_id) == []


async def test_concurrent_moves_from_one_status_have_one_winner(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    execution_id = await _execution_in(pool, tenant, S.RUNNING)

    async def move(target: S) -> S | FSMError:
        try:
            async with transaction(pool) as connection:
                await transition(
                    connection,
                    execution_id,
                    tenant.id,
                    expected=S.RUNNING,
                    to=target,
                    actor_id=tenant.admin_id,
                )
            return target
        except FSMError as exc:
            return exc

    outcomes = await asyncio.gather(*(move(t) for t in [S.SUCCEEDED, S.FAILED, S.CANCELLED] * 4))
    winners = [o for o in outcomes if isinstance(o, S)]
    assert len(winners) == 1
    status = await pool.fetchval("SELECT status FROM executions WHERE id = $1", execution_id)
    assert status == winners[0].value
    assert len(await _events(pool, execution_id)) == 1


async def test_terminal_move_stamps_end_and_retires_idempotency_key(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    execution_id = await _execution_in(pool, tenant, S.RUNNING)
    async with transaction(pool) as connection:
        row = await transition(
            connection,
            execution_id,
            tenant.id,
            expected=S.RUNNING,
            to=S.FAILED,
            actor_id=None,
            fields={"error_class": "RuntimeError", "error_message": "password=hunter2 failed"},
        )
    assert row["ended_at"] is not None
    assert row["duration_ms"] >= 0
    assert row["idempotency_active"] is False
    assert "hunter2" not in row["error_message"]


async def test_other_tenant_cannot_move_an_execution(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    execution_id = await _execution_in(pool, tenant, S.RUNNING)
    from opsexec.errors import NotFoundError

    with pytest.raises(NotFoundError):
        async with transaction(pool) as connection:
            await transition(
                connection,
                execution_id,
                uuid.uuid4(),
                expected=S.RUNNING,
                to=S.SUCCEEDED,
                actor_id=None,
            )


async def test_a_transition_and_the_events_that_follow_it_commit_in_order_and_masked(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    execution_id = await _execution_in(pool, tenant, S.RUNNING)
    async with transaction(pool) as connection:
        await transition(
            connection,
            execution_id,
            tenant.id,
            expected=S.RUNNING,
            to=S.FAILED,
            actor_id=None,
            then=[
                ("execution_timed_out", {"timeout_ms": 10}),
                ("execution_failed", {"status": "failed", "password": "hunter2-planted"}),
            ],
        )
    events = await _events(pool, execution_id)
    assert [e["event_kind"] for e in events] == [
        "status_transition",
        "execution_timed_out",
        "execution_failed",
    ]
    assert "hunter2-planted" not in str(events[2]["payload"])
