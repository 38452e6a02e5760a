"""Per-asset mutual exclusion (R-MUTEX): what is locked, when, and by whom.

An execution that modifies or deploys to a target first takes an exclusive lock on
``lock:v1:{tenant_id}:{target_ref}:{scope}``; read actions take none. The runner takes
*all* of an execution's keys up front, all or nothing, and releases them in ``finally``
on every path; expiry (= the queue lease, renewed with its heartbeat) plus the reaper
cover the paths where ``finally`` never runs (a killed worker).

Why the rules below hold (the SQL is in ``opsexec.store.locks``):

* **All or nothing, race-free.** The unique index on ``lock_key`` decides every race: two
  executions can never both own a key. Normally all keys are free and one plain
  ``INSERT`` of all of them (plus the ``lock_acquired`` event) is a statement of its own:
  it either inserts everything or fails as a whole — one round trip. If it fails, an
  ``INSERT … ON CONFLICT DO UPDATE`` in an explicit transaction renews the owner's own
  keys, takes over expired ones and, if a live other owner holds any key, rolls back so
  nothing stays held.
* **No deadlock.** Every statement that locks lock rows does so in the same global order
  (sorted keys), so overlapping acquirers queue behind each other instead of waiting on
  each other. A rare cross-table deadlock (see ``release_execution_locks``) is retried.
* **Expired means dead.** A lock past ``expires_at`` belongs to an execution that stopped
  heartbeating; an acquirer may take it over at once instead of waiting for the reaper,
  and writes ``lock_reaped`` on the old holder just as the reaper would.
* **Only the owner releases.** The owner is ``(execution_id, owner_tag)``; the tag defaults
  to the execution id, as SPEC R-MUTEX says.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, TypeAlias, TypeVar
from uuid import UUID

import asyncpg

from opsexec.errors import NotFoundError, ResourceBusyError
from opsexec.observability import metrics
from opsexec.safety.masking import Masker, mask_value
from opsexec.store import Connection, transaction
from opsexec.store import locks as store
from opsexec.store.events import append_event
from opsexec.store.locks import LockRow

__all__ = [
    "DEFAULT_SCOPE",
    "LOCKING_ACTION_CLASSES",
    "MAX_LOCK_KEY_LENGTH",
    "AcquiredLocks",
    "LockRow",
    "LockTarget",
    "TakenOverLock",
    "acquire_execution_locks",
    "execution_locks",
    "keys_for_steps",
    "list_execution_locks",
    "lock_holder",
    "lock_key",
    "lock_key_prefix",
    "reap_expired_locks",
    "release_execution_locks",
    "renew_execution_locks",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
PoolOrConnection: TypeAlias = "asyncpg.Pool | Connection"

LOCK_KEY_VERSION = "v1"
DEFAULT_SCOPE = "asset"
MAX_LOCK_KEY_LENGTH = 500
"""``execution_locks.lock_key`` is ``varchar(500)``."""
MAX_SCOPE_LENGTH = 100
MAX_OWNER_TAG_LENGTH = 100
"""``execution_locks.owner_tag`` is ``varchar(100)``."""
ACTION_CLASSES = frozenset({"read", "modify", "deploy"})
LOCKING_ACTION_CLASSES = frozenset({"modify", "deploy"})
"""Read actions take no lock (R-MUTEX): they cannot interfere with each other or a change."""

DEADLOCK_RETRIES = 3
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_DIGEST_MARK = "%sha256-"
# Shape rules only, never a registered secret (see _storable): a pure function of the
# text, with a bounded memo inside. Not shared state in any meaningful sense.
_SHAPE_MASKER = Masker()


# --- keys -------------------------------------------------------------------------------


def _escape_target(target_ref: str) -> str:
    """Percent-encode exactly ``%`` and ``:`` so the target can never contain a separator.

    ``%`` goes first, so every ``%`` in the output starts ``%25`` or ``%3A`` and decoding is
    unambiguous: two different targets always give two different escaped forms.
    """
    return target_ref.replace("%", "%25").replace(":", "%3A")


def _escape_scope(scope: str) -> str:
    """Scopes keep their ``:`` (nothing follows them); only ``%`` is escaped, so that an
    escaped scope, like an escaped target, can never start with the digest mark ``%s``."""
    return scope.replace("%", "%25")


def _digest(text: str) -> str:
    return _DIGEST_MARK + hashlib.sha256(text.encode()).hexdigest()


def _check_text(value: str, what: str, max_length: int) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    if len(value) > max_length:
        raise ValueError(f"{what} must be at most {max_length} characters")
    if _CONTROL_CHARS.search(value):
        raise ValueError(f"{what} must not contain control characters")


def _storable(key: str) -> bool:
    """Fits the column, and the masker's *shape* rules leave it alone.

    Lock keys are copied verbatim into event payloads by SQL (the one-round-trip release),
    so a key must be something the masker would not change. Checked with a masker that
    never holds a registered secret: the answer must depend on the key alone, never on
    which secrets happen to be registered in this process right now — otherwise one target
    could map to two keys and two executions would both "hold" it.
    """
    return len(key) <= MAX_LOCK_KEY_LENGTH and _SHAPE_MASKER.mask_text(key) == key


def lock_key_prefix(tenant_id: UUID | str) -> str:
    """``lock:v1:{tenant_id}:`` — every key of the tenant starts with it.

    The tenant id is normalised through ``UUID`` so it can never contain a ``:`` either.
    """
    return f"lock:{LOCK_KEY_VERSION}:{UUID(str(tenant_id))}:"


def lock_key(tenant_id: UUID | str, target_ref: str, scope: str = DEFAULT_SCOPE) -> str:
    """The lock key of ``target_ref`` in ``tenant_id``: ``lock:v1:{tenant}:{target}:{scope}``.

    Forgery-proof by construction. The tenant is a canonical UUID (no ``:``), the target is
    percent-escaped (``%`` → ``%25``, ``:`` → ``%3A``; so it has no ``:`` either) and the
    scope is the last field, so a key splits back into exactly one (tenant, target, scope):
    the target ``web:asset`` gives ``…:web%3Aasset:asset``, never ``…:web:asset``. Scopes may
    contain ``:`` (``service:nginx``) because nothing follows them; their ``%`` is escaped.

    A target that cannot be stored as it is — the key would exceed ``varchar(500)``, or it
    is secret-shaped (``password``, ``token=…``, ``auth-01:asset`` reads as ``key: value``)
    and the masker would redact part of the key in events — is replaced by
    ``%sha256-<hex digest>`` (then the scope too, if it is the problem). No escaped field
    starts with ``%s``, so a digest never collides with a real name.
    """
    _check_text(target_ref, "a lock target", 255)
    _check_text(scope, "a lock scope", MAX_SCOPE_LENGTH)
    prefix = lock_key_prefix(tenant_id)
    target_part, scope_part = _escape_target(target_ref), _escape_scope(scope)
    key = f"{prefix}{target_part}:{scope_part}"
    if not _storable(key):
        key = f"{prefix}{_digest(target_ref)}:{scope_part}"
    if not _storable(key):
        key = f"{prefix}{_digest(target_ref)}:{_digest(scope)}"
    if not _storable(key):  # only a masker rule matching the prefix itself could get here
        raise ValueError("cannot build a storable lock key for this target")
    return key


class LockTarget(NamedTuple):
    """What the mutex needs to know about one (step, target) pair; a plain tuple works too.

    ``action_class`` is ``read``/``modify``/``deploy`` (``ActionClass`` members are ``str``
    and compare equal). ``lock_scope`` ``None`` means the default ``asset`` scope.
    """

    target_ref: str | None
    action_class: str
    lock_scope: str | None = DEFAULT_SCOPE


def keys_for_steps(
    tenant_id: UUID | str,
    steps: Iterable[LockTarget | tuple[str | None, str, str | None]],
) -> list[str]:
    """The sorted, de-duplicated lock keys an execution must hold before it runs.

    Only modify/deploy steps with a target produce keys; a read step, or a step without a
    target (an inventory query), produces none. An unknown action class is a programming
    error, refused rather than guessed (guessing "no lock" would be unsafe).
    """
    keys: set[str] = set()
    for target_ref, action_class, lock_scope in steps:
        if action_class not in ACTION_CLASSES:
            raise ValueError(f"unknown action class {action_class!r}")
        if action_class in LOCKING_ACTION_CLASSES and target_ref:
            keys.add(lock_key(tenant_id, target_ref, lock_scope or DEFAULT_SCOPE))
    return sorted(keys)


def _sorted_keys(tenant_id: UUID, keys: Iterable[str]) -> list[str]:
    """Dedupe and sort (``sorted`` on ``str`` is the SQL side's ``COLLATE "C"`` order),
    refusing keys of another tenant: an execution may only lock its own tenant's assets."""
    prefix = lock_key_prefix(tenant_id)
    wanted = sorted(set(keys))
    for key in wanted:
        if not key.startswith(prefix):
            raise ValueError("lock key does not belong to the execution's tenant")
        if not _storable(key):
            raise ValueError("lock key is too long or secret-shaped; build it with lock_key()")
    return wanted


def _owner(execution_id: UUID, owner_tag: str | None) -> str:
    tag = str(execution_id) if owner_tag is None else owner_tag
    _check_text(tag, "an owner tag", MAX_OWNER_TAG_LENGTH)
    return tag


def _check_ttl(ttl_s: float) -> float:
    ttl = float(ttl_s)
    if not ttl > 0:
        raise ValueError("ttl_s must be > 0")
    return ttl


# --- transactions -----------------------------------------------------------------------


async def _retrying_deadlocks(attempt: Callable[[], Awaitable[T]]) -> T:
    """Run ``attempt``; when PostgreSQL breaks a deadlock by aborting it, run it again.

    Lock rows are always taken in key order, so lock statements cannot deadlock with each
    other. Across tables they still can, rarely: an expired-lock takeover (or the reaper)
    holds a lock row and waits for an execution's event lock, while a caller's transaction
    holds that event lock and waits for the row. Every attempt is all or nothing, so trying
    again is safe.
    """
    for number in range(1, DEADLOCK_RETRIES + 1):
        try:
            return await attempt()
        except asyncpg.exceptions.DeadlockDetectedError:
            if number == DEADLOCK_RETRIES:
                raise
            logger.warning("lock statement lost a deadlock; retrying (attempt %d)", number)
            await asyncio.sleep(random.uniform(0.005, 0.05) * number)
    raise AssertionError("unreachable")


async def _in_transaction(
    pool_or_connection: PoolOrConnection, work: Callable[[Connection], Awaitable[T]]
) -> T:
    """Run ``work`` in a transaction of its own (a savepoint inside the caller's, so a
    failure undoes only our part and leaves the caller's transaction usable)."""

    async def attempt() -> T:
        if isinstance(pool_or_connection, asyncpg.Pool):
            async with transaction(pool_or_connection) as connection:
                return await work(connection)
        async with pool_or_connection.transaction():
            return await work(pool_or_connection)

    return await _retrying_deadlocks(attempt)


async def _one_statement(
    pool_or_connection: PoolOrConnection, work: Callable[[Connection], Awaitable[T]]
) -> T:
    """Run ``work``, which issues a single statement: atomic on its own, so with a pool it
    needs no BEGIN/COMMIT round trips; inside a caller's transaction it gets a savepoint
    like everything else here."""
    if not isinstance(pool_or_connection, asyncpg.Pool):
        return await _in_transaction(pool_or_connection, work)
    pool = pool_or_connection

    async def attempt() -> T:
        async with pool.acquire() as connection:
            return await work(connection)

    return await _retrying_deadlocks(attempt)


# --- acquire ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TakenOverLock:
    """An expired lock of another owner that an acquire took over."""

    lock_key: str
    previous_execution_id: UUID
    previous_owner_tag: str | None
    previous_expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class AcquiredLocks:
    """What ``acquire_execution_locks`` now holds for the execution.

    ``keys`` is every key held (sorted); ``renewed`` the subset the owner already held
    before this call; ``taken_over`` the expired locks of others it took over.
    ``expires_at`` is the earliest expiry (``None`` when no key was asked for).
    """

    execution_id: UUID
    owner_tag: str
    keys: tuple[str, ...]
    expires_at: datetime | None
    renewed: tuple[str, ...] = ()
    taken_over: tuple[TakenOverLock, ...] = ()


def _busy(wanted: Sequence[str], got: set[str], holders: Sequence[LockRow]) -> ResourceBusyError:
    metrics.lock_conflict()
    missing = [key for key in wanted if key not in got]
    holder_of = {row.lock_key: row for row in holders}
    key = next((k for k in missing if k in holder_of), missing[0])
    holder = holder_of.get(key)
    holder_id = str(holder.execution_id) if holder else None
    return ResourceBusyError(
        f"target lock {key} is held by execution {holder_id}",
        extra={
            "holder_execution_id": holder_id,
            "lock_key": key,
            "holder_expires_at": holder.expires_at.isoformat() if holder else None,
            "conflicting_keys": missing,
        },
    )


async def _acquire(
    connection: Connection,
    *,
    tenant_id: UUID,
    execution_id: UUID,
    owner_tag: str,
    wanted: list[str],
    ttl_s: float,
) -> AcquiredLocks:
    rows = await store.upsert_locks(
        connection,
        tenant_id=tenant_id,
        execution_id=execution_id,
        owner_tag=owner_tag,
        keys=wanted,
        ttl_s=ttl_s,
        acquire_id=uuid.uuid4().hex,
    )
    got = {row.lock_key for row in rows}
    if len(got) < len(wanted):
        # The conflicting rows are row-locked by our statement, so these holders are
        # exactly the ones we collided with. Raising rolls back what we did take.
        holders = await store.find_lock_holders(connection, [k for k in wanted if k not in got])
        if not holders and not await store.execution_in_tenant(connection, execution_id, tenant_id):
            raise NotFoundError("execution not found")
        raise _busy(wanted, got, holders)

    taken = tuple(
        TakenOverLock(
            lock_key=row.lock_key,
            previous_execution_id=row.previous_execution_id,
            previous_owner_tag=row.previous_owner_tag,
            previous_expires_at=row.previous_expires_at,
        )
        for row in sorted(rows, key=lambda r: r.lock_key)
        if row.taken_over and row.previous_execution_id is not None
    )
    renewed = tuple(sorted(row.lock_key for row in rows if not row.fresh))
    metrics.locks_reaped("taken_over", len(taken))
    expires_at = min(row.expires_at for row in rows)

    # (execution, order, kind, payload): lock_reaped for each old holder, then ours.
    events: list[tuple[UUID, int, str, dict[str, Any]]] = []
    for previous in sorted({t.previous_execution_id for t in taken}):
        mine = [t for t in taken if t.previous_execution_id == previous]
        reaped_payload: dict[str, Any] = {
            "keys": [t.lock_key for t in mine],
            "reason": "expired_taken_over",
            "taken_over_by": str(execution_id),
            "owner_tag": mine[0].previous_owner_tag,
            "expired_at": _iso(mine[0].previous_expires_at),
        }
        events.append((previous, 0, "lock_reaped", reaped_payload))
    acquired_payload: dict[str, Any] = {
        "keys": wanted,
        "owner_tag": owner_tag,
        "ttl_s": ttl_s,
        "expires_at": expires_at.isoformat(),
        "renewed": list(renewed),
        "taken_over": [t.lock_key for t in taken],
    }
    events.append((execution_id, 1, "lock_acquired", acquired_payload))
    # Each event write locks its execution's event stream until commit; taking those in
    # execution-id order keeps two acquirers that take over from each other's executions
    # from waiting on each other.
    for event_execution_id, _, kind, payload in sorted(events, key=lambda e: (e[0], e[1])):
        await append_event(connection, event_execution_id, kind, payload)

    return AcquiredLocks(
        execution_id=execution_id,
        owner_tag=owner_tag,
        keys=tuple(wanted),
        expires_at=expires_at,
        renewed=renewed,
        taken_over=taken,
    )


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


async def acquire_execution_locks(
    pool_or_connection: PoolOrConnection,
    *,
    tenant_id: UUID,
    execution_id: UUID,
    keys: Iterable[str],
    ttl_s: float,
    owner_tag: str | None = None,
) -> AcquiredLocks:
    """Take every key for the execution, all or nothing, with expiry now + ``ttl_s``.

    Raises ``ResourceBusyError`` (409, ``extra['holder_execution_id']`` and ``lock_key``)
    when a key is held by a live other owner; nothing is held afterwards. Keys the owner
    already holds are renewed (idempotent); expired keys of others are taken over with a
    ``lock_reaped`` event on their holder. Writes one ``lock_acquired`` event listing the
    keys (with ``expires_at``, ``renewed``, ``taken_over``), atomically with the rows.
    Raises ``NotFoundError`` when the execution is not the tenant's, and ``ValueError`` for
    a key of another tenant or one ``lock_key`` would not have built.

    Given a pool it commits on its own (one statement when every key is free, the normal
    case); given a connection it runs in a savepoint of the caller's transaction, and the
    locks commit with the caller.
    """
    tenant_id = UUID(str(tenant_id))
    wanted = _sorted_keys(tenant_id, keys)
    tag = _owner(execution_id, owner_tag)
    ttl = _check_ttl(ttl_s)
    if not wanted:
        return AcquiredLocks(execution_id=execution_id, owner_tag=tag, keys=(), expires_at=None)

    async def careful(connection: Connection) -> AcquiredLocks:
        return await _acquire(
            connection,
            tenant_id=tenant_id,
            execution_id=execution_id,
            owner_tag=tag,
            wanted=wanted,
            ttl_s=ttl,
        )

    if not isinstance(pool_or_connection, asyncpg.Pool):
        return await _in_transaction(pool_or_connection, careful)
    pool = pool_or_connection
    fast_payload = mask_value(
        {"keys": wanted, "owner_tag": tag, "ttl_s": ttl, "renewed": [], "taken_over": []}
    )

    async def attempt() -> AcquiredLocks:
        async with pool.acquire() as connection:
            # Normally every key is free: one statement, one round trip, no transaction
            # block. Anything else (a conflict, a renewal, a takeover) makes it fail as a
            # whole, and the careful path sorts it out on the same connection.
            try:
                expires_at = await store.insert_free_locks(
                    connection,
                    tenant_id=tenant_id,
                    execution_id=execution_id,
                    owner_tag=tag,
                    keys=wanted,
                    ttl_s=ttl,
                    event_payload=fast_payload,
                )
            except asyncpg.exceptions.UniqueViolationError as exc:
                if exc.constraint_name != "uq_lock_key":
                    raise
            else:
                if expires_at is not None:
                    return AcquiredLocks(
                        execution_id=execution_id,
                        owner_tag=tag,
                        keys=tuple(wanted),
                        expires_at=expires_at,
                    )
            async with connection.transaction():
                return await careful(connection)

    return await _retrying_deadlocks(attempt)


# --- release, renew, reap, inspect -------------------------------------------------------


async def release_execution_locks(
    pool_or_connection: PoolOrConnection,
    *,
    tenant_id: UUID,
    execution_id: UUID,
    owner_tag: str | None = None,
) -> tuple[str, ...]:
    """Delete the owner's locks and write ``lock_released``; return the released keys.

    Meant for ``finally`` on every path: releasing nothing (never acquired, already
    released, reaped, taken over) is a no-op without an event. Another owner's rows are
    never touched. Inside a caller's transaction, call this *before* writing that
    execution's other events: event writes lock the execution, and holding that while
    waiting for a lock row a reaper holds is the one deadlock the ordering cannot prevent.
    """
    tenant_id = UUID(str(tenant_id))
    tag = _owner(execution_id, owner_tag)
    payload = mask_value({"owner_tag": tag})

    async def work(connection: Connection) -> tuple[str, ...]:
        released = await store.delete_owned_locks(
            connection,
            tenant_id=tenant_id,
            execution_id=execution_id,
            owner_tag=tag,
            event_payload=payload,
        )
        return tuple(released)

    return await _one_statement(pool_or_connection, work)


async def renew_execution_locks(
    pool_or_connection: PoolOrConnection,
    *,
    tenant_id: UUID,
    execution_id: UUID,
    ttl_s: float,
    owner_tag: str | None = None,
) -> tuple[str, ...]:
    """Extend every lock the owner still holds to now + ``ttl_s``; return those keys.

    Called with each lease heartbeat. A key missing from the result was reaped or taken
    over after it expired: the runner no longer holds it and must not touch that target.
    No event is written — a heartbeat is not news.
    """
    tenant_id = UUID(str(tenant_id))
    tag = _owner(execution_id, owner_tag)
    ttl = _check_ttl(ttl_s)

    async def work(connection: Connection) -> tuple[str, ...]:
        rows = await store.extend_owned_locks(
            connection, tenant_id=tenant_id, execution_id=execution_id, owner_tag=tag, ttl_s=ttl
        )
        return tuple(row.lock_key for row in rows)

    return await _one_statement(pool_or_connection, work)


async def reap_expired_locks(pool: PoolOrConnection, *, limit: int = 500) -> int:
    """Delete up to ``limit`` expired locks; write ``lock_reaped`` on each owning execution.

    Safe to run from every worker at once (``SKIP LOCKED``): reapers split the expired rows
    and never wait on each other or on an acquirer taking the same row over. Returns the
    number of locks reaped; call again while it returns ``limit``.
    """
    if limit < 1:
        raise ValueError("limit must be >= 1")

    async def work(connection: Connection) -> int:
        rows = await store.delete_expired_locks(connection, limit=limit)
        by_execution: dict[UUID, list[LockRow]] = {}
        for row in rows:
            by_execution.setdefault(row.execution_id, []).append(row)
        for execution_id in sorted(by_execution):
            reaped = sorted(by_execution[execution_id], key=lambda r: r.lock_key)
            await append_event(
                connection,
                execution_id,
                "lock_reaped",
                {
                    "keys": [r.lock_key for r in reaped],
                    "reason": "expired",
                    "owner_tag": reaped[0].owner_tag,
                    "expired_at": min(r.expires_at for r in reaped).isoformat(),
                },
            )
        return len(rows)

    reaped = await _in_transaction(pool, work)
    metrics.locks_reaped("expired", reaped)
    return reaped


async def list_execution_locks(
    pool_or_connection: PoolOrConnection, *, tenant_id: UUID, execution_id: UUID
) -> list[LockRow]:
    """The execution's lock rows (including expired, not yet reaped ones), in key order."""
    tenant_id = UUID(str(tenant_id))

    async def work(connection: Connection) -> list[LockRow]:
        return await store.locks_of_execution(
            connection, tenant_id=tenant_id, execution_id=execution_id
        )

    return await _one_statement(pool_or_connection, work)


async def lock_holder(pool_or_connection: PoolOrConnection, key: str) -> LockRow | None:
    """The row holding ``key`` (possibly expired but not yet reaped), or ``None``."""

    async def work(connection: Connection) -> list[LockRow]:
        return await store.find_lock_holders(connection, [key])

    rows = await _one_statement(pool_or_connection, work)
    return rows[0] if rows else None


# --- the runner's context manager -------------------------------------------------------


async def _complete_despite_cancellation(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` to the end even if our task is cancelled meanwhile, then
    re-deliver the cancellation.

    A lock statement abandoned half-way can commit on the server after we stopped
    listening, leaving a lock nobody will release until it expires. Finishing it (it is
    short) and re-raising keeps ``asyncio.timeout``'s bookkeeping intact, because the
    task's pending cancel request is never cleared.
    """
    task = asyncio.ensure_future(awaitable)
    cancelled = False
    while not task.done():
        try:
            # wait() never cancels the task it waits for, unlike awaiting it directly.
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is the news, not this outcome
        raise asyncio.CancelledError
    return task.result()


@asynccontextmanager
async def execution_locks(
    pool: asyncpg.Pool,
    tenant_id: UUID,
    execution_id: UUID,
    keys: Iterable[str],
    ttl_s: float,
    *,
    owner_tag: str | None = None,
) -> AsyncIterator[AcquiredLocks]:
    """Hold the execution's locks for the ``async with`` body; release them on every exit.

    Success, exception and ``asyncio.CancelledError`` all release. A cancellation that
    lands while acquiring lets the acquire finish and then releases, so no lock outlives
    the block. A failed release is logged, not raised: the body's outcome (or error)
    matters more, and the lock frees itself at expiry (the reaper writes ``lock_reaped``).
    """
    tenant_id = UUID(str(tenant_id))
    wanted = list(keys)

    async def release() -> None:
        try:
            await _complete_despite_cancellation(
                release_execution_locks(
                    pool, tenant_id=tenant_id, execution_id=execution_id, owner_tag=owner_tag
                )
            )
        except Exception:
            logger.exception(
                "could not release the locks of execution %s; they expire on their own",
                execution_id,
            )

    try:
        acquired = await _complete_despite_cancellation(
            acquire_execution_locks(
                pool,
                tenant_id=tenant_id,
                execution_id=execution_id,
                keys=wanted,
                ttl_s=ttl_s,
                owner_tag=owner_tag,
            )
        )
    except asyncio.CancelledError:
        await release()
        raise
    try:
        yield acquired
    finally:
        await release()
