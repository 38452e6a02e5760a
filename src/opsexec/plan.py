"""Plans: the native model, its source map and the canonical hash. Pure, no I/O.

Intake (``opsexec.intake``) turns a document into a ``Plan`` and checks it: ``parse_plan``
(shape: native or PlanV1 → ``Plan``) → ``validate_plan`` (R-PLAN-2 limits, actions,
inputs, dependencies, literal secrets) → ``check_targets`` (against the caller's
tenant's inventory) → ``policy.classify`` → ``canonical_plan``/``plan_hash`` (R-HASH, here)
for the frozen snapshot, which the engine turns back into a ``Plan`` with
``plan_from_snapshot``.

Every refusal is a ``PlanValidationError`` whose ``pointer`` is an RFC 6901 JSON pointer
into the plan document *as the caller sent it*, relative to the plan itself (the HTTP
layer prefixes ``/plan``). A PlanV1 document is mapped onto the native model but keeps a
``SourceMap``, so a bad ``tool`` is reported at ``/plan/steps/0/tool``, not at the native
``/steps/0/action`` the caller never wrote.

Decisions worth knowing (each explained where it is implemented):

- Native plans are strict: unknown fields are refused, except free text ``description``
  and a free-form ``metadata`` object on each step (and ``metadata`` on the plan).
- ``estimated_duration_s`` may be omitted; classification then uses the action's default
  duration. The canonical form keeps it as ``null`` rather than baking the default in, so
  a plan's hash never depends on the action registry's version.
- Duplicate targets within a step are refused (``duplicate_target``); ``depends_on`` is a
  set (sorted and de-duplicated in the canonical form).
- Numbers are canonicalised so that ``1`` and ``1.0`` hash the same; this also makes the
  hash survive a PostgreSQL ``jsonb`` round trip, which prints ``1e+16`` as an integer.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, NoReturn
from urllib.parse import urlsplit
from uuid import UUID

import pydantic
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from opsexec.errors import PlanValidationError

__all__ = [
    "MAX_PLAN_BYTES",
    "MAX_STEPS",
    "MAX_TARGETS_PER_STEP",
    "MAX_TOTAL_STEP_TARGETS",
    "MAX_VALUE_DEPTH",
    "PLAN_ERROR_CODES",
    "SECRET_REF_KEY",
    "VOLATILE_FIELDS",
    "Plan",
    "PlanStep",
    "SecretRef",
    "canonical_json",
    "canonical_plan",
    "check_http_url",
    "derive_idempotency_key",
    "is_secret_ref",
    "json_pointer",
    "plan_from_snapshot",
    "plan_hash",
    "snapshot_hash",
]

# --- limits (R-PLAN-2) ----------------------------------------------------------------

MAX_PLAN_BYTES = 256 * 1024
MAX_STEPS = 200
MAX_TARGETS_PER_STEP = 1_000
MAX_TOTAL_STEP_TARGETS = 10_000
MAX_VALUE_DEPTH = 32
"""Nesting allowed inside ``inputs``/``metadata``. Generous for real inputs, and it keeps
every recursive consumer (JSON encoders, jsonb, the masker) far from recursion limits."""
MAX_NAME_LENGTH = 255
MAX_INTEGER = 10**100
"""Target names end up in ``execution_steps.target_ref varchar(255)``."""

VOLATILE_FIELDS: frozenset[str] = frozenset({"timestamp", "processing_time_ms"})
"""Fields that change on every planner run without changing the plan (R-HASH)."""

# --- secret references (R-SEC) ---------------------------------------------------------

SECRET_REF_KEY = "$secret"  # noqa: S105 - the reference marker, not a secret
SECRET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/@+-]{0,254}$"  # noqa: S105
_SECRET_NAME = re.compile(SECRET_NAME_PATTERN)


class SecretRef(BaseModel):
    """A reference to a stored secret: exactly ``{"$secret": "<name>"}`` on the wire.

    Plans carry these instead of values; the engine resolves them just before a step
    runs. Input models accept ``SecretRef`` wherever a secret may appear.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, validate_by_name=True, validate_by_alias=True
    )

    name: str = Field(alias=SECRET_REF_KEY, pattern=SECRET_NAME_PATTERN)

    def to_json(self) -> dict[str, str]:
        return {SECRET_REF_KEY: self.name}


def is_secret_ref(value: object) -> bool:
    """True for a ``SecretRef`` or a well-formed ``{"$secret": "<name>"}`` mapping."""
    if isinstance(value, SecretRef):
        return True
    if not isinstance(value, Mapping) or len(value) != 1:
        return False
    name = value.get(SECRET_REF_KEY)
    return isinstance(name, str) and _SECRET_NAME.match(name) is not None


# --- JSON pointers ----------------------------------------------------------------------

PointerPart = str | int


def json_pointer(*parts: PointerPart) -> str:
    """An RFC 6901 pointer; ``json_pointer()`` is ``""``, the whole document."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)


def _pointer_parts(pointer: str) -> list[str]:
    if not pointer:
        return []
    return [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]


# --- source maps: native pointers back to the document as sent -------------------------


@dataclass(frozen=True)
class SourceMap:
    """Where each native field came from. Native documents map to themselves.

    For PlanV1, ``fields`` maps (step index, native field) to the document path it was
    read from; other step fields keep their name under ``/plan/steps/i``; step metadata
    holds the unmapped PlanV1 step keys under their own names, and plan metadata holds
    the rest of the document under ``planv1`` mirroring its structure — so every native
    pointer has a mechanical translation.
    """

    format: Literal["native", "planv1"] = "native"
    fields: Mapping[tuple[int, str], tuple[PointerPart, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def to_document(self, pointer: str) -> str:
        if self.format == "native":
            return pointer
        return json_pointer(*self._translate(_pointer_parts(pointer)))

    def _translate(self, parts: list[str]) -> list[PointerPart]:
        if not parts:
            return []
        head, rest = parts[0], parts[1:]
        if head == "steps":
            if len(rest) < 2 or not rest[0].isdigit():
                return ["plan", "steps", *rest]
            index, name, tail = int(rest[0]), rest[1], rest[2:]
            if name == "metadata":
                return ["plan", "steps", index, *tail]
            mapped = self.fields.get((index, name))
            if mapped is not None:
                return [*mapped, *tail]
            return ["plan", "steps", index, name, *tail]
        if head == "metadata":
            if rest and rest[0] == PLANV1_METADATA_KEY:
                return list(rest[1:])
            return []
        mapped = self.fields.get((-1, head))
        if mapped is not None:
            return [*mapped, *rest]
        return list(parts)


NATIVE_SOURCE = SourceMap()
PLANV1_METADATA_KEY = "planv1"


# --- the native model (R-PLAN-1) -------------------------------------------------------

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def check_name(value: str, what: str, max_length: int) -> str:
    """Ids and names appear in logs, URLs and lock keys: no control characters, no
    padding, bounded. Messages never echo the value (it could be anything)."""
    if not value:
        raise ValueError(f"{what} must not be empty")
    if len(value) > max_length:
        raise ValueError(f"{what} must be at most {max_length} characters")
    if _CONTROL_CHARS.search(value) or value != value.strip():
        raise ValueError(f"{what} must not contain control characters or surrounding spaces")
    return value


class PlanStep(BaseModel):
    """One native step. ``estimated_duration_s`` is per target; ``None`` = the action's
    default duration (resolved at classification, see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: str
    action: str = Field(min_length=1, max_length=100)
    targets: list[str] = Field(default_factory=list)
    inputs: dict[str, Any] = Field(default_factory=dict)
    depends_on: list[str] = Field(default_factory=list)
    estimated_duration_s: float | None = Field(default=None, gt=0, le=86_400, allow_inf_nan=False)
    max_concurrency: int | None = Field(default=None, ge=1, le=MAX_TARGETS_PER_STEP)
    max_failures: int | None = Field(default=None, ge=0, le=MAX_TOTAL_STEP_TARGETS)
    timeout_s: float | None = Field(default=None, gt=0, le=86_400, allow_inf_nan=False)
    requires_approval: bool = False
    description: str | None = Field(default=None, max_length=4_000)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        return check_name(value, "a step id", 128)

    @field_validator("depends_on")
    @classmethod
    def _valid_dependencies(cls, value: list[str]) -> list[str]:
        if len(value) > MAX_STEPS:
            raise ValueError(f"a step may depend on at most {MAX_STEPS} steps")
        return value


class Plan(BaseModel):
    """A plan in the native form, whatever format it arrived in.

    Frozen so a plan cannot change between being hashed and being stored; the dicts inside
    (``inputs``, ``metadata``) are plain data and must be treated as read-only.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    steps: list[PlanStep] = Field(min_length=1)
    runbook_url: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    _source: SourceMap = PrivateAttr(default_factory=lambda: NATIVE_SOURCE)

    @field_validator("runbook_url")
    @classmethod
    def _valid_runbook_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_http_url(value, "runbook_url")
        return value

    @property
    def source_format(self) -> Literal["native", "planv1"]:
        return self._source.format

    def document_pointer(self, pointer: str) -> str:
        """Translate a pointer into this native plan to one into the document as sent."""
        return self._source.to_document(pointer)

    def step_ids(self) -> list[str]:
        return [step.id for step in self.steps]

    def all_targets(self) -> list[str]:
        """Every distinct target of the plan, sorted (for inventory look-ups)."""
        return sorted({target for step in self.steps for target in step.targets})

    @property
    def step_target_count(self) -> int:
        """Sum of targets over steps: the ``execution_steps`` rows a run creates
        (a target-less step still creates one)."""
        return sum(max(len(step.targets), 1) for step in self.steps)


def check_http_url(value: str, what: str) -> None:
    """Raise ``ValueError`` unless ``value`` is an absolute http(s) URL without
    ``user:password@`` (that would be a literal secret). Messages never echo the value."""
    if len(value) > 2_048:
        raise ValueError(f"{what} must be at most 2048 characters")
    if _CONTROL_CHARS.search(value) or any(c.isspace() for c in value):
        raise ValueError(f"{what} must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises on a malformed port
    except ValueError:
        raise ValueError(f"{what} must be an http(s) URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{what} must not embed credentials")


# --- building the model from a document ------------------------------------------------


def refuse(plan: Plan | None, code: str, detail: str, pointer: str, **extra: Any) -> NoReturn:
    """Raise a ``PlanValidationError`` with ``pointer`` translated to the document."""
    if plan is not None:
        pointer = plan.document_pointer(pointer)
    raise PlanValidationError(code, detail, pointer=pointer, **extra)


def plan_from_snapshot(snapshot: Mapping[str, Any]) -> Plan:
    """Rebuild a Plan from a stored canonical snapshot (``canonical_plan`` output).

    ``canonical_plan(plan_from_snapshot(s)) == s`` for any snapshot this module wrote, so
    the engine can re-hash what it loaded and compare with the approved hash.
    """
    if not isinstance(snapshot, Mapping):
        raise PlanValidationError("invalid_plan", "a plan must be a JSON object", pointer="")
    return build_plan(dict(snapshot), NATIVE_SOURCE)


def build_plan(native: dict[str, Any], source: SourceMap) -> Plan:
    try:
        plan = Plan.model_validate(native)
    except pydantic.ValidationError as exc:
        raise refusal_from_pydantic(exc, native, source.to_document) from None
    plan._source = source
    return plan


_PYDANTIC_CODES = {"missing": "missing_field", "extra_forbidden": "unknown_field"}


def refusal_from_pydantic(
    exc: pydantic.ValidationError,
    data: Any,
    translate: Callable[[str], str],
    *,
    code: str | None = None,
    base: Sequence[PointerPart] = (),
    what: str = "",
) -> PlanValidationError:
    """A pydantic error as a PlanValidationError: first error in ``pointer``/``detail``,
    all of them in ``errors``. Only pydantic's ``msg`` is used, never ``input``, so a
    value (possibly a secret) is never echoed back."""
    errors: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    first_type = ""
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        parts = _loc_parts(data, error["loc"], error["type"])
        pointer = translate(json_pointer(*base, *parts))
        message = _message(error["type"], error["msg"], error["loc"])
        if (pointer, message) in seen:
            continue
        seen.add((pointer, message))
        if not errors:
            first_type = error["type"]
        errors.append({"pointer": pointer, "message": message})
    first = errors[0]
    final_code = code or _PYDANTIC_CODES.get(first_type, "invalid_field")
    detail = f"{what}{first['message']}"
    return PlanValidationError(final_code, detail, pointer=first["pointer"], errors=errors)


def _message(error_type: str, message: str, loc: tuple[int | str, ...]) -> str:
    """pydantic's message, made plainer; field names may be echoed, values never."""
    name = loc[-1] if loc else ""
    if error_type == "extra_forbidden":
        return f"unknown field {name!r}"
    if error_type == "missing":
        return f"field {name!r} is required"
    return message.removeprefix("Value error, ")


def _loc_parts(data: Any, loc: tuple[int | str, ...], error_type: str) -> list[PointerPart]:
    """The longest prefix of a pydantic ``loc`` that exists in ``data``.

    pydantic adds union member names (``str``, ``SecretRef``) and validator tags to
    ``loc``; those are not places in the document, so walking the data drops them. A
    missing field keeps its name, which is where the caller must add it.
    """
    parts: list[PointerPart] = []
    current = data
    for item in loc:
        in_mapping = isinstance(current, Mapping) and isinstance(item, str) and item in current
        in_list = isinstance(current, list) and isinstance(item, int) and 0 <= item < len(current)
        if not (in_mapping or in_list):
            if error_type == "missing" and isinstance(item, str):
                parts.append(item)
            break
        current = current[item]
        parts.append(item)
    return parts


# --- canonical form and hashes (R-HASH, R-IDEM-1) --------------------------------------


def _normalise(value: Any) -> Any:
    """JSON-ready copy with integral floats as ints (``1.0`` → ``1``).

    Besides making ``1`` and ``1.0`` hash the same, this is what lets a snapshot survive
    PostgreSQL ``jsonb``: it prints ``1e+16`` as ``10000000000000000``, which reads back
    as an int; non-integral floats round-trip exactly.
    """
    if isinstance(value, Mapping):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, SecretRef):
        return value.to_json()
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def canonical_plan(plan: Plan) -> dict[str, Any]:
    """The canonical, JSON-ready form of a plan: what is hashed and stored as the snapshot.

    Every field is explicit (a missing ``depends_on`` and ``[]`` are the same plan),
    targets are sorted inside each step, ``depends_on`` is sorted and de-duplicated (it is
    a set), step order is kept (it is the plan's reading order and the step numbering),
    and volatile top-level metadata fields are dropped. Key order is irrelevant:
    ``canonical_json`` sorts keys.
    """
    steps = [
        {
            "id": step.id,
            "action": step.action,
            "targets": sorted(step.targets),
            "inputs": _normalise(step.inputs),
            "depends_on": sorted(set(step.depends_on)),
            "estimated_duration_s": _normalise(step.estimated_duration_s),
            "max_concurrency": step.max_concurrency,
            "max_failures": step.max_failures,
            "timeout_s": _normalise(step.timeout_s),
            "requires_approval": step.requires_approval,
            "description": step.description,
            "metadata": _normalise(step.metadata),
        }
        for step in plan.steps
    ]
    metadata = {k: v for k, v in _normalise(plan.metadata).items() if k not in VOLATILE_FIELDS}
    return {"steps": steps, "runbook_url": plan.runbook_url, "metadata": metadata}


def _dumps(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def canonical_json(plan: Plan) -> str:
    """``canonical_plan`` as compact JSON with sorted keys (the hashed bytes, as text)."""
    return _dumps(canonical_plan(plan))


def plan_hash(plan: Plan) -> str:
    """sha256 hex of the canonical JSON (``executions.plan_hash``)."""
    return _sha256(canonical_json(plan))


def snapshot_hash(snapshot: Mapping[str, Any]) -> str:
    """Hash a stored snapshot *as stored* — equal to ``plan_hash`` for an untouched one.

    It deliberately does not re-canonicalise (no re-sorting of targets): any edit to the
    stored row, even one that would canonicalise away, changes the hash, so tampering is
    detected. Only number normalisation is applied, which cancels ``jsonb`` artefacts.
    """
    return _sha256(_dumps(_normalise(snapshot)))


def derive_idempotency_key(canonical: str, tenant_id: UUID | str, actor_id: UUID | str) -> str:
    """R-IDEM-1: sha256 hex of ``canonical|tenant|actor``.

    Scoped to the actor as well as the tenant, so two people submitting the same plan get
    two executions (each is accountable for theirs), while one person's double-click
    gets one.
    """
    return _sha256(f"{canonical}|{tenant_id}|{actor_id}")


PLAN_ERROR_CODES: frozenset[str] = frozenset(
    {
        "invalid_plan",
        "invalid_field",
        "missing_field",
        "unknown_field",
        "unknown_step",
        "plan_too_large",
        "too_many_steps",
        "too_many_targets",
        "too_many_step_targets",
        "too_deep",
        "invalid_value",
        "duplicate_step_id",
        "unknown_action",
        "invalid_inputs",
        "invalid_target",
        "duplicate_target",
        "targets_not_allowed",
        "targets_required",
        "unknown_dependency",
        "dependency_cycle",
        "literal_secret",
        "invalid_secret_ref",
        "unknown_target",
    }
)
"""Every ``PlanValidationError.code`` this module raises (``policy`` adds its own)."""
