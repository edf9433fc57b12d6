"""The client side of the balancer's topology API, shared by `treewave run` (SIGHUP) and
`treewave apply`.

Contract (the balancer's side):

- `POST /api/topology` with a topology document (the file's format) makes it the desired
  topology and starts (or supersedes) a migration: 200 or 202 when accepted (posting the
  current topology again is accepted and changes nothing); 422
  `{"error": "...", "problems": ["...", ...]}` naming every problem, nothing changed.
- `GET /api/topology`: `{"topology": {...the adopted document...}, "migration":
  {"state": "steady"|"draining", "retiring": {"<server>": {"queued": n, "running": n,
  ...}}, "retired": {"<server>": {"moved": n, "completed": n, "requeued": n}}, ...}}`
  (`Migration.status`). A server is retired (may be stopped, its storage deleted) once it
  is in `retired` and not in `topology`.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from treewave.core.api import TopologyStatus
from treewave.core.messages import describe_errors

__all__ = [
    "TopologyApiError",
    "TopologyRejected",
    "TopologyState",
    "get_topology",
    "post_topology",
]


class TopologyApiError(Exception):
    """The balancer could not be asked, or has no topology API; `missing` tells which."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


class TopologyRejected(TopologyApiError):
    """422: the balancer named the document's problems; nothing changed."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("the balancer rejected the topology:\n" + "\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class TopologyState:
    """What `GET /api/topology` says."""

    servers: frozenset[str]
    state: str
    retiring: dict[str, dict[str, Any]]
    retired: dict[str, dict[str, Any]]

    def is_retired(self, name: str) -> bool:
        return name in self.retired and name not in self.servers

    @classmethod
    def parse(cls, body: Any) -> TopologyState:
        """Read through the API's own model of the answer (`TopologyStatus`)."""
        try:
            status = TopologyStatus.model_validate(body)
        except ValidationError as exc:
            raise TopologyApiError(
                f"unexpected GET /api/topology answer: {describe_errors(exc)}"
            ) from None
        migration = status.migration
        return cls(
            servers=frozenset(s.name for s in status.topology.servers),
            state=migration.state,
            retiring={n: r.model_dump() for n, r in migration.retiring.items()},
            retired={n: r.model_dump() for n, r in migration.retired.items()},
        )


def _opener(url: str) -> urllib.request.OpenerDirector:
    host = urllib.parse.urlsplit(url).hostname or ""
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    return urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if loopback else []))


def _request(
    method: str, url: str, body: Any = None, timeout: float = 30.0, token: str = ""
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with _opener(url).open(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise TopologyApiError(f"cannot reach the balancer at {url}: {reason}") from None
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def _problems(body: Any) -> list[str]:
    if isinstance(body, dict):
        problems = body.get("problems") or body.get("errors")
        if isinstance(problems, list) and problems:
            return [str(p) for p in problems]
        if "error" in body:
            return [str(body["error"])]
    return [str(body)]


def post_topology(
    balancer: str, document: dict[str, Any], timeout: float = 30.0, token: str = ""
) -> Any:
    """Make `document` the balancer's desired topology; its answer when accepted."""
    url = balancer.rstrip("/") + "/api/topology"
    status, body = _request("POST", url, document, timeout, token)
    if status in (200, 202):
        return body
    if status == 422:
        raise TopologyRejected(_problems(body))
    if status in (404, 405):
        raise TopologyApiError(
            f"the balancer at {balancer} has no topology API (POST /api/topology: {status}); "
            "it cannot change a running topology",
            missing=True,
        )
    raise TopologyApiError(f"POST /api/topology: {status}: {'; '.join(_problems(body))}")


def get_topology(balancer: str, timeout: float = 10.0, token: str = "") -> TopologyState:
    url = balancer.rstrip("/") + "/api/topology"
    status, body = _request("GET", url, None, timeout, token)
    if status != 200:
        raise TopologyApiError(
            f"GET /api/topology: {status}: {'; '.join(_problems(body))}", missing=status == 404
        )
    return TopologyState.parse(body)
