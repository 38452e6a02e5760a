"""SQL for ``execution_locks``: per-asset mutual exclusion rows (R-MUTEX).

PostgreSQL is the only lock authority. A lock is a row whose ``lock_key`` is unique, so
"who holds it" is whatever the unique index says; there is no second store to disagree.

Two rules make every statement here deadlock-free against every other one:

* Rows are locked in one global order, ``lock_key COLLATE "C"`` (byte order, which is
  also Python's ``sorted()`` order for ``str``), whether they are inserted, updated or
  deleted. Two transactions that want overlapping key sets therefore queue up behind each
  other instead of each holding what the other wants.
* The reaper never waits for a row at all (``FOR UPDATE SKIP LOCKED``).

A lock statement that writes its own event takes the execution's event lock (the one
``store.events.append_event`` takes) only after all its rows, like the Python callers do.

The hot pair is one round trip each: ``FAST_ACQUIRE_LOCKS`` and ``RELEASE_OWNED_LOCKS``
are single statements that write their event themselves and run without a transaction
block. Everything unusual (renewal, takeover, conflict) goes through ``ACQUIRE_LOCKS`` in
an explicit transaction. These functions are thin: one statement each, typed rows back.
The policy (key format, all-or-nothing, events, errors) lives in ``opsexec.safety.mutex``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from opsexec.store import Connection
from opsexec.store.channels import EVENTS_CHANNEL

__all__ = [
    "ACQUIRE_LOCKS",
    "EXECUTION_IN_TENANT",
    "EXTEND_OWNED_LOCKS",
    "FAST_ACQUIRE_LOCKS",
    "FIND_LOCK_HOLDERS",
    "LIST_EXECUTION_LOCKS",
    "REAP_EXPIRED_LOCKS",
    "RELEASE_OWNED_LOCKS",
    "LockRow",
    "UpsertedLock",
    "delete_expired_locks",
    "delete_owned_locks",
    "execution_in_tenant",
    "extend_owned_locks",
    "find_lock_holders",
    "insert_free_locks",
    "locks_of_execution",
    "upsert_locks",
]

# The fast path, one round trip: every key is free, which is the normal case. A plain
# INSERT (no ON CONFLICT) of all keys in byte order plus the lock_acquired event, as one
# statement in its own implicit transaction: if any key exists (held, expired, or the
# owner's own) the unique index raises and the whole statement, event included, is
# undone; the caller then takes the careful path (ACQUIRE_LOCKS). Zero rows means the
# execution is not the tenant's.
#
# The event part follows store.events.APPEND_EVENT exactly: the same per-execution
# advisory lock (so seq is commit order within the execution), taken only after every
# lock row is in (the aggregate over `taken` forces that), like every other lock
# statement. $7 is the event payload, already masked by the caller.
FAST_ACQUIRE_LOCKS = f"""
WITH taken AS (
    INSERT INTO execution_locks (lock_key, execution_id, owner_tag, acquired_at, expires_at)
    SELECT wanted.lock_key, e.id, $3::varchar, clock_timestamp(),
           clock_timestamp() + make_interval(secs => $5::double precision)
    FROM executions AS e
    CROSS JOIN unnest($4::varchar[]) WITH ORDINALITY AS wanted (lock_key, ord)
    WHERE e.id = $1::uuid AND e.tenant_id = $2::uuid
    ORDER BY wanted.ord
    RETURNING expires_at
),
summary AS (
    SELECT count(*) AS taken, min(expires_at) AS expires_at FROM taken
),
ordered AS (
    SELECT pg_advisory_xact_lock(hashtextextended($1::uuid::text, 0))
    FROM summary
    WHERE summary.taken > 0
),
event AS (
    INSERT INTO execution_events (execution_id, event_kind, payload)
    SELECT $1::uuid, 'lock_acquired',
           $6::jsonb || jsonb_build_object('expires_at', summary.expires_at)
    FROM summary, ordered
    RETURNING seq
)
SELECT summary.taken, summary.expires_at, (SELECT seq FROM event) AS event_seq,
       (SELECT pg_notify('{EVENTS_CHANNEL}', $1::uuid::text || ':' || seq) FROM event)
FROM summary
"""

# One statement takes every key of an execution, in the order given ($4 must be sorted
# byte-wise and free of duplicates: ON CONFLICT cannot touch one row twice).
#
# * A free key is inserted.
# * A key this very owner (execution + tag) already holds is renewed in place: same row,
#   same acquired_at, new expiry. That makes re-acquiring idempotent.
# * A key held by anyone else is taken over only if its expiry has passed (an expired lock
#   is dead); the old holder is written into the row's metadata so the caller can emit
#   lock_reaped for it (PostgreSQL < 18 cannot RETURN the old row).
# * A live key of someone else is left alone and is simply missing from RETURNING. The
#   DO UPDATE path still row-locks it until our transaction ends, so the holder read by
#   FIND_LOCK_HOLDERS in the same transaction cannot vanish under us.
#
# $6 is a fresh id per call: a row whose metadata carries it was inserted or taken over by
# this statement; a renewed row keeps the id of the call that first took it.
# Executions of other tenants produce no rows at all (the join), so nothing is taken.
ACQUIRE_LOCKS = """
INSERT INTO execution_locks AS l
    (lock_key, execution_id, owner_tag, acquired_at, expires_at, metadata)
SELECT wanted.lock_key, e.id, $3::varchar, clock_timestamp(),
       clock_timestamp() + make_interval(secs => $5::double precision),
       jsonb_build_object('acquire_id', $6::text)
FROM executions AS e
CROSS JOIN unnest($4::varchar[]) WITH ORDINALITY AS wanted (lock_key, ord)
WHERE e.id = $1::uuid AND e.tenant_id = $2::uuid
ORDER BY wanted.ord
ON CONFLICT (lock_key) DO UPDATE
SET execution_id = EXCLUDED.execution_id,
    owner_tag    = EXCLUDED.owner_tag,
    expires_at   = EXCLUDED.expires_at,
    acquired_at  = CASE
        WHEN l.execution_id = EXCLUDED.execution_id AND l.owner_tag = EXCLUDED.owner_tag
        THEN l.acquired_at ELSE EXCLUDED.acquired_at END,
    metadata     = CASE
        WHEN l.execution_id = EXCLUDED.execution_id AND l.owner_tag = EXCLUDED.owner_tag
        THEN l.metadata
        ELSE EXCLUDED.metadata || jsonb_build_object('taken_over', jsonb_build_object(
            'execution_id', l.execution_id,
            'owner_tag', l.owner_tag,
            'expired_at', l.expires_at))
        END
WHERE (l.execution_id = EXCLUDED.execution_id AND l.owner_tag = EXCLUDED.owner_tag)
   OR l.expires_at <= clock_timestamp()
RETURNING l.lock_key,
          l.acquired_at,
          l.expires_at,
          coalesce(l.metadata ->> 'acquire_id' = $6::text, false) AS fresh,
          (l.metadata #>> '{taken_over,execution_id}')::uuid AS previous_execution_id,
          l.metadata #>> '{taken_over,owner_tag}' AS previous_owner_tag,
          (l.metadata #>> '{taken_over,expired_at}')::timestamptz AS previous_expires_at
"""

# Read in the acquiring transaction right after a conflict, so it sees the committed
# holder (a new statement gets a new snapshot under READ COMMITTED).
FIND_LOCK_HOLDERS = """
SELECT lock_key, execution_id, owner_tag, acquired_at, expires_at, metadata
FROM execution_locks
WHERE lock_key = ANY($1::varchar[])
ORDER BY lock_key COLLATE "C"
"""

EXECUTION_IN_TENANT = """
SELECT EXISTS (SELECT 1 FROM executions WHERE id = $1::uuid AND tenant_id = $2::uuid)
"""

# Owner-only: the owner is (execution, tag) and the execution must belong to the tenant.
# Rows are locked in key order first (see the module docstring), and the owner test is
# re-checked on the locked version, so a lock taken over meanwhile is never deleted.
# One statement, one round trip: the delete and its lock_released event (written only
# when something was released, with APPEND_EVENT's advisory lock, after the rows). The
# keys in the payload come from the table; they are shape-safe by construction (see
# opsexec.safety.mutex.lock_key). $4 is the rest of the payload, masked by the caller.
RELEASE_OWNED_LOCKS = f"""
WITH owned AS (
    SELECT l.id
    FROM execution_locks AS l
    JOIN executions AS e ON e.id = l.execution_id
    WHERE l.execution_id = $1::uuid AND e.tenant_id = $2::uuid AND l.owner_tag = $3::varchar
    ORDER BY l.lock_key COLLATE "C"
    FOR UPDATE OF l
),
released AS (
    DELETE FROM execution_locks AS l
    USING owned
    WHERE l.id = owned.id
    RETURNING l.lock_key
),
summary AS (
    SELECT coalesce(array_agg(lock_key ORDER BY lock_key COLLATE "C"), '{{}}') AS keys
    FROM released
),
ordered AS (
    SELECT pg_advisory_xact_lock(hashtextextended($1::uuid::text, 0))
    FROM summary
    WHERE cardinality(summary.keys) > 0
),
event AS (
    INSERT INTO execution_events (execution_id, event_kind, payload)
    SELECT $1::uuid, 'lock_released',
           jsonb_build_object('keys', to_jsonb(summary.keys)) || $4::jsonb
    FROM summary, ordered
    RETURNING seq
)
SELECT summary.keys, (SELECT seq FROM event) AS event_seq,
       (SELECT pg_notify('{EVENTS_CHANNEL}', $1::uuid::text || ':' || seq) FROM event)
FROM summary
"""

# A row still owned is renewed even if its expiry just passed: as long as the row is ours
# nobody else can have held the key in between, so exclusion was never broken.
EXTEND_OWNED_LOCKS = """
WITH owned AS (
    SELECT l.id
    FROM execution_locks AS l
    JOIN executions AS e ON e.id = l.execution_id
    WHERE l.execution_id = $1::uuid AND e.tenant_id = $2::uuid AND l.owner_tag = $3::varchar
    ORDER BY l.lock_key COLLATE "C"
    FOR UPDATE OF l
)
UPDATE execution_locks AS l
SET expires_at = clock_timestamp() + make_interval(secs => $4::double precision)
FROM owned
WHERE l.id = owned.id
RETURNING l.lock_key, l.execution_id, l.owner_tag, l.acquired_at, l.expires_at, l.metadata
"""

# SKIP LOCKED: several reapers split the work instead of queueing, and a reaper never waits
# on an acquirer that is taking the same dead row over. The expiry test is re-checked on
# the locked row, so a lock renewed a moment ago survives.
REAP_EXPIRED_LOCKS = """
WITH expired AS (
    SELECT id
    FROM execution_locks
    WHERE expires_at <= clock_timestamp()
    ORDER BY expires_at
    LIMIT $1::int
    FOR UPDATE SKIP LOCKED
)
DELETE FROM execution_locks AS l
USING expired
WHERE l.id = expired.id
RETURNING l.lock_key, l.execution_id, l.owner_tag, l.acquired_at, l.expires_at, l.metadata
"""

LIST_EXECUTION_LOCKS = """
SELECT l.lock_key, l.execution_id, l.owner_tag, l.acquired_at, l.expires_at, l.metadata
FROM execution_locks AS l
JOIN executions AS e ON e.id = l.execution_id
WHERE l.execution_id = $1::uuid AND e.tenant_id = $2::uuid
ORDER BY l.lock_key COLLATE "C"
"""


@dataclass(frozen=True, slots=True)
class LockRow:
    """One ``execution_locks`` row as stored."""

    lock_key: str
    execution_id: UUID
    owner_tag: str
    acquired_at: datetime
    expires_at: datetime
    metadata: dict[str, Any]

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> LockRow:
        return cls(
            lock_key=record["lock_key"],
            execution_id=record["execution_id"],
            owner_tag=record["owner_tag"],
            acquired_at=record["acquired_at"],
            expires_at=record["expires_at"],
            metadata=dict(record["metadata"] or {}),
        )


@dataclass(frozen=True, slots=True)
class UpsertedLock:
    """A key the acquiring statement now holds, and how it came to hold it.

    ``fresh`` is false for a key the owner already held (renewed); a fresh key with a
    ``previous_execution_id`` was taken over from that expired holder.
    """

    lock_key: str
    acquired_at: datetime
    expires_at: datetime
    fresh: bool
    previous_execution_id: UUID | None
    previous_owner_tag: str | None
    previous_expires_at: datetime | None

    @property
    def taken_over(self) -> bool:
        return self.fresh and self.previous_execution_id is not None


async def insert_free_locks(
    connection: Connection,
    *,
    tenant_id: UUID,
    execution_id: UUID,
    owner_tag: str,
    keys: Sequence[str],
    ttl_s: float,
    event_payload: Mapping[str, Any],
) -> datetime | None:
    """Run ``FAST_ACQUIRE_LOCKS`` outside any transaction; the earliest expiry, or ``None``
    when the execution is not the tenant's.

    Raises ``asyncpg.UniqueViolationError`` (and leaves nothing behind) when any key
    already has a row. Must not run inside a caller's transaction: the error would abort it.
    """
    record = await connection.fetchrow(
        FAST_ACQUIRE_LOCKS,
        execution_id,
        tenant_id,
        owner_tag,
        list(keys),
        ttl_s,
        dict(event_payload),
    )
    assert record is not None  # an aggregate always yields one row
    if record["taken"] == 0:
        return None
    expires_at: datetime = record["expires_at"]
    return expires_at


async def upsert_locks(
    connection: Connection,
    *,
    tenant_id: UUID,
    execution_id: UUID,
    owner_tag: str,
    keys: Sequence[str],
    ttl_s: float,
    acquire_id: str,
) -> list[UpsertedLock]:
    """Run ``ACQUIRE_LOCKS``; the keys missing from the result are held by someone else.

    Call inside a transaction and roll it back when a key is missing: the statement takes
    what it can, the caller makes it all or nothing.
    """
    records = await connection.fetch(
        ACQUIRE_LOCKS, execution_id, tenant_id, owner_tag, list(keys), ttl_s, acquire_id
    )
    return [
        UpsertedLock(
            lock_key=r["lock_key"],
            acquired_at=r["acquired_at"],
            expires_at=r["expires_at"],
            fresh=r["fresh"],
            previous_execution_id=r["previous_execution_id"],
            previous_owner_tag=r["previous_owner_tag"],
            previous_expires_at=r["previous_expires_at"],
        )
        for r in records
    ]


async def find_lock_holders(connection: Connection, keys: Sequence[str]) -> list[LockRow]:
    """The current rows for ``keys`` (absent keys are free), in key order."""
    records = await connection.fetch(FIND_LOCK_HOLDERS, list(keys))
    return [LockRow.from_record(r) for r in records]


async def execution_in_tenant(connection: Connection, execution_id: UUID, tenant_id: UUID) -> bool:
    found: bool = await connection.fetchval(EXECUTION_IN_TENANT, execution_id, tenant_id)
    return found


async def delete_owned_locks(
    connection: Connection,
    *,
    tenant_id: UUID,
    execution_id: UUID,
    owner_tag: str,
    event_payload: Mapping[str, Any],
) -> list[str]:
    """Delete the owner's locks, write ``lock_released`` if there were any, return the keys.

    ``event_payload`` (masked) is merged into the event next to ``keys``. Nothing of
    another owner is touched.
    """
    keys: list[str] = await connection.fetchval(
        RELEASE_OWNED_LOCKS, execution_id, tenant_id, owner_tag, dict(event_payload)
    )
    return keys


async def extend_owned_locks(
    connection: Connection,
    *,
    tenant_id: UUID,
    execution_id: UUID,
    owner_tag: str,
    ttl_s: float,
) -> list[LockRow]:
    """Push the expiry of every lock the owner still holds to now + ``ttl_s``."""
    records = await connection.fetch(EXTEND_OWNED_LOCKS, execution_id, tenant_id, owner_tag, ttl_s)
    return sorted((LockRow.from_record(r) for r in records), key=lambda row: row.lock_key)


async def delete_expired_locks(connection: Connection, *, limit: int) -> list[LockRow]:
    """Delete up to ``limit`` expired locks nobody else is touching, and return them."""
    records = await connection.fetch(REAP_EXPIRED_LOCKS, limit)
    return [LockRow.from_record(r) for r in records]


async def locks_of_execution(
    connection: Connection, *, tenant_id: UUID, execution_id: UUID
) -> list[LockRow]:
    """Every lock row of one execution of ``tenant_id``, expired or not, in key order."""
    records = await connection.fetch(LIST_EXECUTION_LOCKS, execution_id, tenant_id)
    return [LockRow.from_record(r) for r in records]
