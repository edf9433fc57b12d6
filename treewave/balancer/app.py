"""The balancer's HTTP surface: request models, handlers, the JSON-error middleware and
`create_app`. What the handlers ask for is done by the domain (`treewave.balancer.cluster`),
whose `BalancerError`s are mapped to status codes here; the status page
(`treewave.balancer.status`) adds its own routes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from treewave.balancer.access import ACCESS_KEY, SESSION_PATH, access_middleware, open_session
from treewave.balancer.cluster import (
    Balancer,
    BalancerError,
    ServerNotConnected,
    ServerRetiring,
    SubmitUnconfirmed,
    UnknownServer,
    tree_json,
)
from treewave.balancer.openapi import setup_openapi
from treewave.balancer.settings import BalancerSettings
from treewave.balancer.status import locked_page, setup_status
from treewave.balancer.traces import setup_traces
from treewave.core.api import (
    AdoptResult,
    ApiError,
    EmptyRequest,
    FinnRequest,
    FinnResult,
    Health,
    SubmitRequest,
    SubmitResult,
    SubmitUnconfirmedError,
    TopologyRefused,
)
from treewave.core.messages import FinnWork, describe_errors
from treewave.core.topology import Topology, TopologyError
from treewave.wire.http import json_error, json_errors
from treewave.wire.topology_file import load_topology

__all__ = ["BALANCER_KEY", "MAX_BODY_BYTES", "create_app", "http_error"]


BALANCER_KEY = web.AppKey("balancer", Balancer)
MAX_BODY_BYTES = 64 * 1024


def answer(model: BaseModel, status: int = 200) -> web.Response:
    """A JSON answer from one of the API's models (`treewave.core.api`)."""
    return web.Response(
        text=model.model_dump_json(), status=status, content_type="application/json"
    )


def model_error(status: int, model: ApiError) -> web.HTTPException:
    """An HTTP error whose JSON body is `model` (an `ApiError` with more to say)."""
    exc = web.HTTPException(text=model.model_dump_json(), content_type="application/json")
    exc.set_status(status)
    return exc


def http_error(exc: BalancerError) -> web.HTTPException:
    """The HTTP answer to a domain error."""
    if isinstance(exc, UnknownServer):
        return json_error(404, str(exc))
    if isinstance(exc, ServerRetiring):
        return json_error(409, str(exc))
    if isinstance(exc, ServerNotConnected):
        return json_error(503, str(exc))
    if isinstance(exc, SubmitUnconfirmed):
        return model_error(
            504,
            SubmitUnconfirmedError(
                error=str(exc),
                node=exc.name,
                first_task=exc.first_task,
                last_task=exc.last_task,
            ),
        )
    return json_error(500, str(exc))


M = TypeVar("M", bound=BaseModel)


async def read_body(request: web.Request, model: type[M]) -> M:
    """Parse a JSON body into `model`; every failure is a 4xx naming the problem."""
    raw = await request.read()
    if len(raw) > MAX_BODY_BYTES:
        raise json_error(413, f"body too large ({len(raw)} bytes, limit {MAX_BODY_BYTES})")
    if not raw.strip():
        raw = b"{}"
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        if any(e["type"] in ("json_invalid", "json_type") for e in exc.errors()):
            raise json_error(400, "malformed JSON: " + describe_errors(exc)) from None
        raise json_error(422, describe_errors(exc)) from None


async def api_tree(request: web.Request) -> web.Response:
    b = request.app[BALANCER_KEY]
    record = await b.run_echo()
    return answer(tree_json(record, b.topology))


async def api_finn(request: web.Request) -> web.Response:
    b = request.app[BALANCER_KEY]
    body = await read_body(request, FinnRequest)
    record = await b.run_finn(
        FinnWork(tasks_per_node=body.tasks_per_node, duration_s=body.duration_s)
    )
    return answer(
        FinnResult(
            **dict(record.summary()),
            decided=list(record.decided),
            tasks_per_node=body.tasks_per_node,
        )
    )


async def api_rebalance(request: web.Request) -> web.Response:
    b = request.app[BALANCER_KEY]
    await read_body(request, EmptyRequest)
    return answer(await b.rebalance())


async def api_tasks(request: web.Request) -> web.Response:
    b = request.app[BALANCER_KEY]
    body = await read_body(request, SubmitRequest)
    try:
        ids = await b.submit(body.node, body.count, body.duration_s, body.actual_s)
    except BalancerError as exc:
        raise http_error(exc) from None
    return answer(
        SubmitResult(node=body.node, accepted=len(ids), first_task=ids[0], last_task=ids[-1]),
        status=202,
    )


def topology_refused(problems: list[str]) -> web.HTTPException:
    """422 naming every problem of a posted topology (nothing changed)."""
    return model_error(
        422,
        TopologyRefused(
            error="not a valid topology; nothing changed: " + "; ".join(problems),
            problems=problems,
        ),
    )


async def api_topology(request: web.Request) -> web.Response:
    return answer(request.app[BALANCER_KEY].topology_status())


async def api_post_topology(request: web.Request) -> web.Response:
    """Make the posted document (the topology file's format, validated as the file is)
    the desired topology: 202 when a migration to it started, 200 when it is the current
    one, 422 naming every problem (nothing changed)."""
    b = request.app[BALANCER_KEY]
    raw = await request.read()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise topology_refused([f"malformed JSON: {exc}"]) from None
    try:
        desired = Topology.parse(data, "the posted topology")
    except TopologyError as exc:
        raise topology_refused(exc.problems) from None
    adopted = await b.adopt(desired)
    return answer(
        AdoptResult(adopted=adopted, **dict(b.topology_status())), status=202 if adopted else 200
    )


async def api_status(request: web.Request) -> web.Response:
    return answer(request.app[BALANCER_KEY].status())


async def healthz(request: web.Request) -> web.Response:
    b = request.app[BALANCER_KEY]
    up = sum(1 for n in b.topology.names if b.links.connected(n))
    return answer(Health(status="ok", links_up=up, servers=len(b.names)))


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[BALANCER_KEY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def count_error(request: web.Request, exc: web.HTTPException) -> None:
    """Every 4xx/5xx answer, by route and status, in `treewave_api_errors_total`."""
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    request.app[BALANCER_KEY].metrics.api_errors.labels(name, str(exc.status)).inc()


def create_app(settings: BalancerSettings, topology: Topology | None = None) -> web.Application:
    """The balancer's app. Middlewares and routes are listed here, in one place; the
    domain's links and loops run in `cleanup_ctx`."""
    topo = topology or load_topology(settings.topology)
    balancer = Balancer(settings, topo)
    # Access rules first: a refused request never reaches a handler (balancer/access.py).
    check_access = access_middleware(settings.access, balancer.metrics.registry, locked_page())
    app = web.Application(
        middlewares=[check_access, json_errors(count_error)], client_max_size=MAX_BODY_BYTES
    )
    app[BALANCER_KEY] = balancer
    app[ACCESS_KEY] = settings.access
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/tree", api_tree)
    app.router.add_get("/api/status", api_status)
    app.router.add_post("/api/finn", api_finn)
    app.router.add_post("/api/rebalance", api_rebalance)
    app.router.add_post("/api/tasks", api_tasks)
    app.router.add_get("/api/topology", api_topology)
    app.router.add_post("/api/topology", api_post_topology)
    app.router.add_post(SESSION_PATH, open_session)
    setup_status(app, balancer, settings.status_interval_s)
    setup_traces(app, balancer.traces)
    setup_openapi(app)
    app.cleanup_ctx.append(_background)
    return app


async def _background(app: web.Application) -> AsyncIterator[None]:
    async with app[BALANCER_KEY].running():
        yield
