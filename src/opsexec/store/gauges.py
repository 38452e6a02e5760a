"""SQL for the gauges ``/metrics`` reads at scrape time: queue, DLQ, workers, kill switch.

One statement, so a scrape costs one round trip however many gauges there are. Every
count rides an index: the queue's partial index on queued rows, the DLQ is small by
nature, and heartbeats are one row per worker.
"""

from __future__ import annotations

from dataclasses import dataclass

from opsexec.store import Connection

READ = """
SELECT
    (SELECT count(*) FROM execution_queue
     WHERE status = 'queued' AND available_at <= now()) AS queue_ready,
    (SELECT count(*) FROM execution_queue
     WHERE status = 'queued' AND available_at > now()
       AND available_at <> 'infinity'::timestamptz) AS queue_deferred,
    (SELECT count(*) FROM execution_queue
     WHERE status = 'queued' AND available_at = 'infinity'::timestamptz) AS queue_held,
    (SELECT count(*) FROM execution_queue WHERE status = 'leased') AS queue_leased,
    (SELECT coalesce(extract(epoch FROM now() - min(greatest(queued_at, available_at))), 0)
     FROM execution_queue
     WHERE status = 'queued' AND available_at <= now()) AS oldest_ready_age_s,
    (SELECT count(*) FROM execution_dlq
     WHERE requeued_at IS NULL AND closed_at IS NULL) AS dlq_entries,
    (SELECT count(*) FROM worker_heartbeats
     WHERE stopped_at IS NULL AND drain_requested_at IS NULL
       AND last_seen_at > now() - make_interval(secs => $1)) AS workers_running,
    (SELECT count(*) FROM worker_heartbeats
     WHERE stopped_at IS NULL AND drain_requested_at IS NOT NULL
       AND last_seen_at > now() - make_interval(secs => $1)) AS workers_draining,
    (SELECT count(*) FROM worker_heartbeats
     WHERE stopped_at IS NULL
       AND last_seen_at <= now() - make_interval(secs => $1)) AS workers_stale,
    coalesce((SELECT (value->>'engaged')::boolean FROM service_flags
              WHERE name = 'kill_switch'), false) AS kill_switch_runtime
"""


@dataclass(frozen=True, slots=True)
class OperationalGauges:
    queue_ready: int
    queue_deferred: int
    queue_held: int
    queue_leased: int
    oldest_ready_age_s: float
    dlq_entries: int
    workers_running: int
    workers_draining: int
    workers_stale: int
    kill_switch_runtime: bool


async def read_operational_gauges(
    connection: Connection, *, fresh_within_s: float, timeout_s: float | None = None
) -> OperationalGauges:
    row = await connection.fetchrow(READ, fresh_within_s, timeout=timeout_s)
    assert row is not None
    return OperationalGauges(
        queue_ready=row["queue_ready"],
        queue_deferred=row["queue_deferred"],
        queue_held=row["queue_held"],
        queue_leased=row["queue_leased"],
        oldest_ready_age_s=float(row["oldest_ready_age_s"]),
        dlq_entries=row["dlq_entries"],
        workers_running=row["workers_running"],
        workers_draining=row["workers_draining"],
        workers_stale=row["workers_stale"],
        kill_switch_runtime=bool(row["kill_switch_runtime"]),
    )
