"""The one place domain errors become HTTP: RFC 9457 problem details with a stable code."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from opsexec.errors import OpsexecError, pointer_from_location
from opsexec.safety.masking import mask_text

PROBLEM_JSON = "application/problem+json"
logger = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
}


def json_pointer(location: tuple[Any, ...] | list[Any]) -> str:
    """``("body", "plan", "steps", 0)`` → ``/plan/steps/0``: the request part is implied."""
    parts = list(location)
    if parts and parts[0] in {"body", "query", "path", "header"}:
        parts = parts[1:]
    return pointer_from_location(parts)


def problem_response(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    pointer: str | None = None,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"https://opsexec.dev/problems/{code}",
        "title": title,
        "status": status,
        "code": code,
        "detail": mask_text(detail),
    }
    if pointer is not None:
        body["pointer"] = pointer
    if extra:
        body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


async def _domain_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpsexecError)
    if exc.status >= 500:
        logger.error("domain error %s: %s", exc.code, exc.detail)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return problem_response(
        exc.status,
        exc.code,
        exc.title,
        exc.detail,
        pointer=exc.pointer,
        extra=exc.extra,
        headers=headers,
    )


async def _request_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"pointer": json_pointer(err.get("loc", ())), "detail": str(err.get("msg", ""))}
        for err in exc.errors()
    ]
    first = errors[0] if errors else {"pointer": "", "detail": "invalid request"}
    return problem_response(
        422,
        "validation_error",
        "Invalid request",
        first["detail"],
        pointer=first["pointer"],
        extra={"errors": errors},
    )


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return problem_response(
        exc.status_code,
        code,
        code.replace("_", " ").capitalize(),
        str(exc.detail),
        headers=dict(exc.headers) if exc.headers else None,
    )


async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=exc)
    return problem_response(500, "internal_error", "Internal error", "an unexpected error occurred")


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OpsexecError, _domain_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
