"""The action registry, built-in action metadata (DESIGN.md table) and input models."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pydantic
import pytest

from opsexec.actions.registry import (
    Action,
    ActionClass,
    ActionContext,
    ActionInputs,
    ActionRegistry,
    ActionResult,
    ActionSpec,
    AssetInfo,
    builtin_specs,
    default_registry,
)

REGISTRY = default_registry()

# name, class, base level, idempotent, permission  (DESIGN.md "Actions implement…" table)
TABLE = [
    ("inventory.count", "read", 0, True, "asset:read"),
    ("inventory.list", "read", 0, True, "asset:read"),
    ("host.disk_usage", "read", 0, True, "automation:execute"),
    ("host.uptime", "read", 0, True, "automation:execute"),
    ("service.status", "read", 0, True, "automation:execute"),
    ("service.restart", "modify", 1, True, "automation:execute"),
    ("shell.run", "modify", 1, False, "automation:execute"),
    ("deploy.script", "deploy", 2, False, "automation:deploy"),
]


def test_default_registry_holds_exactly_the_builtins() -> None:
    assert REGISTRY.names() == sorted([*(row[0] for row in TABLE), "http.request"])
    assert len(REGISTRY) == 9
    assert "shell.run" in REGISTRY
    assert "shell.rm" not in REGISTRY
    assert list(REGISTRY) == REGISTRY.names()


def test_default_registry_is_fresh_each_time() -> None:
    first = default_registry()
    first.register(spec("custom.thing"))
    assert "custom.thing" not in default_registry()


@pytest.mark.parametrize(("name", "action_class", "level", "idempotent", "permission"), TABLE)
def test_builtin_metadata(
    name: str, action_class: str, level: int, idempotent: bool, permission: str
) -> None:
    spec = REGISTRY.require(name)
    inputs = minimal_inputs(name)
    spec.parse_inputs(inputs)
    assert spec.classify(inputs) == action_class
    assert spec.base_level_for(inputs) == level
    assert spec.is_idempotent(inputs) is idempotent
    assert spec.permission == permission
    assert spec.default_duration_s > 0
    assert spec.description
    expected_scope = None if action_class == "read" else "asset"
    assert spec.lock_scope_for(inputs) == expected_scope


@pytest.mark.parametrize(
    ("method", "action_class", "level", "idempotent"),
    [
        ("GET", "read", 0, True),
        ("HEAD", "read", 0, True),
        ("PUT", "modify", 1, True),
        ("DELETE", "modify", 1, True),
        ("POST", "modify", 1, False),
        ("PATCH", "modify", 1, False),
        ("get", "read", 0, True),
    ],
)
def test_http_request_method_decides(
    method: str, action_class: str, level: int, idempotent: bool
) -> None:
    spec = REGISTRY.require("http.request")
    inputs = {"method": method, "path": "/healthz"}
    assert spec.parse_inputs(inputs).method == method.upper()  # type: ignore[attr-defined]
    assert spec.classify(inputs) == action_class
    assert spec.base_level_for(inputs) == level
    assert spec.is_idempotent(inputs) is idempotent
    assert spec.lock_scope_for(inputs) == (None if action_class == "read" else "asset")
    assert spec.permission == "automation:execute"


def test_http_target_mode_follows_path_or_url() -> None:
    spec = REGISTRY.require("http.request")
    assert spec.target_mode_for({"path": "/"}) == "required"
    assert spec.target_mode_for({"url": "https://api.example.com/"}) == "none"
    assert spec.classify({"path": "/"}) == "read"  # GET by default


def minimal_inputs(name: str) -> dict[str, Any]:
    return {
        "service.status": {"service": "nginx"},
        "service.restart": {"service": "nginx"},
        "shell.run": {"command": "uptime"},
        "deploy.script": {"script": "/opt/deploy/web.sh", "version": "2.4.1"},
    }.get(name, {})


# --- ordering --------------------------------------------------------------------------


def test_action_classes_are_ordered_by_risk() -> None:
    assert ActionClass.READ < ActionClass.MODIFY < ActionClass.DEPLOY
    assert max([ActionClass.READ, ActionClass.DEPLOY, ActionClass.MODIFY]) is ActionClass.DEPLOY
    assert sorted(ActionClass, reverse=True)[0] is ActionClass.DEPLOY
    assert [c.rank for c in ActionClass] == [0, 1, 2]
    assert json.dumps([ActionClass.READ]) == '["read"]'  # still a plain string for JSON/SQL


# --- input models -------------------------------------------------------------------------


def valid(name: str, inputs: dict[str, Any]) -> pydantic.BaseModel:
    return REGISTRY.require(name).parse_inputs(inputs)


def invalid(name: str, inputs: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        REGISTRY.require(name).parse_inputs(inputs)


@pytest.mark.parametrize(
    "service",
    ["nginx", "nginx.service", "getty@tty1.service", "sys-fs-fuse-connections.mount", "W32Time"],
)
def test_service_names_accepted(service: str) -> None:
    valid("service.restart", {"service": service})


@pytest.mark.parametrize(
    "service",
    ["", "-nginx", "nginx; rm -rf /", "a b", "../etc", "x$(id)", "a\\x2d", "n\nx", "x" * 129],
)
def test_service_names_refused(service: str) -> None:
    invalid("service.restart", {"service": service})


def test_inventory_inputs() -> None:
    valid(
        "inventory.count",
        {"group_by": "environment", "filter": {"tags": ["linux"], "environment": "prod"}},
    )
    invalid("inventory.count", {"group_by": "colour"})
    invalid("inventory.count", {"filter": {"owner": "me"}})
    invalid("inventory.list", {"group_by": "tags"})


def test_disk_usage_path() -> None:
    assert valid("host.disk_usage", {}).path == "/"  # type: ignore[attr-defined]
    valid("host.disk_usage", {"path": "C:\\"})
    invalid("host.disk_usage", {"path": "relative"})
    invalid("host.disk_usage", {"path": "/a\nb"})
    invalid("host.uptime", {"anything": 1})


def test_shell_inputs() -> None:
    model = valid(
        "shell.run",
        {"command": "make", "env": {"TOKEN": {"$secret": "t"}, "LANG": "C"}, "workdir": "/srv"},
    )
    assert model.env["TOKEN"].name == "t"  # type: ignore[attr-defined]
    invalid("shell.run", {"command": ""})
    invalid("shell.run", {"command": "x", "env": {"BAD-NAME": "v"}})
    invalid("shell.run", {"command": "x", "workdir": "tmp"})
    invalid("shell.run", {"command": ["ls"]})


def test_deploy_extras_must_be_secret_references() -> None:
    model = valid(
        "deploy.script",
        {
            "script": "/d.sh",
            "version": "1.2.3+build.7",
            "args": ["--fast"],
            "token": {"$secret": "deploy-token"},
        },
    )
    assert {k: v.name for k, v in model.secret_extras().items()} == {"token": "deploy-token"}  # type: ignore[attr-defined]
    invalid("deploy.script", {"script": "/d.sh", "version": "1", "replicas": 3})
    invalid("deploy.script", {"script": "/d.sh", "version": "1", "token": "literal"})
    invalid("deploy.script", {"script": "/d.sh", "version": "1; reboot"})
    invalid("deploy.script", {"script": "/d.sh"})


def test_http_inputs() -> None:
    valid(
        "http.request",
        {"path": "/healthz", "expect_status": 204, "headers": {"X-Api-Key": {"$secret": "k"}}},
    )
    valid(
        "http.request",
        {"method": "POST", "url": "https://api.example.com/v1/things", "body": {"a": [1]}},
    )
    invalid("http.request", {})  # neither path nor url
    invalid("http.request", {"path": "/", "url": "https://x.example/"})
    invalid("http.request", {"path": "healthz"})
    invalid("http.request", {"url": "https://user:pw@x.example/"})
    invalid("http.request", {"url": "file:///etc/passwd"})
    invalid("http.request", {"path": "/", "method": "TRACE"})
    invalid("http.request", {"path": "/", "expect_status": 99})
    invalid("http.request", {"path": "/", "headers": {"X-A": "v\r\nX-B: injected"}})
    invalid("http.request", {"path": "/", "headers": {"Bad Header": "v"}})
    invalid("http.request", {"path": "/", "expect_status": "200"})


# --- registry behaviour ---------------------------------------------------------------------


class NoInputs(ActionInputs):
    pass


def spec(name: str, **overrides: Any) -> ActionSpec:
    fields: dict[str, Any] = {
        "name": name,
        "action_class": ActionClass.READ,
        "base_level": 0,
        "permission": "automation:execute",
        "idempotent": True,
        "input_model": NoInputs,
        "default_duration_s": 1.0,
        "description": "test action",
    }
    fields.update(overrides)
    return ActionSpec(**fields)


class EchoAction:
    def __init__(self, spec: ActionSpec) -> None:
        self.spec = spec

    async def run(
        self, ctx: ActionContext, target: AssetInfo | None, inputs: pydantic.BaseModel
    ) -> ActionResult:
        return ActionResult.success({"target": target.name if target else None}, summary="ok")


def test_register_get_require() -> None:
    registry = ActionRegistry()
    registry.register(spec("acme.ping"))
    assert registry.get("acme.ping") is not None
    assert registry.get("acme.pong") is None
    with pytest.raises(KeyError):
        registry.require("acme.pong")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(spec("acme.ping"))


@pytest.mark.parametrize(
    "overrides",
    [
        {"name": "Ping"},
        {"name": "ping"},
        {"base_level": 4},
        {"base_level": -1},
        {"permission": ""},
        {"default_duration_s": 0},
        {"input_model": dict},
        {"lock_scope": ""},
    ],
)
def test_spec_fields_are_checked(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must"):
        spec(overrides.pop("name", "acme.ping"), **overrides)


def test_specs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        REGISTRY.require("shell.run").idempotent = True  # type: ignore[misc]


def test_lock_scope_may_depend_on_inputs() -> None:
    def per_queue(inputs: Mapping[str, Any]) -> str:
        return f"queue:{inputs['queue']}"

    custom = spec("acme.drain", action_class=ActionClass.MODIFY, lock_scope=per_queue)
    assert custom.lock_scope_for({"queue": "mail"}) == "queue:mail"
    assert spec("acme.look", lock_scope=per_queue).lock_scope_for({"queue": "x"}) is None


def test_attach_pairs_a_runner_with_its_spec() -> None:
    registry = ActionRegistry(builtin_specs())
    shell = registry.require("shell.run")
    runner = EchoAction(shell)
    assert isinstance(runner, Action)
    registry.attach(runner)
    assert registry.implementation("shell.run") is runner
    assert registry.implementation("host.uptime") is None
    with pytest.raises(ValueError, match="different spec"):
        registry.attach(EchoAction(dataclasses.replace(shell, idempotent=True)))
    with pytest.raises(KeyError):
        registry.attach(EchoAction(spec("acme.unknown")))


def test_action_result_helpers() -> None:
    assert ActionResult.success({"n": 6}).content_type == "application/json"
    assert ActionResult.success("text").content_type.startswith("text/plain")
    assert ActionResult.success(b"\x00").content_type == "application/octet-stream"
    failure = ActionResult.failure("ConnectionError", "refused", retryable=True)
    assert (failure.ok, failure.retryable, failure.summary) == (False, True, "refused")


def test_builtin_specs_have_unique_names() -> None:
    names = [s.name for s in builtin_specs()]
    assert len(names) == len(set(names))


# --- entry points -------------------------------------------------------------------------

GROUP = "opsexec.actions.tests"


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A tiny installed distribution advertising actions under ``GROUP``."""
    module = "opsexec_test_plugin"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            from opsexec.actions.registry import ActionClass, ActionInputs, ActionResult, ActionSpec

            class Inputs(ActionInputs):
                pass

            def make(name, cls=ActionClass.READ):
                return ActionSpec(name=name, action_class=cls, base_level=0,
                                  permission="automation:execute", idempotent=True,
                                  input_model=Inputs, default_duration_s=1.0,
                                  description="plugin action")

            SPEC = make("acme.ping")

            class Runner:
                spec = make("acme.pong")
                async def run(self, ctx, target, inputs):
                    return ActionResult.success("pong")

            RUNNER = Runner()

            def several():
                return [make("acme.one"), make("acme.two")]

            CLASH = make("shell.run")
            NOT_AN_ACTION = 42
            """
        )
    )
    dist = tmp_path / "opsexec_test_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: opsexec-test-plugin\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text(
        f"[{GROUP}]\nping = {module}:SPEC\npong = {module}:RUNNER\nseveral = {module}:several\n"
        f"[{GROUP}.clash]\nclash = {module}:CLASH\n"
        f"[{GROUP}.bad]\nbad = {module}:NOT_AN_ACTION\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop(module, None)


def test_load_entry_points(plugin: Path) -> None:
    registry = default_registry()
    added = registry.load_entry_points(GROUP)
    assert sorted(added) == ["acme.one", "acme.ping", "acme.pong", "acme.two"]
    assert registry.implementation("acme.pong") is not None
    assert registry.implementation("acme.ping") is None


def test_entry_point_cannot_replace_a_builtin(plugin: Path) -> None:
    with pytest.raises(ValueError, match="already registered"):
        default_registry().load_entry_points(f"{GROUP}.clash")


def test_entry_point_of_the_wrong_kind(plugin: Path) -> None:
    with pytest.raises(TypeError, match="not an ActionSpec"):
        default_registry().load_entry_points(f"{GROUP}.bad")


def test_no_entry_points_is_fine() -> None:
    assert default_registry().load_entry_points("opsexec.actions.nothing-here") == []
