"""Stream tickets: how a browser opens an SSE stream without putting its API key in a URL.

``EventSource`` cannot send an ``Authorization`` header, and a URL ends up in access logs,
proxy logs and browser history. So the console first asks (with its key, in a header)
``POST /v1/stream-tickets {execution_id}`` and opens the stream with ``?ticket=…``. A
ticket is random, valid for one minute, good for exactly one stream of exactly one
execution, and kept only as its SHA-256 digest in this process's memory: a ticket read
from a log has already been spent. (WebSockets carry the key in a subprotocol instead,
which is a header, so they need no ticket; see ``api/routes/progress.py``.)

Tickets live in one API process. Behind a load balancer, route a client's ticket request
and its stream to the same replica (any sticky-session setting does), or use the header
or WebSocket paths, which work everywhere.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from uuid import UUID

from opsexec.engine.actor import Actor

TICKET_TTL_S = 60.0
MAX_OUTSTANDING = 10_000
"""Unspent tickets kept at most; the oldest are forgotten first (memory stays bounded)."""


@dataclass(frozen=True, slots=True)
class _Issued:
    actor: Actor
    execution_id: UUID
    expires_at: float


def _digest(ticket: str) -> str:
    return hashlib.sha256(ticket.encode()).hexdigest()


class StreamTickets:
    """Issued, unspent tickets of this process, by digest."""

    def __init__(self, ttl_s: float = TICKET_TTL_S, capacity: int = MAX_OUTSTANDING) -> None:
        self.ttl_s = ttl_s
        self.capacity = capacity
        self._issued: dict[str, _Issued] = {}

    def issue(self, actor: Actor, execution_id: UUID) -> str:
        self._forget_expired()
        while len(self._issued) >= self.capacity:
            del self._issued[next(iter(self._issued))]  # dicts keep insertion order
        ticket = "stk_" + secrets.token_urlsafe(24)
        self._issued[_digest(ticket)] = _Issued(actor, execution_id, time.monotonic() + self.ttl_s)
        return ticket

    def redeem(self, ticket: str, execution_id: UUID) -> Actor | None:
        """The actor the ticket was issued to, once; None if unknown, spent, expired or for
        another execution (a mismatch spends it too: tickets are not for probing)."""
        issued = self._issued.pop(_digest(ticket), None)
        if issued is None or issued.expires_at < time.monotonic():
            return None
        if issued.execution_id != execution_id:
            return None
        return issued.actor

    def _forget_expired(self) -> None:
        now = time.monotonic()
        for digest in [d for d, i in self._issued.items() if i.expires_at < now]:
            del self._issued[digest]
