"""The built-in actions against real things: local processes, a real sshd, a real HTTP server.

The context handed to each action (``ActionTestContext``) is a test implementation of our
own ``ActionContext`` protocol — real transports, an in-memory inventory read from the
shared ``inventory.yaml``, a dict of secrets — not a mock of a service. What a user would
notice is asserted: the answer and its summary, that a secret reaches the command or the
server but no command line, that a timeout stops the step, that a failure says why.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import logging
import os
import re
import secrets
import socket
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from opsexec.actions.builtin import builtin_actions
from opsexec.actions.registry import (
    Action,
    ActionContext,
    ActionResult,
    AssetInfo,
    default_registry,
)
from opsexec.actions.transports import CommandResult, LocalTransport, SshTransport, Transport
from opsexec.engine.inventory import parse_yaml_inventory
from opsexec.errors import CommandTimeoutError, StepTimeoutError
from tests.conftest import REPO_ROOT, SHARED_DIR

if TYPE_CHECKING:  # imported by pytest as a plugin; importing it first defeats assert rewriting
    from tests.fixtures.sshd import SshdServer

pytest_plugins = ["tests.fixtures.sshd"]

ACTIONS: dict[str, Action] = {action.spec.name: action for action in builtin_actions()}

# --- a test implementation of ActionContext -------------------------------------------


@dataclass
class InMemoryInventory:
    """``InventoryReader`` over a fixed list of assets (one tenant's worth)."""

    assets: list[AssetInfo]

    async def list_assets(
        self, *, tags: Sequence[str] = (), environment: str | None = None
    ) -> list[AssetInfo]:
        wanted = set(tags)
        return [
            a for a in self.assets if wanted <= set(a.tags) and environment in (None, a.environment)
        ]


def shared_inventory() -> InMemoryInventory:
    specs = parse_yaml_inventory((SHARED_DIR / "plans" / "inventory.yaml").read_text())
    return InMemoryInventory(
        [
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
    )


@dataclass
class RecordingTransport:
    """Wraps a real transport and remembers what each ``run`` was asked to do."""

    inner: Transport
    calls: list[dict[str, Any]] = field(default_factory=list)

    async def run(
        self,
        command: str,
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout_s: float,
        workdir: str | None = None,
    ) -> CommandResult:
        self.calls.append(
            {"command": command, "env": dict(env or {}), "timeout_s": timeout_s, "workdir": workdir}
        )
        return await self.inner.run(
            command, env=env, stdin=stdin, timeout_s=timeout_s, workdir=workdir
        )

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class ActionTestContext:
    """Implements ``ActionContext`` with real parts; records secret look-ups."""

    transport_impl: Transport = field(default_factory=lambda: LocalTransport(kill_grace_s=1))
    inventory: InMemoryInventory = field(default_factory=shared_inventory)
    secrets: dict[str, str] = field(default_factory=dict)
    asset: AssetInfo | None = None
    timeout_s: float = 30.0
    request_id: str | None = None
    execution_id: UUID = field(default_factory=uuid4)
    tenant_id: UUID = field(default_factory=uuid4)
    step_number: int = 1
    attempt: int = 1
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("tests.actions"))
    events: list[str] = field(default_factory=list)

    async def transport(self) -> Transport:
        self.events.append("transport")
        return self.transport_impl

    async def resolve_secret(self, name: str) -> str:
        self.events.append(f"secret:{name}")
        return self.secrets[name]

    def cancel_requested(self) -> bool:
        return False


LOCAL = AssetInfo(name="local-01", address="127.0.0.1", transport="local", environment="dev")


async def run_action(
    name: str, inputs: dict[str, Any], ctx: ActionTestContext, target: AssetInfo | None = LOCAL
) -> ActionResult:
    """Validate ``inputs`` as intake would, then run the built-in."""
    action = ACTIONS[name]
    ctx.asset = target
    assert isinstance(ctx, ActionContext)
    return await action.run(ctx, target, action.spec.parse_inputs(inputs))


def output_dict(result: ActionResult) -> dict[str, Any]:
    assert isinstance(result.output, dict), result.output
    return result.output


def live_commands(fragment: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if fragment in cmdline and state not in {"Z", "X"}:
            found.append(cmdline)
    return found


# --- inventory ------------------------------------------------------------------------


async def test_inventory_count_answers_for_the_shared_inventory() -> None:
    ctx = ActionTestContext()
    result = await run_action("inventory.count", {"group_by": "tags"}, ctx, target=None)
    assert result.ok
    assert result.summary == "60 assets: 54 linux, 6 windows workstations"
    assert output_dict(result)["total"] == 60
    assert output_dict(result)["groups"]["windows"] == 6

    windows = await run_action(
        "inventory.count",
        {"group_by": "tags", "filter": {"tags": ["windows"]}},
        ctx,
        target=None,
    )
    assert windows.summary == "6 assets: 6 windows workstations"
    by_env = await run_action("inventory.count", {"group_by": "environment"}, ctx, target=None)
    assert by_env.summary == "60 assets: 57 production, 2 staging, 1 dev"
    assert ctx.events == []  # an inventory question touches no host and no secret


async def test_inventory_list_leaves_credentials_out() -> None:
    ctx = ActionTestContext()
    result = await run_action(
        "inventory.list", {"filter": {"environment": "staging"}}, ctx, target=None
    )
    assert result.ok
    assert result.summary == "2 assets in staging: web-01, web-02"
    assert output_dict(result) == {
        "total": 2,
        "assets": [
            {
                "name": name,
                "address": address,
                "port": 22,
                "transport": "ssh",
                "environment": "staging",
                "tags": ["linux", "nginx"],
            }
            for name, address in (("web-01", "10.0.1.11"), ("web-02", "10.0.1.12"))
        ],
    }
    assert "ssh-deploy" not in json.dumps(result.output)


# --- host.* over the local transport --------------------------------------------------


async def test_disk_usage_of_root_matches_statvfs() -> None:
    result = await run_action("host.disk_usage", {"path": "/"}, ActionTestContext())
    assert result.ok, result.error_message
    out = output_dict(result)
    vfs = os.statvfs("/")
    assert out["path"] == out["mounted_on"] == "/"
    assert out["size_kb"] == vfs.f_blocks * vfs.f_frsize // 1024
    assert 0 <= out["use_percent"] <= 100
    assert re.fullmatch(r"/: \d+% used, [\d.]+ [KMGTPE]iB free", result.summary)


async def test_disk_usage_of_a_path_with_awkward_characters(tmp_path: Path) -> None:
    awkward = tmp_path / "it's $(touch pwned) dir"
    awkward.mkdir()
    ctx = ActionTestContext(transport_impl=RecordingTransport(LocalTransport()))
    result = await run_action("host.disk_usage", {"path": str(awkward)}, ctx)
    assert result.ok, result.error_message
    assert output_dict(result)["path"] == str(awkward)
    assert result.summary.startswith(f"{awkward} (on ")
    assert not (Path.cwd() / "pwned").exists()
    assert not (tmp_path / "pwned").exists()


async def test_disk_usage_of_a_missing_path_fails_with_dfs_reason() -> None:
    result = await run_action("host.disk_usage", {"path": "/no/such/path"}, ActionTestContext())
    assert not result.ok
    assert (result.error_class, result.retryable) == ("CommandFailedError", False)
    assert result.error_message is not None
    assert "No such file or directory" in result.error_message


async def test_uptime_locally() -> None:
    result = await run_action("host.uptime", {}, ActionTestContext())
    assert result.ok, result.error_message
    out = output_dict(result)
    expected = float(Path("/proc/uptime").read_text().split()[0])
    assert abs(out["uptime_seconds"] - expected) < 30
    assert set(out["load"]) == {"1m", "5m", "15m"}
    assert result.summary.startswith("up ")


# --- service.* with a systemctl stand-in ----------------------------------------------

SYSTEMCTL_STAND_IN = """\
#!/bin/sh
# Stands in for systemd's systemctl: systemd cannot run in this test container, so this
# script records every invocation's argv and answers like systemctl would.
log='{log}'
state='{state}'
for arg in "$@"; do printf '%s\\n' "$arg"; done >> "$log"
printf -- '--\\n' >> "$log"
show() {{ printf 'ActiveState=%s\\nSubState=%s\\nLoadState=%s\\nMainPID=%s\\n' "$@"; }}
verb=$1; shift
while [ "${{1#-}}" != "$1" ]; do shift; done   # options, up to and including --
unit=$1
case "$verb:$unit" in
  restart:broken)
    echo "Job for broken.service failed because the control process exited." >&2
    echo failed > "$state.broken"; exit 1 ;;
  restart:crashy) echo crash-loop > "$state.crashy"; exit 0 ;;
  restart:*) echo restarted > "$state.$unit"; exit 0 ;;
  show:missing) show inactive dead not-found 0 ;;
  show:*)
    case "$(cat "$state.$unit" 2>/dev/null)" in
      restarted) show active running loaded 4321 ;;
      failed) show failed failed loaded 0 ;;
      crash-loop) show activating auto-restart loaded 0 ;;
      *) show active running loaded 1234 ;;
    esac ;;
  *) echo "unexpected: $verb" >&2; exit 64 ;;
esac
"""


@dataclass
class SystemctlStandIn:
    log: Path
    """One argument per line, each invocation ended by a ``--`` line."""


@pytest.fixture
def systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SystemctlStandIn:
    """Puts the stand-in first on the PATH the local transport hands its commands."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "systemctl.log"
    log.touch()
    script = bin_dir / "systemctl"
    script.write_text(SYSTEMCTL_STAND_IN.format(log=log, state=tmp_path / "unit"))
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    return SystemctlStandIn(log)


SHOW_ARGS = ["show", "--no-pager", "--property=ActiveState,SubState,LoadState,MainPID"]


async def test_service_status_parses_systemctl_show(systemctl: SystemctlStandIn) -> None:
    result = await run_action("service.status", {"service": "nginx"}, ActionTestContext())
    assert result.ok, result.error_message
    assert output_dict(result) == {
        "service": "nginx",
        "active": True,
        "active_state": "active",
        "sub_state": "running",
        "load_state": "loaded",
        "main_pid": 1234,
    }
    assert result.summary == "nginx: active (running), pid 1234"
    assert systemctl.log.read_text().splitlines() == [*SHOW_ARGS, "--", "nginx", "--"]


async def test_service_status_of_an_unknown_unit_fails(systemctl: SystemctlStandIn) -> None:
    result = await run_action("service.status", {"service": "missing"}, ActionTestContext())
    assert not result.ok
    assert (result.error_class, result.retryable) == ("ServiceNotFoundError", False)
    assert output_dict(result)["load_state"] == "not-found"


async def test_service_restart_restarts_then_reports(systemctl: SystemctlStandIn) -> None:
    result = await run_action("service.restart", {"service": "nginx"}, ActionTestContext())
    assert result.ok, result.error_message
    assert output_dict(result)["main_pid"] == 4321
    assert output_dict(result)["restarted"] is True
    assert result.summary == "restarted nginx: active (running), pid 4321"
    assert systemctl.log.read_text().splitlines() == [
        *["restart", "--no-ask-password", "--", "nginx", "--"],
        *[*SHOW_ARGS, "--", "nginx", "--"],
    ]


async def test_service_restart_failure_carries_systemds_message(
    systemctl: SystemctlStandIn,
) -> None:
    result = await run_action("service.restart", {"service": "broken"}, ActionTestContext())
    assert not result.ok
    assert (result.error_class, result.retryable) == ("CommandFailedError", False)
    assert result.error_message is not None
    assert "Job for broken.service failed" in result.error_message
    # It did not go on to read the state of a unit whose restart failed.
    assert "show" not in systemctl.log.read_text().splitlines()


async def test_service_restart_into_a_crash_loop_fails(systemctl: SystemctlStandIn) -> None:
    result = await run_action("service.restart", {"service": "crashy"}, ActionTestContext())
    assert not result.ok
    assert result.error_class == "ServiceNotActiveError"
    assert result.error_message == "crashy was restarted but is activating (auto-restart)"
    assert output_dict(result)["sub_state"] == "auto-restart"


# --- shell.run ------------------------------------------------------------------------


async def test_shell_runs_in_workdir_and_returns_text(tmp_path: Path) -> None:
    result = await run_action(
        "shell.run",
        {"command": "pwd; echo 'héllo wörld'; echo warn >&2", "workdir": str(tmp_path)},
        ActionTestContext(),
    )
    assert result.ok
    out = output_dict(result)
    assert out["stdout"] == f"{tmp_path}\nhéllo wörld\n"
    assert out["stderr"] == "warn\n"
    assert (out["exit_status"], out["truncated"]) == (0, False)
    assert result.summary == f"exit 0: {tmp_path}"


async def test_shell_secret_env_reaches_the_command_but_not_its_command_line() -> None:
    value = f"s3cr3t-{secrets.token_hex(12)}"
    marker = f"sleep 1.{secrets.randbelow(10**6):06d}"
    recorder = RecordingTransport(LocalTransport())
    ctx = ActionTestContext(transport_impl=recorder, secrets={"db-password": value})
    task = asyncio.create_task(
        run_action(
            "shell.run",
            {
                "command": f'{marker}; printf "%s|%s" "$DB_PASSWORD" "$MODE"',
                "env": {"DB_PASSWORD": {"$secret": "db-password"}, "MODE": "blue"},
            },
            ctx,
        )
    )
    leaked: list[str] = []
    deadline = time.monotonic() + 5
    while not task.done() and time.monotonic() < deadline:
        leaked += live_commands(value)
        await asyncio.sleep(0.02)
    result = await task
    assert result.ok
    assert output_dict(result)["stdout"] == f"{value}|blue"
    assert leaked == []
    assert value not in recorder.calls[0]["command"]
    assert recorder.calls[0]["env"] == {"DB_PASSWORD": value, "MODE": "blue"}
    # Just in time: the transport was up before the secret was fetched.
    assert ctx.events == ["transport", "secret:db-password"]


async def test_shell_non_zero_exit_is_a_failure_that_is_not_retried() -> None:
    result = await run_action(
        "shell.run",
        {"command": "echo partial; echo 'no space left' >&2; exit 3"},
        ActionTestContext(),
    )
    assert not result.ok
    assert (result.error_class, result.retryable) == ("CommandFailedError", False)
    assert result.error_message == "command exited with status 3: no space left"
    assert output_dict(result)["stdout"] == "partial\n"


async def test_shell_binary_output_comes_back_as_bytes() -> None:
    result = await run_action(
        "shell.run", {"command": r"printf '\377\376\000\001binary'"}, ActionTestContext()
    )
    assert result.ok
    assert result.output == b"\xff\xfe\x00\x01binary"
    assert result.content_type == "application/octet-stream"
    gz = await run_action("shell.run", {"command": "echo data | gzip -c"}, ActionTestContext())
    assert isinstance(gz.output, bytes)
    assert gz.content_type == "application/gzip"


async def test_shell_timeout_propagates_and_leaves_nothing_running() -> None:
    marker = f"sleep 30.{secrets.randbelow(10**6):06d}"
    started = time.monotonic()
    with pytest.raises(CommandTimeoutError):
        await run_action("shell.run", {"command": marker}, ActionTestContext(timeout_s=1))
    assert time.monotonic() - started < 10
    for _ in range(60):
        if not live_commands(marker):
            break
        await asyncio.sleep(0.05)
    assert live_commands(marker) == []


async def test_shell_cancellation_propagates() -> None:
    marker = f"sleep 30.{secrets.randbelow(10**6):06d}"
    task = asyncio.create_task(run_action("shell.run", {"command": marker}, ActionTestContext()))
    for _ in range(100):
        if live_commands(marker):
            break
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- over a real sshd -----------------------------------------------------------------


@pytest.fixture
async def ssh(sshd_server: SshdServer) -> AsyncIterator[SshTransport]:
    transport = SshTransport(
        sshd_server.host,
        sshd_server.port,
        sshd_server.username,
        private_key=sshd_server.client_private_key,
        pinned_host_key=sshd_server.host_public_key,
    )
    try:
        yield transport
    finally:
        await transport.close()


def ssh_asset(server: SshdServer) -> AssetInfo:
    return AssetInfo(
        name="sshd-01",
        address=server.host,
        transport="ssh",
        environment="dev",
        port=server.port,
    )


async def test_shell_over_ssh_with_a_secret(ssh: SshTransport, sshd_server: SshdServer) -> None:
    value = f"ssh-s3cr3t-{secrets.token_hex(10)}"
    ctx = ActionTestContext(transport_impl=ssh, secrets={"api": value})
    result = await run_action(
        "shell.run",
        {
            "command": 'whoami; printf "%s" "$API_TOKEN" | sha256sum',
            "env": {"API_TOKEN": {"$secret": "api"}},
            "workdir": "/tmp",
        },
        ctx,
        target=ssh_asset(sshd_server),
    )
    assert result.ok, result.error_message
    lines = output_dict(result)["stdout"].splitlines()
    assert lines[0] == sshd_server.username
    assert lines[1].split()[0] == hashlib.sha256(value.encode()).hexdigest()
    assert value not in sshd_server.log_text()


async def test_host_facts_over_ssh(ssh: SshTransport, sshd_server: SshdServer) -> None:
    target = ssh_asset(sshd_server)
    disk = await run_action(
        "host.disk_usage", {"path": "/tmp"}, ActionTestContext(transport_impl=ssh), target
    )
    assert disk.ok, disk.error_message
    assert output_dict(disk)["path"] == "/tmp"
    uptime = await run_action("host.uptime", {}, ActionTestContext(transport_impl=ssh), target)
    assert uptime.ok, uptime.error_message
    assert output_dict(uptime)["uptime_seconds"] > 0


async def test_shell_timeout_over_ssh_propagates(
    ssh: SshTransport, sshd_server: SshdServer
) -> None:
    with pytest.raises(StepTimeoutError):
        await run_action(
            "shell.run",
            {"command": "sleep 30"},
            ActionTestContext(transport_impl=ssh, timeout_s=1),
            target=ssh_asset(sshd_server),
        )


# --- deploy.script --------------------------------------------------------------------


async def test_deploy_passes_version_args_and_secret(tmp_path: Path) -> None:
    out = tmp_path / "received"
    script = tmp_path / "deploy it.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"printf '%s\\n' \"$@\" > '{out}.args'\n"
        f"printf '%s' \"$TOKEN\" > '{out}.token'\n"
        f"printf '%s' \"$MODE\" > '{out}.mode'\n"
        'echo "deploying $1"\n'
    )
    script.chmod(0o755)
    value = f"tok-{secrets.token_hex(12)}"
    recorder = RecordingTransport(LocalTransport())
    ctx = ActionTestContext(transport_impl=recorder, secrets={"deploy-token": value})
    args = ["--canary", "blue green", "it's; $(reboot)"]
    result = await run_action(
        "deploy.script",
        {
            "script": str(script),
            "version": "2.4.1",
            "args": args,
            "env": {"MODE": "rolling"},
            "token": {"$secret": "deploy-token"},
        },
        ctx,
    )
    assert result.ok, result.error_message
    assert result.summary == f"deployed 2.4.1 with {script}"
    assert output_dict(result)["stdout"] == "deploying 2.4.1\n"
    assert Path(f"{out}.args").read_text().splitlines() == ["2.4.1", *args]
    assert Path(f"{out}.token").read_text() == value
    assert Path(f"{out}.mode").read_text() == "rolling"
    assert value not in recorder.calls[0]["command"]
    assert ctx.events == ["transport", "secret:deploy-token"]


async def test_deploy_failure_and_missing_script(tmp_path: Path) -> None:
    script = tmp_path / "deploy.sh"
    script.write_text('#!/bin/sh\necho "starting"\necho "health check failed" >&2\nexit 4\n')
    script.chmod(0o755)
    failed = await run_action(
        "deploy.script", {"script": str(script), "version": "7.0.0"}, ActionTestContext()
    )
    assert not failed.ok
    assert (failed.error_class, failed.retryable) == ("CommandFailedError", False)
    assert failed.error_message == f"{script} exited with status 4: health check failed"
    assert failed.summary == f"deploy of 7.0.0 failed: {failed.error_message}"

    missing = await run_action(
        "deploy.script",
        {"script": "/opt/deploy/nowhere.sh", "version": "7.0.0"},
        ActionTestContext(),
    )
    assert not missing.ok
    assert missing.error_message == (
        "/opt/deploy/nowhere.sh was not found on the target (exit status 127)"
    )


# --- http.request against a real local server ----------------------------------------


async def echo(request: Request) -> Response:
    body = await request.body()
    return JSONResponse(
        {
            "method": request.method,
            "path": request.url.path,
            "headers": dict(request.headers),
            "body": body.decode(errors="replace"),
        }
    )


async def status(request: Request) -> Response:
    code = int(request.path_params["code"])
    return PlainTextResponse(f"status {code}", status_code=code)


async def slow(request: Request) -> Response:
    await asyncio.sleep(30)
    return PlainTextResponse("too late")


async def binary(request: Request) -> Response:
    return Response(b"\x89PNG\r\n\x1a\n\x00\x01", media_type="image/png")


async def big(request: Request) -> Response:
    return PlainTextResponse("x" * (2 * 1024 * 1024))


async def redirect(request: Request) -> Response:
    return RedirectResponse("http://example.invalid/elsewhere", status_code=302)


APP = Starlette(
    routes=[
        Route("/echo", echo, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]),
        Route("/status/{code:int}", status),
        Route("/slow", slow),
        Route("/binary", binary),
        Route("/big", big),
        Route("/redirect", redirect),
    ]
)


@dataclass(frozen=True)
class HttpServer:
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def http_server() -> Iterator[HttpServer]:
    """uvicorn serving ``APP`` on a free loopback port, in a thread with its own loop
    (so a handler that sleeps never blocks the tests' loop)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    config = uvicorn.Config(
        APP,
        host="127.0.0.1",
        port=port,
        log_config=None,
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive(), "uvicorn exited at start-up"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield HttpServer(port)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


async def test_http_get_by_path_on_the_target(http_server: HttpServer) -> None:
    ctx = ActionTestContext(request_id="req-1234")
    result = await run_action(
        "http.request", {"path": "/echo", "port": http_server.port, "expect_status": 200}, ctx
    )
    assert result.ok, result.error_message
    out = output_dict(result)
    assert out["url"] == f"{http_server.base}/echo"
    assert (out["status"], out["reason"], out["body_truncated"]) == (200, "OK", False)
    assert out["headers"]["content-type"] == "application/json"
    assert out["body"]["method"] == "GET"
    assert out["body"]["headers"]["x-request-id"] == "req-1234"
    assert result.summary == f"GET {http_server.base}/echo → 200 OK"
    assert ctx.events == []  # no transport: HTTP goes straight from the worker


async def test_http_secret_header_and_body_are_resolved(http_server: HttpServer) -> None:
    value = f"key-{secrets.token_hex(12)}"
    ctx = ActionTestContext(secrets={"api-key": value, "db": "pw-9876"}, request_id="r-1")
    result = await run_action(
        "http.request",
        {
            "method": "POST",
            "url": f"{http_server.base}/echo",
            "headers": {"X-Api-Key": {"$secret": "api-key"}, "X-Request-ID": "plan-wins"},
            "body": {"user": "app", "password": {"$secret": "db"}, "n": [1, 2]},
        },
        ctx,
        target=None,
    )
    assert result.ok, result.error_message
    seen = output_dict(result)["body"]
    assert seen["headers"]["x-api-key"] == value
    assert seen["headers"]["x-request-id"] == "plan-wins"
    assert seen["headers"]["content-type"] == "application/json"
    assert json.loads(seen["body"]) == {"user": "app", "password": "pw-9876", "n": [1, 2]}
    assert sorted(ctx.events) == ["secret:api-key", "secret:db"]


async def test_http_unexpected_status_is_a_failure(http_server: HttpServer) -> None:
    ctx = ActionTestContext()
    not_found = await run_action(
        "http.request", {"url": f"{http_server.base}/status/404"}, ctx, target=None
    )
    assert not not_found.ok
    assert (not_found.error_class, not_found.retryable) == ("UnexpectedStatusError", False)
    assert not_found.error_message == (
        f"GET {http_server.base}/status/404 → 404 Not Found (expected 2xx)"
    )
    assert output_dict(not_found)["body"] == "status 404"

    unavailable = await run_action(
        "http.request",
        {"url": f"{http_server.base}/status/503", "expect_status": 200},
        ctx,
        target=None,
    )
    assert not unavailable.ok
    assert unavailable.retryable

    accepted = await run_action(
        "http.request",
        {"url": f"{http_server.base}/status/503", "expect_status": [200, 503]},
        ctx,
        target=None,
    )
    assert accepted.ok

    moved = await run_action("http.request", {"url": f"{http_server.base}/redirect"}, ctx, None)
    assert not moved.ok
    assert output_dict(moved)["status"] == 302  # not followed to example.invalid


async def test_http_connection_refused_is_retryable() -> None:
    with socket.socket() as holder:  # bound, never listening: connections are refused
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        result = await run_action(
            "http.request", {"path": "/healthz", "port": port}, ActionTestContext()
        )
    assert not result.ok
    assert (result.error_class, result.retryable) == ("ConnectionError", True)
    assert f"127.0.0.1:{port}" in (result.error_message or "")


async def test_http_timeout_propagates(http_server: HttpServer) -> None:
    started = time.monotonic()
    with pytest.raises(StepTimeoutError):
        await run_action(
            "http.request",
            {"url": f"{http_server.base}/slow"},
            ActionTestContext(timeout_s=1),
            target=None,
        )
    assert time.monotonic() - started < 5


async def test_http_binary_and_large_bodies(http_server: HttpServer) -> None:
    ctx = ActionTestContext()
    png = await run_action("http.request", {"url": f"{http_server.base}/binary"}, ctx, None)
    assert output_dict(png)["body"] is None
    assert output_dict(png)["body_base64"] == "iVBORw0KGgoAAQ=="
    large = await run_action("http.request", {"url": f"{http_server.base}/big"}, ctx, None)
    out = output_dict(large)
    assert out["body_truncated"] is True
    assert len(out["body"]) == 1024 * 1024
    head = await run_action(
        "http.request", {"method": "HEAD", "url": f"{http_server.base}/echo"}, ctx, None
    )
    assert head.ok
    assert output_dict(head)["body"] is None


# --- the documented third-party example -----------------------------------------------


def docs_example_source() -> str:
    text = (REPO_ROOT / "docs" / "actions.md").read_text()
    marker = text.index("the test suite executes this block")
    start = text.index("```python\n", marker) + len("```python\n")
    return text[start : text.index("```", start)]


@pytest.fixture
def docs_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The docs' example installed as a distribution advertising it the documented way."""
    package = tmp_path / "acme_opsexec"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "checksum.py").write_text(docs_example_source())
    dist = tmp_path / "acme_opsexec-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-opsexec\nVersion: 1.0\n")
    group = "opsexec.actions.docs-example"
    (dist / "entry_points.txt").write_text(
        f"[{group}]\nfile_checksum = acme_opsexec.checksum:ACTION\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield group
    for name in ("acme_opsexec.checksum", "acme_opsexec"):
        sys.modules.pop(name, None)


async def test_the_documented_example_action_works(docs_plugin: str, tmp_path: Path) -> None:
    registry = default_registry()
    assert registry.load_entry_points(docs_plugin) == ["acme.file_checksum"]
    action = registry.implementation("acme.file_checksum")
    assert action is not None
    payload = tmp_path / "file with 'quotes'.txt"
    payload.write_bytes(b"opsexec\n")
    ctx = ActionTestContext(asset=LOCAL)
    result = await action.run(
        ctx, LOCAL, registry.require("acme.file_checksum").parse_inputs({"path": str(payload)})
    )
    assert result.ok, result.error_message
    assert output_dict(result)["sha256"] == hashlib.sha256(b"opsexec\n").hexdigest()
    missing = await action.run(
        ctx, LOCAL, registry.require("acme.file_checksum").parse_inputs({"path": "/nope"})
    )
    assert (missing.ok, missing.error_class) == (False, "CommandFailedError")
