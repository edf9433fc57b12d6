"""JSON over HTTP for fixtures and benchmarks (standard library only, never through a
proxy from the environment: every service here is on loopback)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp

__all__ = ["fetch_json", "get_json", "get_text", "http_request"]

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _request(
    method: str,
    url: str,
    body: Any,
    token: str = "",
    headers: Mapping[str, str] | None = None,
) -> urllib.request.Request:
    """`body` goes as JSON; bytes go as they are (e.g. a malformed document), still
    labelled JSON. `headers` come last, so they can replace any of these."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    return req


def get_json(
    url: str, method: str = "GET", body: Any = None, timeout: float = 30.0, token: str = ""
) -> Any:
    """The decoded JSON answer, with the API `token` if given; an HTTP error status raises
    `urllib.error.HTTPError`."""
    with _OPENER.open(_request(method, url, body, token), timeout=timeout) as resp:
        return json.loads(resp.read())


def get_text(url: str, timeout: float = 30.0) -> str:
    """The body of a GET as text (e.g. a /metrics page)."""
    with _OPENER.open(_request("GET", url, None), timeout=timeout) as resp:
        return str(resp.read().decode())


def http_request(
    method: str,
    url: str,
    body: Any = None,
    timeout: float = 30,
    token: str = "",
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Any]:
    """(status, decoded JSON body) of one request: `body` sent as JSON (bytes as they
    are), with the API `token` and the `headers` if given. HTTP errors are answers, not
    raised; an answer that is not JSON comes back as text."""
    req = _request(method, url, body, token, headers)
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
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
