"""Client commands: submit, watch, approve, reject, cancel and list executions over HTTP.

Kept out of ``cli.py`` so the client can grow on its own; ``cli.py`` calls
:func:`register` with its top-level app. Every command talks to ``--url``/``OPSEXEC_URL``
with ``--api-key``/``OPSEXEC_API_KEY`` (default: the admin key a local ``opsexec serve``
saved), prints something a person can read, or JSON with ``--json``, and exits with a
code a script can branch on:

====  ===========================================================================
0     done: the execution succeeded (or, without ``--watch``, was accepted)
1     the request failed: server unreachable, unauthenticated, refused, invalid
2     the execution failed (including timed out)
3     the execution was cancelled or rejected
====  ===========================================================================

``watch`` follows the execution's Server-Sent Events stream and, when the connection
drops, resumes it with ``Last-Event-ID``: no event is shown twice or skipped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from opsexec.client import ApiError, Client, resolve_api_key
from opsexec.config import get_settings

EXIT_OK = 0
EXIT_REQUEST_FAILED = 1
EXIT_EXECUTION_FAILED = 2
EXIT_EXECUTION_STOPPED = 3
EXIT_BY_STATUS = {"succeeded": EXIT_OK, "failed": EXIT_EXECUTION_FAILED}
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "rejected"})
RECONNECT_ATTEMPTS = 8
STATUSES = [
    "pending",
    "awaiting_approval",
    "approved",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "rejected",
]

UrlOption = Annotated[str, typer.Option("--url", envvar="OPSEXEC_URL", help="The opsexec server.")]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="OPSEXEC_API_KEY",
        help="API key; defaults to the admin key a local `opsexec serve` saved.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
DEFAULT_URL = "http://127.0.0.1:8080"


def exit_code_for(status: str) -> int:
    if status in TERMINAL:
        return EXIT_BY_STATUS.get(status, EXIT_EXECUTION_STOPPED)
    return EXIT_OK


def _api_key(api_key: str | None) -> str | None:
    return resolve_api_key(api_key, get_settings().data_dir)


def _fail(error: ApiError) -> NoReturn:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(code=EXIT_REQUEST_FAILED)


def _call(url: str, api_key: str | None, method: str, path: str, **kwargs: Any) -> Any:
    try:
        with Client(url, _api_key(api_key)) as client:
            return client.request(method, path, **kwargs)
    except ApiError as error:
        _fail(error)


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, separators=(",", ":"), default=str))


def _describe(execution: dict[str, Any]) -> str:
    steps = execution.get("steps") or {}
    line = (
        f"execution {execution['id']} {execution['status']} "
        f"(level {execution['approval_level']}, {execution['execution_mode']}, "
        f"{execution['sla_class']}; steps {steps.get('succeeded', 0)}/{steps.get('total', 0)})"
    )
    if execution["status"] == "awaiting_approval":
        line += f"\n  waiting for approval: opsexec approve {execution['id']}"
    if execution.get("error_message"):
        line += f"\n  {execution.get('error_class')}: {execution['error_message']}"
    answer = (execution.get("result_summary") or {}).get("answer")
    if answer:
        line += f"\n  {answer}"
    return line


# --- the event stream ----------------------------------------------------------------------


@dataclass
class _Frame:
    event: str = "message"
    data: list[str] = field(default_factory=list)
    id: str | None = None


def sse_frames(lines: Iterator[str]) -> Iterator[_Frame]:
    """Server-Sent Events framing (the subset opsexec sends: id, event, data, comments)."""
    frame = _Frame()
    for line in lines:
        if not line:
            if frame.data or frame.event != "message":
                yield frame
            frame = _Frame()
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            frame.data.append(value)
        elif name == "event":
            frame.event = value
        elif name == "id":
            frame.id = value


def follow_events(
    url: str, api_key: str | None, execution_id: str, *, after: int = 0
) -> Iterator[dict[str, Any]]:
    """Every event message after ``after``, then one ``{"type": "end", …}`` message.

    Reconnects with ``Last-Event-ID`` when the connection drops or the server asks.
    """
    headers = {"Accept": "text/event-stream"}
    key = _api_key(api_key)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    cursor, failures = after, 0
    timeout = httpx.Timeout(10.0, read=60.0)  # the server sends a heartbeat every 15 s
    path = f"{url.rstrip('/')}/v1/executions/{execution_id}/events"
    while True:
        try:
            with httpx.stream(
                "GET", path, headers=headers | {"Last-Event-ID": str(cursor)}, timeout=timeout
            ) as response:
                if response.status_code == 204:  # ended, nothing left after the cursor
                    yield {"type": "end", "next_after": cursor}
                    return
                if response.status_code >= 400:
                    response.read()
                    try:
                        problem = response.json()
                    except ValueError:
                        problem = {"detail": response.text[:200]}
                    raise ApiError(response.status_code, problem)
                failures = 0
                for frame in sse_frames(response.iter_lines()):
                    data = json.loads("\n".join(frame.data)) if frame.data else {}
                    if frame.event == "end":
                        yield {"type": "end"} | data
                        return
                    if frame.event == "reconnect":
                        break
                    if frame.event == "message" and "seq" in data:
                        cursor = int(data["seq"])
                        yield {"type": "event"} | data
        except httpx.TransportError as exc:
            failures += 1
            if failures > RECONNECT_ATTEMPTS:
                raise ApiError(0, {"code": "unreachable", "detail": str(exc)}) from None
            time.sleep(min(0.25 * 2**failures, 5.0))


# --- rendering -------------------------------------------------------------------------------


class _StepTable:
    """Step-targets by number, kept current from step_* events."""

    def __init__(self, steps: list[dict[str, Any]]) -> None:
        self.rows: dict[int, dict[str, Any]] = {}
        self.reset(steps)

    def reset(self, steps: list[dict[str, Any]]) -> None:
        self.rows = {
            s["step_number"]: {
                "step": s["step_key"],
                "action": s["action"],
                "target": s.get("target_ref") or "-",
                "status": s["status"],
                "note": s.get("error_message") or "",
            }
            for s in steps
        }

    def apply(self, message: dict[str, Any]) -> None:
        payload = message.get("payload") or {}
        row = self.rows.get(payload.get("step_number", -1))
        if row is None:
            return
        kind = message["kind"]
        if kind == "step_started":
            row["status"], row["note"] = "running", f"attempt {payload.get('attempt', 1)}"
        elif kind == "step_retrying":
            row["status"], row["note"] = "retrying", str(payload.get("error_class") or "")
        elif kind in ("step_completed", "step_failed"):
            row["status"] = payload.get("status") or (
                "succeeded" if kind == "step_completed" else "failed"
            )
            row["note"] = str(payload.get("summary") or payload.get("error_class") or "")

    def render(self) -> Table:
        table = Table(expand=False, show_edge=False, header_style="bold")
        for column in ("#", "step", "action", "target", "status", ""):
            table.add_column(column, overflow="ellipsis", max_width=48)
        colours = {"succeeded": "green", "failed": "red", "running": "cyan", "retrying": "yellow"}
        for number, row in sorted(self.rows.items()):
            status = Text(row["status"], style=colours.get(row["status"], "dim"))
            table.add_row(
                str(number), row["step"], row["action"], row["target"], status, row["note"]
            )
        return table


def _eta(message: dict[str, Any]) -> str:
    eta = message.get("eta_s")
    if eta is None or message.get("status") in TERMINAL:
        return ""
    return f"ETA {eta:.0f}s" if eta >= 1 else "ETA <1s"


def _event_line(message: dict[str, Any]) -> str:
    payload = message.get("payload") or {}
    detail = ""
    if message["kind"] == "status_transition":
        detail = f"{payload.get('from')} -> {payload.get('to')}"
    elif message["kind"].startswith("step_"):
        detail = f"step {payload.get('step_number')} {payload.get('target') or ''}".rstrip()
        if payload.get("summary"):
            detail += f": {payload['summary']}"
    elif payload.get("answer"):
        detail = str(payload["answer"])
    progress = message.get("progress") or {}
    return (
        f"#{message['seq']:<6} {message['kind']:<22} {detail[:70]:<70} "
        f"{progress.get('done', 0)}/{progress.get('total', 0)} "
        f"{progress.get('percent', 0):5.1f}% {_eta(message)}"
    ).rstrip()


def watch_execution(url: str, api_key: str | None, execution_id: str, *, as_json: bool) -> int:
    """Follow an execution to its end; returns the exit code its final status calls for."""
    try:
        steps = _call(url, api_key, "GET", f"/v1/executions/{execution_id}/steps")
        end: dict[str, Any] = {}
        if as_json:
            for message in follow_events(url, api_key, execution_id):
                _print_json(message)
                end = message
        else:
            end = _watch_rendered(url, api_key, execution_id, steps)
        execution = _call(url, api_key, "GET", f"/v1/executions/{execution_id}")
    except ApiError as error:
        _fail(error)
    if not as_json:
        typer.echo(_describe(execution))
    return exit_code_for(str(end.get("status") or execution["status"]))


def _watch_rendered(
    url: str, api_key: str | None, execution_id: str, steps: list[dict[str, Any]]
) -> dict[str, Any]:
    console = Console()
    table = _StepTable(steps)
    bar = Progress(
        TextColumn("[bold]{task.fields[status]}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} steps"),
        TextColumn("{task.fields[eta]}"),
        console=console,
    )
    task = bar.add_task("run", total=max(len(steps), 1), status="waiting", eta="")
    title = Text(f"execution {execution_id}  (live via SSE)", style="bold")
    end: dict[str, Any] = {}

    def view() -> Group:
        return Group(title, bar, table.render())

    if not console.is_terminal:
        # Logs and CI: one line per event, no cursor tricks.
        for message in follow_events(url, api_key, execution_id):
            if message["type"] == "end":
                end = message
                progress = message.get("progress") or {}
                typer.echo(
                    f"end: {message.get('status')} {progress.get('done', 0)}/"
                    f"{progress.get('total', 0)} steps ({progress.get('percent', 0):.0f}%)"
                )
            else:
                typer.echo(_event_line(message))
        return end
    with Live(view(), console=console, refresh_per_second=8, transient=False) as live:
        for message in follow_events(url, api_key, execution_id):
            if message["type"] == "end":
                end = message
            else:
                table.apply(message)
                if message["kind"] == "plan_amended":
                    table.reset(_call(url, api_key, "GET", f"/v1/executions/{execution_id}/steps"))
            progress = message.get("progress") or {}
            bar.update(
                task,
                total=max(progress.get("total", 0), 1),
                completed=progress.get("done", 0),
                status=message.get("status", ""),
                eta=_eta(message),
            )
            live.update(view())
    return end


# --- commands --------------------------------------------------------------------------------


def submit(
    plan_file: Annotated[
        Path, typer.Argument(metavar="PLAN.json", exists=True, dir_okay=False, readable=True)
    ],
    watch: Annotated[bool, typer.Option("--watch", help="Follow it live to the end.")] = False,
    mode: Annotated[
        str | None, typer.Option(help="immediate or background (default: by SLA class).")
    ] = None,
    runbook_url: Annotated[str | None, typer.Option(help="Runbook for reviewers.")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Your key: a repeat returns the same execution.")
    ] = None,
    as_json: JsonOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Submit a plan (native or PlanV1 JSON) and print the execution, or watch it run."""
    try:
        document = json.loads(plan_file.read_text())
    except ValueError as exc:
        typer.echo(f"error: {plan_file} is not JSON: {exc}", err=True)
        raise typer.Exit(code=EXIT_REQUEST_FAILED) from None
    body: dict[str, Any] = {"plan": document}
    if mode:
        body["mode"] = mode
    if runbook_url:
        body["runbook_url"] = runbook_url
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    execution = _call(url, api_key, "POST", "/v1/executions", json=body, headers=headers)
    if watch:
        if not as_json:
            typer.echo(_describe(execution))
        raise typer.Exit(code=watch_execution(url, api_key, execution["id"], as_json=as_json))
    if as_json:
        _print_json(execution)
    else:
        typer.echo(_describe(execution))
    raise typer.Exit(code=exit_code_for(execution["status"]))


def watch(
    execution_id: Annotated[str, typer.Argument(metavar="ID")],
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON event per line, then the end message.")
    ] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Follow an execution live: progress bar, step table, ETA; exit code by its outcome."""
    raise typer.Exit(code=watch_execution(url, api_key, execution_id, as_json=as_json))


def _decision_output(execution: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(execution)
    else:
        typer.echo(_describe(execution))


def approve(
    execution_id: Annotated[str, typer.Argument(metavar="ID")],
    reason: Annotated[str | None, typer.Option(help="Why; kept with the approval.")] = None,
    step: Annotated[
        int | None, typer.Option(help="Approve this gated step (level 3).", min=1)
    ] = None,
    as_json: JsonOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Approve the pending approval of an execution (its plan, or a gated step)."""
    body = {"reason": reason, "step_number": step}
    execution = _call(url, api_key, "POST", f"/v1/executions/{execution_id}/approve", json=body)
    _decision_output(execution, as_json)


def reject(
    execution_id: Annotated[str, typer.Argument(metavar="ID")],
    reason: Annotated[str, typer.Option(help="Why; required, shown to the requester.")],
    step: Annotated[int | None, typer.Option(help="Reject this gated step.", min=1)] = None,
    as_json: JsonOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Reject an execution waiting for approval; it ends as rejected."""
    body = {"reason": reason, "step_number": step}
    execution = _call(url, api_key, "POST", f"/v1/executions/{execution_id}/reject", json=body)
    _decision_output(execution, as_json)


def cancel(
    execution_id: Annotated[str, typer.Argument(metavar="ID")],
    reason: Annotated[str | None, typer.Option(help="Why; recorded.")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Also interrupt the running step.")
    ] = False,
    as_json: JsonOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Cancel an execution; a running one stops at its next step boundary (now with --force)."""
    body = {"reason": reason, "force": force}
    execution = _call(url, api_key, "POST", f"/v1/executions/{execution_id}/cancel", json=body)
    _decision_output(execution, as_json)


def list_executions(
    status: Annotated[
        list[str] | None,
        typer.Option("--status", help=f"Only these (repeatable): {', '.join(STATUSES)}."),
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.", min=1)] = 50,
    as_json: JsonOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """List executions, newest first."""
    for value in status or []:
        if value not in STATUSES:
            raise typer.BadParameter(f"unknown status {value!r}", param_hint="--status")
    params: list[tuple[str, str | int]] = [("limit", min(limit, 200))]
    params += [("status", value) for value in status or []]
    page = _call(url, api_key, "GET", "/v1/executions", params=params)
    if as_json:
        _print_json(page["items"])
        return
    table = Table(header_style="bold")
    for column in ("id", "status", "level", "mode", "steps", "created"):
        table.add_column(column)
    for item in page["items"]:
        steps = item["steps"]
        table.add_row(
            item["id"],
            item["status"],
            str(item["approval_level"]),
            item["execution_mode"],
            f"{steps['succeeded'] + steps['failed']}/{steps['total']}",
            item["created_at"][:19].replace("T", " "),
        )
    Console().print(table)


def show_execution(
    execution_id: Annotated[str, typer.Argument(metavar="ID")],
    as_json: JsonOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """One execution: status, steps, outcome."""
    execution = _call(url, api_key, "GET", f"/v1/executions/{execution_id}")
    _decision_output(execution, as_json)


def register(app: typer.Typer) -> None:
    """Add the client commands to the ``opsexec`` app."""
    for command in (submit, watch, approve, reject, cancel):
        app.command()(command)
    executions_app = typer.Typer(no_args_is_help=True, help="Executions: list and show.")
    executions_app.command("list")(list_executions)
    executions_app.command("show")(show_execution)
    app.add_typer(executions_app, name="executions")
