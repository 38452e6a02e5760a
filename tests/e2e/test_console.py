"""The web console in a real browser: Debian's Chromium driven by Playwright.

The console must sign in, list executions, follow a running one live and say which
transport carries it — WebSocket, or SSE when the page has no WebSocket, or long-poll when
it has neither (the test deletes them before any page script runs) — and let a person
approve a waiting execution and cancel a running one. Screenshots land in test-output/.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
import pytest

from tests.conftest import ApiServer, TenantFixture, bearer
from tests.live_support import approve, chain_plan, db_seqs, live_api, submit, wait_status
from tests.services import missing_service

pytestmark = [pytest.mark.postgres, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NO_WEBSOCKET = "delete window.WebSocket;"
NO_EVENTSOURCE = "delete window.EventSource;"
DEADLINE_MS = 20_000

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        missing_service(f"{CHROMIUM} is not installed")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture(scope="module")
async def live(
    database_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ApiServer]:
    async with live_api(database_dsn, tmp_path_factory.mktemp("console")) as server:
        yield server


@pytest.fixture
async def client(live: ApiServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
        yield http


OpenPage = Callable[..., Awaitable["Page"]]


@pytest.fixture
async def open_page(browser: Browser, live: ApiServer) -> AsyncIterator[OpenPage]:
    """A fresh browser context per call (its own session storage); page errors fail the test."""
    contexts = []
    errors: list[str] = []

    async def make(*init_scripts: str) -> Page:
        context = await browser.new_context(
            base_url=live.url, viewport={"width": 1280, "height": 900}
        )
        contexts.append(context)
        for script in init_scripts:
            await context.add_init_script(script=script)
        page = await context.new_page()
        page.set_default_timeout(DEADLINE_MS)
        page.on("pageerror", lambda error: errors.append(str(error)))
        return page

    yield make
    for context in contexts:
        await context.close()
    assert not errors, f"JavaScript errors in the console: {errors}"


async def sign_in(page: Page, key: str) -> None:
    await page.goto("/")
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Sign in").click()
    await page.get_by_role("heading", name="Executions").wait_for()


async def timeline_seqs(page: Page) -> list[int]:
    values = await page.locator("#timeline li").evaluate_all(
        "items => items.map(item => Number(item.dataset.seq))"
    )
    return [int(v) for v in values]


async def follow_run(
    page: Page,
    client: httpx.AsyncClient,
    tenant: TenantFixture,
    pool: asyncpg.Pool,
    transport: str,
    output_dir: Path,
) -> dict[str, Any]:
    """Open a waiting execution, start it, and check the page follows it to the end."""
    execution = await submit(client, tenant.admin_key, chain_plan(4, "sleep 0.4; echo step-{n}"))
    await page.goto(f"/#/executions/{execution['id']}")
    await page.locator(f'#transport[data-transport="{transport}"]').wait_for()
    await page.locator('#timeline li[data-kind="execution_started"]').wait_for()
    await approve(client, tenant.admin_key, execution["id"])
    await page.locator('#timeline li[data-kind="step_completed"]').first.wait_for()
    await page.screenshot(path=output_dir / f"console-live-{transport}-running.png", full_page=True)
    await page.locator('#timeline li[data-kind="execution_completed"]').wait_for()
    await page.locator('#detail-status[data-status="succeeded"]').wait_for()
    await page.screenshot(path=output_dir / f"console-live-{transport}-done.png", full_page=True)
    assert await timeline_seqs(page) == await db_seqs(pool, execution["id"])
    assert await page.locator("#progress").evaluate("bar => bar.value") == 100
    assert "4 of 4 steps" in await page.locator("#progress-label").inner_text()
    return execution


async def test_console_signs_in_lists_and_follows_a_run_over_websocket(
    open_page: OpenPage,
    client: httpx.AsyncClient,
    stocked: TenantFixture,
    pool: asyncpg.Pool,
    output_dir: Path,
) -> None:
    listed = await submit(client, stocked.admin_key, chain_plan(1, "echo listed"))
    page = await open_page()
    await page.goto("/")
    await page.get_by_label("API key").fill("opx_wrong")
    await page.get_by_role("button", name="Sign in").click()
    await page.get_by_text("That API key was not accepted.").wait_for()
    await sign_in(page, stocked.admin_key)
    row = page.locator(f'#executions-table tr[data-execution-id="{listed["id"]}"]')
    await row.wait_for()
    assert "awaiting approval" in await row.inner_text()
    await page.get_by_label("Status").select_option("succeeded")
    await row.wait_for(state="detached")
    await page.get_by_label("Status").select_option("awaiting_approval")
    await row.wait_for()
    await page.screenshot(path=output_dir / "console-executions.png", full_page=True)
    assert stocked.admin_key not in page.url
    await follow_run(page, client, stocked, pool, "ws", output_dir)
    assert await page.locator("#transport").inner_text() == "WebSocket"


async def test_console_falls_back_to_sse_without_websocket(
    open_page: OpenPage,
    client: httpx.AsyncClient,
    stocked: TenantFixture,
    pool: asyncpg.Pool,
    output_dir: Path,
) -> None:
    page = await open_page(NO_WEBSOCKET)
    await sign_in(page, stocked.admin_key)
    await follow_run(page, client, stocked, pool, "sse", output_dir)
    assert await page.locator("#transport").inner_text() == "Server-Sent Events"


async def test_console_falls_back_to_polling_without_websocket_and_eventsource(
    open_page: OpenPage,
    client: httpx.AsyncClient,
    stocked: TenantFixture,
    pool: asyncpg.Pool,
    output_dir: Path,
) -> None:
    page = await open_page(NO_WEBSOCKET, NO_EVENTSOURCE)
    await sign_in(page, stocked.admin_key)
    await follow_run(page, client, stocked, pool, "poll", output_dir)
    assert await page.locator("#transport").inner_text() == "long-poll"


async def test_console_approval_shows_the_plan_change_and_moves_the_execution_on(
    open_page: OpenPage,
    client: httpx.AsyncClient,
    stocked: TenantFixture,
    output_dir: Path,
) -> None:
    key = stocked.admin_key
    runbook = f"https://runbooks.example.com/{uuid.uuid4().hex[:6]}"
    execution = await submit(client, key, chain_plan(1, "echo original"), runbook_url=runbook)
    page = await open_page()
    await sign_in(page, key)
    await page.goto(f"/#/executions/{execution['id']}")  # this tab now knows the original
    await page.get_by_role("heading", name="Approval needed").wait_for()
    await page.get_by_text("No changes since the original submission").wait_for()

    amended = await client.put(
        f"/v1/executions/{execution['id']}/plan",
        json={"plan": chain_plan(2, "echo amended-{n}"), "runbook_url": runbook},
        headers=bearer(key),
    )
    assert amended.status_code == 200, amended.text
    await page.goto("/#/approvals")
    card = page.locator(f'article[data-execution-id="{execution["id"]}"]')
    await card.wait_for()
    await card.get_by_text("The plan was amended 1 time(s)").wait_for()
    diff = card.locator("pre.diff")
    added = " ".join(await diff.locator(".added").all_inner_texts())
    removed = " ".join(await diff.locator(".removed").all_inner_texts())
    assert "echo amended-2" in added
    assert "echo original" in removed
    assert await card.get_by_role("link", name=runbook).get_attribute("href") == runbook
    await page.screenshot(path=output_dir / "console-approval-diff.png", full_page=True)

    await card.get_by_label("Reason (required to reject)").fill("checked the diff")
    await card.get_by_role("button", name="Approve").click()
    await page.get_by_text(f"Execution {execution['id'][:8]} approved;").wait_for()
    finished = await wait_status(client, key, execution["id"], {"succeeded", "failed"})
    assert finished["status"] == "succeeded"
    approvals = (await detail(client, key, execution["id"]))["approvals"]
    assert any(a["state"] == "approved" and a["reason"] == "checked the diff" for a in approvals)


async def detail(client: httpx.AsyncClient, key: str, execution_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/executions/{execution_id}", headers=bearer(key))
    body: dict[str, Any] = response.json()
    return body


async def test_console_cancel_stops_a_running_execution(
    open_page: OpenPage,
    client: httpx.AsyncClient,
    stocked: TenantFixture,
    output_dir: Path,
) -> None:
    key = stocked.admin_key
    execution = await submit(client, key, chain_plan(5, "sleep 1; echo slow-{n}"))
    page = await open_page()
    await sign_in(page, key)
    await page.goto(f"/#/executions/{execution['id']}")
    await page.locator('#timeline li[data-kind="execution_started"]').wait_for()
    await approve(client, key, execution["id"])
    await page.locator('#timeline li[data-kind="step_started"]').first.wait_for()

    await page.get_by_label("Reason", exact=True).fill("wrong maintenance window")
    await page.get_by_role("button", name="Cancel execution").click()
    await page.locator('#timeline li[data-kind="cancellation_requested"]').wait_for()
    await page.locator('#timeline li[data-kind="execution_cancelled"]').wait_for()
    await page.locator('#detail-status[data-status="cancelled"]').wait_for()
    await page.screenshot(path=output_dir / "console-cancelled.png", full_page=True)

    final = await detail(client, key, execution["id"])
    assert final["status"] == "cancelled"
    assert final["cancellation_reason"] == "wrong maintenance window"
    assert final["steps"]["succeeded"] < 5, "later steps never ran"
