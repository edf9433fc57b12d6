"""The balancer's OpenAPI 3.1 document, generated at start from the route table below and
the same pydantic models the handlers use (`treewave.core.api`); served at
`GET /api/openapi.json`, with the reference page at `/api/docs`.

A small table and `TypeAdapter.json_schema` rather than a framework plugin: the handlers
stay plain aiohttp handlers (the access middleware, the SSE stream and the topology
document's own validation do not fit a plugin's request parsing), and the only thing to
keep true is that every route has an operation here, which a test checks against the
router in both directions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel, TypeAdapter

from treewave.core.api import (
    AccessError,
    AdoptResult,
    ApiError,
    ClusterStatus,
    EmptyRequest,
    FinnRequest,
    FinnResult,
    Health,
    LiveWave,
    PageSnapshot,
    RebalanceResult,
    SessionOpened,
    SubmitRequest,
    SubmitResult,
    SubmitUnconfirmedError,
    TopologyRefused,
    TopologyStatus,
    TraceList,
    TreeSnapshot,
    WaveTrace,
)
from treewave.core.topology import TopologyFile
from treewave.core.trace import SHIVIZ_DEFAULT_PARSER, SHIVIZ_DELIMITER

__all__ = [
    "DOCS_PATH",
    "OPENAPI_PATH",
    "OPERATIONS",
    "Operation",
    "Reply",
    "openapi_document",
    "setup_openapi",
]

OPENAPI_PATH = "/api/openapi.json"
DOCS_PATH = "/api/docs"
SWAGGER_UI = Path(__file__).resolve().parent / "static" / "swagger-ui"
"""The vendored viewer (its version and licence in the README beside it)."""
REF = "#/components/schemas/{model}"
BY_ALIAS: frozenset[type[BaseModel]] = frozenset({WaveTrace})
"""Models whose JSON names are aliases (a trace entry's `from`, a Python keyword). The
others are written under their field names: the topology settings' aliases are the lab's
names, accepted on input but never written."""
JSON = "application/json"


@dataclass(frozen=True)
class Reply:
    """One documented answer of an operation."""

    status: int
    description: str
    model: type[BaseModel] | None = None
    media: str = JSON
    text_example: str | None = None
    """For a non-JSON answer: what it looks like."""


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    tag: str
    replies: tuple[Reply, ...]
    body: type[BaseModel] | None = None
    description: str = ""
    access: str = "read"
    """"read" (token or session cookie when reads are protected), "write" (token when
    required), "open" (never a token) or "session"."""
    parameters: tuple[Mapping[str, Any], ...] = ()
    links: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Links of the 200 answer (OpenAPI `links`: a value of this answer into another
    operation's parameter)."""


HOST = Reply(421, "The `Host` header names a host this balancer does not serve.", AccessError)
READ_TOKEN = Reply(
    401,
    "Reads need the API token (`--token-for-reads`) and none (or a wrong one) was sent.",
    AccessError,
)
WRITE_ERRORS = (
    Reply(400, "The body is not JSON.", ApiError),
    Reply(401, "The API token is required and missing, or wrong.", AccessError),
    Reply(403, "The `Origin` is not the balancer's own (nor an allowed one).", AccessError),
    Reply(413, "The body is larger than 64 KiB.", ApiError),
    Reply(415, "The body's `Content-Type` is not `application/json`.", AccessError),
    HOST,
    Reply(422, "The body is JSON but not a valid request; nothing changed.", ApiError),
)
READ_ERRORS = (READ_TOKEN, HOST)


FORMAT = {
    "name": "format",
    "in": "query",
    "required": False,
    "schema": {"type": "string", "enum": ["json", "shiviz"], "default": "json"},
    "description": "`shiviz`: a text file for ShiViz's 'Choose file' upload.",
}
SHIVIZ_EXAMPLE = (
    SHIVIZ_DEFAULT_PARSER
    + "\n"
    + SHIVIZ_DELIMITER
    + "\n=== wave echo-1a2b3c-4 ===\nbalancer sends explore to ash [echo-1a2b3c-4]\n"
    + 'balancer {"balancer":1}\n'
)


def _write(*replies: Reply) -> tuple[Reply, ...]:
    """The operation's own answers, then the access and body errors it does not override."""
    own = {r.status for r in replies}
    return (*replies, *(r for r in WRITE_ERRORS if r.status not in own))


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "get",
        "/api/status",
        "The cluster at a glance",
        "cluster",
        (
            Reply(200, "The topology, links, last snapshot, waves and moves.", ClusterStatus),
            *READ_ERRORS,
        ),
    ),
    Operation(
        "get",
        "/api/tree",
        "Run an Echo wave and answer with every server's load",
        "waves",
        (Reply(200, "The wave and the loads it collected.", TreeSnapshot), *READ_ERRORS),
    ),
    Operation(
        "post",
        "/api/finn",
        "Run a Finn wave that gives every server its share of tasks",
        "waves",
        _write(Reply(200, "The wave and the servers that decided.", FinnResult)),
        body=FinnRequest,
        access="write",
    ),
    Operation(
        "post",
        "/api/rebalance",
        "Rebalance now: an Echo, the policy's moves, an Echo",
        "cluster",
        _write(
            Reply(200, "The moves done and planned, pressure before and after.", RebalanceResult)
        ),
        body=EmptyRequest,
        access="write",
    ),
    Operation(
        "post",
        "/api/tasks",
        "Queue new tasks at one server",
        "cluster",
        _write(
            Reply(202, "Queued and on disk at the server.", SubmitResult),
            Reply(404, "No such server.", ApiError),
            Reply(409, "The server is retiring: it takes no new tasks.", ApiError),
            Reply(503, "The server is not connected; nothing was queued.", ApiError),
            Reply(
                504,
                "The server did not confirm in time: the tasks may or may not be queued.",
                SubmitUnconfirmedError,
            ),
        ),
        body=SubmitRequest,
        access="write",
    ),
    Operation(
        "get",
        "/api/topology",
        "The adopted topology and the migration to it",
        "topology",
        (
            Reply(200, "The topology document and the migration's state.", TopologyStatus),
            *READ_ERRORS,
        ),
    ),
    Operation(
        "post",
        "/api/topology",
        "Make a topology document the desired topology",
        "topology",
        _write(
            Reply(200, "It is the current topology: nothing changes.", AdoptResult),
            Reply(202, "Adopted: the migration to it has started.", AdoptResult),
            Reply(
                422, "Not a valid topology; every problem named, nothing changed.", TopologyRefused
            ),
        ),
        body=TopologyFile,
        description="The body is the topology file's format, validated as the file is.",
        access="write",
    ),
    Operation(
        "get",
        "/api/waves",
        "The traced waves kept, newest first",
        "traces",
        (
            Reply(200, "Whether tracing is on, and the traced waves.", TraceList),
            Reply(
                200,
                "With `format=shiviz`: every gathered trace kept in one file ShiViz opens as "
                "it is, one execution per wave, oldest first.",
                None,
                "text/plain",
                SHIVIZ_EXAMPLE,
            ),
            Reply(400, "Unknown `format`.", ApiError),
            *READ_ERRORS,
        ),
        parameters=(FORMAT,),
        links={
            "GetTrace": {
                "operationId": "get_api_waves_wave_id",
                "parameters": {"wave_id": "$response.body#/waves/0/wave_id"},
                "description": "The newest traced wave's trace.",
            }
        },
    ),
    Operation(
        "get",
        "/api/waves/{wave_id}",
        "One wave's trace, message by message",
        "traces",
        (
            Reply(
                200,
                "The trace (JSON), or with `format=shiviz` a file ShiViz's upload opens as it "
                "is (its parser regex and execution delimiter on the first two lines).",
                WaveTrace,
            ),
            Reply(200, "", None, "text/plain", SHIVIZ_EXAMPLE),
            Reply(400, "Unknown `format`.", ApiError),
            Reply(404, "The wave is not among the traced waves kept.", ApiError),
            Reply(503, "The trace is still being gathered.", ApiError),
            *READ_ERRORS,
        ),
        parameters=(
            {
                "name": "wave_id",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
                "example": "echo-1a2b3c-4",
            },
            FORMAT,
        ),
    ),
    Operation(
        "get",
        "/api/events",
        "Live updates (server-sent events)",
        "status page",
        (
            Reply(
                200,
                "A `snapshot` event at once (a `PageSnapshot`), then `snapshot`, `wave` (a "
                "`LiveWave`), `moves`, `trace`, `topology` and `retired` events as they "
                "happen; a comment line now and then. The stream does not end.",
                None,
                "text/event-stream",
                'event: snapshot\ndata: {"topology": ...}\n\n',
            ),
            Reply(503, "The balancer is shutting down.", ApiError),
            *READ_ERRORS,
        ),
    ),
    Operation(
        "get",
        "/",
        "The status page",
        "status page",
        (
            Reply(200, "The page (HTML).", None, "text/html", "<!doctype html>..."),
            Reply(
                401,
                "Reads need the token: a page asking for it (no data).",
                None,
                "text/html",
                "<!doctype html>...",
            ),
            HOST,
        ),
    ),
    Operation(
        "post",
        "/api/session",
        "Open a read session (a cookie) for this browser",
        "access",
        _write(
            Reply(200, "The session cookie is set.", SessionOpened),
            Reply(404, "No API token is configured: there is no session to open.", ApiError),
        ),
        body=EmptyRequest,
        description="With the token in `Authorization`; the cookie lets a browser read "
        "(page loads, the event stream) while reads need the token.",
        access="session",
    ),
    Operation(
        "get",
        OPENAPI_PATH,
        "This document",
        "api",
        (Reply(200, "The OpenAPI 3.1 document.", None, JSON, "{}"), *READ_ERRORS),
    ),
    Operation(
        "get",
        DOCS_PATH,
        "The API reference page",
        "api",
        (Reply(200, "The page (HTML).", None, "text/html", "<!doctype html>..."), *READ_ERRORS),
    ),
    Operation(
        "get",
        "/healthz",
        "Liveness and links up",
        "service",
        (Reply(200, "Up.", Health), HOST),
        access="open",
    ),
    Operation(
        "get",
        "/metrics",
        "Prometheus metrics",
        "service",
        (
            Reply(
                200,
                "The Prometheus text format.",
                None,
                "text/plain",
                "# HELP treewave_waves_total ...\n",
            ),
            HOST,
        ),
        access="open",
    ),
)

SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "read": [{}, {"bearerAuth": []}, {"sessionCookie": []}],
    "write": [{}, {"bearerAuth": []}],
    "session": [{"bearerAuth": []}, {}],
    "open": [],
}
SECURITY_SCHEMES = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "description": "The API token (`treewave secret --out FILE`; the balancer's "
        "`--api-token-file`). Required on changes when the API is published beyond "
        "loopback or with `--require-token`, and on reads with `--token-for-reads`.",
    },
    "sessionCookie": {
        "type": "apiKey",
        "in": "cookie",
        "name": "treewave_session",
        "description": "Set by `POST /api/session`; accepted on reads only.",
    },
}


def operation_id(op: Operation) -> str:
    """`get_api_waves_wave_id` for `GET /api/waves/{wave_id}`; `get_page` for `/`."""
    words = "".join(c if c.isalnum() else " " for c in op.path).split()
    return "_".join([op.method, *(words or ["page"])])


class _Components:
    """Every model's schema once, under its class name; refs point into it."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    def add(self, model: type[BaseModel], mode: str) -> dict[str, str]:
        schema = TypeAdapter(model).json_schema(
            mode="validation" if mode == "validation" else "serialization",
            by_alias=model in BY_ALIAS,
            ref_template=REF,
        )
        for name, sub in {**schema.pop("$defs", {}), model.__name__: schema}.items():
            if self.schemas.setdefault(name, sub) != sub:
                raise ValueError(f"two different schemas named {name} ({mode})")
        return {"$ref": REF.format(model=model.__name__)}


def _content(replies: Sequence[Reply], components: _Components) -> dict[str, Any]:
    content: dict[str, Any] = {}
    for r in replies:
        if r.model is not None:
            content[r.media] = {"schema": components.add(r.model, "serialization")}
        else:
            media: dict[str, Any] = {"schema": {"type": "string"}}
            if r.text_example is not None:
                media["example"] = r.text_example
            if r.media == JSON:
                media["schema"] = {"type": "object"}
                media.pop("example", None)
            content[r.media] = media
    return content


def _operation(op: Operation, components: _Components) -> dict[str, Any]:
    out: dict[str, Any] = {
        "operationId": operation_id(op),
        "summary": op.summary,
        "tags": [op.tag],
        "security": SECURITY[op.access],
    }
    if op.description:
        out["description"] = op.description
    if op.parameters:
        out["parameters"] = [dict(p) for p in op.parameters]
    if op.body is not None:
        schema = components.add(op.body, "validation")
        out["requestBody"] = {
            # Even an empty body goes as JSON: anything else is refused (415).
            "required": True,
            "content": {JSON: {"schema": schema}},
        }
    by_status: dict[int, list[Reply]] = {}
    for r in op.replies:
        by_status.setdefault(r.status, []).append(r)
    responses: dict[str, Any] = {}
    for status, replies in sorted(by_status.items()):
        answer: dict[str, Any] = {
            "description": " ".join(r.description for r in replies if r.description),
            "content": _content(replies, components),
        }
        if status < 300 and op.links:
            answer["links"] = {k: dict(v) for k, v in op.links.items()}
        responses[str(status)] = answer
    out["responses"] = responses
    return out


def openapi_document(operations: Sequence[Operation] = OPERATIONS) -> dict[str, Any]:
    """The document for `operations` (the balancer's, by default)."""
    components = _Components()
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method] = _operation(op, components)
    # Documented here, not used by any route: the event stream's payloads.
    for model in (PageSnapshot, LiveWave):
        components.add(model, "serialization")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "treewave balancer API",
            "version": "1",
            "description": "The balancer of a treewave cluster: Echo and Finn waves, "
            "tasks, rebalancing, the topology and its migration, wave traces. Every error "
            'is JSON `{"error": "..."}` naming the problem; nothing changes unless said.',
        },
        "paths": paths,
        "components": {"schemas": components.schemas, "securitySchemes": SECURITY_SCHEMES},
    }


OPENAPI_KEY = web.AppKey("openapi_document", bytes)


async def serve_openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI_KEY], content_type=JSON)


async def serve_docs(request: web.Request) -> web.Response:
    return web.Response(
        text=DOCS_PAGE, content_type="text/html", headers={"Cache-Control": "no-store"}
    )


DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>treewave balancer API</title>
<link rel="stylesheet" href="/static/swagger-ui/swagger-ui.css">
</head>
<body>
<p style="font-family:sans-serif;margin:8px 16px"><a href="/">&larr; status page</a></p>
<div id="swagger-ui"></div>
<script src="/static/swagger-ui/swagger-ui-bundle.js"></script>
<script src="/static/api-docs.js"></script>
</body>
</html>
"""


def setup_openapi(app: web.Application) -> None:
    """`GET /api/openapi.json` and the reference page `GET /api/docs`."""
    app[OPENAPI_KEY] = json.dumps(openapi_document(), separators=(",", ":")).encode()
    app.router.add_get(OPENAPI_PATH, serve_openapi, name="openapi")
    app.router.add_get(DOCS_PATH, serve_docs, name="api_docs")
