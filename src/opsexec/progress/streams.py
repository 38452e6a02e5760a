"""Live progress of one execution, three ways: WebSocket, Server-Sent Events, long-poll.

All three are the same :class:`EventStream` — the execution's committed events after a
cursor, in seq order, each decorated with the progress and ETA as of that event — framed
differently. The cursor is the last ``seq`` a client has; handing it back (WS ``after``,
SSE ``Last-Event-ID``, poll ``after``) resumes with no gap and no duplicate, because the
stream only ever returns rows with a larger seq and, within an execution, seq order is
commit order.

A stream ends after the execution's last event: ``execution_completed``,
``execution_failed``, ``execution_cancelled``, or a move to a terminal status (a
rejection has no ``execution_*`` event of its own). Rows the same transaction wrote are
delivered before the end.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg

from opsexec.progress.bus import EventBus, StoredEvent, Watch
from opsexec.store.event_reads import progress_at, step_total

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "rejected"})
ENDING_KINDS = frozenset({"execution_completed", "execution_failed", "execution_cancelled"})
FINISHED_STEP_KINDS = frozenset({"step_completed", "step_failed"})
MAX_POLL_WAIT_S = 30.0
SSE_MAX_S = 300.0
"""An SSE response ends (``event: reconnect``) after this long; the client resumes by seq.

A streaming HTTP response keeps a server's graceful shutdown waiting until it ends;
bounding it bounds that wait. WebSockets need no such limit: the server closes them."""
SSE_RETRY_MS = 2000


@dataclass
class Progress:
    """Where an execution stands as of some event: steps done of total, status, timing."""

    total: int
    estimated_s: float | None
    status: str = "pending"
    started_at: datetime | None = None
    finished: dict[str, str] = field(default_factory=dict)
    """step_number → the kind of its latest finishing event (completed or failed)."""

    @classmethod
    def at(cls, baseline: asyncpg.Record, estimated_s: float | None) -> Progress:
        return cls(
            total=baseline["total"],
            estimated_s=estimated_s,
            status=baseline["status"] or "pending",
            started_at=baseline["started_at"],
            finished=dict(baseline["finished"] or {}),
        )

    def apply(self, event: StoredEvent) -> None:
        payload = event.payload
        if event.kind == "status_transition" and isinstance(payload.get("to"), str):
            self.status = payload["to"]
        elif event.kind == "execution_running" and self.started_at is None:
            self.started_at = event.timestamp
        elif event.kind in FINISHED_STEP_KINDS and "step_number" in payload:
            self.finished[str(payload["step_number"])] = event.kind
        elif event.kind == "plan_amended":
            self.finished.clear()  # the steps were replaced; the caller refreshes ``total``

    def view(self, at: datetime) -> tuple[dict[str, Any], float | None]:
        """``(progress, eta_s)`` as of ``at``.

        The ETA is the plan's estimate minus the time spent until a step has finished,
        then the observed pace (elapsed / done * remaining) — the estimate is a guess made
        before anything ran, the pace is what this run actually does. Before the run
        starts it is the whole estimate (queueing and approvals are not predictable);
        at the end it is 0.
        """
        succeeded = sum(1 for kind in self.finished.values() if kind == "step_completed")
        failed = len(self.finished) - succeeded
        done = min(len(self.finished), self.total)
        percent = round(100.0 * done / self.total, 1) if self.total else 0.0
        eta: float | None
        if self.status in TERMINAL_STATUSES:
            eta = 0.0
        elif self.started_at is None:
            eta = self.estimated_s
        else:
            elapsed = max((at - self.started_at).total_seconds(), 0.0)
            if done:
                eta = elapsed / done * (self.total - done)
            elif self.estimated_s is not None:
                eta = max(self.estimated_s - elapsed, 0.0)
            else:
                eta = None
        progress = {
            "done": done,
            "total": self.total,
            "percent": percent,
            "succeeded": succeeded,
            "failed": failed,
        }
        return progress, (round(eta, 1) if eta is not None and math.isfinite(eta) else None)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


class EventStream:
    """One client's ordered, gapless, duplicate-free view of an execution from a cursor.

    Use as an async context manager (it holds a watch on the bus while open).
    """

    def __init__(self, bus: EventBus, execution: asyncpg.Record, after: int) -> None:
        self.bus = bus
        self.execution_id: UUID = execution["id"]
        self.cursor = max(after, 0)
        self.ended = False
        self._estimated_s: float | None = (execution["metadata"] or {}).get("estimated_duration_s")
        # Terminal already: every event is committed, so read to the end without waiting.
        self._draining = execution["status"] in TERMINAL_STATUSES
        self._progress = Progress(total=0, estimated_s=self._estimated_s)
        self._watch: Watch | None = None
        self._exit = AsyncExitStack()

    async def __aenter__(self) -> EventStream:
        async with self.bus.pool.acquire() as connection:
            baseline = await progress_at(connection, self.execution_id, self.cursor)
        self._progress = Progress.at(baseline, self._estimated_s)
        self._watch = await self._exit.enter_async_context(self.bus.watch(self.execution_id))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._exit.aclose()

    @property
    def status(self) -> str:
        return self._progress.status

    def summary(self) -> dict[str, Any]:
        """Status, progress and ETA as of now (for poll answers and the end message)."""
        progress, eta = self._progress.view(datetime.now(UTC))
        return {"status": self.status, "progress": progress, "eta_s": eta}

    async def next_messages(self, wait_s: float, limit: int = 500) -> list[dict[str, Any]]:
        """The next events (at most ``limit``) as soon as there are any, else ``[]`` after
        ``wait_s``. Sets ``ended`` once the execution's last event was returned."""
        if self.ended:
            return []
        assert self._watch is not None, "use the stream as an async context manager"
        if self._draining:
            events = await self.bus.read(self.execution_id, self.cursor, limit)
            if len(events) < limit:
                self.ended = True
        else:
            events = (await self._watch.next_events(self.cursor, wait_s))[:limit]
        messages = await self._consume(events)
        if self._draining and not self.ended and len(messages) < limit:
            # The ending event arrived in this batch: what its transaction also wrote is
            # committed with it, so take the rest now and finish.
            room = limit - len(messages)
            rest = await self.bus.read(self.execution_id, self.cursor, room)
            messages += await self._consume(rest)
            self.ended = len(rest) < room
        return messages

    async def _consume(self, events: list[StoredEvent]) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        for event in events:
            if event.seq <= self.cursor:
                continue  # never twice, whatever path delivered it
            self._progress.apply(event)
            if event.kind == "plan_amended":
                async with self.bus.pool.acquire() as connection:
                    self._progress.total = await step_total(connection, self.execution_id)
            messages.append(self._message(event))
            self.cursor = event.seq
            if event.kind in ENDING_KINDS or (
                event.kind == "status_transition" and self.status in TERMINAL_STATUSES
            ):
                self._draining = True
        return messages

    def _message(self, event: StoredEvent) -> dict[str, Any]:
        progress, eta = self._progress.view(event.timestamp)
        return {
            "seq": event.seq,
            "kind": event.kind,
            "at": _iso(event.timestamp),
            "execution_id": str(event.execution_id),
            "step_id": str(event.step_id) if event.step_id else None,
            "payload": event.payload,
            "status": self.status,
            "progress": progress,
            "eta_s": eta,
        }


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


# --- long-poll ------------------------------------------------------------------------------


async def poll_once(stream: EventStream, wait_s: float, limit: int) -> dict[str, Any]:
    """``{events, next_after, done, status, progress, eta_s}``: at once when events exist,
    after ``wait_s`` (capped) otherwise."""
    wait_s = min(max(wait_s, 0.0), MAX_POLL_WAIT_S)
    events = await stream.next_messages(wait_s, limit)
    return {"events": events, "next_after": stream.cursor, "done": stream.ended} | (
        stream.summary()
    )


# --- Server-Sent Events ---------------------------------------------------------------------


def sse_frame(message: dict[str, Any]) -> str:
    return f"id: {message['seq']}\ndata: {_json(message)}\n\n"


async def sse_body(
    stream: EventStream,
    first: list[dict[str, Any]],
    *,
    heartbeat_s: float,
    max_s: float = SSE_MAX_S,
) -> AsyncIterator[str]:
    """The SSE body: events (``id:`` = seq), ``: heartbeat`` comments when idle, then
    ``event: end`` after the last event, or ``event: reconnect`` when ``max_s`` is up."""
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + max_s
    yield f"retry: {SSE_RETRY_MS}\n\n"
    messages = first
    while True:
        for message in messages:
            yield sse_frame(message)
        if stream.ended:
            yield f"event: end\ndata: {_json({'next_after': stream.cursor} | stream.summary())}\n\n"
            return
        if not messages:
            yield ": heartbeat\n\n"
        if loop.time() >= stop_at:
            yield f"event: reconnect\ndata: {_json({'next_after': stream.cursor})}\n\n"
            return
        messages = await stream.next_messages(min(heartbeat_s, max(stop_at - loop.time(), 0)))


# --- WebSocket ------------------------------------------------------------------------------


async def websocket_pump(
    stream: EventStream,
    send: Callable[[dict[str, Any]], Awaitable[None]],
    *,
    heartbeat_s: float,
) -> None:
    """Send ``{"type": "event", …}`` messages, ``{"type": "heartbeat"}`` when idle, and
    ``{"type": "end", …}`` after the last event; returns when the stream ended."""
    while True:
        messages = await stream.next_messages(heartbeat_s)
        for message in messages:
            await send({"type": "event"} | message)
        if stream.ended:
            await send({"type": "end", "next_after": stream.cursor} | stream.summary())
            return
        if not messages:
            await send({"type": "heartbeat", "at": _iso(datetime.now(UTC))})
