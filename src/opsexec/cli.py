"""The ``opsexec`` command line: server, worker and operator commands.

Thin by design: every command parses its arguments, calls the engine or the HTTP API,
and renders the answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from opsexec.cli_client import ApiKeyOption, UrlOption
from opsexec.cli_client import register as register_client_commands
from opsexec.cli_ops import register as register_ops_commands
from opsexec.cli_secrets import register as register_secret_commands
from opsexec.client import ApiError, Client, resolve_api_key
from opsexec.config import get_settings
from opsexec.observability.logging import configure_logging, uvicorn_log_config

if TYPE_CHECKING:
    from opsexec.store import Connection

app = typer.Typer(no_args_is_help=True, help="Safe execution of automation plans.")
admin_app = typer.Typer(no_args_is_help=True, help="Tenants, users and API keys.")
assets_app = typer.Typer(no_args_is_help=True, help="The inventory of targets.")
dlq_app = typer.Typer(no_args_is_help=True, help="The dead-letter queue.")
app.add_typer(admin_app, name="admin")
register_secret_commands(admin_app)
app.add_typer(assets_app, name="assets")
app.add_typer(dlq_app, name="dlq")

DEFAULT_URL = "http://127.0.0.1:8080"


def _client(url: str, api_key: str | None) -> Client:
    return Client(url, resolve_api_key(api_key, get_settings().data_dir))


def _fail(error: ApiError) -> NoReturn:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(code=1)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    worker_concurrency: Annotated[
        int, typer.Option(help="Background jobs run in this process (0: none).", min=0)
    ] = 2,
) -> None:
    """Run the HTTP API (migrating the database and creating the first admin if needed)."""
    import uvicorn

    from opsexec.api.app import create_app
    from opsexec.engine.bootstrap import Bootstrapped

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)

    def show_admin_key(bootstrapped: Bootstrapped, key_file: str) -> None:
        typer.echo(
            "Created tenant 'default' and user 'admin@localhost'.\n"
            f"Admin API key (shown once; also saved to {key_file}):\n"
            f"  {bootstrapped.api_key}",
            err=False,
        )

    uvicorn.run(
        create_app(
            settings, on_admin_created=show_admin_key, worker_concurrency=worker_concurrency
        ),
        host=host,
        port=port,
        log_config=uvicorn_log_config(settings.log_level, settings.log_format),
        # Open SSE/WebSocket streams must not hold a shutdown open; clients resume by seq.
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
    )


@app.command()
def migrate() -> None:
    """Apply database migrations up to the newest revision."""
    from opsexec.store.database import open_database

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)

    async def run() -> None:
        database = await open_database(settings)
        await database.close()

    asyncio.run(run())
    typer.echo("database schema is at head")


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="Jobs run at once.", min=1)] = 4,
    worker_id: Annotated[
        str | None, typer.Option(help="Name in leases and logs (default host:pid).")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve this worker's Prometheus metrics on this port.", min=1),
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="Address for --metrics-port.")] = "127.0.0.1",
    drain: Annotated[
        bool,
        typer.Option(
            "--drain",
            help="Run nothing: ask the running worker --worker-id to finish its jobs, take "
            "no new one and exit, and wait until it has (uses the database, not the API).",
        ),
    ] = False,
    drain_timeout: Annotated[
        float, typer.Option(help="Seconds --drain waits for the worker to exit.", min=0)
    ] = 3600,
) -> None:
    """Run background jobs until SIGTERM/SIGINT, then drain gracefully and exit 0.

    `opsexec worker --drain --worker-id ID` (on a host with database access) or
    `opsexec workers drain ID` (through the API) makes a running worker finish its current
    jobs, take no new one, and exit 0 as well.
    """
    if drain:
        if worker_id is None:
            raise typer.BadParameter("--drain needs the --worker-id of the worker to drain")
        from opsexec.cli_ops import drain_from_host

        raise typer.Exit(code=drain_from_host(worker_id, reason=None, timeout_s=drain_timeout))
    import signal

    from opsexec.engine.services import open_services
    from opsexec.queue.worker import Worker, WorkerOptions

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)

    async def run() -> None:
        services = await open_services(settings)
        try:
            options = WorkerOptions.from_settings(
                settings, concurrency=concurrency, worker_id=worker_id
            )
            if metrics_port is not None:
                from prometheus_client import start_http_server

                from opsexec.observability.metrics import new_registry

                start_http_server(metrics_port, metrics_host, registry=new_registry())
            job_runner = Worker(services.db.pool, services.db.dsn, services.engine, options)
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, job_runner.stop)
            await job_runner.run()
        finally:
            await services.close()

    asyncio.run(run())


@app.command()
def reap() -> None:
    """One reaper pass: expired leases, locks and approvals."""
    from opsexec.queue.reaper import Reaper
    from opsexec.store.database import open_database

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)

    async def run() -> Any:
        database = await open_database(settings)
        try:
            reaper = Reaper(database.pool, backoff_unit_s=settings.queue_backoff_unit_s)
            return await reaper.reap_once()
        finally:
            await database.close()

    report = asyncio.run(run())
    typer.echo(
        f"{report.leases} leases, {report.locks} locks, {report.approvals} approvals reaped, "
        f"{report.abandoned} abandoned executions ended"
        f"{' (another reaper was active)' if report.skipped else ''}"
    )


@admin_app.command("bootstrap")
def admin_bootstrap(
    tenant: Annotated[str, typer.Option(help="Tenant name (created if missing).")],
    user: Annotated[str, typer.Option(help="User principal, e.g. an email.")],
    roles: Annotated[str, typer.Option(help="Comma-separated roles.")] = "admin",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create (or reuse) a tenant and user and mint a new API key for them."""
    from opsexec.safety.rbac import unknown_roles
    from opsexec.store.identity import create_api_key, ensure_tenant, ensure_user

    role_list = [r.strip() for r in roles.split(",") if r.strip()]
    if bad := unknown_roles(role_list):
        raise typer.BadParameter(f"unknown roles: {', '.join(bad)}", param_hint="--roles")

    async def work(connection: Connection) -> dict[str, str]:
        tenant_id = await ensure_tenant(connection, tenant)
        user_id = await ensure_user(connection, tenant_id, user, role_list)
        _, api_key = await create_api_key(connection, tenant_id, user_id, "cli")
        return {"tenant_id": str(tenant_id), "user_id": str(user_id), "api_key": api_key}

    result = _admin_via_database(work)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"tenant {result['tenant_id']}\nuser   {result['user_id']}")
        typer.echo(f"API key (shown once): {result['api_key']}")


def _admin_via_database(work: Callable[[Connection], Awaitable[Any]]) -> Any:
    """Run ``work`` in one transaction against this machine's database (operator commands)."""
    from opsexec.store import transaction
    from opsexec.store.database import open_database

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)

    async def run() -> Any:
        database = await open_database(settings)
        try:
            async with transaction(database.pool) as connection:
                return await work(connection)
        finally:
            await database.close()

    return asyncio.run(run())


def _tenant_id(connection: Connection, tenant: str) -> Awaitable[Any]:
    return connection.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)


@admin_app.command("create-user")
def admin_create_user(
    tenant: Annotated[str, typer.Option(help="Existing tenant name.")],
    user: Annotated[str, typer.Option(help="User principal, e.g. an email.")],
    roles: Annotated[str, typer.Option(help="Comma-separated roles.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create a user (or set an existing user's roles) in an existing tenant."""
    from opsexec.safety.rbac import unknown_roles
    from opsexec.store.identity import ensure_user

    role_list = [r.strip() for r in roles.split(",") if r.strip()]
    if bad := unknown_roles(role_list):
        raise typer.BadParameter(f"unknown roles: {', '.join(bad)}", param_hint="--roles")

    async def work(connection: Connection) -> dict[str, str] | None:
        tenant_id = await _tenant_id(connection, tenant)
        if tenant_id is None:
            return None
        user_id = await ensure_user(connection, tenant_id, user, role_list)
        return {"tenant_id": str(tenant_id), "user_id": str(user_id)}

    result = _admin_via_database(work)
    if result is None:
        typer.echo(f"error: no tenant named {tenant}", err=True)
        raise typer.Exit(code=1)
    typer.echo(json.dumps(result) if as_json else f"user {result['user_id']}")


@admin_app.command("create-key")
def admin_create_key(
    tenant: Annotated[str, typer.Option(help="Existing tenant name.")],
    user: Annotated[str, typer.Option(help="Existing user principal.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Mint a new API key for an existing user; it is shown once."""
    from opsexec.store.identity import create_api_key

    async def work(connection: Connection) -> dict[str, str] | None:
        row = await connection.fetchrow(
            """SELECT u.tenant_id, u.id FROM users u JOIN tenants t ON t.id = u.tenant_id
               WHERE t.name = $1 AND u.principal = $2 AND NOT u.is_system""",
            tenant,
            user,
        )
        if row is None:
            return None
        key_id, api_key = await create_api_key(connection, row["tenant_id"], row["id"], "cli")
        return {"key_id": str(key_id), "user_id": str(row["id"]), "api_key": api_key}

    result = _admin_via_database(work)
    if result is None:
        typer.echo(f"error: no user {user} in tenant {tenant}", err=True)
        raise typer.Exit(code=1)
    typer.echo(json.dumps(result) if as_json else f"API key (shown once): {result['api_key']}")


@assets_app.command("import")
def assets_import(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Create or update assets from a YAML list or an Ansible INI inventory."""
    from opsexec.engine.inventory import parse_inventory
    from opsexec.errors import ValidationError

    try:
        assets = parse_inventory(file.read_text())
    except ValidationError as exc:
        typer.echo(f"error: {file}: {exc.detail} (at {exc.pointer})", err=True)
        raise typer.Exit(code=1) from None
    payload = [asset.model_dump(exclude_none=True) for asset in assets]
    try:
        with _client(url, api_key) as client:
            result = client.request("POST", "/v1/assets", json=payload)
    except ApiError as error:
        _fail(error)
    typer.echo(f"{result['created']} created, {result['updated']} updated")


register_client_commands(app)
register_ops_commands(app)


@dlq_app.command("list")
def dlq_list(
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Jobs whose attempts are spent, newest first."""
    try:
        with _client(url, api_key) as client:
            entries = client.request("GET", "/v1/dlq")
    except ApiError as error:
        _fail(error)
    if as_json:
        typer.echo(json.dumps(entries))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "execution", "failed at", "attempts", "last error", "requeued", "closed")
    for entry in entries:
        table.add_row(
            entry["id"],
            entry["execution_id"],
            entry["failed_at"],
            str(entry["attempt_count"]),
            (entry["last_error"] or "")[:60],
            entry["requeued_at"] or "",
            f"{entry['closed_at']} ({entry['closed_reason']})" if entry["closed_at"] else "",
        )
    Console().print(table)


@dlq_app.command("requeue")
def dlq_requeue(
    dlq_id: Annotated[str, typer.Argument(help="The dead letter's id.")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Put a dead-lettered job back in the queue with fresh attempts."""
    try:
        with _client(url, api_key) as client:
            entry = client.request("POST", f"/v1/dlq/{dlq_id}/requeue")
    except ApiError as error:
        _fail(error)
    typer.echo(f"requeued execution {entry['execution_id']}")


def main() -> None:
    app()
