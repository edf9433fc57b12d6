"""Who may talk to the balancer's HTTP API, and who may change the cluster.

One aiohttp middleware, independent of the routes, so routes added later are covered:

- **Host** (every request): the name in the `Host` header must be one the balancer serves
  under, else 421. A DNS-rebinding page reaches the balancer under the attacker's own name,
  so this keeps such a page from reading or changing anything. IP literals, `localhost`
  (and `*.localhost`), the compose service name `balancer` and the configured names are
  served; a request without a `Host` header (HTTP/1.0 healthchecks; browsers always send
  one) is let through.
- **State-changing methods** (anything but GET, HEAD, OPTIONS): an `Origin` header, when
  present, must be the balancer's own origin (or a configured one), else 403; the body must
  be `Content-Type: application/json`, else 415. Browsers send cross-site form and
  `text/plain` posts without asking first; they never send a cross-site JSON post without
  a CORS preflight, which the balancer does not grant.
- **API token**: when configured it is checked on state-changing requests that present
  one (`Authorization: Bearer <token>`, compared in constant time); when required (the API
  is published beyond loopback) a request without it gets 401.
- **Reads** (`token_for_reads`, off by default): every GET/HEAD/OPTIONS needs the token too,
  except `/healthz` (healthchecks), `/metrics` (Prometheus scrapes it without a token; the
  same numbers are what Prometheus and Grafana serve) and `/static/` (the page's code). A
  browser cannot put a header on an `EventSource` or a page load, so reads also accept the
  session cookie `POST /api/session` sets for a request bearing the token: an HMAC of a fixed
  label under the token (never the token itself), HttpOnly, SameSite=Strict. The cookie is
  never accepted on state-changing requests: those keep needing the header (a browser adds
  cookies to cross-site requests, never headers). Unauthenticated, `/` answers 401 with a
  page that asks for the token and opens the session (`locked_page`), and no data.

Every rejection is a JSON `{"error", "reason"}` answer (the locked page at `/` excepted),
counted in `treewave_api_rejected_total{reason}` and logged at most once a minute per
client address.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import time
import typing
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry, Counter

from treewave.core.api import AccessError, AccessReason, SessionOpened
from treewave.wire.http import LOG_EVERY_S, RejectionLog, json_error
from treewave.wire.secretfile import read_secret

__all__ = [
    "ACCESS_KEY",
    "ALWAYS_ALLOWED_HOSTS",
    "OPEN_READ_PATHS",
    "REASONS",
    "SESSION_COOKIE",
    "SESSION_PATH",
    "AccessSettings",
    "RejectionLog",
    "access_middleware",
    "access_settings",
    "host_allowed",
    "is_loopback",
    "open_session",
    "origin_allowed",
    "read_needs_token",
    "read_refusal",
    "session_cookie_value",
]

log = logging.getLogger("treewave.balancer.access")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ALWAYS_ALLOWED_HOSTS = ("localhost", "balancer")
"""Besides IP literals and `*.localhost`: loopback, and the compose service name
(Prometheus scrapes `balancer:7999`)."""
REASONS: tuple[AccessReason, ...] = typing.get_args(AccessReason)
TOKEN_ENV = "TREEWAVE_API_TOKEN"
TOKEN_FILE_ENV = "TREEWAVE_API_TOKEN_FILE"
SESSION_PATH = "/api/session"
SESSION_COOKIE = "treewave_session"
_SESSION_LABEL = b"treewave status page: read session v1"
OPEN_READ_PATHS = ("/healthz", "/metrics")
"""Reads that stay open with `token_for_reads` (besides `/static/`): healthchecks, and the
Prometheus scrape (its numbers are published by Prometheus and Grafana anyway)."""
_HOST_ENTRY = re.compile(r"^(\*|\.?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?)$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class AccessSettings:
    """The balancer's access rules (see the module docstring)."""

    token: str = ""
    """The API token; empty: none configured."""
    require_token: bool = False
    """State-changing requests without the token are refused (401)."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names served besides IP literals and `ALWAYS_ALLOWED_HOSTS`: exact names,
    `.example.org` for a domain and its subdomains, `*` for any (behind a proxy that
    checks Host itself)."""
    allowed_origins: tuple[str, ...] = ()
    """Origins besides the balancer's own that may send state-changing requests, e.g.
    `https://treewave.example.org` behind a TLS proxy."""
    token_for_reads: bool = False
    """Reads need the token (or the session cookie) too, except `OPEN_READ_PATHS` and
    `/static/`; implies the token on every state-changing request."""

    def __post_init__(self) -> None:
        if (self.require_token or self.token_for_reads) and not self.token:
            raise ValueError("an API token is required but none is configured")
        for entry in self.allowed_hosts:
            if not _HOST_ENTRY.match(entry):
                raise ValueError(
                    f"allowed host {entry!r} is not a host name, '.domain' or '*' "
                    "(no scheme, port or path)"
                )
        for origin in self.allowed_origins:
            if _parse_origin(origin) is None:
                raise ValueError(
                    f"allowed origin {origin!r} is not an origin like https://name[:port]"
                )


# --- the rules (pure) -------------------------------------------------------------------------


def is_loopback(address: str) -> bool:
    """Whether binding or publishing on `address` keeps the API on this machine."""
    address = address.strip().strip("[]").lower()
    if address == "localhost" or address.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str | None:
    """The host name in a `Host` header (lower case, no port, no trailing dot), or None
    when it is not one."""
    text = host_header.strip()
    if not text or any(c in text for c in "/?#@\\ \t"):
        return None
    try:
        parts = urllib.parse.urlsplit("//" + text)
        name = parts.hostname
        _ = parts.port  # a malformed port raises ValueError
    except ValueError:
        return None
    return name.rstrip(".") if name else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(host_header: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a request with this `Host` header (None: no header) is for this balancer."""
    if host_header is None:
        return True
    name = _host_name(host_header)
    if name is None:
        return False
    if _is_ip(name) or name in ALWAYS_ALLOWED_HOSTS or name.endswith(".localhost"):
        return True
    for entry in allowed:
        entry = entry.lower()
        if entry == "*" or entry == name:
            return True
        if entry.startswith(".") and (name == entry[1:] or name.endswith(entry)):
            return True
    return False


def _parse_origin(text: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin like `http://name:port`, or None."""
    try:
        parts = urllib.parse.urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return None
    return parts.scheme, parts.hostname.rstrip("."), port or _DEFAULT_PORTS[parts.scheme]


def origin_allowed(
    origin: str, scheme: str, host_header: str | None, allowed: tuple[str, ...]
) -> bool:
    """Whether `origin` is the balancer's own (the request's scheme and Host) or allowed."""
    got = _parse_origin(origin)
    if got is None:  # "null" (sandboxed frames, file: pages) or garbage
        return False
    if host_header is not None:
        own = _parse_origin(f"{scheme}://{host_header.strip()}")
        if own is not None and own == got:
            return True
    return any(_parse_origin(a) == got for a in allowed)


def _bearer(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _same(a: str, b: str) -> bool:
    """Constant-time comparison (no early exit on the first differing character)."""
    return hmac.compare_digest(a.encode(), b.encode())


def session_cookie_value(token: str) -> str:
    """The session cookie for `token`: an HMAC of a fixed label under it, so the cookie
    proves the token was presented without being it (a leaked cookie opens reads only,
    and rotating the token ends every session)."""
    return hmac.new(token.encode(), _SESSION_LABEL, hashlib.sha256).hexdigest()


def read_needs_token(path: str) -> bool:
    """Whether a read of `path` needs the token when reads are protected."""
    return path not in OPEN_READ_PATHS and not path.startswith("/static/")


def read_refusal(
    settings: AccessSettings, path: str, authorization: str | None, cookie: str | None
) -> AccessReason | None:
    """Why a read (GET/HEAD/OPTIONS) is refused: "token_missing", "token_wrong", or None
    when it may go on. The `Authorization` header, when sent, decides; else the session
    cookie."""
    if not settings.token_for_reads or not read_needs_token(path):
        return None
    presented = _bearer(authorization)
    if presented is not None:
        return None if _same(presented, settings.token) else "token_wrong"
    if cookie is None:
        return "token_missing"
    return None if _same(cookie, session_cookie_value(settings.token)) else "token_wrong"


# --- the middleware ---------------------------------------------------------------------------


def access_middleware(
    settings: AccessSettings,
    registry: CollectorRegistry,
    locked_page: Callable[[web.Request], web.Response] | None = None,
) -> Middleware:
    """The middleware enforcing `settings`; its rejections are counted in `registry`.
    With reads protected, an unauthenticated `GET /` gets `locked_page`'s answer (status
    401): a page that asks for the token, holding no data."""
    rejected = Counter(
        "treewave_api_rejected",
        "API requests refused by the access rules (Host, Origin, Content-Type, token)",
        ["reason"],
        registry=registry,
    )
    for reason in REASONS:
        rejected.labels(reason)
    limiter = RejectionLog()
    token = settings.token
    hint = "send it as 'Authorization: Bearer <token>' (CLI: --token-file or TREEWAVE_API_TOKEN)"
    writes_need_token = settings.require_token or settings.token_for_reads

    def reject(
        request: web.Request,
        status: int,
        reason: AccessReason,
        message: str,
        page: Callable[[web.Request], web.Response] | None = None,
    ) -> web.Response:
        rejected.labels(reason).inc()
        client = request.remote or "unknown"
        if limiter.should_log(client, time.monotonic()):
            log.warning(
                "refused %s %s from %s (%s): %s [further refusals of this client are only "
                "counted for %g s]",
                request.method,
                request.path,
                client,
                reason,
                message,
                LOG_EVERY_S,
            )
        headers = {"WWW-Authenticate": 'Bearer realm="treewave"'} if status == 401 else None
        if page is not None:
            answer = page(request)
            answer.set_status(status)
            answer.headers.update(headers or {})
            return answer
        return web.Response(
            text=AccessError(error=message, reason=reason).model_dump_json(),
            status=status,
            headers=headers,
            content_type="application/json",
        )

    @web.middleware
    async def check_access(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if not host_allowed(host, settings.allowed_hosts):
            return reject(
                request,
                421,
                "host",
                f"Host {host!r} is not a name this balancer serves (DNS-rebinding defence); "
                "use its address, localhost, or a name given with --allowed-hosts / "
                "TREEWAVE_ALLOWED_HOSTS",
            )
        if request.method in SAFE_METHODS:
            refusal = read_refusal(
                settings,
                request.path,
                request.headers.get("Authorization"),
                request.cookies.get(SESSION_COOKIE),
            )
            if refusal is None:
                return await handler(request)
            if refusal == "token_missing":
                message = (
                    "this balancer requires its API token for reads too (--token-for-reads): "
                    + hint
                    + "; in a browser, open the status page (/) and enter it there"
                )
            elif request.headers.get("Authorization") is not None:
                message = "the API token sent is not this balancer's; " + hint
            else:
                message = (
                    "the session cookie is not valid for this balancer's API token (was it "
                    "changed?); open the status page (/) and enter the token again, or " + hint
                )
            page = locked_page if request.path == "/" else None
            return reject(request, 401, refusal, message, page)
        origin = request.headers.get("Origin")
        if origin is not None and not origin_allowed(
            origin, request.scheme, host, settings.allowed_origins
        ):
            return reject(
                request,
                403,
                "origin",
                f"cross-origin request refused: Origin {origin!r} is not this balancer's "
                "own (add trusted origins with --allowed-origins / TREEWAVE_ALLOWED_ORIGINS)",
            )
        if request.content_type != "application/json":
            got = request.headers.get("Content-Type")
            return reject(
                request,
                415,
                "content_type",
                f"{request.method} requests must have Content-Type: application/json "
                f"(got {got!r}); nothing was changed",
            )
        # The session cookie is never looked at here: a browser sends cookies with
        # cross-site requests too, headers only when the page itself adds them.
        presented = _bearer(request.headers.get("Authorization"))
        if presented is None:
            if writes_need_token or (request.path == SESSION_PATH and token):
                return reject(
                    request,
                    401,
                    "token_missing",
                    f"this balancer requires its API token for {request.method} {request.path}: "
                    + hint,
                )
        elif not token or not _same(presented, token):
            return reject(
                request,
                401,
                "token_wrong",
                "the API token sent is not this balancer's"
                + ("" if token else " (it has none configured)")
                + "; "
                + hint,
            )
        return await handler(request)

    return check_access


ACCESS_KEY = web.AppKey("access_settings", AccessSettings)
"""The app's access settings, for `open_session`."""


async def open_session(request: web.Request) -> web.Response:
    """`POST /api/session` with the token in `Authorization` (the middleware has checked
    it: required on this route whenever a token is configured): answers with the session
    cookie, which lets this browser read with `token_for_reads` (page loads, the event
    stream). It lasts until the browser session ends or the token changes."""
    settings: AccessSettings = request.app[ACCESS_KEY]
    if not settings.token:
        raise json_error(
            404,
            "this balancer has no API token configured: its API is open and there is no "
            "session to open",
        )
    raw = (await request.read()).strip()
    try:
        body = json.loads(raw) if raw else {}
    except (UnicodeDecodeError, ValueError):
        body = None
    if body != {}:
        raise json_error(422, f"POST {SESSION_PATH} takes no fields: send {{}} or no body")
    response = web.Response(
        text=SessionOpened(
            session="open", reads_protected=settings.token_for_reads
        ).model_dump_json(),
        headers={"Cache-Control": "no-store"},
        content_type="application/json",
    )
    response.set_cookie(
        SESSION_COOKIE,
        session_cookie_value(settings.token),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure or None,
    )
    return response


# --- configuration ----------------------------------------------------------------------------


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


def access_settings(args: argparse.Namespace, host: str) -> AccessSettings:
    """The access rules from the arguments (flags and variables: `ACCESS_OPTIONS` in
    treewave/cli/settings.py); the token is required when the API is
    published (or bound, without --published-address) anywhere but loopback."""
    if args.api_token_file:
        token = read_secret(Path(args.api_token_file), what="API token")
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        if token and len(token) < 16:
            raise ValueError(f"{TOKEN_ENV} is too short (need 16+ characters)")
    published = args.published_address or host
    beyond_loopback = not is_loopback(published)
    hosts = _split(args.allowed_hosts)
    name = published.strip().strip("[]").lower()
    if beyond_loopback and name and not _is_ip(name) and _HOST_ENTRY.match(name):
        hosts += (name,)  # the published name is one the balancer serves under
    if (args.require_token or beyond_loopback or args.token_for_reads) and not token:
        if args.token_for_reads:
            why = "--token-for-reads is set, so reads and changes"
        elif args.require_token:
            why = "--require-token is set, so state-changing requests"
        else:
            why = (
                f"the API is reachable beyond loopback (published on {published!r}), so "
                "state-changing requests"
            )
        raise ValueError(
            f"{why} need an API token: give --api-token-file FILE (${TOKEN_FILE_ENV}; make "
            f"one with `treewave secret --out FILE`) or ${TOKEN_ENV}"
        )
    return AccessSettings(
        token=token,
        require_token=args.require_token or beyond_loopback,
        allowed_hosts=hosts,
        allowed_origins=_split(args.allowed_origins),
        token_for_reads=args.token_for_reads,
    )
