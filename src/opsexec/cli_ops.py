"""Operator commands: the runtime kill switch and worker drain (R-ROLL).

``opsexec kill-switch status|on|off`` and ``opsexec workers list|drain`` ask the API, so
they work from any machine that can reach it, every change is audited under the caller,
and every API process and worker sees it. Kept out of ``cli.py`` like the other client
commands; :func:`register` attaches them. ``opsexec worker --drain`` is the server-side
twin (:func:`drain_from_host`): it needs database access instead of an API key, for
deploy scripts on the worker's own host. Exit codes: 0 done, 1 the request failed (or
no such worker), 2 the drain was asked for but the worker did not stop in time.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, NoReturn
from urllib.parse import quote

import typer

from opsexec.cli_client import DEFAULT_URL, ApiKeyOption, JsonOption, UrlOption
from opsexec.client import ApiError, Client, resolve_api_key
from opsexec.config import get_settings

EXIT_REQUEST_FAILED = 1
EXIT_NOT_STOPPED = 2


def _fail(error: ApiError) -> NoReturn:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(code=EXIT_REQUEST_FAILED)


def _call(url: str, api_key: str | None, method: str, path: str, **kwargs: Any) -> Any:
    try:
        with Client(url, resolve_api_key(api_key, get_settings().data_dir)) as client:
            return client.request(method, path, **kwargs)
    except ApiError as error:
        _fail(error)


def _show_kill_switch(state: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(state))
        return
    if not state["engaged"]:
        typer.echo("kill switch: off (new executions are accepted)")
        return
    why = f" — {state['reason']}" if state.get("reason") else ""
    typer.echo(f"kill switch: ON via {state['source']}{why} (new executions get 503)")


def kill_switch(
    action: Annotated[str, typer.Argument(help="status, on or off.")] = "status",
    reason: Annotated[str | None, typer.Option(help="Why (kept in the audit log).")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show, engage or release the runtime kill switch for every process."""
    if action not in ("status", "on", "off"):
        raise typer.BadParameter("expected status, on or off", param_hint="ACTION")
    if action == "status":
        state = _call(url, api_key, "GET", "/v1/admin/kill-switch")
    else:
        body = {"engaged": action == "on", "reason": reason}
        state = _call(url, api_key, "PUT", "/v1/admin/kill-switch", json=body)
    _show_kill_switch(state, as_json)


def workers_list(
    url: UrlOption = DEFAULT_URL, api_key: ApiKeyOption = None, as_json: JsonOption = False
) -> None:
    """Worker processes by heartbeat: running, draining, stale or stopped."""
    workers = _call(url, api_key, "GET", "/v1/admin/workers")
    if as_json:
        typer.echo(json.dumps(workers))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("worker", "state", "jobs", "last seen", "drain requested")
    for worker in workers:
        table.add_row(
            worker["worker_id"],
            worker["state"],
            f"{worker['running_jobs']}/{worker['concurrency']}",
            worker["last_seen_at"],
            worker["drain_requested_at"] or "",
        )
    Console().print(table)


def workers_drain(
    worker_id: Annotated[str, typer.Argument(help="The worker's --worker-id (default host:pid).")],
    reason: Annotated[str | None, typer.Option(help="Why (kept in the audit log).")] = None,
    wait: Annotated[
        bool, typer.Option(help="Wait until the worker has finished its jobs and exited.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits at most.", min=0)] = 3600,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Ask a worker to take nothing new, finish its current jobs, and exit."""
    path = f"/v1/admin/workers/{quote(worker_id, safe='')}"
    worker = _call(url, api_key, "POST", f"{path}/drain", json={"reason": reason})
    deadline = time.monotonic() + timeout
    while wait and worker["state"] != "stopped":
        if time.monotonic() >= deadline:
            typer.echo(f"error: {worker_id} is still {worker['state']}", err=True)
            raise typer.Exit(code=EXIT_NOT_STOPPED)
        time.sleep(1.0)
        worker = _call(url, api_key, "GET", path)
    if as_json:
        typer.echo(json.dumps(worker))
    else:
        typer.echo(f"{worker_id}: {worker['state']} ({worker['running_jobs']} jobs in hand)")


def drain_from_host(worker_id: str, *, reason: str | None, timeout_s: float) -> int:
    """Ask ``worker_id`` to drain through the database and wait until it has exited.

    Audited under the operator tenant (``OPSEXEC_OPERATOR_TENANT``) with no actor: whoever
    can reach the database is the operator here.
    """
    import asyncio

    from opsexec.engine.controls import request_worker_drain
    from opsexec.observability.heartbeat import stale_after_s
    from opsexec.store import workers as worker_store
    from opsexec.store.database import open_database
    from opsexec.store.identity import tenant_id_by_name

    settings = get_settings()
    fresh_within_s = stale_after_s(settings.worker_heartbeat_s)

    async def run() -> int:
        database = await open_database(settings, run_migrations=False)
        try:
            async with database.pool.acquire() as connection:
                operator = await tenant_id_by_name(connection, settings.operator_tenant)
            drained = await request_worker_drain(
                database.pool,
                worker_id,
                audit_tenant_id=operator,
                actor_id=None,
                reason=reason,
                fresh_within_s=fresh_within_s,
            )
            if drained is None:
                typer.echo(f"error: worker {worker_id} not found", err=True)
                return EXIT_REQUEST_FAILED
            worker = drained.worker
            deadline = time.monotonic() + timeout_s
            while worker["stopped_at"] is None:
                if time.monotonic() >= deadline:
                    typer.echo(f"error: {worker_id} has not stopped yet", err=True)
                    return EXIT_NOT_STOPPED
                await asyncio.sleep(0.5)
                async with database.pool.acquire() as connection:
                    latest = await worker_store.get_worker(
                        connection, worker_id, fresh_within_s=fresh_within_s
                    )
                assert latest is not None, "heartbeat rows are only deleted after a week"
                worker = latest
            typer.echo(f"{worker_id}: stopped")
            return 0
        finally:
            await database.close()

    return asyncio.run(run())


def register(app: typer.Typer) -> None:
    app.command("kill-switch")(kill_switch)
    workers_app = typer.Typer(no_args_is_help=True, help="Worker processes: list and drain.")
    workers_app.command("list")(workers_list)
    workers_app.command("drain")(workers_drain)
    app.add_typer(workers_app, name="workers")
