"""Classification (R-CLASS): approval level, duration, SLA, mode, timeouts. Pure, no I/O.

``classify`` answers, for a validated plan, every question intake has to settle before
the execution row is written: how risky (approval level and which steps need their own
level-3 gate), how long (estimate → SLA class → immediate or background), which timeout
policy row governs it, and the queue parameters that follow from the SLA.

Its inputs are plain values the engine looked up (target environments, the tenant's
minimum level), so it is deterministic and testable without a database.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from graphlib import TopologicalSorter
from types import MappingProxyType

from opsexec.actions.registry import ActionClass, ActionRegistry, ActionSpec, RankedStrEnum
from opsexec.errors import PlanValidationError
from opsexec.plan import Plan, PlanStep, json_pointer

__all__ = [
    "DEFAULT_MAX_CONCURRENCY",
    "DEFAULT_PRIORITY",
    "LEASE_BUFFER_MS",
    "MANY_TARGETS",
    "MAX_ATTEMPTS",
    "MAX_LEASE_RENEWALS",
    "PRIORITY_NAMES",
    "PRODUCTION_ENVIRONMENTS",
    "TIMEOUT_POLICIES",
    "Classification",
    "ExecutionMode",
    "SlaClass",
    "StepClassification",
    "TimeoutPolicy",
    "classify",
    "estimate_duration_s",
    "lease_timeout_ms",
    "parse_priority",
    "resolve_mode",
    "resolve_timeout_policy",
    "sla_for",
    "step_cost_s",
    "step_estimate_s",
    "step_timeout_ms",
]


class SlaClass(RankedStrEnum):
    """Ordered ``fast < medium < long`` (not alphabetically)."""

    FAST = "fast"
    MEDIUM = "medium"
    LONG = "long"


class ExecutionMode(StrEnum):
    IMMEDIATE = "immediate"
    BACKGROUND = "background"


FAST_LIMIT_S = 10.0
MEDIUM_LIMIT_S = 30.0


def sla_for(duration_s: float) -> SlaClass:
    """fast < 10 s ≤ medium ≤ 30 s < long (SPEC: "medium 10-30 s", both ends medium)."""
    if duration_s < FAST_LIMIT_S:
        return SlaClass.FAST
    if duration_s <= MEDIUM_LIMIT_S:
        return SlaClass.MEDIUM
    return SlaClass.LONG


# --- timeout policies -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TimeoutPolicy:
    """One ``timeout_policies`` row (SPEC §1). Mirrors the seed migration exactly."""

    id: str
    sla_class: SlaClass
    action_class: ActionClass
    execution_timeout_ms: int
    step_timeout_ms: int
    lease_timeout_ms: int
    max_lease_renewals: int = 3
    description: str = ""


def _policy(
    id: str, sla: SlaClass, cls: ActionClass, execution: int, step: int, lease: int, text: str
) -> TimeoutPolicy:
    return TimeoutPolicy(
        id=id,
        sla_class=sla,
        action_class=cls,
        execution_timeout_ms=execution,
        step_timeout_ms=step,
        lease_timeout_ms=lease,
        description=text,
    )


_S, _A = SlaClass, ActionClass
TIMEOUT_POLICIES: Mapping[str, TimeoutPolicy] = MappingProxyType(
    {
        p.id: p
        for p in (
            _policy(
                "fast_read",
                _S.FAST,
                _A.READ,
                10_000,
                5_000,
                15_000,
                "Quick lookups answered inside the request",
            ),
            _policy(
                "medium_read",
                _S.MEDIUM,
                _A.READ,
                30_000,
                15_000,
                45_000,
                "Reads that take tens of seconds",
            ),
            _policy(
                "medium_modify",
                _S.MEDIUM,
                _A.MODIFY,
                30_000,
                20_000,
                60_000,
                "Restarts and similar changes; also serves fast modify plans",
            ),
            _policy(
                "long_read",
                _S.LONG,
                _A.READ,
                600_000,
                60_000,
                180_000,
                "Long-running reads across many hosts",
            ),
            _policy(
                "long_modify",
                _S.LONG,
                _A.MODIFY,
                600_000,
                120_000,
                360_000,
                "Long-running changes across many hosts",
            ),
            _policy(
                "long_deploy",
                _S.LONG,
                _A.DEPLOY,
                600_000,
                180_000,
                540_000,
                "Deployments of any size",
            ),
        )
    }
)


def resolve_timeout_policy(
    sla: SlaClass | str,
    action_class: ActionClass | str,
    policies: Mapping[str, TimeoutPolicy] | Iterable[TimeoutPolicy] = TIMEOUT_POLICIES,
) -> TimeoutPolicy:
    """The policy row for an (SLA, action class) pair, following SPEC's missing-row rule.

    Search the same action class first, at the same SLA and then longer ones; only if the
    class has no row at all, try stricter classes the same way. Never a shorter SLA or a
    laxer class: a fast modify plan gets ``medium_modify``'s longer step timeout rather
    than ``fast_read``'s, because a restart must not be killed by a lookup's budget.
    ``policies`` defaults to the seed rows; pass rows loaded from the database to honour
    an operator's edits.
    """
    sla, action_class = SlaClass(sla), ActionClass(action_class)
    rows = policies.values() if isinstance(policies, Mapping) else policies
    by_pair = {(p.sla_class, p.action_class): p for p in rows}
    for cls in ActionClass:
        if cls < action_class:
            continue
        for level in SlaClass:
            if level >= sla and (level, cls) in by_pair:
                return by_pair[(level, cls)]
    raise LookupError(f"no timeout policy covers {sla} {action_class}")


MAX_ATTEMPTS: Mapping[SlaClass, int] = MappingProxyType(
    {SlaClass.FAST: 3, SlaClass.MEDIUM: 5, SlaClass.LONG: 3}
)
MAX_LEASE_RENEWALS: Mapping[SlaClass, int] = MappingProxyType(
    {SlaClass.FAST: 1, SlaClass.MEDIUM: 3, SlaClass.LONG: 10}
)
LEASE_BUFFER_MS = 5_000
HEARTBEATS_PER_LEASE = 3
"""Workers renew a lease each time a third of it has passed: one missed beat never loses it."""


def step_timeout_ms(policy: TimeoutPolicy, step: PlanStep) -> int:
    """The timeout of one invocation of ``step`` (one target): the policy's, shortened by
    the step's ``timeout_s`` if that is smaller — never extended (R-PLAN-3).

    ``classify`` already refused a longer ``timeout_s``; the ``min`` here keeps the rule
    true for any caller.
    """
    if step.timeout_s is None:
        return policy.step_timeout_ms
    return max(1, min(policy.step_timeout_ms, round(step.timeout_s * 1000)))


def lease_timeout_ms(
    policy: TimeoutPolicy,
    p95_step_ms: int | None = None,
    buffer_ms: int = LEASE_BUFFER_MS,
    *,
    execution_timeout_ms: int | None = None,
    max_renewals: int | None = None,
) -> int:
    """SPEC: lease = max(step timeout + buffer, 2 x p95 step duration), stretched so that
    a healthy run can keep its lease until its own execution timeout ends it.

    ``step timeout + buffer`` guarantees a worker keeps its lease through one step that
    runs to its timeout, even if a heartbeat is missed; ``2 x p95`` covers actions whose
    observed durations drift above the policy. The policy row's own ``lease_timeout_ms``
    is the seeded static value (kept for the table and forensics), not a floor.

    The stretch: renewals are capped per SLA, so a lease lasts at most ``lease x (1 +
    max_renewals / HEARTBEATS_PER_LEASE)``. With the SPEC formula alone that is 282 s for
    ``long_read`` against a 600 s execution timeout: the reaper would take a job from a
    worker that is running it fine, and the next worker would find its step interrupted.
    Given ``execution_timeout_ms`` and ``max_renewals``, the lease grows until the cap
    covers the execution timeout plus the buffer. The cost is slower detection of a dead
    worker for long executions, which are long anyway.
    """
    lease = policy.step_timeout_ms + buffer_ms
    if p95_step_ms is not None and p95_step_ms > 0:
        lease = max(lease, 2 * p95_step_ms)
    if execution_timeout_ms is not None and max_renewals is not None:
        beats = HEARTBEATS_PER_LEASE + max_renewals
        covering = -(-(execution_timeout_ms + buffer_ms) * HEARTBEATS_PER_LEASE // beats)
        lease = max(lease, covering)
    return lease


# --- duration ----------------------------------------------------------------------------

DEFAULT_MAX_CONCURRENCY = 10
"""Targets of one step in flight at once when the step does not say (the runner uses it)."""


def step_estimate_s(step: PlanStep, spec: ActionSpec | None) -> float:
    """Per-target estimate: the step's own, else the action's default duration."""
    if step.estimated_duration_s is not None:
        return step.estimated_duration_s
    if spec is None:
        raise ValueError(f"step {step.id!r} has no estimate and its action is unknown")
    return spec.default_duration_s


def step_cost_s(step: PlanStep, estimate_s: float) -> float:
    """Wall time of a step: estimate x number of waves of ``max_concurrency`` targets.

    A target-less step still runs once (``max(targets, 1)``).
    """
    concurrency = step.max_concurrency or DEFAULT_MAX_CONCURRENCY
    return estimate_s * math.ceil(max(len(step.targets), 1) / concurrency)


def estimate_duration_s(plan: Plan, registry: ActionRegistry | None = None) -> float:
    """Longest path through the dependency graph, each step costing ``step_cost_s``.

    ``registry`` supplies default durations for steps without an estimate; without it
    such a step raises ``ValueError``. Independent steps may run in parallel, so the
    plan takes as long as its slowest chain, not the sum of its steps.
    """
    by_id = {step.id: step for step in plan.steps}
    graph = {s.id: [d for d in s.depends_on if d in by_id] for s in plan.steps}
    finish: dict[str, float] = {}
    for step_id in TopologicalSorter(graph).static_order():
        step = by_id[step_id]
        spec = registry.get(step.action) if registry is not None else None
        start = max((finish[d] for d in graph[step_id]), default=0.0)
        finish[step_id] = start + step_cost_s(step, step_estimate_s(step, spec))
    return max(finish.values(), default=0.0)


# --- mode and priority ------------------------------------------------------------------

PRIORITY_NAMES: Mapping[str, int] = MappingProxyType({"urgent": 0, "normal": 50, "bulk": 100})
DEFAULT_PRIORITY = 50


def parse_priority(priority: int | str | None) -> int:
    """0-100 (0 most urgent) or ``urgent``/``normal``/``bulk``; default 50.

    Pointer ``/priority`` is relative to the request body, not the plan.
    """
    if priority is None:
        return DEFAULT_PRIORITY
    if isinstance(priority, str):
        value = PRIORITY_NAMES.get(priority.strip().lower())
        if value is not None:
            return value
    elif isinstance(priority, int) and not isinstance(priority, bool) and 0 <= priority <= 100:
        return priority
    raise PlanValidationError(
        "invalid_priority",
        "priority must be an integer 0-100 or one of urgent, normal, bulk",
        pointer="/priority",
    )


def resolve_mode(sla: SlaClass, requested_mode: str | None) -> ExecutionMode:
    """fast → immediate, otherwise background; a caller may always ask for background,
    and may ask for immediate only for a fast plan (a 30-minute deploy cannot hold an
    HTTP request open). Pointer ``/mode`` is relative to the request body."""
    natural = ExecutionMode.IMMEDIATE if sla is SlaClass.FAST else ExecutionMode.BACKGROUND
    if requested_mode is None:
        return natural
    try:
        mode = ExecutionMode(requested_mode)
    except ValueError:
        raise PlanValidationError(
            "invalid_mode", "mode must be immediate or background", pointer="/mode"
        ) from None
    if mode is ExecutionMode.IMMEDIATE and sla is not SlaClass.FAST:
        raise PlanValidationError(
            "immediate_not_allowed",
            f"the plan is estimated {sla}; only fast plans run immediately — "
            "ask for background or leave mode unset",
            pointer="/mode",
            sla_class=sla.value,
        )
    return mode


# --- classification ---------------------------------------------------------------------

PRODUCTION_ENVIRONMENTS = frozenset({"production", "prod"})
"""Environment names that raise a step's level (compared case-insensitively). ``prod``
is included because erring towards more approval is the safe mistake."""
MANY_TARGETS = 10
"""More targets than this in one step makes it at least level 2 (R-CLASS)."""
MAX_LEVEL = 3


@dataclass(frozen=True, kw_only=True)
class StepClassification:
    """How one plan step was judged. ``reasons`` are human-readable for the approval UI."""

    index: int
    step_id: str
    action: str
    action_class: ActionClass
    base_level: int
    level: int
    gated: bool
    permission: str
    idempotent: bool
    lock_scope: str | None
    estimated_duration_s: float
    """Per target (the step's estimate or the action default)."""
    cost_s: float
    """Wall time of the whole step (waves of ``max_concurrency``)."""
    step_timeout_ms: int
    reasons: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Classification:
    """Everything intake decides about a plan before writing the execution."""

    approval_level: int
    steps: tuple[StepClassification, ...]
    gated_step_ids: tuple[str, ...]
    """Steps needing their own level-3 approval before they start (R-APPR)."""
    estimated_duration_s: float
    sla_class: SlaClass
    action_class: ActionClass
    timeout_policy: TimeoutPolicy
    mode: ExecutionMode
    priority: int
    max_attempts: int
    max_lease_renewals: int
    required_permissions: frozenset[str]
    reasons: tuple[str, ...]
    warnings: tuple[str, ...]
    """Things an operator should know but that do not block (estimate beyond timeout)."""

    @property
    def timeout_policy_id(self) -> str:
        return self.timeout_policy.id

    @property
    def execution_timeout_ms(self) -> int:
        return self.timeout_policy.execution_timeout_ms

    @property
    def step_levels(self) -> dict[str, int]:
        return {step.step_id: step.level for step in self.steps}

    @property
    def requires_runbook(self) -> bool:
        """Level ≥ 2 needs a runbook URL (R-APPR, ``runbook_required_for_high_level``)."""
        return self.approval_level >= 2


def _is_production(environment: str | None) -> bool:
    return environment is not None and environment.strip().lower() in PRODUCTION_ENVIRONMENTS


def _step_level(
    step: PlanStep, spec: ActionSpec, environments: Mapping[str, str]
) -> tuple[int, int, list[str]]:
    base = spec.base_level_for(step.inputs)
    level = base
    reasons = [f"{step.action} is level {base}"]
    production = [t for t in step.targets if _is_production(environments.get(t))]
    if production:
        level += 1
        reasons.append(f"+1 for {len(production)} production target(s)")
    if len(step.targets) > MANY_TARGETS and level < 2:
        level = 2
        reasons.append(f"at least 2 for {len(step.targets)} targets (> {MANY_TARGETS})")
    if step.requires_approval:
        level = MAX_LEVEL
        reasons.append("3: the step requires its own approval")
    return base, min(level, MAX_LEVEL), reasons


def classify(
    plan: Plan,
    registry: ActionRegistry,
    *,
    target_environments: Mapping[str, str],
    tenant_min_level: int = 0,
    requested_mode: str | None = None,
    priority: int | str | None = None,
) -> Classification:
    """Classify a plan that passed ``validate_plan`` (R-CLASS).

    Level: per step, the action's base level for its inputs, +1 if any target is in a
    production environment, at least 2 with more than 10 targets, 3 when the step
    ``requires_approval``; the plan takes the highest step level or the tenant minimum,
    capped at 3. The caller can only ever raise it (``requires_approval``), never lower.

    Gates: steps with ``requires_approval`` and steps whose own level is 3 each get a
    per-step level-3 approval, so one risky step in a long plan is approved when it is
    about to run, with the earlier steps' results in view.

    Timeouts: ``timeout_s`` longer than the policy's step timeout is refused here
    (``timeout_exceeds_policy``, pointer ``/steps/i/timeout_s``), because only here is the
    policy known. Pointers of ``/mode`` and ``/priority`` refusals are relative to the
    request body; step pointers are relative to the plan document, like intake's.
    """
    step_results: list[tuple[PlanStep, ActionSpec, int, int, list[str]]] = []
    for step in plan.steps:
        spec = registry.require(step.action)
        base, level, reasons = _step_level(step, spec, target_environments)
        step_results.append((step, spec, base, level, reasons))

    estimate = estimate_duration_s(plan, registry)
    sla = sla_for(estimate)
    action_class = max(
        (spec.classify(step.inputs) for step, spec, *_ in step_results), default=ActionClass.READ
    )
    policy = resolve_timeout_policy(sla, action_class)
    mode = resolve_mode(sla, requested_mode)
    chosen_priority = parse_priority(priority)

    warnings: list[str] = []
    steps: list[StepClassification] = []
    for index, (step, spec, base, level, reasons) in enumerate(step_results):
        if step.timeout_s is not None and step.timeout_s * 1000 > policy.step_timeout_ms:
            raise PlanValidationError(
                "timeout_exceeds_policy",
                f"step {step.id!r} asks for {step.timeout_s:g} s; policy {policy.id} allows "
                f"at most {policy.step_timeout_ms / 1000:g} s per step (timeout_s may only "
                "shorten it)",
                pointer=plan.document_pointer(json_pointer("steps", index, "timeout_s")),
                policy_id=policy.id,
                limit_s=policy.step_timeout_ms / 1000,
            )
        per_target = step_estimate_s(step, spec)
        timeout = step_timeout_ms(policy, step)
        if per_target * 1000 > timeout:
            warnings.append(
                f"step {step.id!r} is estimated at {per_target:g} s per target but times out "
                f"after {timeout / 1000:g} s"
            )
        steps.append(
            StepClassification(
                index=index,
                step_id=step.id,
                action=step.action,
                action_class=spec.classify(step.inputs),
                base_level=base,
                level=level,
                gated=step.requires_approval or level >= MAX_LEVEL,
                permission=spec.permission,
                idempotent=spec.is_idempotent(step.inputs),
                lock_scope=spec.lock_scope_for(step.inputs),
                estimated_duration_s=per_target,
                cost_s=step_cost_s(step, per_target),
                step_timeout_ms=timeout,
                reasons=tuple(reasons),
            )
        )
    if estimate * 1000 > policy.execution_timeout_ms:
        warnings.append(
            f"the plan is estimated at {estimate:g} s but policy {policy.id} times the "
            f"execution out after {policy.execution_timeout_ms / 1000:g} s"
        )

    tenant_floor = max(0, min(tenant_min_level, MAX_LEVEL))
    highest = max(step.level for step in steps)
    level = min(max(highest, tenant_floor), MAX_LEVEL)
    plan_reasons = [f"step {s.step_id!r}: level {s.level}" for s in steps if s.level == highest]
    if tenant_floor > highest:
        plan_reasons.append(f"the tenant's minimum level is {tenant_floor}")

    return Classification(
        approval_level=level,
        steps=tuple(steps),
        gated_step_ids=tuple(s.step_id for s in steps if s.gated),
        estimated_duration_s=estimate,
        sla_class=sla,
        action_class=action_class,
        timeout_policy=policy,
        mode=mode,
        priority=chosen_priority,
        max_attempts=MAX_ATTEMPTS[sla],
        max_lease_renewals=MAX_LEASE_RENEWALS[sla],
        required_permissions=frozenset(s.permission for s in steps),
        reasons=tuple(plan_reasons),
        warnings=tuple(warnings),
    )
