"""Live progress over HTTP: WebSocket, Server-Sent Events and long-poll, plus stream tickets.

How each client proves who it is — never with an API key in a URL, since URLs are logged:

* scripts and the CLI: ``Authorization: Bearer <key>`` on any of the three;
* browsers, WebSocket: the key rides in a subprotocol, ``opsexec.bearer.<base64url(key)>``,
  offered next to ``opsexec.v1`` (the one the server selects and echoes; the key is never
  echoed). ``Sec-WebSocket-Protocol`` is a header: not logged, not in history;
* browsers, SSE: ``EventSource`` cannot send headers, so the console first mints a
  single-use, one-minute ticket (``POST /v1/stream-tickets``, key in the header) and opens
  ``…/events?ticket=…``; see ``progress/tickets.py``.

Every path then reads the execution through the executor, so another tenant's execution
is a 404 (and a recorded probe) before a single event is read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import json
from typing import Annotated, Any
from uuid import UUID

import asyncpg
from fastapi import APIRouter, Header, Query, Request, WebSocket, status
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocketDisconnect

from opsexec.api.auth import authenticate
from opsexec.api.problems import problem_response
from opsexec.api.routes.executions import Reader, load_execution
from opsexec.engine.actor import Actor
from opsexec.errors import AuthenticationError, OpsexecError, PermissionDeniedError
from opsexec.progress.bus import EventBus
from opsexec.progress.streams import (
    MAX_POLL_WAIT_S,
    EventStream,
    poll_once,
    sse_body,
    websocket_pump,
)
from opsexec.progress.tickets import StreamTickets
from opsexec.safety.rbac import Permission
from opsexec.store.identity import find_key_owner
from opsexec.tenancy import TenantSettings

router = APIRouter(prefix="/v1", tags=["progress"])

WS_SUBPROTOCOL = "opsexec.v1"
WS_KEY_PREFIX = "opsexec.bearer."
ANNOUNCEMENTS_HEADER = "X-Opsexec-Announcements"
"""Tells clients (and operators) how this replica hears of new events: redis|notify|poll."""


class StreamTicketRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    execution_id: UUID


class StreamTicket(BaseModel):
    ticket: str = Field(description="Single use, for this execution's event stream only.")
    execution_id: UUID
    expires_in_s: float
    events_url: str = Field(description="Open this URL with EventSource.")


class ProgressView(BaseModel):
    done: int
    total: int
    percent: float
    succeeded: int
    failed: int


class EventMessage(BaseModel):
    seq: int = Field(description="The resume cursor: pass the last one back as `after`.")
    kind: str
    at: str
    execution_id: UUID
    step_id: UUID | None
    payload: dict[str, Any]
    status: str = Field(description="The execution's status as of this event.")
    progress: ProgressView
    eta_s: float | None = Field(description="Seconds left, from the estimate and the pace.")


class EventsPage(BaseModel):
    events: list[EventMessage]
    next_after: int
    done: bool = Field(description="True once the execution's last event was delivered.")
    status: str
    progress: ProgressView
    eta_s: float | None


def _bus(connection: HTTPConnection) -> EventBus:
    bus: EventBus = connection.app.state.bus
    return bus


def _tickets(connection: HTTPConnection) -> StreamTickets:
    tickets: StreamTickets = connection.app.state.stream_tickets
    return tickets


def _heartbeat_s(connection: HTTPConnection) -> float:
    heartbeat: float = connection.app.state.settings.stream_heartbeat_s
    return heartbeat


def _client_ip(connection: HTTPConnection) -> str | None:
    host = connection.client.host if connection.client else None
    try:
        return str(ipaddress.ip_address(host)) if host else None
    except ValueError:  # test clients report names such as "testclient"
        return None


async def _actor_for_key(connection: HTTPConnection, key: str) -> Actor:
    """The same principal ``api.auth.authenticate`` builds, for a key not in a header."""
    async with connection.app.state.db.pool.acquire() as db:
        owner = await find_key_owner(db, key)
    if owner is None:
        raise AuthenticationError("the API key is unknown, revoked, or its user is disabled")
    return Actor(
        tenant_id=owner.tenant_id,
        tenant_name=owner.tenant_name,
        tenant_settings=TenantSettings.from_stored(owner.tenant_settings),
        user_id=owner.user_id,
        principal=owner.principal,
        roles=owner.roles,
        auth_method="api_key",
        source_ip=_client_ip(connection),
        request_id=connection.headers.get("x-request-id"),
    )


def _readable(actor: Actor) -> Actor:
    if not actor.can(Permission.EXECUTION_READ):
        raise PermissionDeniedError(
            f"{actor.principal} lacks the {Permission.EXECUTION_READ.value} permission",
            extra={"permission": Permission.EXECUTION_READ.value},
        )
    return actor


def _redeem(connection: HTTPConnection, ticket: str, execution_id: UUID) -> Actor:
    actor = _tickets(connection).redeem(ticket, execution_id)
    if actor is None:
        raise AuthenticationError(
            "the stream ticket is unknown, already used, expired, or for another execution"
        )
    return actor


def _cursor(last_event_id: str | None, after: int) -> int:
    """``Last-Event-ID`` (what a reconnecting EventSource sends) wins over ``after``."""
    if last_event_id is not None and last_event_id.strip().isdigit():
        return int(last_event_id.strip())
    return after


def _wants_event_stream(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "").lower()


@router.post("/stream-tickets", status_code=status.HTTP_201_CREATED, response_model=StreamTicket)
async def create_stream_ticket(
    body: StreamTicketRequest, request: Request, principal: Reader
) -> StreamTicket:
    """A one-minute, single-use ticket to open one execution's SSE stream from a browser."""
    await load_execution(request, principal, body.execution_id)
    ticket = _tickets(request).issue(principal, body.execution_id)
    return StreamTicket(
        ticket=ticket,
        execution_id=body.execution_id,
        expires_in_s=_tickets(request).ttl_s,
        events_url=f"/v1/executions/{body.execution_id}/events?ticket={ticket}",
    )


@router.get(
    "/executions/{execution_id}/events",
    response_model=None,
    responses={
        200: {
            "description": "Long-poll: events after `after` (JSON). With `Accept: "
            "text/event-stream`: a Server-Sent Events stream, `id:` = seq, heartbeat "
            "comments, `event: end` after the last event.",
            "model": EventsPage,
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        204: {"description": "SSE only: the execution has ended and nothing is left to send."},
    },
)
async def execution_events(
    execution_id: UUID,
    request: Request,
    after: Annotated[int, Query(ge=0, description="Return events with a larger seq.")] = 0,
    wait: Annotated[
        float,
        Query(
            ge=0,
            description=f"Long-poll: wait this long for one (capped at {MAX_POLL_WAIT_S:g} s).",
        ),
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
    ticket: Annotated[
        str | None, Query(max_length=200, description="From POST /v1/stream-tickets.")
    ] = None,
    last_event_id: Annotated[str | None, Header(max_length=40)] = None,
) -> Response:
    """An execution's events after a cursor: long-poll JSON, or SSE when asked for."""
    actor = _redeem(request, ticket, execution_id) if ticket else await authenticate(request)
    execution = await load_execution(request, _readable(actor), execution_id)
    bus = _bus(request)
    headers = {ANNOUNCEMENTS_HEADER: bus.announcements, "Cache-Control": "no-store"}
    if _wants_event_stream(request):
        return await _event_stream_response(request, execution, _cursor(last_event_id, after))
    async with EventStream(bus, execution, after) as stream:
        page = await poll_once(stream, wait, limit)
    return JSONResponse(page, headers=headers)


async def _event_stream_response(
    request: Request, execution: asyncpg.Record, cursor: int
) -> Response:
    bus = _bus(request)
    stream = EventStream(bus, execution, cursor)
    await stream.__aenter__()
    try:
        first = await stream.next_messages(0)
    except BaseException:
        await stream.__aexit__(None, None, None)
        raise
    if stream.ended and not first:
        # 204 is how a server tells EventSource not to reconnect: there is nothing left.
        await stream.__aexit__(None, None, None)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    async def body() -> Any:
        try:
            async for chunk in sse_body(stream, first, heartbeat_s=_heartbeat_s(request)):
                yield chunk
        finally:
            await stream.__aexit__(None, None, None)

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",  # proxies must not hold events back
            ANNOUNCEMENTS_HEADER: bus.announcements,
        },
    )


def _key_from_subprotocols(offered: list[str]) -> str | None:
    for protocol in offered:
        if protocol.startswith(WS_KEY_PREFIX):
            encoded = protocol.removeprefix(WS_KEY_PREFIX)
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError):
                return None
    return None


def _key_from_header(connection: HTTPConnection) -> str | None:
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def _deny(websocket: WebSocket, error: OpsexecError) -> None:
    """Refuse the handshake with the same problem document HTTP would send."""
    response = problem_response(
        error.status, error.code, error.title, error.detail, extra=error.extra
    )
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:  # a server without the denial extension: close with 4xxx instead
        await websocket.close(code=4000 + error.status, reason=error.code)


@router.websocket("/executions/{execution_id}/ws")
async def execution_websocket(
    websocket: WebSocket,
    execution_id: UUID,
    after: Annotated[int, Query(ge=0)] = 0,
    ticket: Annotated[str | None, Query(max_length=200)] = None,
) -> None:
    """Events after ``after`` as JSON messages (``type``: event, heartbeat, end)."""
    offered = list(websocket.scope.get("subprotocols") or [])
    try:
        if ticket:
            actor = _redeem(websocket, ticket, execution_id)
        else:
            key = _key_from_subprotocols(offered) or _key_from_header(websocket)
            if key is None:
                raise AuthenticationError(
                    "send an API key as 'Authorization: Bearer <key>', as the subprotocol "
                    f"'{WS_KEY_PREFIX}<base64url key>', or use a stream ticket"
                )
            actor = await _actor_for_key(websocket, key)
        async with websocket.app.state.db.pool.acquire() as db:
            execution = await websocket.app.state.executor.get(db, _readable(actor), execution_id)
    except OpsexecError as error:
        await _deny(websocket, error)
        return
    await websocket.accept(subprotocol=WS_SUBPROTOCOL if WS_SUBPROTOCOL in offered else None)

    async def send(message: dict[str, Any]) -> None:
        await websocket.send_text(json.dumps(message, separators=(",", ":"), default=str))

    async def until_disconnect() -> None:
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass  # clients may send keep-alives; there is nothing to answer

    async with EventStream(_bus(websocket), execution, after) as stream:
        pump = asyncio.create_task(
            websocket_pump(stream, send, heartbeat_s=_heartbeat_s(websocket))
        )
        listen = asyncio.create_task(until_disconnect())
        done, pending = await asyncio.wait({pump, listen}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        failure = pump.exception() if pump in done else None
        if pump in done and failure is None:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await websocket.close(code=1000)
        elif failure is not None and not isinstance(failure, WebSocketDisconnect | OSError):
            raise failure
