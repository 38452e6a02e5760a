"""The FastAPI application and its lifespan (database, bootstrap, shutdown)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from opsexec import __version__
from opsexec.actions.registry import default_registry
from opsexec.api.problems import install_problem_handlers
from opsexec.api.routes import admin, assets, executions, health
from opsexec.config import Settings
from opsexec.engine.bootstrap import Bootstrapped, bootstrap_first_admin, write_admin_key
from opsexec.engine.executor import Executor
from opsexec.observability.logging import install_masking_on_all_handlers
from opsexec.store.database import open_database


def create_app(
    settings: Settings,
    *,
    on_admin_created: Callable[[Bootstrapped, str], None] | None = None,
) -> FastAPI:
    """Build the app; the database opens when the server starts, not at import.

    ``on_admin_created(bootstrapped, key_file)`` is called once, on the very first start,
    so the CLI can show the new admin key; library code never prints it.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.db = await open_database(settings)
        app.state.executor = Executor(app.state.db.pool, default_registry(), settings)
        install_masking_on_all_handlers()
        bootstrapped = await bootstrap_first_admin(app.state.db.pool)
        if bootstrapped is not None:
            key_file = write_admin_key(settings.data_dir, bootstrapped.api_key)
            if on_admin_created is not None:
                on_admin_created(bootstrapped, str(key_file))
        try:
            yield
        finally:
            await app.state.db.close()

    app = FastAPI(
        title="opsexec",
        version=__version__,
        summary="Safe execution of automation plans",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_problem_handlers(app)
    for module in (health, executions, admin, assets):
        app.include_router(module.router)
    return app
