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

Every rejection is a JSON `{"error", "reason"}` answer, counted in
`treewave_api_rejected_total{reason}` and logged at most once a minute per client address.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import logging
import os
import re
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry, Counter

from treewave.wire.http import LOG_EVERY_S, RejectionLog
from treewave.wire.secretfile import read_secret

__all__ = [
    "ALWAYS_ALLOWED_HOSTS",
    "REASONS",
    "AccessSettings",
    "RejectionLog",
    "access_middleware",
    "access_settings",
    "host_allowed",
    "is_loopback",
    "origin_allowed",
]

log = logging.getLogger("treewave.balancer.access")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ALWAYS_ALLOWED_HOSTS = ("localhost", "balancer")
"""Besides IP literals and `*.localhost`: loopback, and the compose service name
(Prometheus scrapes `balancer:7999`)."""
REASONS = ("host", "origin", "content_type", "token_missing", "token_wrong")
TOKEN_ENV = "TREEWAVE_API_TOKEN"
TOKEN_FILE_ENV = "TREEWAVE_API_TOKEN_FILE"
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

    def __post_init__(self) -> None:
        if self.require_token and not self.token:
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


# --- the middleware ---------------------------------------------------------------------------


def access_middleware(settings: AccessSettings, registry: CollectorRegistry) -> Middleware:
    """The middleware enforcing `settings`; its rejections are counted in `registry`."""
    rejected = Counter(
        "treewave_api_rejected",
        "API requests refused by the access rules (Host, Origin, Content-Type, token)",
        ["reason"],
        registry=registry,
    )
    for reason in REASONS:
        rejected.labels(reason)
    limiter = RejectionLog()
    token = settings.token.encode()
    hint = "send it as 'Authorization: Bearer <token>' (CLI: --token-file or TREEWAVE_API_TOKEN)"

    def reject(request: web.Request, status: int, reason: str, message: str) -> web.Response:
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
        return web.json_response(
            {"error": message, "reason": reason}, status=status, headers=headers
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
            return await handler(request)
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
        presented = _bearer(request.headers.get("Authorization"))
        if presented is None:
            if settings.require_token:
                return reject(
                    request,
                    401,
                    "token_missing",
                    f"this balancer requires its API token for {request.method} requests: " + hint,
                )
        elif not token or not hmac.compare_digest(presented.encode(), token):
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
    if (args.require_token or beyond_loopback) and not token:
        why = (
            "--require-token is set"
            if args.require_token
            else f"the API is reachable beyond loopback (published on {published!r})"
        )
        raise ValueError(
            f"{why}, so state-changing requests need an API token: give --api-token-file "
            f"FILE (${TOKEN_FILE_ENV}; make one with `treewave secret --out FILE`) or "
            f"${TOKEN_ENV}"
        )
    return AccessSettings(
        token=token,
        require_token=args.require_token or beyond_loopback,
        allowed_hosts=hosts,
        allowed_origins=_split(args.allowed_origins),
    )
