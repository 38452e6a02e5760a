"""The PostgreSQL NOTIFY channels: one list, so writers and listeners cannot drift apart.

A notification is queued in the transaction that made its news true, so PostgreSQL
delivers it only if, and only after, that transaction commits. Payloads are identifiers
only (NOTIFY caps them near 8 KB); whoever hears one reads the rows.
"""

from __future__ import annotations

from typing import Final

from opsexec.store import Connection

EVENTS_CHANNEL: Final = "opsexec_events"
"""``<execution_id>:<seq>`` for every committed execution event (live progress)."""
QUEUE_CHANNEL: Final = "opsexec_queue"
"""An execution id whose background job became runnable: workers look for work."""
CANCEL_CHANNEL: Final = "opsexec_cancel"
"""An execution id force-cancelled while running: the worker running it kills the step."""
DRAIN_CHANNEL: Final = "opsexec_worker_drain"
"""A worker id an operator asked to drain."""

WORKER_SIGNAL_CHANNELS: Final = (QUEUE_CHANNEL, CANCEL_CHANNEL, DRAIN_CHANNEL)
"""What workers listen to (directly, or through the Redis relay: ``queue/signals.py``)."""


async def notify(connection: Connection, channel: str, payload: str) -> None:
    """Queue a notification in the caller's transaction (sent at commit, never before)."""
    await connection.execute("SELECT pg_notify($1, $2)", channel, payload)
