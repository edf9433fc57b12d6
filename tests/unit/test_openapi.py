"""The balancer's OpenAPI document: valid OpenAPI 3.1, one operation for every route of
the real app's router and no operation without a route, every reference resolvable, and
every example valid against its own schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aiohttp import web
from openapi_spec_validator import validate

from treewave.balancer.app import create_app
from treewave.balancer.openapi import OPERATIONS, openapi_document
from treewave.balancer.settings import BalancerSettings
from treewave.core.topology import ServerSpec, Topology

TOPOLOGY = Topology.from_servers(
    [ServerSpec(name="ash", cpus=1, children=("birch",)), ServerSpec(name="birch", cpus=1)]
)


def routed(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route; HEAD (added beside each GET) and the static files
    (files, not operations) left out."""
    out = set()
    for route in app.router.routes():
        resource = route.resource
        if resource is None or isinstance(resource, web.StaticResource):
            continue
        if route.method == "HEAD":
            continue
        out.add((route.method.lower(), resource.canonical))
    return out


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m, p) for p, ops in doc["paths"].items() for m in ops}


@pytest.fixture
def document() -> dict[str, Any]:
    return openapi_document()


def test_every_route_has_an_operation_and_every_operation_a_route(
    document: dict[str, Any], tmp_path: Path
) -> None:
    app = create_app(BalancerSettings(topology=tmp_path / "unused.json"), TOPOLOGY)
    routes = routed(app)
    ops = documented(document)
    assert routes - ops == set(), "routes without a documented operation"
    assert ops - routes == set(), "documented operations without a route"
    assert len(routes) == len(OPERATIONS)


def test_a_route_added_without_an_operation_is_caught(tmp_path: Path) -> None:
    app = create_app(BalancerSettings(topology=tmp_path / "unused.json"), TOPOLOGY)

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/api/undocumented", handler)
    assert routed(app) - documented(openapi_document()) == {("get", "/api/undocumented")}


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"] == "3.1.0"
    json.dumps(document)  # plain JSON, nothing else


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    text = json.dumps(document)
    refs = set()
    for part in text.split('"$ref": "')[1:]:
        refs.add(part.split('"', 1)[0])
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in schemas, ref


def test_errors_security_and_examples(document: dict[str, Any]) -> None:
    ops = {(m, p): op for p, ops in document["paths"].items() for m, op in ops.items()}
    tasks = ops[("post", "/api/tasks")]
    assert {"202", "401", "403", "404", "409", "415", "421", "422", "503", "504"} <= set(
        tasks["responses"]
    )
    assert {"bearerAuth": []} in tasks["security"]
    assert ops[("get", "/healthz")]["security"] == []
    assert "401" in ops[("get", "/api/status")]["responses"]
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    schemas = document["components"]["schemas"]
    resolver_doc = {"components": {"schemas": schemas}}
    examples = 0
    for name, schema in schemas.items():
        for example in schema.get("examples", []):
            jsonschema.validate(example, {**schema, **resolver_doc})
            examples += 1
        assert name
    assert examples >= 3
    trace = ops[("get", "/api/waves/{wave_id}")]
    assert set(trace["responses"]["200"]["content"]) == {"application/json", "text/plain"}
    links = ops[("get", "/api/waves")]["responses"]["200"]["links"]
    assert links["GetTrace"]["operationId"] == trace["operationId"]
