"""Per-asset mutual exclusion against the real database (R-MUTEX).

What a user would notice: two changes never run on one asset at once, a refused execution
names who is in the way, nothing stays locked after an execution ends however it ends,
and a crashed execution's locks free themselves.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from typing import Any

import asyncpg
import pytest

from opsexec.actions.registry import ActionClass
from opsexec.errors import NotFoundError, ResourceBusyError
from opsexec.safety.masking import mask_value, registered_secrets
from opsexec.safety.mutex import (
    AcquiredLocks,
    LockTarget,
    acquire_execution_locks,
    execution_locks,
    keys_for_steps,
    list_execution_locks,
    lock_holder,
    lock_key,
    reap_expired_locks,
    release_execution_locks,
    renew_execution_locks,
)
from opsexec.store import events as event_store
from opsexec.store import locks as lock_store
from opsexec.store import transaction
from opsexec.store.identity import ensure_tenant
from tests.conftest import TenantFixture

pytestmark = pytest.mark.postgres


async def _execution(pool: asyncpg.Pool, tenant: TenantFixture) -> uuid.UUID:
    """A running execution row of ``tenant`` (locks reference executions)."""
    execution_id: uuid.UUID = await pool.fetchval(
        """
        INSERT INTO executions (tenant_id, actor_id, idempotency_key, plan_hash, plan_snapshot,
            plan_size_bytes, step_count, target_count, execution_mode, approval_level,
            sla_class, status, started_at)
        VALUES ($1, $2, $3, repeat('0', 64), '{"steps": []}', 2, 1, 0, 'immediate', 0,
            'fast', 'running', now())
        RETURNING id
        """,
        tenant.id,
        tenant.admin_id,
        uuid.uuid4().hex,
    )
    return execution_id


async def _events(
    pool: asyncpg.Pool, execution_id: uuid.UUID, kind: str | None = None
) -> list[asyncpg.Record]:
    return await pool.fetch(
        """
        SELECT event_kind, payload FROM execution_events
        WHERE execution_id = $1 AND ($2::text IS NULL OR event_kind = $2)
        ORDER BY seq
        """,
        execution_id,
        kind,
    )


async def _rows(pool: asyncpg.Pool, keys: list[str]) -> dict[str, uuid.UUID]:
    records = await pool.fetch(
        "SELECT lock_key, execution_id FROM execution_locks WHERE lock_key = ANY($1)", keys
    )
    return {r["lock_key"]: r["execution_id"] for r in records}


def _keys(tenant: TenantFixture, *targets: str) -> list[str]:
    return [lock_key(tenant.id, target) for target in targets]


async def _acquire(
    pool: asyncpg.Pool,
    tenant: TenantFixture,
    execution_id: uuid.UUID,
    keys: list[str],
    ttl_s: float = 60,
    **kwargs: Any,
) -> AcquiredLocks:
    return await acquire_execution_locks(
        pool, tenant_id=tenant.id, execution_id=execution_id, keys=keys, ttl_s=ttl_s, **kwargs
    )


async def _release(pool: asyncpg.Pool, tenant: TenantFixture, execution_id: uuid.UUID) -> None:
    await release_execution_locks(pool, tenant_id=tenant.id, execution_id=execution_id)


# --- keys -------------------------------------------------------------------------------


def test_key_format() -> None:
    tenant_id = uuid.UUID("0b7c6a52-1f3e-4d5a-9c2b-8e7f6a5d4c3b")
    assert lock_key(tenant_id, "web-01") == f"lock:v1:{tenant_id}:web-01:asset"
    assert lock_key(str(tenant_id).upper(), "web-01", "service:nginx") == (
        f"lock:v1:{tenant_id}:web-01:service:nginx"
    )


def test_a_target_with_colons_cannot_forge_another_key() -> None:
    tenant_id = uuid.uuid4()
    forged = lock_key(tenant_id, "web-01:asset", "asset")
    assert forged == f"lock:v1:{tenant_id}:web-01%3Aasset:asset"
    assert forged != lock_key(tenant_id, "web-01", "asset:asset")
    # The escape character is escaped too, so a literal "%3A" is not a colon.
    assert lock_key(tenant_id, "a%3Ab") != lock_key(tenant_id, "a:b")
    assert lock_key(tenant_id, "a%3Ab") == f"lock:v1:{tenant_id}:a%253Ab:asset"
    # Another tenant's id inside a target stays inside the target field.
    other = uuid.uuid4()
    assert not lock_key(tenant_id, f"{other}:web").startswith(f"lock:v1:{other}:")


def test_a_very_long_escaped_target_still_fits_the_column() -> None:
    tenant_id = uuid.uuid4()
    colons, percents = ":" * 255, "%" * 255
    assert len(lock_key(tenant_id, colons)) <= 500
    assert lock_key(tenant_id, colons) == lock_key(tenant_id, colons)
    assert lock_key(tenant_id, colons) != lock_key(tenant_id, percents)
    assert len(lock_key(tenant_id, "w" * 255)) <= 500


@pytest.mark.parametrize(
    ("tenant_id", "target", "scope"),
    [
        ("not-a-uuid", "web-01", "asset"),
        (uuid.uuid4(), "", "asset"),
        (uuid.uuid4(), "web\n01", "asset"),
        (uuid.uuid4(), "web-01", ""),
        (uuid.uuid4(), "x" * 256, "asset"),
    ],
)
def test_bad_key_parts_are_refused(tenant_id: Any, target: str, scope: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        lock_key(tenant_id, target, scope)


def test_a_secret_shaped_target_gets_a_digest_key() -> None:
    """The masker would redact part of such a key in events; a digest is exact instead."""
    tenant_id = uuid.uuid4()
    key = lock_key(tenant_id, "password")
    assert key.startswith(f"lock:v1:{tenant_id}:%sha256-")
    assert key.endswith(":asset")
    assert mask_value(key) == key
    assert key != lock_key(tenant_id, "passwords")
    assert lock_key(tenant_id, "web-01") == f"lock:v1:{tenant_id}:web-01:asset"


def test_registered_secrets_never_change_a_key() -> None:
    """One target must map to one key in every process, whatever secrets are registered
    there, or two executions could both lock "the same" asset under different keys."""
    tenant_id = uuid.uuid4()
    plain = lock_key(tenant_id, "db-primary-eu-west-1")
    with registered_secrets("db-primary-eu-west-1"):
        assert lock_key(tenant_id, "db-primary-eu-west-1") == plain


def test_scopes_keep_colons_but_cannot_imitate_a_digest() -> None:
    tenant_id = uuid.uuid4()
    assert lock_key(tenant_id, "web-01", "%sha256-x") == f"lock:v1:{tenant_id}:web-01:%25sha256-x"


def test_keys_for_steps_ignores_read_actions_and_targetless_steps() -> None:
    tenant_id = uuid.uuid4()
    keys = keys_for_steps(
        tenant_id,
        [
            LockTarget("web-02", ActionClass.MODIFY, "asset"),
            ("web-01", "deploy", None),
            ("db-01", ActionClass.READ, None),
            ("web-02", "modify", "asset"),  # duplicate
            (None, "modify", "asset"),  # an inventory-wide step has no target
            ("web-03", "modify", "service:nginx"),
        ],
    )
    assert keys == sorted(
        [
            lock_key(tenant_id, "web-01"),
            lock_key(tenant_id, "web-02"),
            lock_key(tenant_id, "web-03", "service:nginx"),
        ]
    )
    assert keys_for_steps(tenant_id, [("db-01", "read", "asset")]) == []
    with pytest.raises(ValueError, match="unknown action class"):
        keys_for_steps(tenant_id, [("web-01", "destroy", "asset")])


# --- acquire ----------------------------------------------------------------------------


async def test_second_execution_on_one_asset_is_told_who_holds_it(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    first, second = await _execution(pool, tenant), await _execution(pool, tenant)
    keys = _keys(tenant, "web-01")
    acquired = await _acquire(pool, tenant, first, keys)
    assert acquired.keys == tuple(keys)
    assert acquired.owner_tag == str(first)

    with pytest.raises(ResourceBusyError) as caught:
        await _acquire(pool, tenant, second, keys)
    assert caught.value.code == "resource_busy"
    assert caught.value.status == 409
    assert caught.value.extra["holder_execution_id"] == str(first)
    assert caught.value.extra["lock_key"] == keys[0]
    assert str(first) in caught.value.detail
    assert await _rows(pool, keys) == {keys[0]: first}
    assert await _events(pool, second) == []

    await _release(pool, tenant, first)
    await _acquire(pool, tenant, second, keys)
    assert await _rows(pool, keys) == {keys[0]: second}
    await _release(pool, tenant, second)


async def test_all_or_nothing(pool: asyncpg.Pool, tenant: TenantFixture) -> None:
    a, b = await _execution(pool, tenant), await _execution(pool, tenant)
    k1, k2, k3 = _keys(tenant, "host-1", "host-2", "host-3")
    await _acquire(pool, tenant, b, [k2])

    with pytest.raises(ResourceBusyError) as caught:
        await _acquire(pool, tenant, a, [k3, k1, k2])
    assert caught.value.extra["holder_execution_id"] == str(b)
    assert caught.value.extra["lock_key"] == k2
    assert await _rows(pool, [k1, k2, k3]) == {k2: b}
    assert await _events(pool, a) == []

    # k1 and k3 really are free: a third execution takes them at once.
    c = await _execution(pool, tenant)
    await _acquire(pool, tenant, c, [k1, k3])
    assert await _rows(pool, [k1, k2, k3]) == {k1: c, k2: b, k3: c}
    for execution_id in (b, c):
        await _release(pool, tenant, execution_id)


async def test_a_conflict_inside_the_callers_transaction_leaves_it_usable(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    a, b = await _execution(pool, tenant), await _execution(pool, tenant)
    k1, k2 = _keys(tenant, "tx-1", "tx-2")
    await _acquire(pool, tenant, b, [k2])
    async with transaction(pool) as connection:
        with pytest.raises(ResourceBusyError):
            await acquire_execution_locks(
                connection, tenant_id=tenant.id, execution_id=a, keys=[k1, k2], ttl_s=60
            )
        assert (
            await connection.fetchval(
                "SELECT count(*) FROM execution_locks WHERE execution_id = $1", a
            )
            == 0
        )
        await acquire_execution_locks(
            connection, tenant_id=tenant.id, execution_id=a, keys=[k1], ttl_s=60
        )
    assert await _rows(pool, [k1, k2]) == {k1: a, k2: b}
    for execution_id in (a, b):
        await _release(pool, tenant, execution_id)


async def test_reacquiring_is_idempotent_and_renews(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    execution_id = await _execution(pool, tenant)
    k1, k2 = _keys(tenant, "idem-1", "idem-2")
    first = await _acquire(pool, tenant, execution_id, [k1], ttl_s=5)
    before = await lock_holder(pool, k1)
    again = await _acquire(pool, tenant, execution_id, [k2, k1, k1], ttl_s=600)
    after = await lock_holder(pool, k1)
    assert before is not None
    assert after is not None
    assert again.keys == (k1, k2)
    assert again.renewed == (k1,)
    assert again.taken_over == ()
    assert after.acquired_at == before.acquired_at
    assert first.expires_at is not None
    assert again.expires_at is not None
    assert after.expires_at > before.expires_at
    assert await _rows(pool, [k1, k2]) == {k1: execution_id, k2: execution_id}
    await _release(pool, tenant, execution_id)


async def test_a_different_owner_tag_of_the_same_execution_is_not_the_owner(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    execution_id = await _execution(pool, tenant)
    keys = _keys(tenant, "tagged")
    await _acquire(pool, tenant, execution_id, keys, owner_tag="worker-a")
    with pytest.raises(ResourceBusyError):
        await _acquire(pool, tenant, execution_id, keys, owner_tag="worker-b")
    released = await release_execution_locks(
        pool, tenant_id=tenant.id, execution_id=execution_id, owner_tag="worker-a"
    )
    assert released == tuple(keys)


async def test_events_are_written_with_the_rows(pool: asyncpg.Pool, tenant: TenantFixture) -> None:
    execution_id = await _execution(pool, tenant)
    keys = sorted(_keys(tenant, "ev-2", "ev-1"))
    await _acquire(pool, tenant, execution_id, keys, ttl_s=30)
    await _release(pool, tenant, execution_id)
    await _release(pool, tenant, execution_id)  # twice: a no-op, no second event
    events = await _events(pool, execution_id)
    assert [e["event_kind"] for e in events] == ["lock_acquired", "lock_released"]
    acquired, released = events[0]["payload"], events[1]["payload"]
    assert acquired["keys"] == keys
    assert acquired["owner_tag"] == str(execution_id)
    assert acquired["ttl_s"] == 30
    assert released["keys"] == keys


async def test_a_key_that_is_not_storable_is_refused(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    execution_id = await _execution(pool, tenant)
    raw = f"lock:v1:{tenant.id}:password:asset"  # not built by lock_key(): masked in events
    with pytest.raises(ValueError, match="lock_key"):
        await _acquire(pool, tenant, execution_id, [raw])


def test_lock_statements_take_the_event_log_lock_the_event_log_takes() -> None:
    """The one-statement acquire and release write their event themselves; they must
    serialise with ``append_event`` on the same per-execution advisory lock."""
    event_lock = "pg_advisory_xact_lock(hashtextextended($1::uuid::text, 0))"
    assert event_lock in event_store.APPEND_EVENT
    assert event_lock in lock_store.FAST_ACQUIRE_LOCKS
    assert event_lock in lock_store.RELEASE_OWNED_LOCKS


async def test_nothing_to_lock_touches_nothing(pool: asyncpg.Pool, tenant: TenantFixture) -> None:
    execution_id = await _execution(pool, tenant)
    acquired = await _acquire(pool, tenant, execution_id, [])
    assert acquired.keys == ()
    assert acquired.expires_at is None
    assert await release_execution_locks(pool, tenant_id=tenant.id, execution_id=execution_id) == ()
    assert await _events(pool, execution_id) == []


async def test_tenants_are_kept_apart(pool: asyncpg.Pool, tenant: TenantFixture) -> None:
    execution_id = await _execution(pool, tenant)
    async with transaction(pool) as connection:
        other_tenant = await ensure_tenant(connection, f"other-{uuid.uuid4().hex[:8]}")
    # A key of another tenant is refused before any SQL runs.
    with pytest.raises(ValueError, match="tenant"):
        await _acquire(pool, tenant, execution_id, [lock_key(other_tenant, "web-01")])
    # Our execution named under another tenant does not exist there.
    with pytest.raises(NotFoundError):
        await acquire_execution_locks(
            pool,
            tenant_id=other_tenant,
            execution_id=execution_id,
            keys=[lock_key(other_tenant, "web-01")],
            ttl_s=60,
        )
    keys = _keys(tenant, "mine")
    await _acquire(pool, tenant, execution_id, keys)
    assert (
        await release_execution_locks(pool, tenant_id=other_tenant, execution_id=execution_id) == ()
    )
    assert await list_execution_locks(pool, tenant_id=other_tenant, execution_id=execution_id) == []
    mine = await list_execution_locks(pool, tenant_id=tenant.id, execution_id=execution_id)
    assert [row.lock_key for row in mine] == keys
    await _release(pool, tenant, execution_id)


# --- concurrency -------------------------------------------------------------------------


async def test_fifty_executions_racing_for_overlapping_keys(
    pool: asyncpg.Pool, tenant: TenantFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """Random 2-3 key subsets of 5 keys, each asked for in a random order, 50 at once."""
    caplog.set_level(logging.WARNING, logger="opsexec.safety.mutex")
    keys = _keys(tenant, *(f"race-{n}" for n in range(5)))
    executions = [await _execution(pool, tenant) for _ in range(50)]
    rng = random.Random(20240601)
    wanted = {e: rng.sample(keys, rng.choice([2, 3])) for e in executions}
    held: dict[str, uuid.UUID] = {}  # what the winners believe they hold, right now
    violations: list[str] = []
    conflicts = 0

    async def run(execution_id: uuid.UUID) -> None:
        nonlocal conflicts
        my_keys = wanted[execution_id]
        for _ in range(2000):
            try:
                acquired = await _acquire(pool, tenant, execution_id, my_keys, ttl_s=60)
            except ResourceBusyError as busy:
                conflicts += 1
                if busy.extra["lock_key"] not in my_keys:
                    violations.append(f"busy names {busy.extra['lock_key']}, not one of ours")
                await asyncio.sleep(rng.uniform(0, 0.004))
                continue
            for key in acquired.keys:
                if key in held:
                    violations.append(f"{key} won by {execution_id} while {held[key]} holds it")
                held[key] = execution_id
            await asyncio.sleep(rng.uniform(0, 0.003))  # "run the step"
            for key in acquired.keys:
                if held.get(key) == execution_id:
                    del held[key]
            await _release(pool, tenant, execution_id)
            return
        raise AssertionError(f"{execution_id} never got its locks")

    await asyncio.wait_for(asyncio.gather(*(run(e) for e in executions)), timeout=120)
    assert violations == []
    assert conflicts > 0, "the race never raced"
    assert await _rows(pool, keys) == {}
    assert not [r for r in caplog.records if "deadlock" in r.getMessage()]
    for execution_id in executions:
        kinds = [e["event_kind"] for e in await _events(pool, execution_id)]
        assert kinds == ["lock_acquired", "lock_released"]


async def test_expiry_takeover_and_reapers_racing_keep_the_books_straight(
    pool: asyncpg.Pool, tenant: TenantFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """Short TTLs, holders that overrun them, takeovers and three reapers all at once.

    Every key an execution acquired ends up released by it, reaped, or taken over, exactly
    once, with the event to prove it; nothing deadlocks; nothing is left behind.
    """
    caplog.set_level(logging.WARNING, logger="opsexec.safety.mutex")
    keys = _keys(tenant, *(f"churn-{n}" for n in range(4)))
    executions = [await _execution(pool, tenant) for _ in range(30)]
    rng = random.Random(7)
    done = asyncio.Event()

    async def reaper() -> None:
        while not done.is_set():
            await reap_expired_locks(pool, limit=2)
            await asyncio.sleep(rng.uniform(0, 0.01))

    async def run(execution_id: uuid.UUID) -> None:
        my_keys = rng.sample(keys, 2)
        for _ in range(3000):
            try:
                await _acquire(pool, tenant, execution_id, my_keys, ttl_s=rng.uniform(0.01, 0.05))
            except ResourceBusyError:
                await asyncio.sleep(rng.uniform(0, 0.005))
                continue
            await asyncio.sleep(rng.uniform(0, 0.06))  # sometimes longer than the TTL
            await _release(pool, tenant, execution_id)
            return
        raise AssertionError(f"{execution_id} never got its locks")

    reapers = [asyncio.create_task(reaper()) for _ in range(3)]
    try:
        await asyncio.wait_for(asyncio.gather(*(run(e) for e in executions)), timeout=120)
    finally:
        done.set()
        await asyncio.gather(*reapers)
    assert await _rows(pool, keys) == {}
    assert not [r for r in caplog.records if "deadlock" in r.getMessage()]
    for execution_id in executions:
        events = await _events(pool, execution_id)
        acquired = [
            k for e in events if e["event_kind"] == "lock_acquired" for k in e["payload"]["keys"]
        ]
        ended = [
            k
            for e in events
            if e["event_kind"] in ("lock_released", "lock_reaped")
            for k in e["payload"]["keys"]
        ]
        assert sorted(acquired) == sorted(ended), events


# --- release ----------------------------------------------------------------------------


async def test_only_the_owner_releases(pool: asyncpg.Pool, tenant: TenantFixture) -> None:
    owner, intruder = await _execution(pool, tenant), await _execution(pool, tenant)
    keys = _keys(tenant, "owned-1", "owned-2")
    await _acquire(pool, tenant, owner, keys)
    assert await _release_as(pool, tenant, intruder) == ()
    assert (
        await release_execution_locks(
            pool, tenant_id=tenant.id, execution_id=owner, owner_tag="someone-else"
        )
        == ()
    )
    assert await _rows(pool, keys) == dict.fromkeys(keys, owner)
    assert await _events(pool, owner, "lock_released") == []
    assert await _events(pool, intruder) == []
    assert await _release_as(pool, tenant, owner) == tuple(keys)


async def _release_as(
    pool: asyncpg.Pool, tenant: TenantFixture, execution_id: uuid.UUID
) -> tuple[str, ...]:
    return await release_execution_locks(pool, tenant_id=tenant.id, execution_id=execution_id)


async def test_context_manager_releases_after_success(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    execution_id = await _execution(pool, tenant)
    keys = _keys(tenant, "cm-ok")
    async with execution_locks(pool, tenant.id, execution_id, keys, 60) as acquired:
        assert acquired.keys == tuple(keys)
        assert await _rows(pool, keys) == {keys[0]: execution_id}
    assert await _rows(pool, keys) == {}


async def test_context_manager_releases_after_an_exception(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    execution_id = await _execution(pool, tenant)
    keys = _keys(tenant, "cm-boom")
    with pytest.raises(RuntimeError, match="step failed"):
        async with execution_locks(pool, tenant.id, execution_id, keys, 60):
            raise RuntimeError("step failed")
    assert await _rows(pool, keys) == {}
    assert [e["event_kind"] for e in await _events(pool, execution_id)] == [
        "lock_acquired",
        "lock_released",
    ]


async def test_context_manager_releases_after_cancellation(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    execution_id = await _execution(pool, tenant)
    keys = _keys(tenant, "cm-cancel")
    inside = asyncio.Event()

    async def run() -> None:
        async with execution_locks(pool, tenant.id, execution_id, keys, 60):
            inside.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(run())
    await asyncio.wait_for(inside.wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _rows(pool, keys) == {}


async def test_cancelled_while_acquiring_leaves_nothing_behind(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    """Cancel at every early moment: the acquire may be in flight, yet no row survives."""
    keys = _keys(tenant, "cm-early-1", "cm-early-2")
    for yields in range(12):
        execution_id = await _execution(pool, tenant)

        async def run(execution_id: uuid.UUID = execution_id) -> None:
            async with execution_locks(pool, tenant.id, execution_id, keys, 60):
                await asyncio.sleep(3600)

        task = asyncio.create_task(run())
        for _ in range(yields):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await _rows(pool, keys) == {}, f"lock left behind after {yields} yields"


async def test_a_timeout_around_the_block_still_times_out(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    """The release swallows no cancellation: asyncio.timeout still sees its own."""
    execution_id = await _execution(pool, tenant)
    keys = _keys(tenant, "cm-timeout")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2), execution_locks(pool, tenant.id, execution_id, keys, 60):
            await asyncio.sleep(3600)
    assert await _rows(pool, keys) == {}


async def test_a_busy_target_raises_from_the_context_manager(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    holder, waiting = await _execution(pool, tenant), await _execution(pool, tenant)
    keys = _keys(tenant, "cm-busy")
    async with execution_locks(pool, tenant.id, holder, keys, 60):
        with pytest.raises(ResourceBusyError) as caught:
            async with execution_locks(pool, tenant.id, waiting, keys, 60):
                pytest.fail("the body must not run without the lock")
        assert caught.value.extra["holder_execution_id"] == str(holder)
        assert await _rows(pool, keys) == {keys[0]: holder}
    assert await _rows(pool, keys) == {}


# --- expiry -------------------------------------------------------------------------------


async def test_renewal_extends_expiry(pool: asyncpg.Pool, tenant: TenantFixture) -> None:
    execution_id = await _execution(pool, tenant)
    keys = _keys(tenant, "renew-1", "renew-2")
    await _acquire(pool, tenant, execution_id, keys, ttl_s=0.5)
    before = {r.lock_key: r.expires_at for r in await _list(pool, tenant, execution_id)}
    renewed = await renew_execution_locks(
        pool, tenant_id=tenant.id, execution_id=execution_id, ttl_s=300
    )
    after = {r.lock_key: r.expires_at for r in await _list(pool, tenant, execution_id)}
    assert renewed == tuple(keys)
    assert all((after[k] - before[k]).total_seconds() > 250 for k in keys)
    # Only the owner renews.
    other = await _execution(pool, tenant)
    assert await renew_execution_locks(pool, tenant_id=tenant.id, execution_id=other, ttl_s=1) == ()
    await asyncio.sleep(0.6)  # past the original expiry: a renewed lock is not reaped
    await reap_expired_locks(pool)
    assert await _rows(pool, keys) == dict.fromkeys(keys, execution_id)
    await _release(pool, tenant, execution_id)


async def _list(pool: asyncpg.Pool, tenant: TenantFixture, execution_id: uuid.UUID) -> list[Any]:
    return await list_execution_locks(pool, tenant_id=tenant.id, execution_id=execution_id)


async def test_an_expired_lock_is_reaped_with_an_event(
    pool: asyncpg.Pool, tenant: TenantFixture
) -> None:
    crashed, alive = await _execution(pool, tenant), await _execution(pool, tenant)
    dead_keys = _keys(tenant, "reap-1", "reap-2")
    live_keys = _keys(tenant, "reap-3")
    await _acquire(pool, tenant, crashed, dead_keys, ttl_s=0.05)
    await _acquire(pool, tenant, alive, live_keys, ttl_s=60)
    await asyncio.sleep(0.1)

    # Several reapers at once split the work: every dead lock is reaped exactly once.
    counts = await asyncio.gather(*(reap_expired_locks(pool, limit=1) for _ in range(4)))
    counts.append(await reap_expired_locks(pool))
    assert sum(counts) >= 2
    assert await _rows(pool, dead_keys + live_keys) == {live_keys[0]: alive}
    reaped = await _events(pool, crashed, "lock_reaped")
    assert sorted(k for e in reaped for k in e["payload"]["keys"]) == dead_keys
    assert all(e["payload"]["reason"] == "expired" for e in reaped)
    assert await _events(pool, alive, "lock_reaped") == []
    # The crashed execution's late release finds nothing to do.
    assert await _release_as(pool, tenant, crashed) == ()
    await _release(pool, tenant, alive)


async def test_an_expired_lock_can_be_taken_over(pool: asyncpg.Pool, tenant: TenantFixture) -> None:
    stalled, newcomer = await _execution(pool, tenant), await _execution(pool, tenant)
    k1, k2 = _keys(tenant, "takeover-1", "takeover-2")
    await _acquire(pool, tenant, stalled, [k1], ttl_s=0.05)
    await asyncio.sleep(0.1)

    acquired = await _acquire(pool, tenant, newcomer, [k1, k2])
    assert acquired.keys == (k1, k2)
    assert [(t.lock_key, t.previous_execution_id) for t in acquired.taken_over] == [(k1, stalled)]
    assert await _rows(pool, [k1, k2]) == {k1: newcomer, k2: newcomer}
    reaped = await _events(pool, stalled, "lock_reaped")
    assert len(reaped) == 1
    assert reaped[0]["payload"]["keys"] == [k1]
    assert reaped[0]["payload"]["taken_over_by"] == str(newcomer)
    acquired_event = (await _events(pool, newcomer, "lock_acquired"))[0]["payload"]
    assert acquired_event["taken_over"] == [k1]

    # The stalled execution wakes up: it can neither renew nor release what it lost.
    assert (
        await renew_execution_locks(pool, tenant_id=tenant.id, execution_id=stalled, ttl_s=60) == ()
    )
    assert await _release_as(pool, tenant, stalled) == ()
    assert await _rows(pool, [k1, k2]) == {k1: newcomer, k2: newcomer}
    # Renewing what it took over does not report the takeover again.
    again = await _acquire(pool, tenant, newcomer, [k1])
    assert again.taken_over == ()
    assert len(await _events(pool, stalled, "lock_reaped")) == 1
    await _release(pool, tenant, newcomer)


async def test_a_live_lock_is_never_taken_over(pool: asyncpg.Pool, tenant: TenantFixture) -> None:
    holder, other = await _execution(pool, tenant), await _execution(pool, tenant)
    keys = _keys(tenant, "live")
    await _acquire(pool, tenant, holder, keys, ttl_s=60)
    assert await reap_expired_locks(pool) >= 0
    with pytest.raises(ResourceBusyError):
        await _acquire(pool, tenant, other, keys)
    assert await _rows(pool, keys) == {keys[0]: holder}
    await _release(pool, tenant, holder)
