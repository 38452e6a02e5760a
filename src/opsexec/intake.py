"""Plan intake: a document in (native or PlanV1), a checked ``Plan`` out. Pure, no I/O.

``parse_plan`` checks shape and maps PlanV1 onto the native model (keeping a source map
so refusals point into the document as sent); ``validate_plan`` checks meaning against
the action registry and the R-PLAN-2 limits; ``check_targets`` checks targets against the
caller's inventory. ``load_plan`` runs the first two. The model, the pointers and the
canonical hash live in ``opsexec.plan``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NoReturn

import pydantic

from opsexec.errors import PlanValidationError
from opsexec.plan import (
    MAX_INTEGER,
    MAX_NAME_LENGTH,
    MAX_PLAN_BYTES,
    MAX_STEPS,
    MAX_TARGETS_PER_STEP,
    MAX_TOTAL_STEP_TARGETS,
    MAX_VALUE_DEPTH,
    NATIVE_SOURCE,
    PLANV1_METADATA_KEY,
    SECRET_REF_KEY,
    VOLATILE_FIELDS,
    Plan,
    PlanStep,
    PointerPart,
    SourceMap,
    build_plan,
    check_name,
    is_secret_ref,
    json_pointer,
    refusal_from_pydantic,
    refuse,
)
from opsexec.safety.masking import is_secret_key

if TYPE_CHECKING:
    from opsexec.actions.registry import ActionRegistry

__all__ = ["check_targets", "document_size_bytes", "load_plan", "parse_plan", "validate_plan"]


# --- parsing ---------------------------------------------------------------------------


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
        native, source = dict(document), NATIVE_SOURCE
    plan = build_plan(native, source)
    return plan


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


def _map_planv1(document: Mapping[str, Any]) -> tuple[dict[str, Any], SourceMap]:
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
    native["metadata"] = {PLANV1_METADATA_KEY: described}
    return native, SourceMap("planv1", MappingProxyType(fields))


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
        refuse(
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
        refuse(
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
            refuse(
                plan,
                "too_many_targets",
                f"step {step.id!r} has {len(step.targets)} targets; "
                f"the limit is {MAX_TARGETS_PER_STEP}",
                json_pointer("steps", index, "targets"),
                limit=MAX_TARGETS_PER_STEP,
                actual=len(step.targets),
            )
    if total > MAX_TOTAL_STEP_TARGETS:
        refuse(
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
                refuse(
                    plan,
                    "too_deep",
                    f"values may nest at most {MAX_VALUE_DEPTH} levels",
                    json_pointer(*path),
                )
            if isinstance(current, Mapping):
                for key, item in current.items():
                    if not isinstance(key, str):
                        refuse(plan, "invalid_value", "keys must be strings", json_pointer(*path))
                    _check_string(plan, key, path)
                    stack.append((item, (*path, key), depth + 1))
            elif isinstance(current, list | tuple):
                stack.extend((item, (*path, i), depth + 1) for i, item in enumerate(current))
            elif isinstance(current, str):
                _check_string(plan, current, path)
            elif isinstance(current, float) and not math.isfinite(current):
                refuse(plan, "invalid_value", "numbers must be finite", json_pointer(*path))
            elif (
                isinstance(current, int)
                and not isinstance(current, bool)
                and abs(current) >= MAX_INTEGER
            ):
                # Python refuses to print ints beyond ~4300 digits; no real input needs 100.
                refuse(plan, "invalid_value", "integers must be below 1e100", json_pointer(*path))
            elif current is not None and not isinstance(current, bool | int | float):
                refuse(
                    plan,
                    "invalid_value",
                    f"{type(current).__name__} is not a JSON value",
                    json_pointer(*path),
                )


def _check_string(plan: Plan, value: str, path: tuple[PointerPart, ...]) -> None:
    if "\x00" in value:
        refuse(plan, "invalid_value", "strings must not contain NUL", json_pointer(*path))
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        refuse(plan, "invalid_value", "strings must be valid Unicode", json_pointer(*path))


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
                        refuse(
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
                refuse(
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
            refuse(
                plan,
                "duplicate_step_id",
                f"step id {step.id!r} is used by steps {seen[step.id]} and {index}",
                json_pointer("steps", index, "id"),
            )
        seen[step.id] = index


def _check_step(plan: Plan, index: int, step: PlanStep, registry: ActionRegistry) -> None:
    spec = registry.get(step.action)
    if spec is None:
        refuse(
            plan,
            "unknown_action",
            f"unknown action {step.action!r}",
            json_pointer("steps", index, "action"),
            known_actions=registry.names(),
        )
    seen: set[str] = set()
    for j, target in enumerate(step.targets):
        try:
            check_name(target, "a target name", MAX_NAME_LENGTH)
        except ValueError as exc:
            refuse(plan, "invalid_target", str(exc), json_pointer("steps", index, "targets", j))
        if target in seen:
            refuse(
                plan,
                "duplicate_target",
                f"target {target!r} appears twice in step {step.id!r}",
                json_pointer("steps", index, "targets", j),
            )
        seen.add(target)
    try:
        spec.parse_inputs(step.inputs)
    except pydantic.ValidationError as exc:
        raise refusal_from_pydantic(
            exc,
            step.inputs,
            plan.document_pointer,
            code="invalid_inputs",
            base=("steps", index, "inputs"),
            what=f"{step.action} inputs: ",
        ) from None
    mode = spec.target_mode_for(step.inputs)
    if mode == "none" and step.targets:
        refuse(
            plan,
            "targets_not_allowed",
            f"{step.action} runs without targets; remove them",
            json_pointer("steps", index, "targets"),
        )
    if mode == "required" and not step.targets:
        refuse(
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
                refuse(
                    plan,
                    "unknown_dependency",
                    f"step {step.id!r} depends on {dependency!r}, which is not in the plan",
                    json_pointer("steps", index, "depends_on", j),
                )
    cycle = _find_cycle(plan, index_of)
    if cycle is not None:
        first, second = plan.steps[cycle[0]], plan.steps[cycle[1]]
        names = [plan.steps[i].id for i in cycle]
        refuse(
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
                refuse(
                    plan,
                    "unknown_target",
                    f"target {target!r} is not in the inventory",
                    json_pointer("steps", index, "targets", j),
                    unknown_targets=unknown[:100],
                )
