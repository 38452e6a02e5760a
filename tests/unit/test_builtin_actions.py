"""The built-in actions' pure parts: parsers, command builders, summaries, input rules.

Everything here runs without a process, a socket or a database; the same code paths
against real commands, sshd and an HTTP server are in
``tests/integration/test_builtin_actions.py``.
"""

from __future__ import annotations

import gzip
import shlex
from pathlib import Path
from typing import Any

import pydantic
import pytest

from opsexec.actions.builtin import builtin_actions, register_builtins
from opsexec.actions.builtin._common import decode_text, sniff_content_type
from opsexec.actions.builtin.deploy import DeployScriptInputs, deploy_command
from opsexec.actions.builtin.host import (
    disk_usage_command,
    format_duration,
    format_size_kb,
    parse_df,
    parse_uptime,
)
from opsexec.actions.builtin.http import (
    HttpRequestInputs,
    decode_body,
    request_url,
    status_expected,
    status_retryable,
)
from opsexec.actions.builtin.inventory import count_assets, list_summary, pluralize
from opsexec.actions.builtin.service import (
    parse_systemctl_show,
    restart_command,
    show_command,
)
from opsexec.actions.builtin.shell import command_result
from opsexec.actions.registry import (
    Action,
    ActionRegistry,
    AssetInfo,
    builtin_specs,
    default_registry,
)
from opsexec.actions.transports.base import CommandResult
from opsexec.engine.inventory import parse_yaml_inventory
from tests.conftest import SHARED_DIR

# --- host.disk_usage ------------------------------------------------------------------

GNU_DF = """\
Filesystem     1024-blocks     Used Available Capacity Mounted on
/dev/vda         264212084 24760804  81630108      24% /
"""


def test_parse_df_reads_the_posix_line() -> None:
    usage = parse_df(GNU_DF)
    assert usage.as_output("/") == {
        "filesystem": "/dev/vda",
        "size_kb": 264212084,
        "used_kb": 24760804,
        "available_kb": 81630108,
        "use_percent": 24,
        "mounted_on": "/",
        "path": "/",
    }
    assert usage.summary("/") == "/: 24% used, 78 GiB free"
    assert usage.summary("/srv/data") == "/srv/data (on /): 24% used, 78 GiB free"


def test_parse_df_keeps_spaces_in_filesystem_and_mount_point() -> None:
    text = (
        "Filesystem 1024-blocks Used Available Capacity Mounted on\n"
        "//nas/share with space 1000 250 750 25% /mnt/my share\n"
    )
    usage = parse_df(text)
    assert (usage.filesystem, usage.mounted_on) == ("//nas/share with space", "/mnt/my share")


def test_parse_df_size_less_and_over_reserved_filesystems() -> None:
    header = "Filesystem 1024-blocks Used Available Capacity Mounted on\n"
    assert parse_df(header + "proc 0 0 0 - /proc\n").use_percent is None
    over = parse_df(header + "/dev/ada0p2 1000 1020 -20 105% /\n")
    assert (over.available_kb, over.use_percent) == (-20, 105)
    assert over.summary("/") == "/: 105% used, 0 KiB free"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Filesystem 1024-blocks Used Available Capacity Mounted on\n",
        "df: cannot read table of mounted file systems\n",
        GNU_DF + "/dev/vdb 10 1 9 10% /data\n",
        "Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/vda lots of space\n",
    ],
)
def test_parse_df_refuses_what_it_does_not_understand(text: str) -> None:
    with pytest.raises(ValueError, match=r"df|filesystem"):
        parse_df(text)


def test_disk_usage_command_quotes_the_path() -> None:
    path = "/srv/it's $(reboot) `x`; rm -rf /"
    command = disk_usage_command(path)
    assert shlex.split(command) == ["df", "-P", "-k", "--", path]


@pytest.mark.parametrize(
    ("size_kb", "text"),
    [
        (0, "0 KiB"),
        (512, "512 KiB"),
        (1536, "1.5 MiB"),
        (10 * 1024, "10 MiB"),
        (int(9.5 * 1024 * 1024), "9.5 GiB"),
        (120 * 1024 * 1024, "120 GiB"),
        (3 * 1024**3, "3 TiB"),
    ],
)
def test_format_size(size_kb: int, text: str) -> None:
    assert format_size_kb(size_kb) == text


# --- host.uptime ----------------------------------------------------------------------


def test_parse_uptime_with_load() -> None:
    uptime = parse_uptime("1048305.27 4012345.10\n0.15 0.10 0.05 2/171 29252\n")
    assert uptime.as_output() == {
        "uptime_seconds": 1048305.27,
        "uptime": "12 days, 3 hours",
        "load": {"1m": 0.15, "5m": 0.10, "15m": 0.05},
    }
    assert uptime.summary() == "up 12 days, 3 hours; load 0.15 0.10 0.05"


def test_parse_uptime_without_loadavg() -> None:
    uptime = parse_uptime("65.5 100.0\n")
    assert uptime.load is None
    assert uptime.summary() == "up 1 minute, 5 seconds"


@pytest.mark.parametrize(
    "text", ["", "up 3 days\n", "abc 12.0\n", "-5 1\n", "12.0 1.0\nnot numbers here\n"]
)
def test_parse_uptime_refuses_garbage(text: str) -> None:
    with pytest.raises(ValueError, match=r"uptime|loadavg"):
        parse_uptime(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 seconds"),
        (0.7, "0 seconds"),
        (59, "59 seconds"),
        (61, "1 minute, 1 second"),
        (3600, "1 hour"),
        (86_400 + 59, "1 day"),
        (90_061, "1 day, 1 hour"),
        (2 * 86_400 + 60, "2 days"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# --- service.* ------------------------------------------------------------------------


def test_systemctl_commands_are_fixed_and_quoted() -> None:
    assert shlex.split(show_command("nginx")) == [
        "systemctl",
        "show",
        "--no-pager",
        "--property=ActiveState,SubState,LoadState,MainPID",
        "--",
        "nginx",
    ]
    assert shlex.split(restart_command("getty@tty1")) == [
        "systemctl",
        "restart",
        "--no-ask-password",
        "--",
        "getty@tty1",
    ]


def test_parse_systemctl_show() -> None:
    state = parse_systemctl_show(
        "nginx", "ActiveState=active\nSubState=running\nLoadState=loaded\nMainPID=1234\n"
    )
    assert state.as_output() == {
        "service": "nginx",
        "active": True,
        "active_state": "active",
        "sub_state": "running",
        "load_state": "loaded",
        "main_pid": 1234,
    }
    assert state.summary() == "nginx: active (running), pid 1234"


def test_parse_systemctl_show_inactive_and_unknown_units() -> None:
    stopped = parse_systemctl_show(
        "cron", "MainPID=0\nLoadState=loaded\nActiveState=inactive\nSubState=dead\n"
    )
    assert (stopped.active, stopped.main_pid, stopped.found) == (False, None, True)
    assert stopped.summary() == "cron: inactive (dead)"
    missing = parse_systemctl_show(
        "nope", "ActiveState=inactive\nSubState=dead\nLoadState=not-found\nMainPID=0\n"
    )
    assert not missing.found
    assert missing.summary() == "nope: not found"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ActiveState=active\nSubState=running\nLoadState=loaded\n",
        "ActiveState=active\nSubState=running\nLoadState=loaded\nMainPID=abc\n",
        "Failed to connect to bus: No such file or directory\n",
    ],
)
def test_parse_systemctl_show_refuses_incomplete_output(text: str) -> None:
    with pytest.raises(ValueError, match=r"systemctl show|MainPID"):
        parse_systemctl_show("nginx", text)


@pytest.mark.parametrize("name", ["nginx;reboot", "-nginx", "a b", "$(x)", "a/b", "'x'", ""])
def test_service_names_that_could_escape_are_refused(name: str) -> None:
    spec = default_registry().require("service.status")
    with pytest.raises(pydantic.ValidationError):
        spec.parse_inputs({"service": name})


# --- shell.run / output decoding ------------------------------------------------------


def result(stdout: bytes, status: int = 0, stderr: bytes = b"", **kw: Any) -> CommandResult:
    return CommandResult(exit_status=status, stdout=stdout, stderr=stderr, duration_ms=5, **kw)


def test_decode_text() -> None:
    assert decode_text("héllo\n".encode()) == "héllo\n"
    assert decode_text(b"\xff\xfe") is None
    assert decode_text(b"a\0b") is None
    cut = "ab€".encode()[:-1]  # a 3-byte character cut by the transport's output cap
    assert decode_text(cut, truncated=True) == "ab"
    assert decode_text(cut, truncated=False) is None


def test_sniff_content_type() -> None:
    assert sniff_content_type(gzip.compress(b"x")) == "application/gzip"
    assert sniff_content_type(b"\x89PNG\r\n\x1a\nrest") == "image/png"
    assert sniff_content_type(b"\xff\xfe\x00") == "application/octet-stream"


def test_command_result_text_success_and_failure() -> None:
    ok = command_result(result(b"hello\nworld\n", stderr=b"warn\n"))
    assert ok.ok
    assert ok.output == {
        "exit_status": 0,
        "stdout": "hello\nworld\n",
        "stderr": "warn\n",
        "truncated": False,
        "duration_ms": 5,
    }
    assert ok.summary == "exit 0: hello"
    assert command_result(result(b"")).summary == "exit 0 (no output)"

    failed = command_result(result(b"", status=3, stderr=b"step 1\nboom: disk full\n"))
    assert (failed.ok, failed.retryable, failed.error_class) == (False, False, "CommandFailedError")
    assert failed.error_message == "command exited with status 3: boom: disk full"


def test_command_result_binary_stdout_is_returned_as_bytes() -> None:
    payload = gzip.compress(b"archive")
    ok = command_result(result(payload, stderr=b"\xffnot text either"))
    assert ok.ok
    assert ok.output == payload
    assert ok.content_type == "application/gzip"
    assert ok.summary == f"exit 0: {len(payload)} bytes of binary output (application/gzip)"

    failed = command_result(result(b"\x00\x01", status=2, stderr=b"bad\n"))
    assert not failed.ok
    assert failed.output == b"\x00\x01"
    assert failed.content_type == "application/octet-stream"
    assert failed.error_message == "command exited with status 2: bad"


def test_command_result_stderr_is_text_even_when_it_is_not() -> None:
    out = command_result(result(b"ok\n", stderr=b"caf\xe9 \x00"))
    assert isinstance(out.output, dict)
    assert out.output["stderr"] == "caf\ufffd \ufffd"
    assert out.output["truncated"] is False
    truncated = command_result(result(b"x" * 10, stdout_truncated=True))
    assert isinstance(truncated.output, dict)
    assert truncated.output["truncated"] is True


# --- deploy.script --------------------------------------------------------------------


def test_deploy_command_quotes_every_word() -> None:
    args = ["--mode", "blue green", 'it\'s "quoted"; reboot', "$(id)"]
    command = deploy_command("/opt/deploy/web app.sh", "2.4.1+build.7", args)
    assert shlex.split(command) == ["/opt/deploy/web app.sh", "2.4.1+build.7", *args]


def deploy_inputs(**extra: Any) -> DeployScriptInputs:
    model = (
        default_registry()
        .require("deploy.script")
        .parse_inputs({"script": "/opt/deploy/web.sh", "version": "2.4.1", **extra})
    )
    assert isinstance(model, DeployScriptInputs)
    return model


def test_deploy_extras_become_upper_case_environment_variables() -> None:
    model = deploy_inputs(
        token={"$secret": "deploy-token"},
        registry_password={"$secret": "registry"},
        env={"MODE": "blue", "API": {"$secret": "api"}},
    )
    exported = model.exported_env()
    assert exported["MODE"] == "blue"
    assert {name: getattr(value, "name", value) for name, value in exported.items()} == {
        "MODE": "blue",
        "API": "api",
        "TOKEN": "deploy-token",
        "REGISTRY_PASSWORD": "registry",
    }


@pytest.mark.parametrize(
    "extra",
    [
        {"deploy-token": {"$secret": "t"}},  # not a shell identifier
        {"1token": {"$secret": "t"}},
        {"path": {"$secret": "t"}},  # would replace $PATH
        {"ld_preload": {"$secret": "t"}},
        {"token": {"$secret": "t"}, "env": {"TOKEN": "x"}},  # collides with env
        {"token": "literal"},  # extras are secret references only
    ],
)
def test_deploy_extras_that_cannot_be_exported_are_refused(extra: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        deploy_inputs(**extra)


# --- http.request ---------------------------------------------------------------------


def http_inputs(**values: Any) -> HttpRequestInputs:
    model = default_registry().require("http.request").parse_inputs(values)
    assert isinstance(model, HttpRequestInputs)
    return model


WEB = AssetInfo(name="web-01", address="10.0.1.11", transport="ssh", environment="staging", port=22)


def test_request_url_joins_path_onto_the_target() -> None:
    assert request_url(http_inputs(path="/healthz"), WEB) == "http://10.0.1.11:80/healthz"
    assert (
        request_url(http_inputs(path="/h?x=1", scheme="https"), WEB)
        == "https://10.0.1.11:443/h?x=1"
    )
    assert request_url(http_inputs(path="/", port=8080), WEB) == "http://10.0.1.11:8080/"
    v6 = AssetInfo(name="v6", address="fd00::1", transport="ssh", environment="dev")
    assert request_url(http_inputs(path="/"), v6) == "http://[fd00::1]:80/"
    url = "https://api.example.com/v1/x"
    assert request_url(http_inputs(url=url), None) == url


def test_http_inputs_accept_one_or_several_expected_statuses() -> None:
    assert http_inputs(path="/", expect_status=[200, 204]).expect_status == [200, 204]
    for bad in ([], [99], ["200"], "200", True):
        with pytest.raises(pydantic.ValidationError):
            http_inputs(path="/", expect_status=bad)
    with pytest.raises(pydantic.ValidationError, match="go with path"):
        http_inputs(url="https://x.example/", port=8443)
    with pytest.raises(pydantic.ValidationError):
        http_inputs(path="/", scheme="ftp")


def test_status_rules() -> None:
    assert status_expected(204, None)
    assert not status_expected(302, None)
    assert status_expected(404, 404)
    assert status_expected(503, [200, 503])
    assert not status_expected(200, [201, 202])
    assert [
        s for s in (400, 404, 408, 429, 500, 501, 502, 503, 504, 505) if status_retryable(s)
    ] == [
        408,
        429,
        500,
        502,
        503,
        504,
    ]


def test_decode_body() -> None:
    assert decode_body(b'{"ok": true}', "application/json", truncated=False) == {
        "body": {"ok": True}
    }
    assert decode_body(b'{"ok": tr', "application/problem+json", truncated=True) == {
        "body": '{"ok": tr'
    }
    assert decode_body(b"not json", "application/json", truncated=False) == {"body": "not json"}
    assert decode_body(b"hello", "text/plain", truncated=False) == {"body": "hello"}
    assert decode_body(b"", "", truncated=False) == {"body": None}
    assert decode_body(b"caf\xe9", "text/plain", truncated=False, charset="iso-8859-1") == {
        "body": "café"
    }
    assert decode_body(b"\x89PNG\x00", "image/png", truncated=False) == {
        "body": None,
        "body_base64": "iVBORwA=",
    }


# --- inventory ------------------------------------------------------------------------


def shared_inventory() -> list[AssetInfo]:
    specs = parse_yaml_inventory((SHARED_DIR / "plans" / "inventory.yaml").read_text())
    assets = [
        AssetInfo(
            name=s.name,
            address=s.address,
            transport=s.transport,
            environment=s.environment,
            port=s.port,
            tags=tuple(s.tags),
            credential_ref=s.credential_ref,
        )
        for s in specs
    ]
    return sorted(assets, key=lambda a: a.name)


def only(
    assets: list[AssetInfo], tags: tuple[str, ...] = (), env: str | None = None
) -> list[AssetInfo]:
    return [a for a in assets if set(tags) <= set(a.tags) and env in (None, a.environment)]


def test_count_summaries_read_naturally_for_the_shared_inventory() -> None:
    assets = shared_inventory()
    assert count_assets(assets).summary == "60 assets"
    assert count_assets(assets, "tags").summary == "60 assets: 54 linux, 6 windows workstations"
    assert count_assets(assets, "environment").summary == (
        "60 assets: 57 production, 2 staging, 1 dev"
    )
    assert count_assets(assets, "transport").summary == "60 assets: 53 ssh, 6 winrm, 1 local"

    windows = only(assets, ("windows",))
    assert count_assets(windows, "tags", ["windows"]).summary == "6 assets: 6 windows workstations"
    assert count_assets(windows, None, ["windows"], "production").summary == (
        "6 assets tagged windows in production"
    )
    linux = only(assets, ("linux",))
    assert count_assets(linux, "tags", ["linux"]).summary == (
        "54 linux assets: 50 api, 2 nginx, 1 demo, 1 postgres"
    )
    production = only(assets, env="production")
    assert count_assets(production, "tags", [], "production").summary == (
        "57 assets: 51 linux, 6 windows workstations"
    )
    assert (
        count_assets(only(assets, ("demo",)), "tags", ["demo"]).summary == "1 asset: 1 linux demo"
    )
    assert count_assets([], "tags", ["nope", "gone"]).summary == "0 assets tagged nope and gone"


def test_count_output_is_structured() -> None:
    output = count_assets(shared_inventory(), "tags").output
    assert output == {
        "total": 60,
        "group_by": "tags",
        "groups": {
            "linux": 54,
            "api": 50,
            "windows": 6,
            "workstation": 6,
            "nginx": 2,
            "demo": 1,
            "postgres": 1,
        },
        "filter": None,
        "untagged": 0,
    }
    assert list(output["groups"]) == [
        "linux",
        "api",
        "windows",
        "workstation",
        "nginx",
        "demo",
        "postgres",
    ]
    by_env = count_assets(shared_inventory(), "environment", [], "x").output
    assert by_env["groups"] == {"production": 57, "staging": 2, "dev": 1}
    assert by_env["filter"] == {"tags": [], "environment": "x"}


def asset(name: str, *tags: str, environment: str = "dev") -> AssetInfo:
    return AssetInfo(
        name=name, address="10.0.0.1", transport="ssh", environment=environment, tags=tags
    )


def test_tag_breakdown_always_adds_up_to_the_total() -> None:
    assets = [
        asset("a", "server", "linux"),
        asset("b", "server", "linux"),
        asset("c", "router"),
        asset("d"),
        asset("e", "linux", "db"),  # overlaps "linux" of a and b: cannot be its own phrase
    ]
    summary = count_assets(assets, "tags").summary
    assert summary == "5 assets: 3 linux, 1 router, 1 untagged"
    many = [asset(f"h{i}", f"t{i}") for i in range(8)]
    assert count_assets(many, "tags").summary == ("8 assets: 1 t0, 1 t1, 1 t2, 1 t3, 1 t4, 3 other")
    envs = [asset(f"h{i}", environment=f"e{i % 7}") for i in range(14)]
    assert count_assets(envs, "environment").summary == (
        "14 assets: 2 e0, 2 e1, 2 e2, 2 e3, 2 e4, 4 other"
    )


def test_pluralize_only_countable_nouns() -> None:
    assert pluralize("windows workstation", 6) == "windows workstations"
    assert pluralize("windows workstation", 1) == "windows workstation"
    assert pluralize("linux", 54) == "linux"
    assert pluralize("core switch", 2) == "core switches"
    assert pluralize("proxy", 3) == "proxies"
    assert pluralize("api", 50) == "api"


def test_list_summary() -> None:
    assert list_summary([]) == "0 assets"
    assert (
        list_summary(["db-prod", "web-01"], " in staging") == "2 assets in staging: db-prod, web-01"
    )
    names = [f"prod-{i:03d}" for i in range(1, 8)]
    assert list_summary(names) == (
        "7 assets: prod-001, prod-002, prod-003, prod-004, prod-005 and 2 more"
    )


# --- registration ---------------------------------------------------------------------


def test_every_builtin_spec_has_a_runner() -> None:
    actions = builtin_actions()
    assert sorted(a.spec.name for a in actions) == sorted(s.name for s in builtin_specs())
    assert all(isinstance(a, Action) for a in actions)
    registry = default_registry()
    for spec in builtin_specs():
        runner = registry.implementation(spec.name)
        assert runner is not None
        assert runner.spec == spec


def test_register_builtins_into_an_empty_registry() -> None:
    registry = ActionRegistry()
    register_builtins(registry)
    assert registry.names() == default_registry().names()
    assert all(registry.implementation(name) is not None for name in registry)


def test_docs_describe_every_builtin() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "actions.md").read_text()
    for spec in builtin_specs():
        assert f"`{spec.name}`" in text
