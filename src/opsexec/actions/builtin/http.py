"""``http.request``: one HTTP request, whose method decides its risk.

``GET``/``HEAD`` are reads (level 0, no lock); every other method may change state, so
it is a modify (level 1, asset lock). ``GET``/``HEAD``/``PUT``/``DELETE`` are idempotent
by HTTP semantics (RFC 9110 §9.2.2) and may be retried; ``POST``/``PATCH`` are not.

Where the request goes: ``path`` is relative to each target — ``{scheme}://{address}:
{port}{path}`` with ``scheme`` ``http`` unless the input says ``https``, and ``port`` the
input's or the scheme's default (80/443). The asset's own ``port`` is *not* used: it is
the transport's port (22 for SSH), not the service's. ``url`` is absolute and the request
is made once from the executor (the step takes no targets). Exactly one of them.

Running it:

* Header values and the body may hold secret references; they are resolved the moment
  the request is built. The body is sent as JSON unless it is a string (sent as text).
* The engine's ``request_id`` (when the context has one) goes along as ``X-Request-ID``
  so the target's logs can be joined with ours; a plan's own header wins.
* The whole request — connect, send, read — must fit into ``ctx.timeout_s``; running out
  raises ``StepTimeoutError`` like every other timed-out step (the engine marks the step
  timed out and retries idempotent requests).
* The status must be ``expect_status`` (one code or a list), or any 2xx when not given.
  Redirects are not followed: a 3xx is the answer (following one could carry a
  credential header to another host). A mismatch is a failure; it is retryable for
  408, 429 and 5xx other than 501/505, which say "later" rather than "no". Refused,
  reset or unreachable connections are retryable failures too.
* The worker's proxy variables and ``.netrc`` are ignored (``trust_env=False``): what a
  request carries is what the plan says, not what the worker's environment adds. TLS is
  verified against the default CA bundle.

Output: ``{"method", "url", "status", "reason", "headers", "body", "body_truncated",
"elapsed_ms"}``. ``body`` is parsed JSON for JSON responses, text for text, and
``None`` with ``body_base64`` for anything else; at most ``MAX_BODY_BYTES`` are read.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

import httpx
from pydantic import BaseModel, Field, StringConstraints, field_validator, model_validator

from opsexec.actions.builtin._common import (
    INVALID_SECRET,
    MISSING_TARGET,
    ActionFailure,
    Deadline,
    decode_text,
    require_inputs,
    resolve_secret_value,
    resolve_secrets_in,
)
from opsexec.actions.registry import (
    ActionClass,
    ActionContext,
    ActionInputs,
    ActionResult,
    ActionSpec,
    AssetInfo,
    SecretOrStr,
    SecretRef,
    TargetMode,
)
from opsexec.plan import check_http_url

__all__ = [
    "CONNECTION_ERROR",
    "HTTP_REQUEST",
    "IDEMPOTENT_METHODS",
    "MAX_BODY_BYTES",
    "READ_METHODS",
    "SPECS",
    "UNEXPECTED_STATUS",
    "HttpRequestAction",
    "HttpRequestInputs",
    "HttpRequestSpec",
    "decode_body",
    "request_url",
    "status_expected",
    "status_retryable",
]

HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
READ_METHODS = frozenset({"GET", "HEAD"})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE"})

# RFC 9110 token characters: a header name can never smuggle a CR/LF or a colon.
HeaderName = Annotated[str, StringConstraints(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")]
StatusCode = Annotated[int, Field(ge=100, le=599)]
StatusCodes = Annotated[list[StatusCode], Field(min_length=1, max_length=50)]

MAX_BODY_BYTES = 1024 * 1024
"""Response bytes kept. A health check or API answer is far smaller; a step that
downloads a release by accident should not fill the worker's memory."""

UNEXPECTED_STATUS = "UnexpectedStatusError"
CONNECTION_ERROR = "ConnectionError"
REQUEST_ERROR = "HttpRequestError"

REQUEST_ID_HEADER = "X-Request-ID"


class HttpRequestInputs(ActionInputs):
    method: HttpMethod = "GET"
    path: Annotated[str, StringConstraints(max_length=2_048)] | None = None
    url: str | None = None
    scheme: Literal["http", "https"] | None = None
    """With ``path`` only: ``http`` (default) or ``https``."""
    port: int | None = Field(default=None, ge=1, le=65_535)
    """With ``path`` only: the service's port; the scheme's default (80/443) if absent."""
    headers: dict[HeaderName, SecretOrStr] = Field(default_factory=dict, max_length=100)
    body: Any = None
    expect_status: StatusCode | StatusCodes | None = None
    """One status or a list of them; ``None`` accepts any 2xx."""

    @field_validator("method", mode="before")
    @classmethod
    def _upper_method(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("path")
    @classmethod
    def _valid_path(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/") or any(c.isspace() for c in value)):
            raise ValueError("path must start with / and contain no spaces")
        return value

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_http_url(value, "url")
        return value

    @field_validator("headers")
    @classmethod
    def _valid_header_values(cls, value: dict[str, SecretOrStr]) -> dict[str, SecretOrStr]:
        for header in value.values():
            if isinstance(header, str) and ("\r" in header or "\n" in header):
                raise ValueError("header values must not contain line breaks")
        return value

    @model_validator(mode="after")
    def _path_or_url(self) -> Self:
        if (self.path is None) == (self.url is None):
            raise ValueError("exactly one of path or url is required")
        if self.url is not None and (self.scheme is not None or self.port is not None):
            raise ValueError("scheme and port go with path; a url carries its own")
        return self


def _method(inputs: Mapping[str, Any]) -> str:
    method = inputs.get("method", "GET")
    return method.upper() if isinstance(method, str) else "GET"


@dataclass(frozen=True, kw_only=True)
class HttpRequestSpec(ActionSpec):
    """The static fields describe the worst case (a modify at level 1); the hooks refine
    it per request from the method."""

    def classify(self, inputs: Mapping[str, Any]) -> ActionClass:
        return ActionClass.READ if _method(inputs) in READ_METHODS else ActionClass.MODIFY

    def base_level_for(self, inputs: Mapping[str, Any]) -> int:
        return 0 if self.classify(inputs) is ActionClass.READ else 1

    def is_idempotent(self, inputs: Mapping[str, Any]) -> bool:
        return _method(inputs) in IDEMPOTENT_METHODS

    def target_mode_for(self, inputs: Mapping[str, Any]) -> TargetMode:
        return "none" if inputs.get("url") is not None else "required"


HTTP_REQUEST = HttpRequestSpec(
    name="http.request",
    action_class=ActionClass.MODIFY,
    base_level=1,
    permission="automation:execute",
    idempotent=False,
    input_model=HttpRequestInputs,
    default_duration_s=2.0,
    description="An HTTP request to each target (path) or to one URL.",
)

SPECS: tuple[ActionSpec, ...] = (HTTP_REQUEST,)


# --- pure pieces ------------------------------------------------------------------------


def request_url(params: HttpRequestInputs, target: AssetInfo | None) -> str:
    """The absolute URL of this invocation (see the module docstring)."""
    if params.url is not None:
        return params.url
    if target is None:
        raise ActionFailure(MISSING_TARGET, "a request by path needs a target asset")
    scheme = params.scheme or "http"
    port = params.port or (443 if scheme == "https" else 80)
    host = target.address
    if ":" in host and not host.startswith("["):  # an IPv6 literal
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}{params.path}"


def status_expected(status: int, expect: int | list[int] | None) -> bool:
    if expect is None:
        return 200 <= status < 300
    if isinstance(expect, int):
        return status == expect
    return status in expect


def status_retryable(status: int) -> bool:
    """Statuses that mean "not now" rather than "no": 408, 429 and most 5xx.

    501 (not implemented) and 505 (version not supported) will not change on a retry.
    """
    return status in (408, 429) or (500 <= status <= 599 and status not in (501, 505))


def _expectation(expect: int | list[int] | None) -> str:
    if expect is None:
        return "2xx"
    if isinstance(expect, int):
        return str(expect)
    return " or ".join(str(code) for code in expect)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def decode_body(
    data: bytes, content_type: str, *, truncated: bool, charset: str | None = None
) -> dict[str, Any]:
    """``{"body": …}`` as JSON, text, or ``None`` plus ``body_base64`` for binary.

    JSON that does not parse (or was cut by the size cap) is kept as text: the bytes are
    still worth seeing. A declared non-UTF-8 charset is honoured for text.
    """
    if not data:
        return {"body": None}
    text: str | None
    if charset and charset.lower().replace("_", "-") not in ("utf-8", "utf8"):
        try:
            text = data.decode(charset)
        except (LookupError, UnicodeDecodeError):
            text = None
        if text is not None and "\0" in text:
            text = None
    else:
        text = decode_text(data, truncated=truncated)
    if text is None:
        return {"body": None, "body_base64": base64.b64encode(data).decode("ascii")}
    if _is_json(content_type) and not truncated:
        try:
            return {"body": json.loads(text)}
        except ValueError:
            pass
    return {"body": text}


def _response_headers(response: httpx.Response) -> dict[str, str]:
    """Response headers, repeated ones joined as RFC 9110 allows (``Set-Cookie`` with
    newlines, since its values contain commas)."""
    headers: dict[str, str] = {}
    for name in response.headers:
        values = response.headers.get_list(name)
        headers[name] = ("\n" if name == "set-cookie" else ", ").join(values)
    return headers


async def _read_bounded(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of the (decompressed) body; the rest is not read at all."""
    chunks: list[bytes] = []
    kept = 0
    async for chunk in response.aiter_bytes():
        room = limit - kept
        if len(chunk) > room:
            chunks.append(chunk[:room])
            return b"".join(chunks), True
        chunks.append(chunk)
        kept += len(chunk)
    return b"".join(chunks), False


# --- the request ------------------------------------------------------------------------


async def _headers(
    ctx: ActionContext, headers: Mapping[str, SecretOrStr], has_body: bool, body_is_text: bool
) -> dict[str, str]:
    resolved: dict[str, str] = {}
    for name, value in headers.items():
        if isinstance(value, SecretRef):
            secret = await resolve_secret_value(ctx, value.name, f"header {name}")
            if "\r" in secret or "\n" in secret:
                raise ActionFailure(
                    INVALID_SECRET,
                    f"secret {value.name!r} for header {name} contains a line break",
                )
            resolved[name] = secret
        else:
            resolved[name] = value
    lowered = {name.lower() for name in resolved}
    request_id = getattr(ctx, "request_id", None)
    if request_id is not None and REQUEST_ID_HEADER.lower() not in lowered:
        resolved[REQUEST_ID_HEADER] = str(request_id)
    if has_body and "content-type" not in lowered:
        resolved["Content-Type"] = (
            "text/plain; charset=utf-8" if body_is_text else "application/json"
        )
    return resolved


async def _body(ctx: ActionContext, body: Any) -> bytes | None:
    if body is None:
        return None
    if isinstance(body, str):
        return body.encode("utf-8")
    resolved = await resolve_secrets_in(ctx, body)
    return json.dumps(resolved, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class HttpRequestAction:
    """Sends the request with httpx and judges the status."""

    @property
    def spec(self) -> ActionSpec:
        return HTTP_REQUEST

    async def run(
        self, ctx: ActionContext, target: AssetInfo | None, inputs: BaseModel
    ) -> ActionResult:
        params = require_inputs(inputs, HttpRequestInputs)
        deadline = Deadline(ctx.timeout_s)
        try:
            return await self._send(ctx, params, request_url(params, target), deadline)
        except ActionFailure as failure:
            return failure.result()

    async def _send(
        self, ctx: ActionContext, params: HttpRequestInputs, url: str, deadline: Deadline
    ) -> ActionResult:
        method = params.method
        content = await deadline.bound(_body(ctx, params.body))
        headers = await deadline.bound(
            _headers(ctx, params.headers, content is not None, isinstance(params.body, str))
        )
        started = time.monotonic()
        try:
            async with httpx.AsyncClient(
                timeout=httpx.Timeout(deadline.remaining()),
                follow_redirects=False,
                trust_env=False,
            ) as client:
                request = client.build_request(method, url, headers=headers, content=content)
                del headers, content  # resolved secrets: kept no longer than needed
                exchange = await deadline.bound(_exchange(client, request))
        except httpx.TimeoutException:
            raise deadline.expired() from None
        except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError) as exc:
            raise ActionFailure(
                CONNECTION_ERROR, f"{method} {url}: {_describe(exc)}", retryable=True
            ) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise ActionFailure(REQUEST_ERROR, f"{method} {url}: {_describe(exc)}") from None

        status = exchange.status
        output: dict[str, Any] = {
            "method": method,
            "url": url,
            "status": status,
            "reason": exchange.reason,
            "headers": exchange.headers,
            **exchange.body,
            "body_truncated": exchange.truncated,
            "elapsed_ms": max(0, round((time.monotonic() - started) * 1000)),
        }
        answer = f"{method} {url} → {status} {exchange.reason}".rstrip()
        if status_expected(status, params.expect_status):
            return ActionResult.success(output, summary=answer)
        raise ActionFailure(
            UNEXPECTED_STATUS,
            f"{answer} (expected {_expectation(params.expect_status)})",
            retryable=status_retryable(status),
            output=output,
        )


@dataclass(frozen=True)
class _Exchange:
    """A finished exchange: the response's facts and its (bounded, decoded) body."""

    status: int
    reason: str
    headers: dict[str, str]
    body: dict[str, Any]
    truncated: bool


async def _exchange(client: httpx.AsyncClient, request: httpx.Request) -> _Exchange:
    """Send, read at most ``MAX_BODY_BYTES`` of the body, close the response."""
    response = await client.send(request, stream=True)
    try:
        if request.method == "HEAD":
            data, truncated = b"", False
        else:
            data, truncated = await _read_bounded(response, MAX_BODY_BYTES)
    finally:
        await response.aclose()
    return _Exchange(
        status=response.status_code,
        reason=response.reason_phrase,
        headers=_response_headers(response),
        body=decode_body(
            data,
            response.headers.get("content-type", ""),
            truncated=truncated,
            charset=response.charset_encoding,
        ),
        truncated=truncated,
    )


def _describe(exc: Exception) -> str:
    """The exception's message, or its kind when httpx gives none (it often does not)."""
    text = str(exc).strip()
    return text or type(exc).__name__
