"""The FastAPI application and its lifespan (database, bootstrap, shutdown)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from opsexec import __version__
from opsexec.api.middleware import ObservabilityMiddleware
from opsexec.api.problems import install_problem_handlers
from opsexec.api.routes import (
    admin,
    assets,
    console,
    credentials,
    dlq,
    executions,
    health,
    operations,
    progress,
)
from opsexec.api.routes import metrics as metrics_routes
from opsexec.config import Settings
from opsexec.engine.bootstrap import Bootstrapped, bootstrap_first_admin, write_admin_key
from opsexec.engine.services import open_services
from opsexec.observability.heartbeat import stale_after_s
from opsexec.observability.logging import install_masking_on_all_handlers
from opsexec.observability.metrics import DatabaseGauges, new_registry
from opsexec.progress.bus import EventBus
from opsexec.progress.tickets import StreamTickets
from opsexec.queue.signals import WorkerSignals
from opsexec.queue.worker import Worker, WorkerOptions
from opsexec.store.channels import CANCEL_CHANNEL


def create_app(
    settings: Settings,
    *,
    on_admin_created: Callable[[Bootstrapped, str], None] | None = None,
    worker_concurrency: int = 0,
    retry_backoff_s: float = 1.0,
) -> FastAPI:
    """Build the app; the database opens when the server starts, not at import.

    ``on_admin_created(bootstrapped, key_file)`` is called once, on the very first start,
    so the CLI can show the new admin key; library code never prints it. With
    ``worker_concurrency`` > 0 the process also runs a background worker.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await open_services(settings, retry_backoff_s=retry_backoff_s)
        app.state.services = services
        app.state.db = services.db
        app.state.secret_master_key = services.master_key
        app.state.secret_backend = services.secrets
        app.state.engine = services.engine
        app.state.executor = services.executor
        install_masking_on_all_handlers()
        bootstrapped = await bootstrap_first_admin(app.state.db.pool)
        if bootstrapped is not None:
            key_file = write_admin_key(settings.data_dir, bootstrapped.api_key)
            if on_admin_created is not None:
                on_admin_created(bootstrapped, str(key_file))
        bus = EventBus(
            services.db.pool,
            services.db.dsn,
            redis_url=settings.redis_url,
            poll_interval_s=settings.event_poll_interval_s,
        )
        await bus.start()
        app.state.bus = bus
        app.state.stream_tickets = StreamTickets()
        worker = None
        if worker_concurrency > 0:
            worker = Worker(
                services.db.pool,
                services.db.dsn,
                services.engine,
                WorkerOptions.from_settings(settings, concurrency=worker_concurrency),
            )
            worker_task = asyncio.create_task(worker.run())
            cancel_signals = None
        else:
            # Immediate runs happen in this process; a forced cancel may arrive at another
            # API process and must reach them (an in-process worker already listens).
            cancel_signals = WorkerSignals(
                services.db.dsn,
                {CANCEL_CHANNEL: services.engine.on_cancel_signal},
                redis_url=settings.redis_url,
            )
            await cancel_signals.start()
        app.state.worker = worker
        try:
            yield
        finally:
            if worker is not None:
                worker.stop()
                await worker_task
            if cancel_signals is not None:
                await cancel_signals.stop()
            await bus.stop()
            await services.close()

    app = FastAPI(
        title="opsexec",
        version=__version__,
        summary="Safe execution of automation plans",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_problem_handlers(app)
    # Request ids and latency for every route; one metrics registry per app.
    app.add_middleware(ObservabilityMiddleware)
    app.state.metrics_gauges = DatabaseGauges(
        fresh_within_s=stale_after_s(settings.worker_heartbeat_s),
        kill_switch_env=settings.kill_switch,
    )
    app.state.metrics_registry = new_registry(app.state.metrics_gauges)
    for extra in (metrics_routes, operations):
        app.include_router(extra.router)
    for module in (health, executions, admin, assets, credentials, dlq, progress, console):
        app.include_router(module.router)
    return app
