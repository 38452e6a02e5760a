"""The web console: three static files, no build step, served at ``/``.

The console is plain HTML/CSS/JS talking to the same ``/v1`` API as every other client.
Only the three known files are served (no directory to browse), with a strict Content
Security Policy: scripts and styles come from this origin only, and the page may connect
back to this origin (HTTP and, per CSP 3, its WebSocket) and nowhere else.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from opsexec.errors import NotFoundError

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def console_page() -> FileResponse:
    return FileResponse(
        CONSOLE_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers=SECURITY_HEADERS,
    )


@router.get("/console/{name}")
async def console_asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise NotFoundError(f"no console file named {name}")
    return FileResponse(CONSOLE_DIR / name, media_type=ASSETS[name], headers=SECURITY_HEADERS)
