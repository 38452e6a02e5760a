"""What the built-in runners share: deadlines, secret resolution, output decoding, failures.

Kept private to the package: third-party actions get the same guarantees from the
protocol itself (``ActionContext``), not from these helpers, so the helpers can change
without breaking anyone.
"""

from __future__ import annotations

import asyncio
import codecs
import time
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel

from opsexec.actions.registry import ActionContext, ActionResult, SecretRef, is_secret_ref
from opsexec.actions.transports.base import CommandResult, Transport
from opsexec.errors import StepTimeoutError
from opsexec.plan import SECRET_REF_KEY

__all__ = [
    "COMMAND_FAILED",
    "INVALID_SECRET",
    "MISSING_TARGET",
    "OUTPUT_PARSE_ERROR",
    "PARSE_ENV",
    "ActionFailure",
    "Deadline",
    "command_failure",
    "decode_lenient",
    "decode_text",
    "first_line",
    "last_line",
    "require_inputs",
    "resolve_env",
    "resolve_secret_value",
    "resolve_secrets_in",
    "run_command",
    "sniff_content_type",
]

# error_class values of the built-ins' failures; stable, shown to users and in metrics.
COMMAND_FAILED = "CommandFailedError"
OUTPUT_PARSE_ERROR = "OutputParseError"
INVALID_SECRET = "InvalidSecretError"  # noqa: S105 - an error class name
MISSING_TARGET = "MissingTargetError"

PARSE_ENV: Mapping[str, str] = {"LC_ALL": "C"}
"""Environment for commands whose output we parse: a German ``df`` says
``Dateisystem``, and a localised number may use a decimal comma."""

SUMMARY_LINE_LIMIT = 200
"""Characters of a command's output quoted in a one-line summary."""

ModelT = TypeVar("ModelT", bound=BaseModel)
T = TypeVar("T")


class ActionFailure(Exception):
    """An expected failure, raised deep in a helper and turned into a result by ``run``.

    Runners catch it at their top level (``except ActionFailure as failure: return
    failure.result()``), so helpers can stop early without threading results through
    every return value, and nothing ordinary escapes ``run`` as an exception.
    """

    def __init__(
        self,
        error_class: str,
        message: str,
        *,
        retryable: bool = False,
        output: dict[str, Any] | list[Any] | str | bytes = "",
    ) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.message = message
        self.retryable = retryable
        self.output = output

    def result(self) -> ActionResult:
        return ActionResult.failure(
            self.error_class, self.message, retryable=self.retryable, output=self.output
        )


def require_inputs(inputs: BaseModel, model: type[ModelT]) -> ModelT:
    """``inputs`` as the action's own model; anything else is a bug in the caller."""
    if not isinstance(inputs, model):
        raise TypeError(f"expected {model.__name__} inputs, got {type(inputs).__name__}")
    return inputs


class Deadline:
    """The step's time budget, shared by every await of one ``run``.

    An action that makes two round trips (``service.restart``: restart, then read the
    state) must fit both into ``ctx.timeout_s``, not give each the whole budget.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._ends_at = time.monotonic() + timeout_s

    def remaining(self) -> float:
        """Seconds left; raises ``StepTimeoutError`` once the budget is spent."""
        left = self._ends_at - time.monotonic()
        if left <= 0:
            raise self.expired()
        return left

    def expired(self) -> StepTimeoutError:
        return StepTimeoutError(
            f"step timed out after {self.timeout_s:g} s", extra={"timeout_s": self.timeout_s}
        )

    async def bound(self, awaitable: Awaitable[T]) -> T:
        """Await within the remaining budget; running out is a ``StepTimeoutError``."""
        try:
            async with asyncio.timeout(self.remaining()):
                return await awaitable
        except TimeoutError:
            raise self.expired() from None


async def run_command(
    transport: Transport,
    command: str,
    deadline: Deadline,
    *,
    env: Mapping[str, str] | None = None,
    workdir: str | None = None,
) -> CommandResult:
    """Run one command within what is left of the step's budget.

    ``CommandTimeoutError`` and ``TransportError`` propagate on purpose: the engine maps
    them to a timed-out step and to a retry.
    """
    return await transport.run(command, env=env, timeout_s=deadline.remaining(), workdir=workdir)


# --- secrets ----------------------------------------------------------------------------


async def resolve_secret_value(ctx: ActionContext, name: str, what: str) -> str:
    """The value behind a reference, refused when it could not be passed on intact.

    A NUL byte cannot live in an environment variable or a header; the message names
    ``what`` (the variable or header), never the value.
    """
    value = await ctx.resolve_secret(name)
    if "\0" in value:
        raise ActionFailure(INVALID_SECRET, f"secret {name!r} for {what} contains a NUL byte")
    return value


async def resolve_env(ctx: ActionContext, env: Mapping[str, str | SecretRef]) -> dict[str, str]:
    """Environment variables with every secret reference replaced by its value.

    Call it as late as possible — right before the command runs — so the values live
    only for the command's duration.
    """
    resolved: dict[str, str] = {}
    for name, value in env.items():
        if isinstance(value, SecretRef):
            resolved[name] = await resolve_secret_value(ctx, value.name, f"${name}")
        else:
            resolved[name] = value
    return resolved


async def resolve_secrets_in(ctx: ActionContext, value: Any) -> Any:
    """A copy of a JSON-like value with every secret reference resolved (request bodies).

    Accepts both ``SecretRef`` objects and the wire form ``{"$secret": "name"}``, as a
    free-form input (``body: Any``) keeps the wire form after validation.
    """
    if isinstance(value, SecretRef):
        return await resolve_secret_value(ctx, value.name, "the request body")
    if is_secret_ref(value):
        return await resolve_secret_value(ctx, str(value[SECRET_REF_KEY]), "the request body")
    if isinstance(value, Mapping):
        return {key: await resolve_secrets_in(ctx, item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [await resolve_secrets_in(ctx, item) for item in value]
    return value


# --- output -----------------------------------------------------------------------------


def decode_text(data: bytes, *, truncated: bool = False) -> str | None:
    """``data`` as text, or ``None`` when it is not text.

    Text means valid UTF-8 without NUL bytes (PostgreSQL ``jsonb`` cannot store ``\\u0000``,
    and a NUL is the surest sign of binary data). When the stream was ``truncated`` the
    cut may have split a multi-byte character; that incomplete tail is dropped rather
    than taken as proof of binary.
    """
    if b"\0" in data:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    try:
        return decoder.decode(data, final=not truncated)
    except UnicodeDecodeError:
        return None


def decode_lenient(data: bytes) -> str:
    """Diagnostic text (stderr): always a string, undecodable bytes and NULs as U+FFFD."""
    return data.decode("utf-8", errors="replace").replace("\0", "\ufffd")


_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "application/gzip"),
    (b"PK\x03\x04", "application/zip"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"%PDF-", "application/pdf"),
)


def sniff_content_type(data: bytes) -> str:
    """A content type for binary output from its leading bytes; octet-stream otherwise.

    Only the few formats people actually pipe out of a shell step (archives, images,
    reports); guessing more would be guessing.
    """
    for magic, content_type in _MAGIC:
        if data.startswith(magic):
            return content_type
    return "application/octet-stream"


def first_line(text: str, limit: int = SUMMARY_LINE_LIMIT) -> str:
    """The first non-blank line, shortened for a summary."""
    for line in text.splitlines():
        if line.strip():
            return _shorten(line.strip(), limit)
    return ""


def last_line(text: str, limit: int = SUMMARY_LINE_LIMIT) -> str:
    """The last non-blank line (where shells and tools put the error), shortened."""
    for line in reversed(text.splitlines()):
        if line.strip():
            return _shorten(line.strip(), limit)
    return ""


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def command_failure(what: str, result: CommandResult) -> ActionFailure:
    """A failed command as a non-retryable failure quoting the last line of stderr.

    Not retryable: a command that ran and said no will say no again; transient
    problems (a dropped connection, a timeout) arrive as exceptions, not exit codes.
    """
    stderr = decode_lenient(result.stderr)
    reason = last_line(stderr) or last_line(decode_lenient(result.stdout))
    message = f"{what} exited with status {result.exit_status}"
    return ActionFailure(
        COMMAND_FAILED,
        f"{message}: {reason}" if reason else message,
        output={
            "exit_status": result.exit_status,
            "stdout": decode_lenient(result.stdout),
            "stderr": stderr,
            "truncated": result.truncated,
        },
    )
