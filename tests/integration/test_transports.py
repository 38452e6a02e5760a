"""Command transports against the real thing: local processes and a real sshd on loopback.

What a user would notice: output and exit status come back; a timeout or a forced cancel
leaves nothing running (locally or on the target, children included); secrets reach the
command but no command line and no sshd log; host keys are pinned or recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import asyncssh
import pytest

from opsexec.actions.transports import (
    CommandResult,
    LocalTransport,
    SshTransport,
    Transport,
)
from opsexec.actions.transports.ssh import BOOTSTRAP, build_preamble
from opsexec.errors import (
    CommandTimeoutError,
    HostKeyMismatchError,
    StepTimeoutError,
    TransportAuthenticationError,
    TransportError,
    ValidationError,
)

if TYPE_CHECKING:  # imported by pytest as a plugin; importing it first defeats assert rewriting
    from tests.fixtures.sshd import SshdServer

# Registers the `sshd_server` fixture. pytest (9.x) honours this in test modules and only in
# the root conftest otherwise; registering it again in tests/conftest.py is harmless.
pytest_plugins = ["tests.fixtures.sshd"]

# --- helpers --------------------------------------------------------------------------


def live_commands(fragment: str) -> list[tuple[int, str]]:
    """(pid, command line) of every running, non-zombie process whose argv has ``fragment``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state = stat[stat.rfind(")") + 2 :].split()[0]
        if fragment in cmdline and state not in {"Z", "X"}:
            found.append((int(entry.name), cmdline))
    return found


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def assert_gone(fragment: str) -> None:
    """Kill signals are asynchronous: allow a moment, then nothing may be left."""
    await wait_until(lambda: not live_commands(fragment), timeout_s=3)
    assert live_commands(fragment) == []


def unique_sleep(seconds: int = 30) -> str:
    """``sleep 30.NNNNNN``: long enough to be killed, unique enough to be found in /proc."""
    return f"sleep {seconds}.{secrets.randbelow(10**6):06d}"


async def assert_timeout_kills(transport: Transport, command: str, *fragments: str) -> None:
    started = time.monotonic()
    with pytest.raises(CommandTimeoutError) as caught:
        await transport.run(command, timeout_s=1)
    assert isinstance(caught.value, StepTimeoutError)
    assert caught.value.code == "timeout"
    # It gave up at the timeout (plus the kill grace), not after the 30 s sleep.
    assert time.monotonic() - started < 10
    for fragment in fragments:
        await assert_gone(fragment)


async def assert_term_comes_first(transport: Transport) -> None:
    """The group gets SIGTERM and a grace period before SIGKILL, so it can clean up."""
    proof = Path(f"/tmp/opsexec-term-{secrets.token_hex(6)}")
    sleep = unique_sleep()
    try:
        with pytest.raises(CommandTimeoutError):
            await transport.run(
                f"trap 'echo cleaned-up > {proof}; exit 0' TERM; {sleep} & wait", timeout_s=1
            )
        assert await wait_until(proof.exists, timeout_s=3)
        assert proof.read_text() == "cleaned-up\n"
        await assert_gone(sleep)
    finally:
        proof.unlink(missing_ok=True)


async def assert_cancel_kills(transport: Transport, command: str, fragment: str) -> None:
    task = asyncio.create_task(transport.run(command, timeout_s=60))
    assert await wait_until(lambda: bool(live_commands(fragment))), "command never started"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_gone(fragment)


async def run_watching_for_secret(
    transport: Transport, secret: str, fragment: str, command: str
) -> tuple[CommandResult, list[str]]:
    """Run ``command`` and, while ``fragment`` is running, collect every argv holding ``secret``."""
    task = asyncio.create_task(transport.run(command, env={"MY_SECRET": secret}, timeout_s=30))
    assert await wait_until(lambda: bool(live_commands(fragment))), "command never started"
    leaked = [cmdline for _, cmdline in live_commands(secret)]
    ps = await asyncio.create_subprocess_exec("ps", "-eo", "args", stdout=asyncio.subprocess.PIPE)
    ps_output, _ = await ps.communicate()
    if secret in ps_output.decode(errors="replace"):
        leaked.append("ps -eo args")
    return await task, leaked


@contextlib.contextmanager
def socket_bound_but_not_listening() -> Iterator[int]:
    """A loopback port that refuses connections and that nobody else can take meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        yield int(holder.getsockname()[1])


# --- local ----------------------------------------------------------------------------


@pytest.fixture
def local() -> LocalTransport:
    return LocalTransport(kill_grace_s=1)


async def test_local_returns_output_and_exit_status(local: LocalTransport) -> None:
    result = await local.run("echo out; echo err >&2; exit 3", timeout_s=10)
    assert (result.exit_status, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    assert not result.ok
    assert not result.truncated
    assert result.duration_ms >= 0


async def test_local_feeds_stdin_and_enters_workdir(local: LocalTransport, tmp_path: Path) -> None:
    result = await local.run("cat; pwd", stdin=b"a\0b\n", timeout_s=10, workdir=str(tmp_path))
    assert result.stdout == b"a\0b\n" + str(tmp_path).encode() + b"\n"


async def test_local_missing_workdir_fails_the_command(
    local: LocalTransport, tmp_path: Path
) -> None:
    result = await local.run("echo never", timeout_s=10, workdir=str(tmp_path / "nope"))
    assert result.exit_status != 0
    assert result.stdout == b""
    assert b"nope" in result.stderr


async def test_local_reports_death_by_signal_like_a_shell(local: LocalTransport) -> None:
    result = await local.run("kill -TERM $$", timeout_s=10)
    assert result.exit_status == 128 + 15


async def test_local_env_reaches_command_but_no_command_line(local: LocalTransport) -> None:
    secret = f"s3cr3t-{secrets.token_hex(12)}"
    fragment = unique_sleep(seconds=2)
    result, leaked = await run_watching_for_secret(
        local, secret, fragment, f'{fragment}; printf %s "$MY_SECRET"'
    )
    assert result.stdout == secret.encode()
    assert leaked == []


async def test_local_does_not_leak_the_workers_environment(
    local: LocalTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPSEXEC_SECRET_KEY", "worker-only")
    result = await local.run('printf %s "${OPSEXEC_SECRET_KEY-unset}:$PATH"', timeout_s=10)
    value, path = result.stdout.decode().split(":", 1)
    assert value == "unset"
    assert "/bin" in path


async def test_local_refuses_bad_env_names_without_echoing_values(local: LocalTransport) -> None:
    with pytest.raises(ValidationError) as caught:
        await local.run("true", env={"BAD-NAME": "hunter2"}, timeout_s=10)
    assert "hunter2" not in str(caught.value)


async def test_local_timeout_kills_the_process(local: LocalTransport) -> None:
    sleep = unique_sleep()
    await assert_timeout_kills(local, sleep, sleep)


async def test_local_timeout_kills_the_shells_children(local: LocalTransport) -> None:
    first, second = unique_sleep(), unique_sleep()
    await assert_timeout_kills(local, f"{first} & {second}", first, second)


async def test_local_timeout_kills_a_child_that_ignores_sigterm(local: LocalTransport) -> None:
    sleep = unique_sleep()
    await assert_timeout_kills(local, f"trap '' TERM; {sleep} & wait", sleep)


async def test_local_timeout_sends_sigterm_before_sigkill(local: LocalTransport) -> None:
    await assert_term_comes_first(local)


async def test_local_timeout_keeps_partial_output(local: LocalTransport) -> None:
    with pytest.raises(CommandTimeoutError) as caught:
        await local.run(f"echo started; {unique_sleep()}", timeout_s=1)
    assert caught.value.stdout == b"started\n"


async def test_local_cancel_kills_the_process_group(local: LocalTransport) -> None:
    first, second = unique_sleep(), unique_sleep()
    await assert_cancel_kills(local, f"{first} & {second}", first)
    await assert_gone(second)


async def test_local_output_is_capped_and_marked(local: LocalTransport) -> None:
    capped = LocalTransport(output_limit=1024)
    result = await capped.run("head -c 1000000 /dev/zero; echo done >&2", timeout_s=30)
    assert result.exit_status == 0
    assert len(result.stdout) == 1024
    assert result.stdout_truncated
    assert result.truncated
    assert (result.stderr, result.stderr_truncated) == (b"done\n", False)


# --- the SSH wrapper, without sshd ------------------------------------------------------


async def test_remote_wrapper_makes_a_process_group_when_not_a_leader() -> None:
    """Where sshd did not setsid() the session, the wrapper's `setsid -w` branch runs.

    Started from this test process, the bootstrap shell is not a group leader; the
    wrapper must still hand over a pgid that is the command's own group, and keep the
    command's exit status.
    """
    marker = f"__opsexec_pgid_{secrets.token_hex(8)}__"
    preamble = build_preamble(
        'ps -o pgid= -p $$; printf %s "$X"; exit 5', {"X": "x\ny"}, "/", marker
    )
    process = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        BOOTSTRAP,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate(preamble)
    assert process.returncode == 5
    announced = stderr.decode().split()
    assert announced[0] == marker
    pgid_line, env_value = stdout.decode().split("\n", 1)
    assert int(pgid_line) == int(announced[1]) != os.getpgrp()
    assert env_value == "x\ny"


# --- ssh ------------------------------------------------------------------------------


@pytest.fixture
async def ssh_password(sshd_server: SshdServer) -> AsyncIterator[SshTransport]:
    async with SshTransport(
        sshd_server.host,
        sshd_server.port,
        sshd_server.username,
        password=sshd_server.password,
        kill_grace_s=1,
    ) as transport:
        yield transport


@pytest.fixture
async def ssh_key(sshd_server: SshdServer) -> AsyncIterator[SshTransport]:
    async with SshTransport(
        sshd_server.host,
        sshd_server.port,
        sshd_server.username,
        private_key=sshd_server.client_private_key,
        pinned_host_key=sshd_server.host_public_key,
        kill_grace_s=1,
    ) as transport:
        yield transport


@pytest.fixture(params=["password", "key"])
async def ssh_any_login(
    request: pytest.FixtureRequest,
    sshd_server: SshdServer,
) -> AsyncIterator[SshTransport]:
    """The same server, logged in to with the password or with the client key."""
    by_password = request.param == "password"
    async with SshTransport(
        sshd_server.host,
        sshd_server.port,
        sshd_server.username,
        password=sshd_server.password if by_password else None,
        private_key=None if by_password else sshd_server.client_private_key,
    ) as transport:
        yield transport


@pytest.mark.sshd
async def test_ssh_runs_commands_with_password_or_key(ssh_any_login: SshTransport) -> None:
    hi = await ssh_any_login.run("echo hi", timeout_s=20)
    assert (hi.exit_status, hi.stdout, hi.stderr) == (0, b"hi\n", b"")
    df = await ssh_any_login.run("df -P /", timeout_s=20)
    assert df.exit_status == 0
    assert df.stdout.startswith(b"Filesystem")


@pytest.mark.sshd
async def test_ssh_returns_exit_status_and_clean_stderr(ssh_key: SshTransport) -> None:
    result = await ssh_key.run("echo out; echo err >&2; exit 7", timeout_s=20)
    # The pgid marker the transport sends itself on stderr is not part of the output.
    assert (result.exit_status, result.stdout, result.stderr) == (7, b"out\n", b"err\n")


@pytest.mark.sshd
async def test_ssh_feeds_stdin_and_enters_workdir(ssh_key: SshTransport) -> None:
    data = b"line one\nline 'two'\n\x00\xff binary\n"
    result = await ssh_key.run("cat; pwd", stdin=data, timeout_s=20, workdir="/tmp")
    assert result.stdout == data + b"/tmp\n"
    missing = await ssh_key.run("echo never", timeout_s=20, workdir="/nonexistent dir")
    assert missing.exit_status != 0
    assert missing.stdout == b""
    assert b"nonexistent dir" in missing.stderr


@pytest.mark.sshd
async def test_ssh_env_values_survive_quoting(ssh_key: SshTransport) -> None:
    tricky = "a'b\"c $HOME `id` \\n\nsecond line\n\n"
    result = await ssh_key.run(
        'printf %s "$TRICKY"', env={"TRICKY": tricky, "EMPTY": ""}, timeout_s=20
    )
    assert result.stdout == tricky.encode()


@pytest.mark.sshd
async def test_ssh_reuses_one_connection(
    sshd_server: SshdServer,
    ssh_key: SshTransport,
) -> None:
    before = sshd_server.log_text().count("Accepted publickey")
    results = [await ssh_key.run(f"echo {n}", timeout_s=20) for n in range(3)]
    results += await asyncio.gather(*(ssh_key.run("true", timeout_s=20) for _ in range(3)))
    assert [r.exit_status for r in results] == [0] * 6
    await asyncio.sleep(0.2)  # sshd flushes its log line asynchronously
    assert sshd_server.log_text().count("Accepted publickey") - before == 1


@pytest.mark.sshd
async def test_ssh_records_the_observed_host_key(
    sshd_server: SshdServer,
    ssh_password: SshTransport,
) -> None:
    assert ssh_password.observed_host_key is None
    await ssh_password.run("true", timeout_s=20)
    assert ssh_password.observed_host_key == sshd_server.host_public_key


@pytest.mark.sshd
async def test_ssh_pinned_host_key_is_accepted(
    sshd_server: SshdServer,
    ssh_key: SshTransport,
) -> None:
    assert (await ssh_key.run("echo pinned", timeout_s=20)).stdout == b"pinned\n"
    assert ssh_key.observed_host_key == sshd_server.host_public_key


@pytest.mark.sshd
async def test_ssh_refuses_a_host_key_that_is_not_the_pinned_one(
    sshd_server: SshdServer,
) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    password_attempts = sshd_server.log_text().count(" password for ")
    async with SshTransport(
        sshd_server.host,
        sshd_server.port,
        sshd_server.username,
        password=sshd_server.password,
        pinned_host_key=other,
    ) as transport:
        with pytest.raises(HostKeyMismatchError) as caught:
            await transport.run("echo should-not-run", timeout_s=20)
        assert transport.observed_host_key is None
    error = caught.value
    assert isinstance(error, TransportError)
    assert not error.retryable
    assert error.code == "host_key_mismatch"
    assert error.extra["presented_host_key"] == sshd_server.host_public_key
    assert sshd_server.password not in str(error)
    # Refused during key exchange: the password was never offered to the impostor.
    await asyncio.sleep(0.2)
    assert sshd_server.log_text().count(" password for ") == password_attempts


@pytest.mark.sshd
async def test_ssh_refuses_a_pinned_key_of_a_type_the_server_lacks(
    sshd_server: SshdServer,
) -> None:
    rsa = asyncssh.generate_private_key("ssh-rsa", key_size=2048).export_public_key().decode()
    async with SshTransport(
        sshd_server.host,
        sshd_server.port,
        sshd_server.username,
        password=sshd_server.password,
        pinned_host_key=rsa,
    ) as transport:
        with pytest.raises(HostKeyMismatchError) as caught:
            await transport.run("true", timeout_s=20)
    assert not caught.value.retryable
    assert caught.value.extra["offered_host_key_algorithms"] == ["ssh-ed25519"]


@pytest.mark.sshd
async def test_ssh_wrong_password_is_not_retryable_and_not_echoed(
    sshd_server: SshdServer,
) -> None:
    wrong = f"wrong-{secrets.token_hex(8)}"
    async with SshTransport(
        sshd_server.host, sshd_server.port, sshd_server.username, password=wrong
    ) as transport:
        with pytest.raises(TransportAuthenticationError) as caught:
            await transport.run("true", timeout_s=20)
    error = caught.value
    assert isinstance(error, TransportError)
    assert not error.retryable
    assert "authentication failed" in str(error)
    for text in (str(error), error.detail, repr(error), repr(transport)):
        assert wrong not in text
        assert sshd_server.password not in text


def test_ssh_unreadable_private_key_is_not_echoed() -> None:
    garbage = (
        "-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-key-c0ffee\n-----END OPENSSH PRIVATE KEY-----"
    )
    with pytest.raises(TransportAuthenticationError) as caught:
        SshTransport("127.0.0.1", 22, "x", private_key=garbage)
    assert "c0ffee" not in str(caught.value)


async def test_ssh_closed_port_is_retryable() -> None:
    with socket_bound_but_not_listening() as port:
        async with SshTransport("127.0.0.1", port, "nobody", password="pw-c0ffee") as transport:
            with pytest.raises(TransportError) as caught:
                await transport.run("true", timeout_s=5)
    error = caught.value
    assert error.retryable
    assert not isinstance(error, TransportAuthenticationError)
    assert "pw-c0ffee" not in str(error)


async def test_ssh_unknown_host_name_is_a_transport_error() -> None:
    transport = SshTransport("no-such-host.invalid", 22, "nobody", connect_timeout_s=5)
    with pytest.raises(TransportError) as caught:
        await transport.run("true", timeout_s=5)
    assert "no-such-host.invalid" in str(caught.value)
    await transport.close()


@pytest.mark.sshd
async def test_ssh_timeout_kills_the_remote_process(ssh_key: SshTransport) -> None:
    await assert_timeout_kills(ssh_key, "sleep 30.2468", "sleep 30.2468")
    # The connection survives a timeout: the next command runs.
    assert (await ssh_key.run("echo still-here", timeout_s=20)).stdout == b"still-here\n"


@pytest.mark.sshd
async def test_ssh_timeout_kills_remote_children_too(ssh_password: SshTransport) -> None:
    first, second = unique_sleep(), unique_sleep()
    await assert_timeout_kills(
        ssh_password, f"{first} & trap '' TERM; {second} & wait", first, second
    )


@pytest.mark.sshd
async def test_ssh_timeout_sends_sigterm_before_sigkill(ssh_key: SshTransport) -> None:
    # Proves the transport's own `kill -TERM -PGID` reached the remote group: this sshd
    # also kills a session's processes when its channel closes, but uncatchably.
    await assert_term_comes_first(ssh_key)


@pytest.mark.sshd
async def test_ssh_cancel_kills_the_remote_process_group(ssh_key: SshTransport) -> None:
    first, second = unique_sleep(), unique_sleep()
    await assert_cancel_kills(ssh_key, f"{first} & {second}", first)
    await assert_gone(second)


@pytest.mark.sshd
async def test_ssh_env_secret_reaches_command_but_not_ps_or_sshd_log(
    sshd_server: SshdServer,
    ssh_password: SshTransport,
) -> None:
    secret = f"s3cr3t-{secrets.token_hex(12)}"
    fragment = unique_sleep(seconds=2)
    result, leaked = await run_watching_for_secret(
        ssh_password, secret, fragment, f'echo "$MY_SECRET"; {fragment}'
    )
    assert result.stdout == f"{secret}\n".encode()
    assert leaked == []
    log = sshd_server.log_text()
    assert "Accepted password" in log  # the log is live and VERBOSE
    assert secret not in log
    assert sshd_server.password not in log


@pytest.mark.sshd
async def test_ssh_output_is_capped_and_marked(sshd_server: SshdServer) -> None:
    async with SshTransport(
        sshd_server.host,
        sshd_server.port,
        sshd_server.username,
        private_key=sshd_server.client_private_key,
        output_limit=1024,
    ) as transport:
        result = await transport.run("head -c 1000000 /dev/zero; echo done >&2", timeout_s=30)
    assert result.exit_status == 0
    assert (len(result.stdout), result.stdout_truncated) == (1024, True)
    assert (result.stderr, result.stderr_truncated) == (b"done\n", False)


@pytest.mark.sshd
async def test_ssh_transport_reconnects_after_the_connection_drops(
    sshd_server: SshdServer,
    ssh_key: SshTransport,
) -> None:
    await ssh_key.run("true", timeout_s=20)
    # Kill this connection's sshd session process from the server side.
    me = await ssh_key.run("echo $PPID", timeout_s=20)
    session_pid = int(me.stdout)
    os.kill(session_pid, 9)
    await asyncio.sleep(0.5)
    assert (await ssh_key.run("echo again", timeout_s=20)).stdout == b"again\n"
