"""Reads of the event log for live streams (``progress/``): by cursor, newest seq, progress.

Kept apart from ``events.py`` so the write path every engine module calls stays tiny.
"""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

import asyncpg

from opsexec.store import Connection

EVENTS_AFTER = """
SELECT seq, execution_id, step_id, "timestamp", event_kind, payload
FROM execution_events
WHERE execution_id = $1 AND seq > $2
ORDER BY seq
LIMIT $3
"""


async def events_after(
    connection: Connection, execution_id: UUID, after: int, limit: int
) -> list[asyncpg.Record]:
    """Committed events of one execution with ``seq > after``, oldest first."""
    return await connection.fetch(EVENTS_AFTER, execution_id, after, limit)


async def last_seq(connection: Connection, execution_id: UUID) -> int:
    """The newest committed ``seq`` of an execution (0 when it has none)."""
    seq: int = await connection.fetchval(
        "SELECT coalesce(max(seq), 0) FROM execution_events WHERE execution_id = $1",
        execution_id,
    )
    return seq


LAST_SEQS = """
SELECT execution_id, max(seq) AS seq
FROM execution_events
WHERE execution_id = ANY($1::uuid[])
GROUP BY execution_id
"""


async def last_seqs(connection: Connection, execution_ids: Sequence[UUID]) -> dict[UUID, int]:
    """The newest ``seq`` of each execution that has events: one query for many streams."""
    rows = await connection.fetch(LAST_SEQS, list(execution_ids))
    return {row["execution_id"]: row["seq"] for row in rows}


PROGRESS_AT = """
SELECT
    (SELECT count(*) FROM execution_steps WHERE execution_id = $1) AS total,
    (SELECT payload->>'to' FROM execution_events
      WHERE execution_id = $1 AND seq <= $2 AND event_kind = 'status_transition'
      ORDER BY seq DESC LIMIT 1) AS status,
    (SELECT "timestamp" FROM execution_events
      WHERE execution_id = $1 AND seq <= $2 AND event_kind = 'execution_running'
      ORDER BY seq LIMIT 1) AS started_at,
    (SELECT coalesce(jsonb_object_agg(step, kind), '{}'::jsonb) FROM (
        SELECT DISTINCT ON (payload->>'step_number')
               payload->>'step_number' AS step, event_kind AS kind
        FROM execution_events
        WHERE execution_id = $1 AND seq <= $2
          AND event_kind IN ('step_completed', 'step_failed')
          AND payload ? 'step_number'
        ORDER BY payload->>'step_number', seq DESC
    ) finished) AS finished
"""


async def progress_at(connection: Connection, execution_id: UUID, seq: int) -> asyncpg.Record:
    """What a stream resuming after ``seq`` must know to report progress from there on.

    ``total`` step-targets now; the status, run start and per-step outcome as of ``seq``.
    """
    row = await connection.fetchrow(PROGRESS_AT, execution_id, seq)
    assert row is not None
    return row


async def step_total(connection: Connection, execution_id: UUID) -> int:
    """How many step-targets the execution has now (an amended plan changes it)."""
    total: int = await connection.fetchval(
        "SELECT count(*) FROM execution_steps WHERE execution_id = $1", execution_id
    )
    return total
