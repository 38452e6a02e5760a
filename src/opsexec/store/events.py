"""The execution event log: every event is a row first, an announcement second."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from opsexec.safety.masking import mask_value
from opsexec.store import Connection
from opsexec.store.channels import EVENTS_CHANNEL

# The advisory lock serialises event writers of one execution until they commit, so `seq`
# (allocated at insert) is also commit order within an execution: a stream that read up
# to seq N can never later find an event N-1 appear behind it.
# pg_notify in the same statement queues the announcement in the caller's transaction:
# PostgreSQL delivers it only if, and only after, that transaction commits. The payload is
# the seq alone (NOTIFY payloads are capped near 8 KB); listeners read the row.
APPEND_EVENT = f"""
WITH ordered AS (
    SELECT pg_advisory_xact_lock(hashtextextended($1::uuid::text, 0))
), inserted AS (
    INSERT INTO execution_events (execution_id, step_id, event_kind, payload, metadata)
    SELECT $1::uuid, $2::uuid, $3::varchar, $4::jsonb, $5::jsonb FROM ordered
    RETURNING seq
)
SELECT seq, pg_notify('{EVENTS_CHANNEL}', $1::uuid::text || ':' || seq) FROM inserted
"""


async def append_event(
    connection: Connection,
    execution_id: UUID,
    kind: str,
    payload: Mapping[str, Any] | None = None,
    *,
    step_id: UUID | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> int:
    """Insert one masked event in the caller's transaction and return its ``seq``."""
    seq: int = await connection.fetchval(
        APPEND_EVENT,
        execution_id,
        step_id,
        kind,
        mask_value(dict(payload or {})),
        mask_value(dict(metadata or {})),
    )
    return seq


# Several events of one execution in one statement, in the order given: rows are inserted
# (and `seq` drawn) in the order the ordinality sort produces them.
APPEND_EVENTS = f"""
WITH ordered AS (
    SELECT pg_advisory_xact_lock(hashtextextended($1::uuid::text, 0))
), inserted AS (
    INSERT INTO execution_events (execution_id, event_kind, payload)
    SELECT $1::uuid, e.kind, e.payload
    FROM ordered, unnest($2::varchar[], $3::jsonb[]) WITH ORDINALITY AS e(kind, payload, n)
    ORDER BY e.n
    RETURNING seq
)
SELECT seq, pg_notify('{EVENTS_CHANNEL}', $1::uuid::text || ':' || seq) FROM inserted
"""


async def append_events(
    connection: Connection,
    execution_id: UUID,
    kinds_and_payloads: Sequence[tuple[str, Mapping[str, Any]]],
) -> list[int]:
    """``append_event`` for several execution-level events at once (one round trip)."""
    rows = await connection.fetch(
        APPEND_EVENTS,
        execution_id,
        [kind for kind, _ in kinds_and_payloads],
        [mask_value(dict(payload)) for _, payload in kinds_and_payloads],
    )
    return sorted(row["seq"] for row in rows)
