"""Live progress (R-API): WebSocket, SSE and long-poll over real HTTP, across processes.

Every stream is checked against the event log itself: the seqs a client receives must be
exactly the execution's rows, in order — after a cut-and-resume as well — and a client on
one `opsexec serve` must see, within a second of each commit, the events of an execution
that a worker attached to another `serve` runs: through PostgreSQL NOTIFY, through Redis,
and after Redis dies mid-stream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from tests.conftest import ApiServer, TenantFixture, bearer, migrated_database
from tests.live_support import (
    ServeProcess,
    approve,
    chain_plan,
    db_seqs,
    live_api,
    private_redis,
    sse_frames,
    start_serve,
    submit,
    wait_ready,
    wait_status,
)
from tests.support import other_tenant_admin, problem

pytestmark = pytest.mark.postgres

FOUR_STEPS = chain_plan(4, "sleep 0.3; echo step-{n}")
Collected = tuple[list[dict[str, Any]], dict[str, Any] | None]


@pytest.fixture(scope="module")
async def live(
    database_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ApiServer]:
    """An API with a background worker; heartbeats every half second to be observable."""
    async with live_api(
        database_dsn, tmp_path_factory.mktemp("live"), stream_heartbeat_s=0.5
    ) as server:
        yield server


@pytest.fixture
async def client(live: ApiServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
        yield http


def ws_url(base: str, execution_id: str, **query: Any) -> str:
    params = "&".join(f"{k}={v}" for k, v in query.items())
    return f"{base.replace('http://', 'ws://')}/v1/executions/{execution_id}/ws?{params}"


# --- the three transports as a client uses them ------------------------------------------------


async def collect_ws(
    http: httpx.AsyncClient, key: str, execution_id: str, *, after: int = 0, cut: str | None = None
) -> Collected:
    messages: list[dict[str, Any]] = []
    url = ws_url(str(http.base_url), execution_id, after=after)
    async with ws_connect(url, additional_headers=bearer(key)) as socket:
        async for raw in socket:
            message = json.loads(raw)
            if message["type"] == "event":
                messages.append(message)
                if message["kind"] == cut:
                    return messages, None  # leaving the block drops the connection
            elif message["type"] == "end":
                return messages, message
    return messages, None


async def collect_sse(
    http: httpx.AsyncClient, key: str, execution_id: str, *, after: int = 0, cut: str | None = None
) -> Collected:
    headers = bearer(key) | {"Accept": "text/event-stream"}
    if after:
        headers["Last-Event-ID"] = str(after)  # what a reconnecting EventSource sends
    messages: list[dict[str, Any]] = []
    async with http.stream("GET", f"/v1/executions/{execution_id}/events", headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        async for frame in sse_frames(r):
            if frame.event == "end":
                return messages, frame.data
            if frame.event == "message":
                assert frame.id == str(frame.data["seq"])
                messages.append(frame.data)
                if frame.data["kind"] == cut:
                    return messages, None
    return messages, None


async def collect_poll(
    http: httpx.AsyncClient, key: str, execution_id: str, *, after: int = 0, cut: str | None = None
) -> Collected:
    messages: list[dict[str, Any]] = []
    while True:
        response = await http.get(
            f"/v1/executions/{execution_id}/events",
            params={"after": after, "wait": 10},
            headers=bearer(key),
        )
        page = response.json()
        for message in page["events"]:
            messages.append(message)
            if message["kind"] == cut:
                return messages, None  # stop here; resume from this seq
        after = page["next_after"]
        if page["done"]:
            return messages, page


COLLECTORS: dict[str, Callable[..., Awaitable[Collected]]] = {
    "ws": collect_ws,
    "sse": collect_sse,
    "poll": collect_poll,
}


@pytest.mark.parametrize("transport", ["ws", "sse", "poll"])
async def test_transport_delivers_every_event_in_order_and_resumes_without_gap_or_duplicate(
    transport: str, client: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool
) -> None:
    collect = COLLECTORS[transport]
    key = stocked.admin_key
    execution = await submit(client, key, FOUR_STEPS)
    whole = asyncio.create_task(collect(client, key, execution["id"]))
    interrupted = asyncio.create_task(collect(client, key, execution["id"], cut="step_completed"))
    await approve(client, key, execution["id"])  # a worker picks it up from here

    first_part, _ = await asyncio.wait_for(interrupted, 30)
    assert first_part[-1]["kind"] == "step_completed"
    assert first_part[-1]["progress"]["done"] == 1
    resumed, resumed_end = await asyncio.wait_for(
        collect(client, key, execution["id"], after=first_part[-1]["seq"]), 30
    )
    messages, end = await asyncio.wait_for(whole, 30)

    expected = await db_seqs(pool, execution["id"])
    assert [m["seq"] for m in messages] == expected
    assert messages[0]["kind"] == "execution_started"
    assert messages[-1]["kind"] == "execution_completed"
    assert [m["seq"] for m in first_part + resumed] == expected, "a gap or a duplicate"
    assert end is not None
    assert end["status"] == "succeeded"
    assert resumed_end is not None
    assert resumed_end["status"] == "succeeded"

    done = [m["progress"]["done"] for m in messages]
    assert done == sorted(done), "progress never goes backwards"
    assert messages[-1]["progress"] == {
        "done": 4,
        "total": 4,
        "percent": 100.0,
        "succeeded": 4,
        "failed": 0,
    }
    assert messages[-1]["eta_s"] == 0.0
    running = [m for m in messages if m["status"] == "running" and m["kind"] == "step_started"]
    assert running
    assert all(m["eta_s"] is not None and m["eta_s"] >= 0 for m in running)


async def test_long_poll_answers_at_once_when_events_exist_and_after_wait_otherwise(
    client: httpx.AsyncClient, stocked: TenantFixture
) -> None:
    key = stocked.admin_key
    execution = await submit(client, key, chain_plan(1, "true"))  # waits for approval
    url = f"/v1/executions/{execution['id']}/events"

    started = time.monotonic()
    page = (await client.get(url, params={"after": 0, "wait": 10}, headers=bearer(key))).json()
    assert time.monotonic() - started < 5, "events existed: the answer must not wait"
    assert next(e["kind"] for e in page["events"]) == "execution_started"
    assert page["done"] is False
    assert page["status"] == "awaiting_approval"

    started = time.monotonic()
    idle = (
        await client.get(url, params={"after": page["next_after"], "wait": 1}, headers=bearer(key))
    ).json()
    assert time.monotonic() - started >= 0.95, "no events: the answer waits `wait` seconds"
    assert idle["events"] == []
    assert idle["next_after"] == page["next_after"]

    waiting = asyncio.create_task(
        client.get(url, params={"after": page["next_after"], "wait": 20}, headers=bearer(key))
    )
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await approve(client, key, execution["id"])
    woken = (await asyncio.wait_for(waiting, 20)).json()
    assert time.monotonic() - started < 10, "a new event ends the wait"
    assert woken["events"][0]["kind"] == "approval_approved"

    await wait_status(client, key, execution["id"], {"succeeded"})
    last = await client.get(url, params={"after": 0, "limit": 1000}, headers=bearer(key))
    final = last.json()
    assert final["done"] is True
    assert final["events"][-1]["kind"] == "execution_completed"
    started = time.monotonic()
    after_end = await client.get(
        url, params={"after": final["next_after"], "wait": 10}, headers=bearer(key)
    )
    assert time.monotonic() - started < 5, "an ended execution has nothing to wait for"
    assert after_end.json()["events"] == []
    assert after_end.json()["done"] is True


async def test_another_tenants_stream_is_404_and_leaks_no_event(
    client: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool
) -> None:
    execution = await submit(client, stocked.admin_key, chain_plan(1, "true"))
    stranger = await other_tenant_admin(pool)
    url = f"/v1/executions/{execution['id']}/events"

    polled = await client.get(url, params={"after": 0}, headers=bearer(stranger))
    assert "events" not in problem(polled, 404, "not_found")
    streamed = await client.get(url, headers=bearer(stranger) | {"Accept": "text/event-stream"})
    assert "execution_started" not in problem(streamed, 404, "not_found").get("detail", "")
    ticket = await client.post(
        "/v1/stream-tickets", json={"execution_id": execution["id"]}, headers=bearer(stranger)
    )
    problem(ticket, 404, "not_found")
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(
            ws_url(str(client.base_url), execution["id"]), additional_headers=bearer(stranger)
        ):
            pass
    assert refused.value.response.status_code == 404
    assert b"execution_started" not in (refused.value.response.body or b"")

    probes = await pool.fetchval(
        """SELECT count(*) FROM execution_events
           WHERE execution_id = $1 AND event_kind = 'rbac_violation'""",
        uuid.UUID(execution["id"]),
    )
    assert probes >= 4, "every foreign probe is recorded"


def _key_protocol(key: str) -> str:
    return "opsexec.bearer." + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


async def test_browser_auth_never_puts_a_key_in_a_url(
    client: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool
) -> None:
    key = stocked.admin_key
    execution = await submit(client, key, chain_plan(1, "true"))
    other = await submit(client, key, chain_plan(1, "echo other"))

    # WebSocket: the key rides in a subprotocol (a header); the server echoes only opsexec.v1.
    async with ws_connect(
        ws_url(str(client.base_url), execution["id"]),
        subprotocols=["opsexec.v1", _key_protocol(key)],  # type: ignore[list-item]
    ) as socket:
        assert socket.subprotocol == "opsexec.v1"
        assert json.loads(await socket.recv())["kind"] == "execution_started"
    with pytest.raises(InvalidStatus) as bad_key:
        async with ws_connect(
            ws_url(str(client.base_url), execution["id"]),
            subprotocols=["opsexec.v1", _key_protocol("opx_not-a-key")],  # type: ignore[list-item]
        ):
            pass
    assert bad_key.value.response.status_code == 401

    # SSE: a single-use ticket, minted with the key in a header, bound to one execution.
    minted = await client.post(
        "/v1/stream-tickets", json={"execution_id": execution["id"]}, headers=bearer(key)
    )
    assert minted.status_code == 201, minted.text
    ticket = minted.json()
    assert key not in ticket["events_url"]
    assert ticket["ticket"] in ticket["events_url"]
    sse = {"Accept": "text/event-stream"}
    async with client.stream("GET", ticket["events_url"], headers=sse) as response:
        assert response.status_code == 200
        async for frame in sse_frames(response):
            if frame.event == "message":
                assert frame.data["kind"] == "execution_started"
                break
    again = await client.get(ticket["events_url"], headers=sse)
    problem(again, 401, "unauthenticated")

    wrong = (
        await client.post(
            "/v1/stream-tickets", json={"execution_id": execution["id"]}, headers=bearer(key)
        )
    ).json()["ticket"]
    misused = await client.get(
        f"/v1/executions/{other['id']}/events", params={"ticket": wrong}, headers=sse
    )
    problem(misused, 401, "unauthenticated")


async def test_an_event_whose_announcement_is_lost_still_arrives(
    client: httpx.AsyncClient, stocked: TenantFixture, pool: asyncpg.Pool
) -> None:
    """The polling safety net: a row written without NOTIFY is delayed, never lost."""
    key = stocked.admin_key
    execution = await submit(client, key, chain_plan(1, "true"))
    url = f"/v1/executions/{execution['id']}/events"
    page = (await client.get(url, params={"after": 0}, headers=bearer(key))).json()
    waiting = asyncio.create_task(
        client.get(url, params={"after": page["next_after"], "wait": 20}, headers=bearer(key))
    )
    await asyncio.sleep(0.3)  # the long-poll is parked on the feed now
    seq = await pool.fetchval(
        """INSERT INTO execution_events (execution_id, event_kind, payload)
           VALUES ($1, 'step_progress', '{"note": "unannounced"}') RETURNING seq""",
        uuid.UUID(execution["id"]),
    )
    arrived = (await asyncio.wait_for(waiting, 25)).json()
    assert [e["seq"] for e in arrived["events"]] == [seq]
    assert arrived["events"][0]["payload"] == {"note": "unannounced"}


async def test_sse_sends_heartbeats_while_idle_and_204_once_nothing_is_left(
    client: httpx.AsyncClient, stocked: TenantFixture
) -> None:
    key = stocked.admin_key
    execution = await submit(client, key, chain_plan(1, "true"))
    headers = bearer(key) | {"Accept": "text/event-stream"}
    url = f"/v1/executions/{execution['id']}/events"
    async with client.stream("GET", url, headers=headers) as response:
        frames = sse_frames(response)
        seen_event = False
        async for frame in frames:
            seen_event = seen_event or frame.event == "message"
            if frame.comment and seen_event:
                break  # an idle stream (waiting for approval) still hears from the server

    await approve(client, key, execution["id"])
    await wait_status(client, key, execution["id"], {"succeeded"})
    messages, end = await collect_sse(client, key, execution["id"])
    assert end is not None
    assert end["status"] == "succeeded"
    finished = await client.get(url, headers=headers | {"Last-Event-ID": str(messages[-1]["seq"])})
    assert finished.status_code == 204, "EventSource must not reconnect to an ended stream"


# --- two `opsexec serve` processes -------------------------------------------------------------


@pytest.fixture(scope="module")
async def cluster_dsn(server_dsn: str) -> AsyncIterator[str]:
    """A database of its own: no in-process worker of this suite may take these jobs."""
    async with migrated_database(server_dsn, "opsexec_cluster") as dsn:
        yield dsn


async def cluster_tenant(dsn: str) -> str:
    """An admin key of a new tenant in the cluster database."""
    from opsexec.store import connect
    from opsexec.store.identity import create_api_key, ensure_tenant, ensure_user

    connection = await connect(dsn)
    try:
        async with connection.transaction():
            tenant_id = await ensure_tenant(connection, f"c-{uuid.uuid4().hex[:8]}")
            user_id = await ensure_user(connection, tenant_id, "admin@cluster", ["admin"])
            _, key = await create_api_key(connection, tenant_id, user_id, "test")
    finally:
        await connection.close()
    return key


async def start_pair(dsn: str, tmp: Path, **env: str) -> tuple[ServeProcess, ServeProcess]:
    """A `serve` that runs jobs, then a `serve` without a worker that clients talk to.

    The runner starts first so that, with Redis, it is the relay and the front end hears
    announcements only through Redis. Polling is pushed out to 30 s so only announcements
    can deliver an event within the second the test allows.
    """
    env = {"OPSEXEC_EVENT_POLL_INTERVAL_S": "30", **env}
    runner = start_serve(dsn, tmp / "runner", tmp / "runner.log", worker_concurrency=2, **env)
    try:
        await wait_ready(runner)
        front = start_serve(dsn, tmp / "front", tmp / "front.log", worker_concurrency=0, **env)
        try:
            await wait_ready(front)
        except BaseException:
            front.stop()
            raise
    except BaseException:
        runner.stop()
        raise
    return runner, front


async def announcements_via(front: ServeProcess, key: str, execution_id: str) -> str:
    async with httpx.AsyncClient(base_url=front.url, timeout=10) as http:
        response = await http.get(
            f"/v1/executions/{execution_id}/events", params={"after": 0}, headers=bearer(key)
        )
    return response.headers["x-opsexec-announcements"]


async def until_announcements(
    front: ServeProcess, key: str, execution_id: str, wanted: str, timeout: float = 15
) -> None:
    deadline = time.monotonic() + timeout
    while (seen := await announcements_via(front, key, execution_id)) != wanted:
        if time.monotonic() > deadline:
            raise AssertionError(f"front end hears announcements via {seen}, not {wanted}")
        await asyncio.sleep(0.2)


async def watch_across(
    front: ServeProcess,
    key: str,
    execution_id: str,
    start: Callable[[], Awaitable[None]],
    on_event: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
) -> list[tuple[dict[str, Any], float]]:
    """SSE on the front end; returns each event with its delay from commit to receipt."""
    received: list[tuple[dict[str, Any], float]] = []
    headers = bearer(key) | {"Accept": "text/event-stream"}
    async with httpx.AsyncClient(base_url=front.url, timeout=30) as http:
        url = f"/v1/executions/{execution_id}/events"
        async with http.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200
            opened = datetime.now(UTC)
            await start()
            async for frame in sse_frames(response):
                if frame.event == "end":
                    break
                if frame.event != "message":
                    continue
                at = datetime.fromisoformat(frame.data["at"].replace("Z", "+00:00"))
                delay = (datetime.now(UTC) - at).total_seconds() if at >= opened else 0.0
                received.append((frame.data, delay))
                if on_event is not None:
                    await on_event(frame.data)
    return received


async def run_across(
    front: ServeProcess,
    key: str,
    pool_dsn: str,
    plan: dict[str, Any],
    on_event: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    before: Callable[[str], Awaitable[None]] | None = None,
) -> tuple[str, list[tuple[dict[str, Any], float]]]:
    async with httpx.AsyncClient(base_url=front.url, timeout=30) as http:
        assets = await http.post(
            "/v1/assets",
            json=[{"name": "local-01", "address": "127.0.0.1", "transport": "local"}],
            headers=bearer(key),
        )
        assert assets.status_code in (200, 201), assets.text
        execution = await submit(http, key, plan)
        if before is not None:
            await before(execution["id"])

        async def go() -> None:
            await approve(http, key, execution["id"])

        received = await asyncio.wait_for(
            watch_across(front, key, execution["id"], go, on_event), 60
        )
    connection = await asyncpg.connect(pool_dsn)
    try:
        rows = await connection.fetch(
            "SELECT seq FROM execution_events WHERE execution_id = $1 ORDER BY seq",
            uuid.UUID(execution["id"]),
        )
    finally:
        await connection.close()
    assert [m["seq"] for m, _ in received] == [r["seq"] for r in rows]
    assert received[-1][0]["kind"] == "execution_completed"
    return execution["id"], received


def assert_within_a_second(received: list[tuple[dict[str, Any], float]]) -> None:
    slow = [(m["seq"], m["kind"], round(d, 3)) for m, d in received if d >= 1.0]
    assert not slow, f"events seen later than a second after their commit: {slow}"


async def test_a_client_on_one_server_sees_another_servers_worker_without_redis(
    cluster_dsn: str, tmp_path: Path
) -> None:
    key = await cluster_tenant(cluster_dsn)
    runner, front = await start_pair(cluster_dsn, tmp_path, OPSEXEC_REDIS_URL="")
    try:

        async def via_notify(execution_id: str) -> None:
            assert await announcements_via(front, key, execution_id) == "notify"

        _, received = await run_across(front, key, cluster_dsn, FOUR_STEPS, before=via_notify)
        assert_within_a_second(received)
    finally:
        front.stop()
        runner.stop()


async def test_a_client_on_one_server_sees_another_servers_worker_through_redis(
    cluster_dsn: str, tmp_path: Path
) -> None:
    from redis.asyncio import Redis

    key = await cluster_tenant(cluster_dsn)
    with private_redis(tmp_path) as redis_server:
        runner, front = await start_pair(cluster_dsn, tmp_path, OPSEXEC_REDIS_URL=redis_server.url)
        relayed: list[str] = []
        spy = Redis.from_url(redis_server.url, decode_responses=True)
        pubsub = spy.pubsub()
        await pubsub.subscribe("opsexec:events")

        async def listen() -> None:
            async for message in pubsub.listen():
                if message["type"] == "message":
                    relayed.extend(message["data"].splitlines())

        spying = asyncio.create_task(listen())
        try:

            async def via_redis(execution_id: str) -> None:
                await until_announcements(front, key, execution_id, "redis")

            execution_id, received = await run_across(
                front, key, cluster_dsn, FOUR_STEPS, before=via_redis
            )
            assert_within_a_second(received)
            assert any(line.startswith(execution_id) for line in relayed), "not via Redis"
            assert await announcements_via(front, key, execution_id) == "redis"
        finally:
            spying.cancel()
            await asyncio.gather(spying, return_exceptions=True)
            await pubsub.aclose()
            await spy.aclose()
            front.stop()
            runner.stop()


async def test_streams_keep_up_after_redis_is_killed_mid_stream(
    cluster_dsn: str, tmp_path: Path
) -> None:
    key = await cluster_tenant(cluster_dsn)
    with private_redis(tmp_path) as redis_server:
        runner, front = await start_pair(cluster_dsn, tmp_path, OPSEXEC_REDIS_URL=redis_server.url)
        try:

            async def via_redis(execution_id: str) -> None:
                await until_announcements(front, key, execution_id, "redis")

            async def kill_redis_after_first_step(message: dict[str, Any]) -> None:
                if message["kind"] == "step_completed" and message["progress"]["done"] == 1:
                    redis_server.kill()

            execution_id, received = await run_across(
                front,
                key,
                cluster_dsn,
                chain_plan(6, "sleep 0.3; echo step-{n}"),
                on_event=kill_redis_after_first_step,
                before=via_redis,
            )
            assert redis_server.process.poll() is not None, "Redis was killed mid-stream"
            assert_within_a_second(received)
            assert await announcements_via(front, key, execution_id) == "notify"

            redis_server.restart()  # and once Redis is back, the front end returns to it
            await until_announcements(front, key, execution_id, "redis", timeout=30)
        finally:
            front.stop()
            runner.stop()
