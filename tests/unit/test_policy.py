"""Classification (R-CLASS), timeout policies and SLA/mode/priority rules."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from opsexec.actions.registry import ActionClass, default_registry
from opsexec.errors import PlanValidationError
from opsexec.intake import load_plan, parse_plan
from opsexec.plan import Plan
from opsexec.policy import (
    DEFAULT_MAX_CONCURRENCY,
    HEARTBEATS_PER_LEASE,
    LEASE_BUFFER_MS,
    MAX_ATTEMPTS,
    MAX_LEASE_RENEWALS,
    TIMEOUT_POLICIES,
    Classification,
    ExecutionMode,
    SlaClass,
    TimeoutPolicy,
    classify,
    estimate_duration_s,
    lease_timeout_ms,
    parse_priority,
    resolve_timeout_policy,
    sla_for,
    step_timeout_ms,
)

REPO = Path(__file__).resolve().parents[2]
SHARED_DIR = Path(os.environ.get("OPSEXEC_SHARED_DIR", REPO.parent / "shared"))
PLANS_DIR = SHARED_DIR / "plans"
REGISTRY = default_registry()


def inventory_environments() -> dict[str, str]:
    assets = yaml.safe_load((PLANS_DIR / "inventory.yaml").read_text())
    return {asset["name"]: asset["environment"] for asset in assets}


def example(name: str) -> Plan:
    raw = (PLANS_DIR / name).read_bytes()
    return load_plan(json.loads(raw), REGISTRY, document_size_bytes=len(raw))


def classify_doc(document: dict[str, Any], **kwargs: Any) -> Classification:
    plan = load_plan(document, REGISTRY, document_size_bytes=1)
    kwargs.setdefault("target_environments", ENVIRONMENTS)
    return classify(plan, REGISTRY, **kwargs)


ENVIRONMENTS: dict[str, str] = {
    "dev-01": "dev",
    "stage-01": "staging",
    "prod-01": "production",
    **{f"dev-{i:02}": "dev" for i in range(2, 30)},
}


def step(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": "s", "action": "host.uptime", "targets": ["dev-01"]}
    base.update(fields)
    return base


# --- the README's table -------------------------------------------------------------------

# file, approval level, SLA, mode, timeout policy (the README's table plus derived ids)
EXPECTED = [
    ("count_assets.json", 0, "fast", "immediate", "fast_read"),
    ("planv1_count_assets.json", 0, "fast", "immediate", "fast_read"),
    ("disk_usage_local.json", 0, "fast", "immediate", "fast_read"),
    ("restart_nginx.json", 1, "medium", "background", "medium_modify"),
    ("deploy_staging.json", 2, "long", "background", "long_deploy"),
    ("deploy_prod_50.json", 3, "long", "background", "long_deploy"),
]


def test_every_example_plan_is_in_the_table() -> None:
    assert {p.name for p in PLANS_DIR.glob("*.json")} == {row[0] for row in EXPECTED}


@pytest.mark.parametrize(("name", "level", "sla", "mode", "policy_id"), EXPECTED)
def test_example_plans_classify_as_documented(
    name: str, level: int, sla: str, mode: str, policy_id: str
) -> None:
    result = classify(example(name), REGISTRY, target_environments=inventory_environments())
    assert (result.approval_level, result.sla_class, result.mode, result.timeout_policy_id) == (
        level,
        sla,
        mode,
        policy_id,
    )
    assert result.max_attempts == MAX_ATTEMPTS[SlaClass(sla)]
    assert result.max_lease_renewals == MAX_LEASE_RENEWALS[SlaClass(sla)]


def test_restart_nginx_is_fourteen_seconds() -> None:
    result = classify(example("restart_nginx.json"), REGISTRY, target_environments={})
    assert result.estimated_duration_s == 14
    assert result.action_class is ActionClass.MODIFY
    assert [s.lock_scope for s in result.steps] == [None, "asset", None]


def test_deploy_to_fifty_production_servers() -> None:
    result = classify(
        example("deploy_prod_50.json"), REGISTRY, target_environments=inventory_environments()
    )
    # precheck 3 s x 5 waves + deploy 60 s x 10 waves + verify 2 s x 2 waves
    assert result.estimated_duration_s == 15 + 600 + 4
    assert result.step_levels == {"precheck": 2, "deploy": 3, "verify": 2}
    assert result.gated_step_ids == ("deploy",)
    assert result.required_permissions == {"automation:execute", "automation:deploy"}
    assert result.requires_runbook
    assert any("times the execution out" in w for w in result.warnings)


def test_deploy_staging_carries_a_secret_and_needs_a_runbook() -> None:
    result = classify(
        example("deploy_staging.json"), REGISTRY, target_environments=inventory_environments()
    )
    assert result.estimated_duration_s == 80  # 40 s x 2 targets one at a time
    assert result.gated_step_ids == ()
    assert result.steps[0].idempotent is False


# --- timeout policies --------------------------------------------------------------------


def test_seed_policies_match_the_spec() -> None:
    rows = {
        p.id: (
            p.sla_class,
            p.action_class,
            p.execution_timeout_ms,
            p.step_timeout_ms,
            p.lease_timeout_ms,
        )
        for p in TIMEOUT_POLICIES.values()
    }
    assert rows == {
        "fast_read": ("fast", "read", 10_000, 5_000, 15_000),
        "medium_read": ("medium", "read", 30_000, 15_000, 45_000),
        "medium_modify": ("medium", "modify", 30_000, 20_000, 60_000),
        "long_read": ("long", "read", 600_000, 60_000, 180_000),
        "long_modify": ("long", "modify", 600_000, 120_000, 360_000),
        "long_deploy": ("long", "deploy", 600_000, 180_000, 540_000),
    }
    assert {p.max_lease_renewals for p in TIMEOUT_POLICIES.values()} == {3}
    assert all(p.lease_timeout_ms >= p.step_timeout_ms for p in TIMEOUT_POLICIES.values())


@pytest.mark.parametrize(
    ("sla", "action_class", "policy_id"),
    [
        ("fast", "read", "fast_read"),
        ("fast", "modify", "medium_modify"),
        ("fast", "deploy", "long_deploy"),
        ("medium", "read", "medium_read"),
        ("medium", "modify", "medium_modify"),
        ("medium", "deploy", "long_deploy"),
        ("long", "read", "long_read"),
        ("long", "modify", "long_modify"),
        ("long", "deploy", "long_deploy"),
    ],
)
def test_resolve_timeout_policy(sla: str, action_class: str, policy_id: str) -> None:
    assert resolve_timeout_policy(sla, action_class).id == policy_id


def test_resolve_falls_back_to_a_stricter_class_and_fails_loudly() -> None:
    only_deploy = [TIMEOUT_POLICIES["long_deploy"]]
    assert resolve_timeout_policy("fast", "read", only_deploy).id == "long_deploy"
    with pytest.raises(LookupError):
        resolve_timeout_policy("long", "deploy", [TIMEOUT_POLICIES["fast_read"]])


def test_step_timeout_may_only_shorten() -> None:
    policy = TIMEOUT_POLICIES["medium_modify"]
    plan = parse_plan({"steps": [step(timeout_s=2.5), step(id="t"), step(id="u", timeout_s=99)]})
    assert step_timeout_ms(policy, plan.steps[0]) == 2_500
    assert step_timeout_ms(policy, plan.steps[1]) == 20_000
    assert step_timeout_ms(policy, plan.steps[2]) == 20_000  # clamped, never extended


def test_longer_timeout_is_refused_at_classification() -> None:
    document = {"steps": [step(id="a"), step(id="b", timeout_s=5.001)]}
    with pytest.raises(PlanValidationError) as caught:
        classify_doc(document)
    assert (caught.value.code, caught.value.pointer) == (
        "timeout_exceeds_policy",
        "/steps/1/timeout_s",
    )
    assert caught.value.extra["policy_id"] == "fast_read"
    result = classify_doc({"steps": [step(id="a"), step(id="b", timeout_s=5)]})
    assert result.steps[1].step_timeout_ms == 5_000


def test_lease_timeout() -> None:
    policy = TIMEOUT_POLICIES["medium_modify"]
    assert lease_timeout_ms(policy) == 25_000
    assert lease_timeout_ms(policy, p95_step_ms=10_000) == 25_000
    assert lease_timeout_ms(policy, p95_step_ms=20_000) == 40_000
    assert lease_timeout_ms(policy, buffer_ms=1_000) == 21_000


def _longest_hold_ms(lease_ms: int, renewals: int) -> float:
    """How long a worker can hold a lease: the lease, then one extension per capped renewal
    (each renewal moves the expiry to a full lease from a beat that came a third in)."""
    return lease_ms + renewals * lease_ms / HEARTBEATS_PER_LEASE


@pytest.mark.parametrize("policy_id", sorted(TIMEOUT_POLICIES))
@pytest.mark.parametrize("stretch", [1.0, 6.25])
def test_a_healthy_run_keeps_its_lease_until_its_execution_timeout(
    policy_id: str, stretch: float
) -> None:
    """Also when a big plan's estimate stretches the execution timeout (a 50-host deploy)."""
    policy = TIMEOUT_POLICIES[policy_id]
    renewals = MAX_LEASE_RENEWALS[policy.sla_class]
    execution_ms = int(policy.execution_timeout_ms * stretch)
    lease = lease_timeout_ms(policy, execution_timeout_ms=execution_ms, max_renewals=renewals)
    assert lease >= lease_timeout_ms(policy), "the SPEC formula stays the floor"
    assert _longest_hold_ms(lease, renewals) >= execution_ms + LEASE_BUFFER_MS
    # And no longer than it must be: dead workers are still noticed as early as possible.
    assert _longest_hold_ms(lease - 1, renewals) < execution_ms + LEASE_BUFFER_MS or (
        lease == lease_timeout_ms(policy)
    )


# --- SLA and duration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "sla"),
    [(0, "fast"), (9.99, "fast"), (10, "medium"), (30, "medium"), (30.01, "long"), (600, "long")],
)
def test_sla_boundaries(seconds: float, sla: str) -> None:
    assert sla_for(seconds) == sla


def test_sla_classes_are_ordered_by_length() -> None:
    assert SlaClass.FAST < SlaClass.MEDIUM < SlaClass.LONG
    assert max(SlaClass) is SlaClass.LONG


def test_duration_counts_waves_of_concurrency() -> None:
    targets = [f"dev-{i:02}" for i in range(1, 26)]
    plan = parse_plan(
        {
            "steps": [
                step(targets=targets, estimated_duration_s=2),  # default 10 at once: 3 waves
                step(id="t", targets=targets, estimated_duration_s=2, max_concurrency=5),
                step(id="u", targets=targets, estimated_duration_s=2, max_concurrency=25),
            ]
        }
    )
    assert DEFAULT_MAX_CONCURRENCY == 10
    # independent steps run side by side: the longest one decides
    assert estimate_duration_s(plan) == 10


def test_duration_is_the_longest_dependency_path() -> None:
    plan = parse_plan(
        {
            "steps": [
                step(id="a", estimated_duration_s=1),
                step(id="b", depends_on=["a"], estimated_duration_s=5),
                step(id="c", depends_on=["a"], estimated_duration_s=2),
                step(id="d", depends_on=["b", "c"], estimated_duration_s=1),
                step(id="lone", estimated_duration_s=6),
            ]
        }
    )
    assert estimate_duration_s(plan) == 7


def test_missing_estimate_uses_the_action_default() -> None:
    plan = parse_plan({"steps": [step(action="service.restart", inputs={"service": "nginx"})]})
    assert (
        estimate_duration_s(plan, REGISTRY)
        == REGISTRY.require("service.restart").default_duration_s
    )
    with pytest.raises(ValueError, match="no estimate"):
        estimate_duration_s(plan)


# --- levels ------------------------------------------------------------------------------


def test_production_target_adds_one() -> None:
    result = classify_doc({"steps": [step(targets=["dev-01", "prod-01"])]})
    assert result.approval_level == 1
    assert any("production" in r for r in result.steps[0].reasons)


def test_production_is_case_insensitive_and_prod_counts() -> None:
    result = classify_doc({"steps": [step(targets=["a"])]}, target_environments={"a": "Prod"})
    assert result.approval_level == 1


@pytest.mark.parametrize(("count", "level"), [(10, 0), (11, 2)])
def test_many_targets_mean_at_least_two(count: int, level: int) -> None:
    targets = [f"dev-{i:02}" for i in range(1, count + 1)]
    assert classify_doc({"steps": [step(targets=targets)]}).approval_level == level


def test_requires_approval_gates_the_step_at_level_three() -> None:
    result = classify_doc({"steps": [step(id="a"), step(id="b", requires_approval=True)]})
    assert result.approval_level == 3
    assert result.step_levels == {"a": 0, "b": 3}
    assert result.gated_step_ids == ("b",)


def test_planv1_approval_points_gate_steps() -> None:
    document = json.loads((PLANS_DIR / "planv1_count_assets.json").read_text())
    document["execution_metadata"]["approval_points"] = ["step_001_count"]
    result = classify_doc(document)
    assert (result.approval_level, result.gated_step_ids) == (3, ("step_001_count",))


@pytest.mark.parametrize(("tenant_min", "level"), [(-5, 1), (0, 1), (2, 2), (3, 3), (9, 3)])
def test_tenant_minimum_raises_and_the_level_is_capped(tenant_min: int, level: int) -> None:
    document = {"steps": [step(action="service.restart", inputs={"service": "nginx"})]}
    assert classify_doc(document, tenant_min_level=tenant_min).approval_level == level


def test_level_is_capped_at_three() -> None:
    targets = ["prod-01", *[f"dev-{i:02}" for i in range(2, 15)]]
    document = {
        "steps": [
            step(action="deploy.script", targets=targets, inputs={"script": "/d", "version": "1"})
        ]
    }
    result = classify_doc(document)
    assert result.approval_level == 3
    assert result.gated_step_ids == ("s",)


@pytest.mark.parametrize(
    ("method", "level", "action_class"),
    [("GET", 0, "read"), ("head", 0, "read"), ("POST", 1, "modify"), ("DELETE", 1, "modify")],
)
def test_http_method_decides_the_class(method: str, level: int, action_class: str) -> None:
    document = {"steps": [step(action="http.request", inputs={"method": method, "path": "/x"})]}
    result = classify_doc(document)
    assert (result.approval_level, result.action_class) == (level, action_class)


# --- mode and priority -----------------------------------------------------------------------


def test_mode_follows_the_sla_and_background_is_always_allowed() -> None:
    fast = {"steps": [step()]}
    medium = {"steps": [step(estimated_duration_s=15)]}
    assert classify_doc(fast).mode is ExecutionMode.IMMEDIATE
    assert classify_doc(fast, requested_mode="background").mode is ExecutionMode.BACKGROUND
    assert classify_doc(fast, requested_mode="immediate").mode is ExecutionMode.IMMEDIATE
    assert classify_doc(medium).mode is ExecutionMode.BACKGROUND
    with pytest.raises(PlanValidationError) as caught:
        classify_doc(medium, requested_mode="immediate")
    assert (caught.value.code, caught.value.pointer) == ("immediate_not_allowed", "/mode")
    with pytest.raises(PlanValidationError) as caught:
        classify_doc(fast, requested_mode="now")
    assert (caught.value.code, caught.value.pointer) == ("invalid_mode", "/mode")


@pytest.mark.parametrize(
    ("given", "expected"),
    [(None, 50), (0, 0), (100, 100), (7, 7), ("urgent", 0), ("Normal", 50), ("bulk", 100)],
)
def test_priority(given: int | str | None, expected: int) -> None:
    assert parse_priority(given) == expected
    assert classify_doc({"steps": [step()]}, priority=given).priority == expected


@pytest.mark.parametrize("given", [-1, 101, True, "high", "50", 5.0])
def test_bad_priority(given: Any) -> None:
    with pytest.raises(PlanValidationError) as caught:
        parse_priority(given)
    assert (caught.value.code, caught.value.pointer) == ("invalid_priority", "/priority")


def test_timeout_policy_is_a_frozen_value() -> None:
    policy = TIMEOUT_POLICIES["fast_read"]
    assert isinstance(policy, TimeoutPolicy)
    with pytest.raises(AttributeError):
        policy.step_timeout_ms = 1  # type: ignore[misc]
