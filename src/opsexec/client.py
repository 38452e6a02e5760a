"""A small HTTP client for the opsexec API, used by the CLI's client commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from opsexec.engine.bootstrap import ADMIN_KEY_FILE


class ApiError(Exception):
    """A problem response from the server, carrying its stable ``code``."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.code = str(problem.get("code", "http_error"))
        detail = problem.get("detail") or problem.get("title") or "request failed"
        pointer = f" (at {problem['pointer']})" if problem.get("pointer") else ""
        super().__init__(f"{status} {self.code}: {detail}{pointer}")


def resolve_api_key(api_key: str | None, data_dir: Path) -> str | None:
    """An explicit key, else the bootstrap admin key a local ``opsexec serve`` wrote."""
    if api_key:
        return api_key
    key_file = data_dir / ADMIN_KEY_FILE
    return key_file.read_text().strip() if key_file.is_file() else None


class Client:
    def __init__(self, url: str, api_key: str | None, *, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            detail = f"cannot reach {self._http.base_url}: {exc}"
            raise ApiError(0, {"code": "unreachable", "detail": detail}) from None
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"detail": response.text[:200]}
            raise ApiError(response.status_code, problem)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()
