"""JSON over HTTP for fixtures and benchmarks (standard library only, never through a
proxy from the environment: every service here is on loopback)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp

__all__ = ["fetch_json", "get_json", "get_text", "http_request"]

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _request(method: str, url: str, body: Any, token: str = "") -> urllib.request.Request:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    return req


def get_json(url: str, method: str = "GET", body: Any = None, timeout: float = 30.0) -> Any:
    """The decoded JSON answer; an HTTP error status raises `urllib.error.HTTPError`."""
    with _OPENER.open(_request(method, url, body), timeout=timeout) as resp:
        return json.loads(resp.read())


def get_text(url: str, timeout: float = 30.0) -> str:
    """The body of a GET as text (e.g. a /metrics page)."""
    with _OPENER.open(_request("GET", url, None), timeout=timeout) as resp:
        return str(resp.read().decode())


def http_request(
    method: str, url: str, body: Any = None, timeout: float = 30, token: str = ""
) -> tuple[int, Any]:
    """(status, decoded JSON body) of one request, with the API `token` if given; HTTP
    errors are answers, not raised."""
    try:
        with _OPENER.open(_request(method, url, body, token), timeout=timeout) as resp:
            raw = resp.read()
            status: int = resp.status
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        status = exc.code
    try:
        return status, json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return status, raw.decode(errors="replace")


async def fetch_json(http: aiohttp.ClientSession, url: str) -> Any:
    """GET with the test's aiohttp session: the JSON of a 200 answer (else the test fails
    with the body)."""
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()
