"""The migrated schema holds exactly what SPEC §1 names, read back from the catalogs."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from opsexec.store import connect, migrate
from opsexec.store.database import schema_revision
from tests.conftest import TenantFixture, with_database

pytestmark = pytest.mark.postgres

ENUMS = {
    "execution_status": [
        "pending",
        "awaiting_approval",
        "approved",
        "running",
        "succeeded",
        "failed",
        "cancelled",
        "rejected",
    ],
    "execution_mode": ["immediate", "background"],
    "sla_class": ["fast", "medium", "long"],
    "approval_state": ["pending", "approved", "rejected", "expired"],
}

COLUMNS = {
    "executions": """id tenant_id actor_id request_id idempotency_key plan_hash plan_snapshot
        plan_size_bytes step_count target_count execution_mode approval_level sla_class status
        created_at started_at ended_at duration_ms queue_wait_ms cancelled_by cancelled_at
        cancellation_reason timeout_ms timed_out result_summary error_class error_message
        retries_total ws_events_emitted worker_id lease_renewals cancel_checks_performed
        last_transition_at last_transition_by last_transition_from timeout_policy_id metadata
        idempotency_active""",
    "execution_steps": """id execution_id step_number action target_type target_ref status
        attempt max_retries started_at ended_at duration_ms timeout_ms timed_out output_ref
        output_summary output_size_bytes error_class error_message metadata""",
    "approvals": """id execution_id approval_level required_role plan_hash plan_snapshot_hash
        approver_id approver_principal auth_method source_ip state decided_at reason
        runbook_url created_at expires_at auto_approved auto_approval_policy metadata
        step_number""",
    "execution_events": "id execution_id step_id timestamp event_kind payload metadata seq",
    "execution_queue": """id execution_id priority status leased_by leased_at
        lease_expires_at lease_count queued_at started_at completed_at attempt max_attempts
        last_error metadata available_at""",
    "execution_dlq": """id execution_id original_queue_id failed_at attempt_count last_error
        plan_snapshot execution_context metadata""",
    "execution_locks": "id lock_key execution_id owner_tag acquired_at expires_at metadata",
    "timeout_policies": """id sla_class action_class execution_timeout_ms step_timeout_ms
        lease_timeout_ms max_lease_renewals description created_at""",
    "tenants": "id name settings",
    "users": "id tenant_id principal roles disabled",
    "api_keys": "id tenant_id user_id key_hash revoked_at",
    "assets": """id tenant_id name address transport port environment tags credential_ref""",
    "credentials": "id tenant_id name kind username nonce ciphertext",
    "artifacts": "id execution_id step_id content_type size_bytes content",
}

TIMESTAMP_COLUMNS = {
    "executions": """created_at started_at ended_at cancelled_at last_transition_at""",
    "approvals": "decided_at created_at expires_at",
    "execution_queue": "leased_at lease_expires_at queued_at started_at completed_at",
    "execution_locks": "acquired_at expires_at",
}

CONSTRAINTS = {
    "executions": """valid_timing valid_duration valid_queue_wait valid_timeout
        valid_cancellation valid_result_size""",
    "approvals": """valid_approval_timing runbook_required_for_high_level
        approver_required_for_decision""",
}

INDEXES = {
    "executions": """ux_exec_tenant_idem ix_exec_tenant_status_created ix_exec_request
        ix_exec_actor ix_exec_cancelled ix_exec_timeout ix_exec_sla_duration""",
    "execution_steps": """ix_steps_execution ix_steps_execution_status ix_steps_action_status
        ix_steps_target_action ix_steps_timed_out""",
    "execution_queue": "ix_queue_ready ix_queue_lease_expiry ix_queue_execution ix_queue_leased_by",
    "execution_locks": "ix_locks_expires",
}

PARTIAL_INDEXES = {
    "ux_exec_tenant_idem",
    "ix_exec_cancelled",
    "ix_exec_timeout",
    "ix_exec_sla_duration",
    "ix_steps_target_action",
    "ix_steps_timed_out",
    "ix_queue_ready",
    "ix_queue_lease_expiry",
}

POLICIES = {
    "fast_read": ("fast", "read", 10_000, 5_000, 15_000),
    "medium_read": ("medium", "read", 30_000, 15_000, 45_000),
    "medium_modify": ("medium", "modify", 30_000, 20_000, 60_000),
    "long_read": ("long", "read", 600_000, 60_000, 180_000),
    "long_modify": ("long", "modify", 600_000, 120_000, 360_000),
    "long_deploy": ("long", "deploy", 600_000, 180_000, 540_000),
}


async def test_enums_have_exact_labels_in_order(pool: asyncpg.Pool) -> None:
    rows = await pool.fetch(
        """
        SELECT t.typname, array_agg(e.enumlabel ORDER BY e.enumsortorder) AS labels
        FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
        GROUP BY t.typname
        """
    )
    found = {r["typname"]: list(r["labels"]) for r in rows}
    assert found == ENUMS


@pytest.mark.parametrize("table", sorted(COLUMNS))
async def test_table_has_every_column(pool: asyncpg.Pool, table: str) -> None:
    rows = await pool.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_name = $1", table
    )
    present = {r["column_name"] for r in rows}
    assert set(COLUMNS[table].split()) <= present


async def test_times_are_timestamptz(pool: asyncpg.Pool) -> None:
    for table, names in TIMESTAMP_COLUMNS.items():
        for column in names.split():
            data_type = await pool.fetchval(
                """SELECT data_type FROM information_schema.columns
                   WHERE table_name = $1 AND column_name = $2""",
                table,
                column,
            )
            assert data_type == "timestamp with time zone", (table, column)


async def test_enum_columns_use_enum_types(pool: asyncpg.Pool) -> None:
    rows = await pool.fetch(
        """SELECT table_name, column_name, udt_name FROM information_schema.columns
           WHERE udt_name IN ('execution_status', 'execution_mode', 'sla_class',
                              'approval_state')"""
    )
    found = {(r["table_name"], r["column_name"]): r["udt_name"] for r in rows}
    assert found[("executions", "status")] == "execution_status"
    assert found[("executions", "execution_mode")] == "execution_mode"
    assert found[("executions", "sla_class")] == "sla_class"
    assert found[("executions", "last_transition_from")] == "execution_status"
    assert found[("execution_steps", "status")] == "execution_status"
    assert found[("approvals", "state")] == "approval_state"
    assert found[("timeout_policies", "sla_class")] == "sla_class"


@pytest.mark.parametrize("table", sorted(CONSTRAINTS))
async def test_named_check_constraints(pool: asyncpg.Pool, table: str) -> None:
    rows = await pool.fetch(
        """SELECT conname FROM pg_constraint
           WHERE conrelid = $1::regclass AND contype = 'c'""",
        table,
    )
    assert set(CONSTRAINTS[table].split()) <= {r["conname"] for r in rows}


@pytest.mark.parametrize("table", sorted(INDEXES))
async def test_named_indexes(pool: asyncpg.Pool, table: str) -> None:
    rows = await pool.fetch(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = $1", table
    )
    definitions = {r["indexname"]: r["indexdef"] for r in rows}
    for name in INDEXES[table].split():
        assert name in definitions, name
        assert (" WHERE " in definitions[name]) == (name in PARTIAL_INDEXES), name


async def test_idempotency_index_is_unique_over_tenant_and_key(pool: asyncpg.Pool) -> None:
    definition = await pool.fetchval(
        "SELECT indexdef FROM pg_indexes WHERE indexname = 'ux_exec_tenant_idem'"
    )
    assert definition.startswith("CREATE UNIQUE INDEX")
    assert "(tenant_id, idempotency_key)" in definition


async def test_lock_key_is_unique_and_steps_unique_per_execution(pool: asyncpg.Pool) -> None:
    rows = await pool.fetch(
        """SELECT conrelid::regclass::text AS tbl, pg_get_constraintdef(oid) AS def
           FROM pg_constraint WHERE contype = 'u'"""
    )
    uniques = {(r["tbl"], r["def"]) for r in rows}
    assert ("execution_locks", "UNIQUE (lock_key)") in uniques
    assert ("execution_steps", "UNIQUE (execution_id, step_number)") in uniques
    assert ("timeout_policies", "UNIQUE (sla_class, action_class)") in uniques


async def test_timeout_policy_rows(pool: asyncpg.Pool) -> None:
    rows = await pool.fetch(
        """SELECT id, sla_class::text, action_class, execution_timeout_ms, step_timeout_ms,
                  lease_timeout_ms, max_lease_renewals FROM timeout_policies"""
    )
    found = {r["id"]: tuple(r.values())[1:6] for r in rows}
    assert found == POLICIES
    assert {r["max_lease_renewals"] for r in rows} == {3}


@pytest.fixture
async def scratch_dsn(server_dsn: str) -> AsyncIterator[str]:
    name = f"opsexec_scratch_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(server_dsn, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_downgrade_to_base_then_upgrade_again(scratch_dsn: str) -> None:
    await migrate.upgrade(scratch_dsn)
    await migrate.downgrade(scratch_dsn, "base")
    connection = await connect(scratch_dsn)
    try:
        leftovers = await connection.fetchval(
            """SELECT count(*) FROM pg_tables WHERE schemaname = 'public'
               AND tablename <> 'alembic_version'"""
        )
        types = await connection.fetchval(
            "SELECT count(*) FROM pg_type WHERE typname = 'execution_status'"
        )
        assert (leftovers, types) == (0, 0)
        await migrate.upgrade(scratch_dsn)
        assert await schema_revision(connection) == migrate.head_revision()
    finally:
        await connection.close()


async def test_concurrent_migrate_processes_do_not_collide(scratch_dsn: str) -> None:
    env = {**os.environ, "OPSEXEC_DATABASE_URL": scratch_dsn}
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "opsexec",
            "migrate",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        for _ in range(3)
    ]
    outputs = await asyncio.gather(*(p.communicate() for p in processes))
    assert [p.returncode for p in processes] == [0, 0, 0], outputs
    connection = await connect(scratch_dsn)
    try:
        assert await schema_revision(connection) == migrate.head_revision()
        assert await connection.fetchval("SELECT count(*) FROM timeout_policies") == 6
    finally:
        await connection.close()


# --- every CHECK refuses a violating row -------------------------------------------


async def _insert_execution(
    connection: asyncpg.Connection, tenant: TenantFixture, **overrides: Any
) -> uuid.UUID:
    values: dict[str, Any] = {
        "tenant_id": tenant.id,
        "actor_id": tenant.admin_id,
        "idempotency_key": uuid.uuid4().hex,
        "plan_hash": "0" * 64,
        "plan_snapshot": {"steps": []},
        "plan_size_bytes": 10,
        "step_count": 1,
        "target_count": 0,
        "execution_mode": "immediate",
        "approval_level": 0,
        "sla_class": "fast",
    }
    values.update(overrides)
    names = list(values)
    placeholders = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    execution_id: uuid.UUID = await connection.fetchval(
        f"INSERT INTO executions ({', '.join(names)}) VALUES ({placeholders}) RETURNING id",
        *values.values(),
    )
    return execution_id


async def _refused(pool: asyncpg.Pool, constraint: str, coroutine_factory: Any) -> None:
    async with pool.acquire() as connection:
        with pytest.raises(asyncpg.CheckViolationError) as info:
            async with connection.transaction():
                await coroutine_factory(connection)
    assert info.value.constraint_name == constraint


async def test_valid_row_is_accepted(pool: asyncpg.Pool, tenant: TenantFixture) -> None:
    async with pool.acquire() as connection:
        assert await _insert_execution(connection, tenant)


async def test_half_set_cancellation_is_refused(pool: asyncpg.Pool, tenant: TenantFixture) -> None:
    await _refused(
        pool,
        "valid_cancellation",
        lambda c: _insert_execution(c, tenant, cancelled_by=tenant.admin_id),
    )


async def test_oversized_result_summary_is_refused(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    # Random text does not compress, so its stored size really exceeds 10 KiB.
    big = {"answer": secrets.token_hex(8 * 1024)}
    await _refused(
        pool, "valid_result_size", lambda c: _insert_execution(c, tenant, result_summary=big)
    )


async def test_ended_before_started_is_refused(pool: asyncpg.Pool, tenant: TenantFixture) -> None:
    async def insert(connection: asyncpg.Connection) -> None:
        await _insert_execution(
            connection,
            tenant,
            started_at=await connection.fetchval("SELECT now() + interval '1 minute'"),
            ended_at=await connection.fetchval("SELECT now() + interval '30 seconds'"),
        )

    await _refused(pool, "valid_timing", insert)


async def test_zero_timeout_is_refused(pool: asyncpg.Pool, tenant: TenantFixture) -> None:
    await _refused(pool, "valid_timeout", lambda c: _insert_execution(c, tenant, timeout_ms=0))


async def test_negative_queue_wait_is_refused(pool: asyncpg.Pool, tenant: TenantFixture) -> None:
    await _refused(
        pool, "valid_queue_wait", lambda c: _insert_execution(c, tenant, queue_wait_ms=-1)
    )


async def test_step_attempt_above_retries_is_refused(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    async def insert(connection: asyncpg.Connection) -> None:
        execution_id = await _insert_execution(connection, tenant)
        await connection.execute(
            """INSERT INTO execution_steps
                   (execution_id, step_number, step_key, action, attempt, max_retries)
               VALUES ($1, 1, 's', 'shell.run', 5, 3)""",
            execution_id,
        )

    await _refused(pool, "valid_attempt", insert)


async def _insert_approval(
    connection: asyncpg.Connection, tenant: TenantFixture, **overrides: Any
) -> None:
    execution_id = await _insert_execution(connection, tenant)
    values: dict[str, Any] = {
        "execution_id": execution_id,
        "approval_level": 1,
        "plan_hash": "0" * 64,
        "plan_snapshot_hash": "0" * 64,
    }
    values.update(overrides)
    names = list(values)
    placeholders = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    await connection.execute(
        f"INSERT INTO approvals ({', '.join(names)}) VALUES ({placeholders})", *values.values()
    )


async def test_level_two_approval_without_runbook_is_refused(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    await _refused(
        pool,
        "runbook_required_for_high_level",
        lambda c: _insert_approval(c, tenant, approval_level=2),
    )


async def test_decided_approval_without_approver_is_refused(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    await _refused(
        pool,
        "approver_required_for_decision",
        lambda c: _insert_approval(c, tenant, state="approved"),
    )


async def test_lease_shorter_than_step_timeout_is_refused(pool: asyncpg.Pool) -> None:
    async def insert(connection: asyncpg.Connection) -> None:
        await connection.execute(
            """INSERT INTO timeout_policies (id, sla_class, action_class,
                   execution_timeout_ms, step_timeout_ms, lease_timeout_ms)
               VALUES ('bad', 'fast', 'deploy', 1000, 1000, 10)"""
        )

    await _refused(pool, "valid_lease_timeout", insert)
