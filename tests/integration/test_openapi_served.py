"""`GET /api/openapi.json` and `GET /api/docs` on a balancer app: the document generated
at start, under the same access rules as every other read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema

from treewave.balancer.access import AccessSettings
from treewave.balancer.app import create_app
from treewave.balancer.openapi import openapi_document
from treewave.balancer.settings import BalancerSettings
from treewave.core.api import PageSnapshot
from treewave.core.topology import ServerSpec, Topology

TOPOLOGY = Topology.from_servers([ServerSpec(name="ash", cpus=1)])
TOKEN = "a-token-of-sixteen-or-more"


def app(tmp_path: Path, access: AccessSettings) -> Any:
    settings = BalancerSettings(
        topology=tmp_path / "unused.json",
        peer_urls={"ash": "ws://127.0.0.1:9/ws"},  # nobody there: no link needed here
        rebalance_interval_s=0,
        access=access,
    )
    return create_app(settings, TOPOLOGY)


async def test_the_document_and_the_page_are_served(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(app(tmp_path, AccessSettings()))
    resp = await client.get("/api/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert await resp.json() == openapi_document()
    page = await client.get("/api/docs")
    assert page.status == 200
    html = await page.text()
    assert "/static/swagger-ui/swagger-ui-bundle.js" in html
    for asset in ("swagger-ui/swagger-ui-bundle.js", "swagger-ui/swagger-ui.css", "api-docs.js"):
        got = await client.get("/static/" + asset)
        assert got.status == 200, asset
    status_page = await client.get("/")
    assert 'href="/api/docs"' in await status_page.text()


async def test_the_event_streams_snapshot_is_the_documented_page_snapshot(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """`/api/events` is documented by prose and the `PageSnapshot` schema (schemathesis
    cannot read an endless stream): its first event is checked against that model here."""
    client = await aiohttp_client(app(tmp_path, AccessSettings()))
    async with client.get("/api/events") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        event = data = None
        while data is None:
            line = (await resp.content.readline()).decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: ") :])
    assert event == "snapshot"
    snapshot = PageSnapshot.model_validate(data)
    assert snapshot.policy == "lpt"
    assert [s.name for s in snapshot.topology.servers] == ["ash"]
    schemas = openapi_document()["components"]["schemas"]
    assert "PageSnapshot" in schemas
    jsonschema.validate(data, {**schemas["PageSnapshot"], "components": {"schemas": schemas}})


async def test_reads_protected_need_the_token_for_the_document_too(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    client = await aiohttp_client(app(tmp_path, AccessSettings(token=TOKEN, token_for_reads=True)))
    for path in ("/api/openapi.json", "/api/docs"):
        refused = await client.get(path)
        assert refused.status == 401, path
        assert (await refused.json())["reason"] == "token_missing"
        ok = await client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status == 200, path
    # The viewer's own files are static files: open, like the status page's.
    assert (await client.get("/static/swagger-ui/swagger-ui.css")).status == 200
