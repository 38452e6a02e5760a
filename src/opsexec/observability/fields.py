"""The R-OBS fields of an execution, for log lines and metric labels.

One definition, used by the executor (the "submitted" line), the engine (bound around a
run, so every line logged inside it carries them) and the "finished" line, so the names
never drift apart: ``exec_id, tenant_id, plan_hash, request_id, actor_id, action,
targets, approval_level, status, error_class, duration_ms, retries_total, queue_wait_ms,
worker_id, lease_renewals, cancel_checks_performed``.

Identity fields (:func:`execution_fields`) hold for the whole run and are bound once.
Outcome fields (:func:`outcome_fields`) change while it runs, so they go on the lines
that report a state, never into the bound context where they would go stale.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, TypeAlias

import asyncpg

from opsexec.actions.registry import ActionRegistry
from opsexec.plan import Plan

ExecutionRow: TypeAlias = "asyncpg.Record | Mapping[str, Any]"
"""An ``executions`` row as the store returns it, or a dict with its columns (tests)."""

MAX_LOGGED_TARGETS: Final = 20
"""A 1 000-target deploy would otherwise put 1 000 names on every line of its run."""

_OUTCOME_COLUMNS: Final = (
    "status",
    "error_class",
    "duration_ms",
    "retries_total",
    "queue_wait_ms",
    "worker_id",
    "lease_renewals",
    "cancel_checks_performed",
)


def execution_request_id(execution: ExecutionRow) -> str | None:
    """The correlation id downstream calls and log lines carry for this execution.

    The ``X-Request-ID`` of the request that submitted it (kept in ``metadata``), else
    the caller's ``request_id`` body field (a uuid column of its own), else None.
    """
    metadata = execution["metadata"] or {}
    header = metadata.get("request_id")
    if header:
        return str(header)
    column = execution["request_id"]
    return str(column) if column is not None else None


def primary_action(plan: Plan, registry: ActionRegistry) -> str | None:
    """The action that makes the plan as risky as it is: the first of its riskiest class.

    A metric label must have few values, so a plan of several actions is labelled by one
    of them — the one its approval level and timeout policy were chosen for.
    """
    best: tuple[Any, str] | None = None
    for step in plan.steps:
        spec = registry.get(step.action)
        if spec is None:
            continue
        action_class = spec.classify(step.inputs)
        if best is None or action_class > best[0]:
            best = (action_class, step.action)
    return best[1] if best else None


def plan_targets(plan: Plan) -> tuple[list[str], int]:
    """Sorted distinct targets (at most ``MAX_LOGGED_TARGETS``) and how many there are."""
    targets = sorted({target for step in plan.steps for target in step.targets})
    return targets[:MAX_LOGGED_TARGETS], len(targets)


def execution_fields(
    execution: ExecutionRow, plan: Plan | None = None, registry: ActionRegistry | None = None
) -> dict[str, Any]:
    """The fields that identify an execution for its whole life (safe to bind)."""
    fields: dict[str, Any] = {
        "exec_id": str(execution["id"]),
        "tenant_id": str(execution["tenant_id"]),
        "actor_id": str(execution["actor_id"]),
        "plan_hash": execution["plan_hash"],
        "approval_level": execution["approval_level"],
        "sla_class": str(execution["sla_class"]),
        "execution_mode": str(execution["execution_mode"]),
    }
    request_id = execution_request_id(execution)
    if request_id is not None:
        fields["request_id"] = request_id
    if plan is not None:
        if registry is not None:
            fields["action"] = primary_action(plan, registry)
        fields["targets"], fields["target_count"] = plan_targets(plan)
    return fields


def outcome_fields(execution: ExecutionRow) -> dict[str, Any]:
    """Status and counters as they are in ``execution`` now (omitting what is unknown)."""
    fields: dict[str, Any] = {}
    for column in _OUTCOME_COLUMNS:
        value = execution[column]
        if value is not None:
            fields[column] = str(value) if column == "status" else value
    return fields
