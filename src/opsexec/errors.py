"""Domain errors.

Every refusal opsexec makes is one of these. Each carries a stable machine-readable
``code`` and the HTTP status it maps to, so ``api/problems.py`` can turn any of them into
an RFC 9457 problem response in one place, and the CLI can show the same code.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError as PydanticValidationError


class OpsexecError(Exception):
    """Base of every domain error; ``code`` is part of the public API and never changes."""

    code: str = "opsexec_error"
    status: int = 500
    title: str = "Internal error"
    error_class: str | None = None
    """The ``error_class`` an execution records for this error; the class name if None."""

    def __init__(
        self,
        detail: str,
        *,
        pointer: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.pointer = pointer
        self.extra: dict[str, Any] = extra or {}

    @classmethod
    def recorded_as(cls) -> str:
        return cls.error_class or cls.__name__


# --- 4xx: the caller can fix these -------------------------------------------------


class ValidationError(OpsexecError):
    """The request or plan is malformed; ``pointer`` names the offending field."""

    code = "validation_error"
    status = 422
    title = "Invalid request"


def pointer_from_location(location: Iterable[str | int], prefix: str = "") -> str:
    """A Pydantic error location as an RFC 6901 JSON pointer under ``prefix``."""
    escaped = (str(p).replace("~", "~0").replace("/", "~1") for p in location)
    return prefix + "".join("/" + p for p in escaped)


def from_pydantic(exc: PydanticValidationError, *, prefix: str = "") -> ValidationError:
    """The first error Pydantic found, as our 422 naming the offending field."""
    error = exc.errors()[0]
    return ValidationError(error["msg"], pointer=pointer_from_location(error["loc"], prefix))


class PlanValidationError(ValidationError):
    """A plan failed R-PLAN-2/3; ``code`` is specific (``unknown_action``, ``cycle``…)."""

    title = "Invalid plan"

    def __init__(self, code: str, detail: str, *, pointer: str, **extra: Any) -> None:
        super().__init__(detail, pointer=pointer, extra=extra)
        self.code = code


class AuthenticationError(OpsexecError):
    code = "unauthenticated"
    status = 401
    title = "Authentication required"


class PermissionDeniedError(OpsexecError):
    """The principal lacks a permission (HTTP 403; at the worker the execution fails)."""

    code = "permission_denied"
    status = 403
    title = "Permission denied"


class PermissionRevokedError(PermissionDeniedError):
    """At run time the requester no longer holds a permission the plan needs (R-RBAC)."""

    code = "permission_revoked"
    error_class = "PermissionError"


class NotFoundError(OpsexecError):
    """Absent, or belonging to another tenant: the two are indistinguishable on purpose."""

    code = "not_found"
    status = 404
    title = "Not found"


class ConflictError(OpsexecError):
    code = "conflict"
    status = 409
    title = "Conflict"


class FSMError(ConflictError):
    """An illegal lifecycle move, or a compare-and-set that lost a race."""

    code = "illegal_transition"
    title = "Illegal status transition"


class ResourceBusyError(ConflictError):
    """A lock on a target is held by another execution (``extra['holder_execution_id']``)."""

    code = "resource_busy"
    title = "Target is locked"


class ApprovalInvalidatedError(ConflictError):
    """The stored plan no longer hashes to what was approved; approvals are void."""

    code = "approval_invalidated"
    title = "Approval invalidated"


class IdempotencyKeyReusedError(ConflictError):
    code = "idempotency_key_reused"
    title = "Idempotency key reused"


class ApprovalLevelNotEnabledError(PermissionDeniedError):
    """The plan's approval level is above the tenant's enabled maximum (R-ROLL)."""

    code = "approval_level_not_enabled"
    title = "Approval level not enabled"


class ApprovalExpiredError(ConflictError):
    code = "approval_expired"
    title = "Approval expired"


class ServiceDisabledError(OpsexecError):
    """Kill switch or tenant disabled (R-ROLL)."""

    code = "service_disabled"
    status = 503
    title = "Execution disabled"


# --- failures recorded on an execution ---------------------------------------------


class StepTimeoutError(OpsexecError):
    """Recorded as error_class ``TimeoutError`` (R-TIMEOUT)."""

    code = "timeout"
    status = 504
    title = "Timed out"
    error_class = "TimeoutError"


class IndeterminateStepOutcome(OpsexecError):
    """A non-idempotent step was interrupted mid-flight; a person must decide."""

    code = "indeterminate_step_outcome"
    status = 409
    title = "Indeterminate step outcome"


class LeaseLostError(OpsexecError):
    """A worker's fenced write found its lease gone: it must stop touching the job."""

    code = "lease_lost"
    status = 409
    title = "Lease lost"


# --- transports: reaching a target and running a command there ---------------------


class TransportError(OpsexecError):
    """Reaching or talking to a target failed (DNS, refused, lost connection, bad login).

    ``retryable`` tells the runner whether trying again later can help (R-ENGINE retries
    connection errors): a refused or dropped connection can, a rejected login cannot. The
    detail never contains a password, passphrase or key.
    """

    code = "transport_error"
    status = 502
    title = "Target unreachable"
    retryable: bool = True

    def __init__(
        self,
        detail: str,
        *,
        retryable: bool | None = None,
        pointer: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail, pointer=pointer, extra=extra)
        if retryable is not None:
            self.retryable = retryable


class TransportAuthenticationError(TransportError):
    """The target refused our credentials; retrying with the same ones cannot help."""

    code = "transport_auth_failed"
    title = "Target refused the credentials"
    retryable = False


class HostKeyMismatchError(TransportError):
    """The server presented a host key other than the pinned one: possible interception.

    Raised before any credential is sent. ``extra`` carries the expected and presented
    public keys (public keys are not secrets) so an operator can decide to re-pin.
    """

    code = "host_key_mismatch"
    title = "Host key mismatch"
    retryable = False


class CommandTimeoutError(StepTimeoutError):
    """A transport command outlived its timeout; its process group was killed.

    A ``StepTimeoutError`` (error_class ``TimeoutError``, R-TIMEOUT) that also keeps the
    output captured before the kill, for forensics. The output stays off ``extra`` so it
    never lands unmasked in a problem response.
    """

    def __init__(
        self,
        detail: str,
        *,
        stdout: bytes = b"",
        stderr: bytes = b"",
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail, extra=extra)
        self.stdout = stdout
        self.stderr = stderr


# --- secrets: stored credentials, their master key, and references to them ---------


class SecretNotFoundError(NotFoundError):
    """A secret reference names nothing its backend holds for this tenant.

    The detail names the reference (``db-password``, ``env:DEPLOY_TOKEN``), never a value.
    At the worker the step fails with it, before the action runs.
    """

    code = "secret_not_found"
    title = "Secret not found"


class SecretUnusableError(ValidationError):
    """A secret value cannot be used safely: too short to be redacted from output.

    Value-based masking ignores values under ``MIN_SECRET_LENGTH`` characters (they occur
    inside ordinary words), so such a value would reach logs and events in clear text.
    """

    code = "secret_unusable"
    title = "Secret unusable"


class SecretKeyError(OpsexecError):
    """The master key is malformed, unreadable, or not the key the stored rows need.

    A configuration fault an operator must fix; the detail never contains key material.
    """

    code = "secret_key_error"
    status = 500
    title = "Secret key problem"


class SecretDecryptionError(OpsexecError):
    """A stored credential failed to decrypt: altered, moved, or under another key.

    AES-GCM authenticates the ciphertext together with the tenant, name and kind, so a row
    edited in place or copied to another tenant or name is refused rather than misused.
    """

    code = "secret_undecryptable"
    status = 500
    title = "Secret cannot be decrypted"


class TransportUnavailableError(TransportError):
    """The target's transport (winrm, say) is not one this opsexec provides."""

    code = "transport_unavailable"
    title = "Transport unavailable"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, retryable=False)
