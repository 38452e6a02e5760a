"""``http.request``: one HTTP request, whose method decides its risk.

``GET``/``HEAD`` are reads (level 0, no lock); every other method may change state, so
it is a modify (level 1, asset lock). ``GET``/``HEAD``/``PUT``/``DELETE`` are idempotent
by HTTP semantics (RFC 9110 §9.2.2) and may be retried; ``POST``/``PATCH`` are not.

Where the request goes: ``path`` is relative to each target (``http://<address>[:port]``,
so the step needs targets); ``url`` is absolute and the request is made once from the
executor (the step takes no targets). Exactly one of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

from pydantic import Field, StringConstraints, field_validator, model_validator

from opsexec.actions.registry import (
    ActionClass,
    ActionInputs,
    ActionSpec,
    SecretOrStr,
    TargetMode,
)
from opsexec.plan import check_http_url

__all__ = [
    "HTTP_REQUEST",
    "IDEMPOTENT_METHODS",
    "READ_METHODS",
    "SPECS",
    "HttpRequestInputs",
    "HttpRequestSpec",
]

HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
READ_METHODS = frozenset({"GET", "HEAD"})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE"})

# RFC 9110 token characters: a header name can never smuggle a CR/LF or a colon.
HeaderName = Annotated[str, StringConstraints(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")]


class HttpRequestInputs(ActionInputs):
    method: HttpMethod = "GET"
    path: Annotated[str, StringConstraints(max_length=2_048)] | None = None
    url: str | None = None
    headers: dict[HeaderName, SecretOrStr] = Field(default_factory=dict, max_length=100)
    body: Any = None
    expect_status: int | None = Field(default=None, ge=100, le=599)
    """``None`` accepts any 2xx."""

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
