"""Request correlation and latency for every HTTP request (R-OBS).

:class:`ObservabilityMiddleware` is plain ASGI (no ``BaseHTTPMiddleware``: that one runs
the endpoint in another task, which breaks context variables and streaming). Per request:

* ``X-Request-ID``: an incoming value is kept when it is at most 128 characters of a safe
  charset, otherwise replaced; absent, one is generated. The chosen value is written back
  into the request's headers (so ``authenticate`` and everything after it see the same
  id), bound to the log context (every line logged while serving it carries
  ``request_id``), and returned on the response — error responses included.
* latency from arrival to the response headers, by route *template* (``/v1/executions/
  {execution_id}``, never the raw path, so label values stay few), method and status.

Unhandled exceptions are answered here with the same problem document
``api/problems.py`` produces, so a 500 carries the request id as well: Starlette's own
last-resort handler sits outside every user middleware and would drop the header.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any, Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from opsexec.api.problems import problem_response
from opsexec.observability import metrics
from opsexec.observability.logging import bind_log_context

__all__ = ["REQUEST_ID_HEADER", "ObservabilityMiddleware", "accepted_request_id"]

logger = logging.getLogger("opsexec.api")

REQUEST_ID_HEADER: Final = "X-Request-ID"
_HEADER: Final = b"x-request-id"
MAX_REQUEST_ID_LENGTH: Final = 128
# Letters, digits and the punctuation common in trace ids (W3C, AWS, uuids, base64url):
# nothing that could break a log line, a header or a shell.
_SAFE_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:@+=/-]{1,%d}" % MAX_REQUEST_ID_LENGTH)  # noqa: UP031
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE: Final = "unmatched"


def accepted_request_id(raw: str | None) -> str:
    """``raw`` when it is a safe request id, else a new one (a uuid4)."""
    if raw is not None and _SAFE_REQUEST_ID.fullmatch(raw):
        return raw
    return str(uuid.uuid4())


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED_ROUTE


class ObservabilityMiddleware:
    """Request id in, request id out, bound to logs; request latency into metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = self._adopt_request_id(scope)
        with bind_log_context(request_id=request_id):
            if scope["type"] == "websocket":
                await self.app(scope, receive, send)
                return
            await self._http(scope, receive, send, request_id)

    @staticmethod
    def _adopt_request_id(scope: Scope) -> str:
        """Choose the id and make it the only ``X-Request-ID`` the app will see."""
        headers: list[tuple[bytes, bytes]] = list(scope.get("headers") or [])
        incoming = next((value for name, value in headers if name.lower() == _HEADER), None)
        try:
            raw = incoming.decode("latin-1") if incoming is not None else None
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
            raw = None
        request_id = accepted_request_id(raw)
        if raw != request_id:
            headers = [(name, value) for name, value in headers if name.lower() != _HEADER]
            headers.append((_HEADER, request_id.encode("ascii")))
            scope["headers"] = headers
        return request_id

    async def _http(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        started = time.perf_counter()
        state: dict[str, Any] = {"status": None}
        method = str(scope.get("method", "GET")).upper()
        method = method if method in _METHODS else "OTHER"

        async def send_with_request_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                state["status"] = status
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.lower() != _HEADER
                ]
                headers.append((_HEADER, request_id.encode("ascii")))
                message = {**message, "headers": headers}
                metrics.http_request(
                    _route_template(scope), method, status, time.perf_counter() - started
                )
            await send(message)

        try:
            await self.app(scope, receive, send_with_request_id)
        except Exception:
            if state["status"] is not None:
                raise  # the response is under way; the server can only drop the connection
            logger.exception("unhandled error")
            response = problem_response(
                500, "internal_error", "Internal error", "an unexpected error occurred"
            )
            await response(scope, receive, send_with_request_id)
