"""HTTP pieces shared by the node and balancer services: every error answered as JSON."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

__all__ = [
    "LOG_EVERY_S",
    "ErrorHook",
    "Handler",
    "RejectionLog",
    "error_text",
    "json_error",
    "json_errors",
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ErrorHook = Callable[[web.Request, web.HTTPException], None]
"""Called with every 4xx/5xx answer, e.g. to count it."""
LOG_EVERY_S = 60.0


class RejectionLog:
    """Log a rejection at most once per `every_s` per client, so a flood of bad requests
    cannot flood the log (the metric still counts every one)."""

    def __init__(self, every_s: float = LOG_EVERY_S, keep: int = 4096) -> None:
        self.every_s = every_s
        self.keep = keep
        self.last: dict[str, float] = {}

    def should_log(self, client: str, now: float) -> bool:
        last = self.last.get(client)
        if last is not None and now - last < self.every_s:
            return False
        if len(self.last) >= self.keep:
            self.last = {c: t for c, t in self.last.items() if now - t < self.every_s}
        self.last[client] = now
        return True


def error_text(message: str) -> str:
    return json.dumps({"error": message})


def json_error(status: int, message: str) -> web.HTTPException:
    """An HTTP error whose body is `{"error": message}`."""
    exc = web.HTTPException(text=error_text(message), content_type="application/json")
    exc.set_status(status)
    return exc


def json_errors(on_error: ErrorHook | None = None) -> Middleware:
    """A middleware answering every HTTP error (unknown route, wrong method, not a
    WebSocket upgrade, a handler's own) as JSON `{"error": ...}` naming the problem;
    `on_error` sees each one first."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 400:
                if on_error is not None:
                    on_error(request, exc)
                if exc.content_type != "application/json":
                    detail = (exc.text or "").strip()
                    if not detail or detail.startswith(f"{exc.status}:"):
                        detail = f"{exc.reason}: {request.method} {request.path}"
                    exc.text = error_text(detail)
                    exc.content_type = "application/json"
            raise

    return middleware
