"""Pure parts of live progress: announcements, progress and ETA, tickets, SSE framing."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from opsexec.cli_client import exit_code_for, sse_frames
from opsexec.engine.actor import Actor
from opsexec.progress.bus import StoredEvent, parse_announcements
from opsexec.progress.streams import Progress, sse_frame
from opsexec.progress.tickets import StreamTickets
from opsexec.tenancy import TenantSettings

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def event(kind: str, seconds: float = 0, **payload: Any) -> StoredEvent:
    return StoredEvent(
        seq=1,
        execution_id=uuid.uuid4(),
        step_id=None,
        kind=kind,
        timestamp=T0 + timedelta(seconds=seconds),
        payload=payload,
    )


def test_announcements_parse_single_and_batched_and_skip_junk() -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    assert parse_announcements(f"{first}:7") == [(first, 7)]
    batch = f"{first}:8\nhb\n{second}:9\nnot-a-uuid:1\n{second}:x"
    assert parse_announcements(batch) == [(first, 8), (second, 9)]


def test_eta_is_the_estimate_before_the_run_then_the_observed_pace() -> None:
    progress = Progress(total=4, estimated_s=8.0)
    assert progress.view(T0) == (
        {"done": 0, "total": 4, "percent": 0.0, "succeeded": 0, "failed": 0},
        8.0,
    )
    progress.apply(event("status_transition", to="running"))
    progress.apply(event("execution_running", 0))
    assert progress.view(T0 + timedelta(seconds=3))[1] == 5.0  # estimate minus elapsed
    progress.apply(event("step_completed", 4, step_number=1))
    view, eta = progress.view(T0 + timedelta(seconds=4))
    assert view["done"] == 1
    assert view["percent"] == 25.0
    assert eta == 12.0  # 4 s per step observed, 3 steps left
    progress.apply(event("step_failed", 5, step_number=2))
    progress.apply(event("step_completed", 6, step_number=2))  # a retry that succeeded
    view, _ = progress.view(T0 + timedelta(seconds=6))
    assert (view["done"], view["succeeded"], view["failed"]) == (2, 2, 0)
    progress.apply(event("status_transition", to="failed"))
    assert progress.view(T0 + timedelta(seconds=7))[1] == 0.0


def test_an_amended_plan_forgets_finished_steps() -> None:
    progress = Progress(total=2, estimated_s=None)
    progress.apply(event("step_completed", step_number=1))
    progress.apply(event("plan_amended"))
    assert progress.view(T0)[0]["done"] == 0
    assert progress.view(T0)[1] is None


def _actor() -> Actor:
    return Actor(
        tenant_id=uuid.uuid4(),
        tenant_name="t",
        tenant_settings=TenantSettings(),
        user_id=uuid.uuid4(),
        principal="someone",
        roles=("viewer",),
        auth_method="api_key",
    )


def test_tickets_are_single_use_bound_to_one_execution_and_expire() -> None:
    tickets = StreamTickets(ttl_s=60)
    actor, execution, other = _actor(), uuid.uuid4(), uuid.uuid4()
    ticket = tickets.issue(actor, execution)
    assert tickets.redeem(ticket, execution) == actor
    assert tickets.redeem(ticket, execution) is None, "single use"
    misused = tickets.issue(actor, execution)
    assert tickets.redeem(misused, other) is None
    assert tickets.redeem(misused, execution) is None, "a misuse spends it"
    expired = StreamTickets(ttl_s=-1).issue(actor, execution)
    assert StreamTickets(ttl_s=-1).redeem(expired, execution) is None
    bounded = StreamTickets(capacity=2)
    oldest = bounded.issue(actor, execution)
    bounded.issue(actor, execution)
    bounded.issue(actor, execution)
    assert bounded.redeem(oldest, execution) is None, "the oldest is forgotten first"


def test_sse_frames_round_trip_and_skip_comments() -> None:
    message = {"seq": 42, "kind": "step_started", "payload": {"note": "a\nb"}}
    text = "retry: 2000\n\n: heartbeat\n\n" + sse_frame(message) + 'event: end\ndata: {"x":1}\n\n'
    frames = list(sse_frames(iter(text.split("\n"))))
    assert [(f.event, f.id) for f in frames] == [("message", "42"), ("end", None)]
    assert frames[0].data == ['{"seq":42,"kind":"step_started","payload":{"note":"a\\nb"}}']


def test_exit_codes_tell_scripts_how_it_ended() -> None:
    assert exit_code_for("succeeded") == 0
    assert exit_code_for("failed") == 2
    assert exit_code_for("cancelled") == 3
    assert exit_code_for("rejected") == 3
    assert exit_code_for("awaiting_approval") == 0
