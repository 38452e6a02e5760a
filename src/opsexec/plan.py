"""Plans: the native model, PlanV1 intake, validation and the canonical hash. Pure, no I/O.

The flow at intake is ``parse_plan`` (shape: native or PlanV1 → ``Plan``) →
``validate_plan`` (R-PLAN-2 limits, actions, inputs, dependencies, literal secrets) →
``check_targets`` (against the caller's tenant's inventory) → ``policy.classify`` →
``canonical_plan``/``plan_hash`` (R-HASH) for the frozen snapshot. ``load_plan`` runs the
first two in one call.

Every refusal is a ``PlanValidationError`` whose ``pointer`` is an RFC 6901 JSON pointer
into the plan document *as the caller sent it*, relative to the plan itself (the HTTP
layer prefixes ``/plan``). A PlanV1 document is mapped onto the native model but keeps a
source map, so a bad ``tool`` is reported at ``/plan/steps/0/tool``, not at the native
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
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, NoReturn
from urllib.parse import urlsplit
from uuid import UUID

import pydantic
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from opsexec.errors import PlanValidationError
from opsexec.safety.masking import is_secret_key

if TYPE_CHECKING:
    from opsexec.actions.registry import ActionRegistry

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
    "check_targets",
    "derive_idempotency_key",
    "document_size_bytes",
    "is_secret_ref",
    "json_pointer",
    "load_plan",
    "parse_plan",
    "plan_from_snapshot",
    "plan_hash",
    "snapshot_hash",
    "validate_plan",
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
_MAX_INTEGER = 10**100
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
class _SourceMap:
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
            if rest and rest[0] == _PLANV1_METADATA_KEY:
                return list(rest[1:])
            return []
        mapped = self.fields.get((-1, head))
        if mapped is not None:
            return [*mapped, *rest]
        return list(parts)


_NATIVE = _SourceMap()
_PLANV1_METADATA_KEY = "planv1"


# --- the native model (R-PLAN-1) -------------------------------------------------------

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def _check_name(value: str, what: str, max_length: int) -> str:
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
        return _check_name(value, "a step id", 128)

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

    _source: _SourceMap = PrivateAttr(default_factory=lambda: _NATIVE)

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


# --- parsing ---------------------------------------------------------------------------


def _refuse(plan: Plan | None, code: str, detail: str, pointer: str, **extra: Any) -> NoReturn:
    """Raise a ``PlanValidationError`` with ``pointer`` translated to the document."""
    if plan is not None:
        pointer = plan.document_pointer(pointer)
    raise PlanValidationError(code, detail, pointer=pointer, **extra)


def parse_plan(document: Any) -> Plan:
    """Parse a plan document (native or PlanV1; a dict, or JSON text/bytes) into a Plan.

    This checks *shape* only; ``validate_plan`` checks meaning against the registry.
    """
    if isinstance(document, str | bytes | bytearray):
        document = _loads(document)
    if not isinstance(document, Mapping):
        raise PlanValidationError("invalid_plan", "a plan must be a JSON object", pointer="")
    if "plan" in document and "steps" not in document:
        native, source = _map_planv1(document)
    else:
        native, source = dict(document), _NATIVE
    plan = _build(native, source)
    return plan


def plan_from_snapshot(snapshot: Mapping[str, Any]) -> Plan:
    """Rebuild a Plan from a stored canonical snapshot (``canonical_plan`` output).

    ``canonical_plan(plan_from_snapshot(s)) == s`` for any snapshot this module wrote, so
    the engine can re-hash what it loaded and compare with the approved hash.
    """
    if not isinstance(snapshot, Mapping):
        raise PlanValidationError("invalid_plan", "a plan must be a JSON object", pointer="")
    return _build(dict(snapshot), _NATIVE)


def load_plan(document: Any, registry: ActionRegistry, *, document_size_bytes: int) -> Plan:
    """``parse_plan`` then ``validate_plan``: the whole document-level intake in one call."""
    return validate_plan(parse_plan(document), registry, document_size_bytes=document_size_bytes)


def document_size_bytes(document: Any) -> int:
    """Size of a parsed document as compact UTF-8 JSON, for callers without the raw bytes.

    Compact encoding makes the 256 KiB limit independent of the sender's whitespace.
    """
    if isinstance(document, str | bytes | bytearray):
        return len(document.encode() if isinstance(document, str) else document)
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False, default=str)
    return len(text.encode("utf-8", errors="surrogatepass"))


def _loads(raw: str | bytes | bytearray) -> Any:
    def no_constants(name: str) -> NoReturn:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(raw, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PlanValidationError(
            "invalid_plan", f"the plan is not valid JSON: {type(exc).__name__}", pointer=""
        ) from None


def _build(native: dict[str, Any], source: _SourceMap) -> Plan:
    try:
        plan = Plan.model_validate(native)
    except pydantic.ValidationError as exc:
        raise _from_pydantic(exc, native, source.to_document) from None
    plan._source = source
    return plan


_PYDANTIC_CODES = {"missing": "missing_field", "extra_forbidden": "unknown_field"}


def _from_pydantic(
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


# --- PlanV1 mapping --------------------------------------------------------------------

_V1_MAPPED_STEP_KEYS = frozenset(
    {
        "id",
        "tool",
        "action",
        "inputs",
        "targets",
        "depends_on",
        "estimated_duration",
        "estimated_duration_s",
        "description",
        "max_concurrency",
        "max_failures",
        "timeout_s",
        "requires_approval",
    }
)
_V1_PASSTHROUGH_KEYS = ("max_concurrency", "max_failures", "timeout_s", "description")


def _map_planv1(document: Mapping[str, Any]) -> tuple[dict[str, Any], _SourceMap]:
    """Map an upstream PlanV1 document onto the native form.

    - ``tool`` → ``action``; ``estimated_duration`` (seconds) → ``estimated_duration_s``,
      where ``0``/``null`` mean "no estimate" (the action default applies) — a planner
      saying "instant" should not get its plan refused.
    - targets: a step-level ``targets`` list if present, else ``inputs.targets`` when it
      is a list (moved out of the inputs). PlanV1 has no documented targets field, and
      planners put them among the tool inputs.
    - ``execution_metadata.approval_points`` (step ids, or ``{"step_id": …}``) set
      ``requires_approval`` on those steps: a level-3 gate each.
    - The remaining descriptive keys are kept, not lost: per step in ``metadata`` under
      their own names, plan-wide in ``metadata.planv1`` mirroring the document. Volatile
      keys (``timestamp``, ``processing_time_ms``) are dropped.
    - Step order is kept exactly (``execution_order`` is descriptive; ``depends_on``
      drives execution), so native step ``i`` is document step ``i``.
    """
    plan_part = document["plan"]
    if not isinstance(plan_part, Mapping):
        raise PlanValidationError("invalid_field", "plan must be an object", pointer="/plan")
    raw_steps = plan_part.get("steps")
    if raw_steps is None:
        raise PlanValidationError("missing_field", "plan.steps is required", pointer="/plan/steps")
    if not isinstance(raw_steps, list):
        raise PlanValidationError(
            "invalid_field", "plan.steps must be a list", pointer="/plan/steps"
        )
    execution_metadata = document.get("execution_metadata")
    if execution_metadata is None:
        execution_metadata = {}
    if not isinstance(execution_metadata, Mapping):
        raise PlanValidationError(
            "invalid_field", "execution_metadata must be an object", pointer="/execution_metadata"
        )
    approval_points = _approval_points(execution_metadata.get("approval_points"))

    fields: dict[tuple[int, str], tuple[PointerPart, ...]] = {}
    steps: list[Any] = []
    step_ids: set[str] = set()
    for index, raw in enumerate(raw_steps):
        if not isinstance(raw, Mapping):
            steps.append(raw)  # pydantic reports it at /plan/steps/<index>
            continue
        step, step_fields = _map_planv1_step(index, raw, approval_points)
        fields.update(step_fields)
        steps.append(step)
        if isinstance(raw.get("id"), str):
            step_ids.add(raw["id"])
    for step_id, position in approval_points.items():
        if step_id not in step_ids:
            raise PlanValidationError(
                "unknown_step",
                "an approval point names a step that is not in the plan",
                pointer=json_pointer("execution_metadata", "approval_points", position),
            )

    native: dict[str, Any] = {"steps": steps}
    for where, container in (("", document), ("plan", plan_part)):
        if "runbook_url" in container:
            native["runbook_url"] = container["runbook_url"]
            fields[(-1, "runbook_url")] = (where, "runbook_url") if where else ("runbook_url",)
            break
    described = _without(document, {"plan", "runbook_url", *VOLATILE_FIELDS})
    described["plan"] = _without(plan_part, {"steps", "runbook_url", *VOLATILE_FIELDS})
    if "execution_metadata" in described:
        described["execution_metadata"] = _without(execution_metadata, set(VOLATILE_FIELDS))
    native["metadata"] = {_PLANV1_METADATA_KEY: described}
    return native, _SourceMap("planv1", MappingProxyType(fields))


def _approval_points(raw: Any) -> dict[str, int]:
    """Step id → position in ``approval_points`` (for pointers)."""
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise PlanValidationError(
            "invalid_field",
            "approval_points must be a list of step ids",
            pointer="/execution_metadata/approval_points",
        )
    points: dict[str, int] = {}
    for position, point in enumerate(raw):
        step_id = point.get("step_id") if isinstance(point, Mapping) else point
        if not isinstance(step_id, str):
            raise PlanValidationError(
                "invalid_field",
                "an approval point must be a step id",
                pointer=json_pointer("execution_metadata", "approval_points", position),
            )
        points.setdefault(step_id, position)
    return points


def _map_planv1_step(
    index: int, raw: Mapping[str, Any], approval_points: Mapping[str, int]
) -> tuple[dict[str, Any], dict[tuple[int, str], tuple[PointerPart, ...]]]:
    here: tuple[PointerPart, ...] = ("plan", "steps", index)
    fields: dict[tuple[int, str], tuple[PointerPart, ...]] = {}
    step: dict[str, Any] = {}
    if "id" in raw:
        step["id"] = raw["id"]
    if "tool" in raw or "action" not in raw:
        fields[(index, "action")] = (*here, "tool")
        if "tool" in raw:
            step["action"] = raw["tool"]
    else:
        step["action"] = raw["action"]

    inputs = raw.get("inputs")
    inputs = {} if inputs is None else inputs
    if "targets" in raw:
        step["targets"] = [] if raw["targets"] is None else raw["targets"]
    elif isinstance(inputs, Mapping) and isinstance(inputs.get("targets"), list):
        step["targets"] = inputs["targets"]
        inputs = _without(inputs, {"targets"})
        fields[(index, "targets")] = (*here, "inputs", "targets")
    step["inputs"] = inputs
    step["depends_on"] = [] if raw.get("depends_on") is None else raw["depends_on"]

    if "estimated_duration_s" in raw:
        duration = raw["estimated_duration_s"]
    else:
        duration = raw.get("estimated_duration")
        fields[(index, "estimated_duration_s")] = (*here, "estimated_duration")
    if duration is not None and not (duration == 0 and not isinstance(duration, bool)):
        step["estimated_duration_s"] = duration
    for key in _V1_PASSTHROUGH_KEYS:
        if raw.get(key) is not None:
            step[key] = raw[key]

    step_id = raw.get("id")
    if isinstance(step_id, str) and step_id in approval_points:
        step["requires_approval"] = True
        fields[(index, "requires_approval")] = (
            "execution_metadata",
            "approval_points",
            approval_points[step_id],
        )
    elif raw.get("requires_approval") is not None:
        step["requires_approval"] = raw["requires_approval"]

    described = {k: v for k, v in raw.items() if k not in _V1_MAPPED_STEP_KEYS}
    if described:
        step["metadata"] = described
    return step, fields


def _without(mapping: Mapping[str, Any], keys: Collection[str]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k not in keys}


# --- validation (R-PLAN-2) -------------------------------------------------------------


def validate_plan(plan: Plan, registry: ActionRegistry, *, document_size_bytes: int) -> Plan:
    """Check a parsed plan against the limits and the registry; return it unchanged.

    Raises ``PlanValidationError`` (codes in ``PLAN_ERROR_CODES``). Literal secrets are
    checked before inputs are validated, so no error message can be built from inputs
    that still hold a literal secret. Targets are checked separately (``check_targets``)
    because that needs the caller's tenant's inventory.
    """
    if document_size_bytes > MAX_PLAN_BYTES:
        _refuse(
            plan,
            "plan_too_large",
            f"the plan is {document_size_bytes} bytes; the limit is {MAX_PLAN_BYTES}",
            "",
            limit=MAX_PLAN_BYTES,
            actual=document_size_bytes,
        )
    _check_limits(plan)
    _check_values(plan)
    _check_literal_secrets(plan)
    _check_step_ids(plan)
    for index, step in enumerate(plan.steps):
        _check_step(plan, index, step, registry)
    _check_dependencies(plan)
    return plan


def _check_limits(plan: Plan) -> None:
    if len(plan.steps) > MAX_STEPS:
        _refuse(
            plan,
            "too_many_steps",
            f"the plan has {len(plan.steps)} steps; the limit is {MAX_STEPS}",
            "/steps",
            limit=MAX_STEPS,
            actual=len(plan.steps),
        )
    total = 0
    for index, step in enumerate(plan.steps):
        total += len(step.targets)
        if len(step.targets) > MAX_TARGETS_PER_STEP:
            _refuse(
                plan,
                "too_many_targets",
                f"step {step.id!r} has {len(step.targets)} targets; "
                f"the limit is {MAX_TARGETS_PER_STEP}",
                json_pointer("steps", index, "targets"),
                limit=MAX_TARGETS_PER_STEP,
                actual=len(step.targets),
            )
    if total > MAX_TOTAL_STEP_TARGETS:
        _refuse(
            plan,
            "too_many_step_targets",
            f"the plan has {total} step targets in all; the limit is {MAX_TOTAL_STEP_TARGETS}",
            "/steps",
            limit=MAX_TOTAL_STEP_TARGETS,
            actual=total,
        )


def _iter_free_values(plan: Plan) -> Iterator[tuple[tuple[PointerPart, ...], Any]]:
    """The caller-supplied free-form parts of a plan and where they live."""
    for index, step in enumerate(plan.steps):
        yield ("steps", index, "inputs"), step.inputs
        yield ("steps", index, "metadata"), step.metadata
        if step.description is not None:
            yield ("steps", index, "description"), step.description
    yield ("metadata",), plan.metadata


def _check_values(plan: Plan) -> None:
    """Refuse values PostgreSQL ``jsonb`` or UTF-8 cannot hold, and runaway nesting.

    NUL characters and lone surrogates parse fine as JSON but make the insert (or the
    hash) fail later, which would be a 500 instead of a 422 naming the field.
    """
    for index, step in enumerate(plan.steps):
        for j, target in enumerate(step.targets):
            _check_string(plan, target, ("steps", index, "targets", j))
        for j, dependency in enumerate(step.depends_on):
            _check_string(plan, dependency, ("steps", index, "depends_on", j))
    for base, value in _iter_free_values(plan):
        stack: list[tuple[Any, tuple[PointerPart, ...], int]] = [(value, base, 0)]
        while stack:
            current, path, depth = stack.pop()
            if depth > MAX_VALUE_DEPTH:
                _refuse(
                    plan,
                    "too_deep",
                    f"values may nest at most {MAX_VALUE_DEPTH} levels",
                    json_pointer(*path),
                )
            if isinstance(current, Mapping):
                for key, item in current.items():
                    if not isinstance(key, str):
                        _refuse(plan, "invalid_value", "keys must be strings", json_pointer(*path))
                    _check_string(plan, key, path)
                    stack.append((item, (*path, key), depth + 1))
            elif isinstance(current, list | tuple):
                stack.extend((item, (*path, i), depth + 1) for i, item in enumerate(current))
            elif isinstance(current, str):
                _check_string(plan, current, path)
            elif isinstance(current, float) and not math.isfinite(current):
                _refuse(plan, "invalid_value", "numbers must be finite", json_pointer(*path))
            elif (
                isinstance(current, int)
                and not isinstance(current, bool)
                and abs(current) >= _MAX_INTEGER
            ):
                # Python refuses to print ints beyond ~4300 digits; no real input needs 100.
                _refuse(plan, "invalid_value", "integers must be below 1e100", json_pointer(*path))
            elif current is not None and not isinstance(current, bool | int | float):
                _refuse(
                    plan,
                    "invalid_value",
                    f"{type(current).__name__} is not a JSON value",
                    json_pointer(*path),
                )


def _check_string(plan: Plan, value: str, path: tuple[PointerPart, ...]) -> None:
    if "\x00" in value:
        _refuse(plan, "invalid_value", "strings must not contain NUL", json_pointer(*path))
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        _refuse(plan, "invalid_value", "strings must be valid Unicode", json_pointer(*path))


def _check_literal_secrets(plan: Plan) -> None:
    """R-SEC-1: under a secret-shaped key only secret references (or null/booleans).

    Everything nested under a secret-shaped key counts as secret: ``{"auth": {"user":
    "x"}}`` is refused too, because a value one level down leaks just as well. Booleans
    and null carry no secret (``"use_auth": true`` passes). The detail never contains the
    value; the pointer names where it is.
    """
    for base, value in _iter_free_values(plan):
        if isinstance(value, str):
            continue  # description: free text, no keys
        stack: list[tuple[Any, tuple[PointerPart, ...], bool]] = [(value, base, False)]
        while stack:
            current, path, secret = stack.pop()
            if isinstance(current, Mapping):
                if SECRET_REF_KEY in current:
                    if not is_secret_ref(current):
                        _refuse(
                            plan,
                            "invalid_secret_ref",
                            'a secret reference is exactly {"$secret": "<name>"} with a name '
                            "of letters, digits and _.:/@+-",
                            json_pointer(*path),
                        )
                    continue
                stack.extend(
                    (item, (*path, key), secret or is_secret_key(str(key)))
                    for key, item in reversed(list(current.items()))
                )
            elif isinstance(current, list | tuple):
                stack.extend(
                    (item, (*path, i), secret) for i, item in reversed(list(enumerate(current)))
                )
            elif secret and current is not None and not isinstance(current, bool):
                _refuse(
                    plan,
                    "literal_secret",
                    "a literal value under a secret-shaped key; send a secret reference "
                    '{"$secret": "<name>"} instead',
                    json_pointer(*path),
                )


def _check_step_ids(plan: Plan) -> None:
    seen: dict[str, int] = {}
    for index, step in enumerate(plan.steps):
        if step.id in seen:
            _refuse(
                plan,
                "duplicate_step_id",
                f"step id {step.id!r} is used by steps {seen[step.id]} and {index}",
                json_pointer("steps", index, "id"),
            )
        seen[step.id] = index


def _check_step(plan: Plan, index: int, step: PlanStep, registry: ActionRegistry) -> None:
    spec = registry.get(step.action)
    if spec is None:
        _refuse(
            plan,
            "unknown_action",
            f"unknown action {step.action!r}",
            json_pointer("steps", index, "action"),
            known_actions=registry.names(),
        )
    seen: set[str] = set()
    for j, target in enumerate(step.targets):
        try:
            _check_name(target, "a target name", MAX_NAME_LENGTH)
        except ValueError as exc:
            _refuse(plan, "invalid_target", str(exc), json_pointer("steps", index, "targets", j))
        if target in seen:
            _refuse(
                plan,
                "duplicate_target",
                f"target {target!r} appears twice in step {step.id!r}",
                json_pointer("steps", index, "targets", j),
            )
        seen.add(target)
    try:
        spec.parse_inputs(step.inputs)
    except pydantic.ValidationError as exc:
        raise _from_pydantic(
            exc,
            step.inputs,
            plan.document_pointer,
            code="invalid_inputs",
            base=("steps", index, "inputs"),
            what=f"{step.action} inputs: ",
        ) from None
    mode = spec.target_mode_for(step.inputs)
    if mode == "none" and step.targets:
        _refuse(
            plan,
            "targets_not_allowed",
            f"{step.action} runs without targets; remove them",
            json_pointer("steps", index, "targets"),
        )
    if mode == "required" and not step.targets:
        _refuse(
            plan,
            "targets_required",
            f"{step.action} needs at least one target",
            json_pointer("steps", index, "targets"),
        )


def _check_dependencies(plan: Plan) -> None:
    index_of = {step.id: i for i, step in enumerate(plan.steps)}
    for index, step in enumerate(plan.steps):
        for j, dependency in enumerate(step.depends_on):
            if dependency not in index_of:
                _refuse(
                    plan,
                    "unknown_dependency",
                    f"step {step.id!r} depends on {dependency!r}, which is not in the plan",
                    json_pointer("steps", index, "depends_on", j),
                )
    cycle = _find_cycle(plan, index_of)
    if cycle is not None:
        first, second = plan.steps[cycle[0]], plan.steps[cycle[1]]
        names = [plan.steps[i].id for i in cycle]
        _refuse(
            plan,
            "dependency_cycle",
            "dependency cycle: " + " → ".join(names) + " (→ = depends on)",
            json_pointer("steps", cycle[0], "depends_on", first.depends_on.index(second.id)),
            cycle=names,
        )


def _find_cycle(plan: Plan, index_of: Mapping[str, int]) -> list[int] | None:
    """A dependency cycle as step indexes ``[a, b, …, a]`` (a depends on b …), or None.

    Iterative depth-first search in step order, so the reported cycle is deterministic and
    deep chains cannot hit the recursion limit.
    """
    edges = [[index_of[d] for d in step.depends_on] for step in plan.steps]
    state = [0] * len(edges)  # 0 unseen, 1 on the current path, 2 done
    for start in range(len(edges)):
        if state[start]:
            continue
        state[start] = 1
        path = [start]
        stack = [iter(edges[start])]
        while stack:
            following = next(stack[-1], None)
            if following is None:
                state[path.pop()] = 2
                stack.pop()
            elif state[following] == 1:
                return [*path[path.index(following) :], following]
            elif state[following] == 0:
                state[following] = 1
                path.append(following)
                stack.append(iter(edges[following]))
    return None


def check_targets(plan: Plan, known: Collection[str]) -> None:
    """Refuse targets not in ``known`` (``unknown_target``, pointer to the first).

    The engine passes only the caller's tenant's asset names, so another tenant's asset
    is indistinguishable from a missing one — deliberately (R-RBAC tenant isolation).
    """
    known_set = known if isinstance(known, set | frozenset) else set(known)
    unknown = sorted({t for step in plan.steps for t in step.targets if t not in known_set})
    if not unknown:
        return
    for index, step in enumerate(plan.steps):
        for j, target in enumerate(step.targets):
            if target not in known_set:
                _refuse(
                    plan,
                    "unknown_target",
                    f"target {target!r} is not in the inventory",
                    json_pointer("steps", index, "targets", j),
                    unknown_targets=unknown[:100],
                )


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
