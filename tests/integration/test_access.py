"""Who may change the cluster (issue 15), against real processes on loopback: cross-site
requests, DNS rebinding and the API token. Every refusal must leave the cluster exactly as
it was, be counted by reason and be logged at most once a minute per client.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.cluster import Cluster, StartCluster
from tests.support.commands import clean_env, treewave_command
from tests.support.metrics import counter_by
from treewave.wire.secretfile import ensure_secret

HOUR = 3600
TOPOLOGY: dict[str, Any] = {
    "settings": {"task_time_s": HOUR, "wave_timeout_s": 10},
    "servers": [
        {"name": "aurora", "cpus": 1, "tasks": 1, "children": ["birch", "cedar"]},
        {"name": "birch", "cpus": 1, "tasks": 1, "children": []},
        {"name": "cedar", "cpus": 1, "tasks": 0, "children": []},
    ],
}
JSON = {"Content-Type": "application/json"}
TASK = json.dumps({"node": "cedar", "count": 2})
FINN = json.dumps({"tasks_per_node": 1})


async def state(http: aiohttp.ClientSession, cluster: Cluster, token: str = "") -> Any:
    """Everything a request could change: every server's task ids and the balancer's
    waves and moves (`token`: for a balancer whose reads need it)."""
    out: dict[str, Any] = {}
    for name in cluster.names:
        async with http.get(cluster.url(name) + "/api/tasks") as resp:
            out[name] = await resp.json()
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.get(cluster.balancer_url + "/api/status", headers=auth) as resp:
        assert resp.status == 200, await resp.text()
        status = await resp.json()
    out["waves"] = status["waves"]
    out["moves"] = status["moves"]
    return out


async def rejected(http: aiohttp.ClientSession, cluster: Cluster) -> dict[str, float]:
    async with http.get(cluster.balancer_url + "/metrics") as resp:
        text = await resp.text()
    return counter_by(text, "treewave_api_rejected", "reason")


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    data: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    async with http.request(method, url, data=data, headers=headers or {}) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json()


def held(snapshot: dict[str, Any], name: str) -> int:
    """Tasks a server holds (running or queued)."""
    return len(snapshot[name]["running"]) + len(snapshot[name]["queued"])


def own_origin(cluster: Cluster) -> str:
    return cluster.balancer_url  # http://127.0.0.1:PORT


@pytest.fixture(scope="module")
def cluster(start_module_cluster: StartCluster) -> Cluster:
    return start_module_cluster(TOPOLOGY)


# --- cross-site requests ------------------------------------------------------------------------


async def test_cross_origin_posts_are_refused_and_change_nothing(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    before = await state(http, cluster)
    counts = await rejected(http, cluster)
    base = cluster.balancer_url
    for origin in ("http://evil.example", "null", "http://127.0.0.1:1", "https://127.0.0.1"):
        for path, body in (("/api/tasks", TASK), ("/api/finn", FINN), ("/api/rebalance", "{}")):
            status, answer = await call(http, "POST", base + path, body, {**JSON, "Origin": origin})
            assert status == 403, (origin, path, answer)
            assert answer["reason"] == "origin"
            assert "cross-origin" in answer["error"]
            assert origin in answer["error"]
    # A future route is covered too: the rule is by method, not by route.
    status, answer = await call(
        http, "DELETE", base + "/api/topology", "{}", {**JSON, "Origin": "http://evil.example"}
    )
    assert status == 403, answer
    assert await state(http, cluster) == before
    after = await rejected(http, cluster)
    assert after["origin"] - counts["origin"] == 13


async def test_same_origin_and_originless_posts_are_accepted(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    url = cluster.balancer_url + "/api/tasks"
    status, answer = await call(http, "POST", url, TASK, {**JSON, "Origin": own_origin(cluster)})
    assert status == 202, answer
    status, answer = await call(http, "POST", url, TASK, JSON)
    assert status == 202, answer
    port = cluster.services["balancer"].port
    # The page opened as http://localhost:PORT posts with that origin and Host.
    headers = {**JSON, "Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"}
    status, answer = await call(http, "POST", url, TASK, headers)
    assert status == 202, answer


async def test_non_json_bodies_are_refused_and_change_nothing(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    before = await state(http, cluster)
    counts = await rejected(http, cluster)
    base = cluster.balancer_url
    cases: list[tuple[str, Any, dict[str, str]]] = [
        ("/api/tasks", TASK, {"Content-Type": "text/plain"}),
        ("/api/tasks", TASK, {"Content-Type": "text/plain;charset=UTF-8"}),
        ("/api/finn", {"tasks_per_node": "1"}, {}),  # a form: x-www-form-urlencoded
        ("/api/finn", FINN, {"Content-Type": "multipart/form-data; boundary=x"}),
        ("/api/rebalance", None, {}),  # no body, no Content-Type
        ("/api/rebalance", "{}", {"Content-Type": "application/x-www-form-urlencoded"}),
    ]
    for path, body, headers in cases:
        status, answer = await call(http, "POST", base + path, body, headers)
        assert status == 415, (path, headers, answer)
        assert answer["reason"] == "content_type"
        assert "application/json" in answer["error"]
    assert await state(http, cluster) == before
    after = await rejected(http, cluster)
    assert after["content_type"] - counts["content_type"] == len(cases)


# --- DNS rebinding ------------------------------------------------------------------------------


async def test_foreign_host_names_are_refused_for_reads_and_writes(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    before = await state(http, cluster)
    counts = await rejected(http, cluster)
    base = cluster.balancer_url
    port = cluster.services["balancer"].port
    # 127.0.0.1.nip.io resolves to 127.0.0.1: the name a rebinding page would use.
    for host in (f"evil.example:{port}", "127.0.0.1.nip.io", "localhost.evil.example", "treewave"):
        for method, path, body in (
            ("GET", "/api/status", None),
            ("GET", "/api/tree", None),
            ("GET", "/", None),
            ("POST", "/api/finn", FINN),
            ("POST", "/api/tasks", TASK),
        ):
            status, answer = await call(http, method, base + path, body, {**JSON, "Host": host})
            assert status == 421, (host, method, path, answer)
            assert answer["reason"] == "host"
            assert "DNS-rebinding" in answer["error"]
            assert "--allowed-hosts" in answer["error"]
    assert await state(http, cluster) == before
    after = await rejected(http, cluster)
    assert after["host"] - counts["host"] == 20
    # The names the balancer serves under: loopback, its IP, the compose service name.
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "balancer:7999", f"[::1]:{port}"):
        status, _ = await call(http, "GET", base + "/api/status", headers={"Host": host})
        assert status == 200, host


async def test_allowed_hosts_and_origins_are_configurable(
    start_cluster: StartCluster, http: aiohttp.ClientSession
) -> None:
    cluster = start_cluster(
        TOPOLOGY,
        extra_args={
            "balancer": [
                "--allowed-hosts",
                "treewave.example.org, .lab.example",
                "--allowed-origins",
                "https://treewave.example.org",
            ]
        },
    )
    base = cluster.balancer_url
    for host, expected in (
        ("treewave.example.org", 200),
        ("node1.lab.example:7999", 200),
        ("lab.example", 200),
        ("evil.example", 421),
        ("treewave.example.org.evil.example", 421),
    ):
        status, _ = await call(http, "GET", base + "/api/status", headers={"Host": host})
        assert status == expected, host
    # Behind a TLS proxy the page's origin is https://treewave.example.org.
    headers = {**JSON, "Host": "treewave.example.org", "Origin": "https://treewave.example.org"}
    status, answer = await call(http, "POST", base + "/api/tasks", TASK, headers)
    assert status == 202, answer
    headers["Origin"] = "https://evil.example"
    status, answer = await call(http, "POST", base + "/api/tasks", TASK, headers)
    assert status == 403, answer


async def test_refusals_are_logged_once_a_minute_per_client(
    start_cluster: StartCluster, http: aiohttp.ClientSession
) -> None:
    cluster = start_cluster(TOPOLOGY)
    base = cluster.balancer_url
    for _ in range(25):
        await call(http, "POST", base + "/api/finn", FINN, {"Content-Type": "text/plain"})
        await call(http, "GET", base + "/api/status", headers={"Host": "evil.example"})
        await call(http, "POST", base + "/api/finn", FINN, {**JSON, "Origin": "http://x.test"})
    counts = await rejected(http, cluster)
    assert counts == {
        "host": 25,
        "origin": 25,
        "content_type": 25,
        "token_missing": 0,
        "token_wrong": 0,
    }
    log = cluster.services["balancer"].log_text()
    refusals = [line for line in log.splitlines() if "refused " in line]
    assert len(refusals) == 1, refusals
    assert "127.0.0.1" in refusals[0]
    assert "only counted" in refusals[0]


# --- the API token ------------------------------------------------------------------------------


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-token"
    ensure_secret(path)
    return path


@pytest.fixture
def token(token_file: Path) -> str:
    return token_file.read_text(encoding="utf-8").strip()


async def test_token_required_missing_or_wrong_is_401_right_is_accepted(
    start_cluster: StartCluster, http: aiohttp.ClientSession, token_file: Path, token: str
) -> None:
    cluster = start_cluster(
        TOPOLOGY,
        extra_args={"balancer": ["--require-token", "--api-token-file", str(token_file)]},
    )
    base = cluster.balancer_url
    before = await state(http, cluster)
    for auth, reason in (
        (None, "token_missing"),
        ("Bearer " + "x" * len(token), "token_wrong"),
        ("Bearer " + token[:-1], "token_wrong"),
        ("Bearer ", "token_wrong"),
        ("Basic " + token, "token_wrong"),
        (token, "token_wrong"),
    ):
        headers = {**JSON, **({"Authorization": auth} if auth is not None else {})}
        for path, body in (("/api/tasks", TASK), ("/api/finn", FINN), ("/api/rebalance", "{}")):
            async with http.post(base + path, data=body, headers=headers) as resp:
                assert resp.status == 401, (auth, path, await resp.text())
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                answer = await resp.json()
            assert answer["reason"] == reason, (auth, answer)
            assert "Authorization: Bearer" in answer["error"]
            assert token not in answer["error"]
    assert await state(http, cluster) == before
    counts = await rejected(http, cluster)
    assert counts["token_missing"] == 3
    assert counts["token_wrong"] == 15
    # Reads stay open; the right token is accepted.
    status, _ = await call(http, "GET", base + "/api/status")
    assert status == 200
    with_token = {**JSON, "Authorization": f"Bearer {token}"}
    status, answer = await call(http, "POST", base + "/api/tasks", TASK, with_token)
    assert status == 202, answer
    status, answer = await call(http, "POST", base + "/api/finn", FINN, with_token)
    assert status == 200, answer
    assert answer["complete"] is True, answer
    # The token does not excuse a cross-site request.
    status, answer = await call(
        http, "POST", base + "/api/tasks", TASK, {**with_token, "Origin": "http://evil.example"}
    )
    assert status == 403, answer
    after = await state(http, cluster)
    assert held(after, "cedar") == held(before, "cedar") + 2 + 1


def treewave(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*treewave_command(), *args],
        capture_output=True,
        text=True,
        env=env or clean_env(),
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


async def test_cli_sends_the_token(
    start_cluster: StartCluster, http: aiohttp.ClientSession, token_file: Path, token: str
) -> None:
    cluster = start_cluster(
        TOPOLOGY,
        extra_args={"balancer": ["--require-token", "--api-token-file", str(token_file)]},
    )
    url = cluster.balancer_url
    before = await state(http, cluster)

    refused = treewave("submit", "--balancer", url, "--node", "birch", "--count", "3")
    assert refused.returncode == 1
    assert "requires its API token" in refused.stderr
    assert "--token-file" in refused.stderr
    wrong = {**clean_env(), "TREEWAVE_API_TOKEN": "y" * 40}
    refused = treewave("rebalance", "--balancer", url, env=wrong)
    assert refused.returncode == 1
    assert "not this balancer's" in refused.stderr
    assert await state(http, cluster) == before
    # Reads need no token.
    assert treewave("status", "--balancer", url).returncode == 0

    ok = treewave(
        "submit",
        "--balancer",
        url,
        "--node",
        "birch",
        "--count",
        "3",
        "--token-file",
        str(token_file),
    )
    assert ok.returncode == 0, ok.stderr
    assert re.search(r"queued 3 tasks on birch", ok.stdout), ok.stdout
    ok = treewave("finn", "--balancer", url, env={**clean_env(), "TREEWAVE_API_TOKEN": token})
    assert ok.returncode == 0, ok.stderr
    by_file = {**clean_env(), "TREEWAVE_API_TOKEN_FILE": str(token_file)}
    ok = treewave("rebalance", "--balancer", url, env=by_file)
    assert ok.returncode == 0, ok.stderr
    after = await state(http, cluster)
    total = sum(held(after, n) for n in cluster.names)
    assert total == sum(held(before, n) for n in cluster.names) + 3 + len(cluster.names)

    missing = treewave("rebalance", "--balancer", url, "--token-file", str(token_file) + ".nope")
    assert missing.returncode == 1
    assert "cannot read the API token file" in missing.stderr


# --- start-up -----------------------------------------------------------------------------------


def test_balancer_beyond_loopback_will_not_start_without_a_token(tmp_path: Path) -> None:
    topo = tmp_path / "topology.json"
    topo.write_text(json.dumps(TOPOLOGY), encoding="utf-8")
    common = ["balancer", "--topology", str(topo), "--port", "1"]
    for extra in (
        ["--host", "0.0.0.0"],
        ["--host", "0.0.0.0", "--published-address", "192.0.2.7"],
        ["--published-address", "treewave.example.org"],
        ["--require-token"],
    ):
        done = treewave(*common, *extra)
        assert done.returncode == 2, (extra, done.stderr)
        assert "need an API token" in done.stderr, done.stderr
        assert "--api-token-file" in done.stderr
    short = tmp_path / "short"
    short.write_text("abc\n", encoding="utf-8")
    done = treewave(*common, "--host", "0.0.0.0", "--api-token-file", str(short))
    assert done.returncode == 2
    assert "API token" in done.stderr
    assert "too short" in done.stderr
    done = treewave(*common, "--allowed-hosts", "http://evil.example/")
    assert done.returncode == 2
    assert "allowed host" in done.stderr
    for extra, words in (
        (["--token-for-reads"], "--token-for-reads is set, so reads and changes need an API"),
        (["--token-for-reads", "--require-token"], "--token-for-reads is set"),
    ):
        done = treewave(*common, *extra)
        assert done.returncode == 2, (extra, done.stderr)
        assert words in done.stderr, done.stderr
        assert "--api-token-file" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    bad = {**clean_env(), "TREEWAVE_TOKEN_FOR_READS": "maybe"}
    done = treewave(*common, env=bad)
    assert done.returncode == 2
    assert "TREEWAVE_TOKEN_FOR_READS" in done.stderr
    assert "'maybe'" in done.stderr


# --- reads behind the token (--token-for-reads) ---------------------------------------------

# Every read route but the open ones; /api/waves/nope reaches its handler (404) when let in.
READ_ROUTES = (
    "/",
    "/api/tree",
    "/api/status",
    "/api/topology",
    "/api/waves",
    "/api/waves/nope",
    "/api/events",
)
OPEN_ROUTES = ("/healthz", "/metrics", "/static/status.js", "/static/session.js")
SECRETS = ("aurora", "birch", "cedar", "wave_id")
"""What a refused read must not reveal: server names, waves."""


async def first_event(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[str, Any]:
    """The first event of a server-sent event stream: (event name, decoded data)."""
    async with http.get(url, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/event-stream"
        event = ""
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
            elif line.startswith("data:") and event:
                return event, json.loads(line.removeprefix("data:"))
    raise AssertionError("the stream ended before its first event")


async def read(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], method: str = "GET"
) -> tuple[int, str, aiohttp.ClientResponse]:
    """(status, body, response) of a read; an event stream is closed at once (its body is
    left empty)."""
    async with http.request(method, url, headers=headers) as resp:
        if resp.content_type == "text/event-stream":
            return resp.status, "", resp
        return resp.status, await resp.text(), resp


@pytest.fixture
def reads_args(token_file: Path) -> dict[str, list[str]]:
    return {"balancer": ["--token-for-reads", "--api-token-file", str(token_file)]}


async def test_reads_need_the_token_when_configured(
    start_cluster: StartCluster,
    http: aiohttp.ClientSession,
    reads_args: dict[str, list[str]],
    token: str,
) -> None:
    cluster = start_cluster(TOPOLOGY, extra_args=reads_args)
    base = cluster.balancer_url
    counts = await rejected(http, cluster)
    wrong_header = {"Authorization": "Bearer " + "x" * len(token)}
    stale_cookie = {"Cookie": "treewave_session=" + "0" * 64}
    for path in READ_ROUTES:
        for headers in ({}, wrong_header):
            for method in ("GET", "HEAD"):
                status, text, resp = await read(http, base + path, headers, method)
                assert status == 401, (path, headers, method, text)
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        status, text, resp = await read(http, base + path, stale_cookie)
        assert status == 401, (path, text)
        for headers, reason in (({}, "token_missing"), (wrong_header, "token_wrong")):
            status, text, resp = await read(http, base + path, headers)
            for secret in SECRETS:
                assert secret not in text, (path, secret, text)
            if path == "/":
                # The page shell: it asks for the token and holds no data.
                assert resp.content_type == "text/html"
                assert 'id="token-form"' in text
                assert "/static/session.js" in text
                assert "tw-initial" not in text
                continue
            answer = json.loads(text)
            assert answer["reason"] == reason, (path, answer)
            why = "--token-for-reads" if reason == "token_missing" else "not this balancer's"
            assert why in answer["error"], answer
            assert "Authorization: Bearer" in answer["error"]
            assert token not in text
    status, text, _ = await read(http, base + "/api/status", stale_cookie)
    assert "session cookie" in json.loads(text)["error"]
    after = await rejected(http, cluster)
    n = len(READ_ROUTES)
    assert after["token_missing"] - counts["token_missing"] == 3 * n
    assert after["token_wrong"] - counts["token_wrong"] == 3 * n + n + 1
    # Healthchecks, the Prometheus scrape and the page's code stay open.
    for path in OPEN_ROUTES:
        status, text, _ = await read(http, base + path, {})
        assert status == 200, (path, text)
    # The right token in the header: every read goes through.
    auth = {"Authorization": f"Bearer {token}"}
    for path in READ_ROUTES:
        status, text, _ = await read(http, base + path, auth)
        assert status == (404 if path == "/api/waves/nope" else 200), (path, text)
    status, text, _ = await read(http, base + "/", auth)
    assert 'id="tree"' in text
    assert "aurora" in text
    event, data = await first_event(http, base + "/api/events", auth)
    assert event == "snapshot"
    assert {n["name"] for n in data["snapshot"]["nodes"]} == set(cluster.names)
    # Reads protected means changes need the token too, even on loopback.
    before = await state(http, cluster, token)
    status, answer = await call(http, "POST", base + "/api/tasks", TASK, JSON)
    assert status == 401, answer
    assert answer["reason"] == "token_missing", answer
    assert await state(http, cluster, token) == before
    # Refusals are logged once a minute per client, whatever route and reason.
    log = cluster.services["balancer"].log_text()
    assert len([line for line in log.splitlines() if "refused " in line]) == 1, log


async def test_a_session_cookie_opens_reads_never_changes(
    start_cluster: StartCluster,
    http: aiohttp.ClientSession,
    reads_args: dict[str, list[str]],
    token: str,
) -> None:
    cluster = start_cluster(TOPOLOGY, extra_args=reads_args)
    base = cluster.balancer_url
    url = base + "/api/session"
    auth = {**JSON, "Authorization": f"Bearer {token}"}
    # The session is opened only by a same-origin JSON request bearing the token.
    for headers, status_wanted, reason in (
        (JSON, 401, "token_missing"),
        ({**JSON, "Authorization": "Bearer " + "y" * 40}, 401, "token_wrong"),
        ({**auth, "Content-Type": "text/plain"}, 415, "content_type"),
        ({**auth, "Origin": "http://evil.example"}, 403, "origin"),
    ):
        async with http.post(url, data="{}", headers=headers) as resp:
            assert resp.status == status_wanted, await resp.text()
            assert "Set-Cookie" not in resp.headers
            assert (await resp.json())["reason"] == reason
    async with http.post(url, data='{"x": 1}', headers=auth) as resp:
        assert resp.status == 422, await resp.text()
        assert "Set-Cookie" not in resp.headers
    async with http.post(url, data="{}", headers={**auth, "Origin": own_origin(cluster)}) as resp:
        assert resp.status == 200, await resp.text()
        assert await resp.json() == {"session": "open", "reads_protected": True}
        set_cookie = resp.headers["Set-Cookie"]
        value = resp.cookies["treewave_session"].value
    assert token not in set_cookie
    assert value
    assert value != token
    attributes = {a.strip().split("=")[0].lower() for a in set_cookie.split(";")[1:]}
    assert {"httponly", "samesite", "path"} <= attributes, set_cookie
    assert "samesite=strict" in set_cookie.lower()
    assert "path=/" in set_cookie.lower()

    # The cookie alone (no header) lets this browser read: the page, the API, the stream.
    cookie = {"Cookie": f"treewave_session={value}"}
    for path in READ_ROUTES:
        status, text, _ = await read(http, base + path, cookie)
        assert status == (404 if path == "/api/waves/nope" else 200), (path, text)
    status, text, _ = await read(http, base + "/", cookie)
    assert 'id="tree"' in text
    assert "tw-initial" in text
    for name in cluster.names:
        assert f'data-name="{name}"' in text
    event, data = await first_event(http, base + "/api/events", cookie)
    assert event == "snapshot"
    assert {n["name"] for n in data["snapshot"]["nodes"]} == set(cluster.names)
    # A wrong header is not excused by a good cookie.
    status, _, _ = await read(
        http, base + "/api/status", {**cookie, "Authorization": "Bearer " + "z" * 40}
    )
    assert status == 401

    # ...but never changes anything: state-changing requests need the header (CSRF).
    before = await state(http, cluster, token)
    counts = await rejected(http, cluster)
    same_origin = {**JSON, **cookie, "Origin": own_origin(cluster)}
    for path, body in (
        ("/api/tasks", TASK),
        ("/api/finn", FINN),
        ("/api/rebalance", "{}"),
        ("/api/session", "{}"),
    ):
        status, answer = await call(http, "POST", base + path, body, same_origin)
        assert status == 401, (path, answer)
        assert answer["reason"] == "token_missing"
    assert await state(http, cluster, token) == before
    after = await rejected(http, cluster)
    assert after["token_missing"] - counts["token_missing"] == 4
    status, answer = await call(http, "POST", base + "/api/tasks", TASK, {**auth, **cookie})
    assert status == 202, answer
    assert held(await state(http, cluster, token), "cedar") == held(before, "cedar") + 2


async def test_reads_stay_open_without_the_setting(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    base = cluster.balancer_url
    for path in (*READ_ROUTES, *OPEN_ROUTES):
        status, text, _ = await read(http, base + path, {})
        assert status == (404 if path == "/api/waves/nope" else 200), (path, text)
    status, text, _ = await read(http, base + "/", {})
    assert "tw-initial" in text
    assert 'data-name="aurora"' in text
    # Without a token configured there is no session to open.
    status, answer = await call(http, "POST", base + "/api/session", "{}", JSON)
    assert status == 404, answer
    assert "no API token configured" in answer["error"]


async def test_token_without_the_setting_opens_a_session_but_reads_are_open(
    start_cluster: StartCluster, http: aiohttp.ClientSession, token_file: Path, token: str
) -> None:
    cluster = start_cluster(
        TOPOLOGY, extra_args={"balancer": ["--api-token-file", str(token_file)]}
    )
    base = cluster.balancer_url
    status, _, _ = await read(http, base + "/api/status", {})
    assert status == 200
    auth = {**JSON, "Authorization": f"Bearer {token}"}
    status, answer = await call(http, "POST", base + "/api/session", "{}", auth)
    assert status == 200
    assert answer == {"session": "open", "reads_protected": False}
    # On loopback without --require-token the session route still insists on the token.
    status, answer = await call(http, "POST", base + "/api/session", "{}", JSON)
    assert status == 401, answer
    assert answer["reason"] == "token_missing", answer


async def test_cli_reads_with_the_token(
    start_cluster: StartCluster,
    http: aiohttp.ClientSession,
    reads_args: dict[str, list[str]],
    token_file: Path,
    token: str,
) -> None:
    cluster = start_cluster(TOPOLOGY, extra_args=reads_args)
    url = cluster.balancer_url
    refused = treewave("status", "--balancer", url)
    assert refused.returncode == 1
    assert "requires its API token for reads too" in refused.stderr
    assert "--token-file" in refused.stderr
    ok = treewave("status", "--balancer", url, "--token-file", str(token_file))
    assert ok.returncode == 0, ok.stderr
    for name in cluster.names:
        assert name in ok.stdout
    # `treewave trace` reads /api/waves: it takes the token the same way.
    async with http.get(url + "/api/tree", headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
    refused = treewave("trace", "latest", "--balancer", url)
    assert refused.returncode == 1
    assert "requires its API token for reads too" in refused.stderr
    env = {**clean_env(), "TREEWAVE_API_TOKEN_FILE": str(token_file)}
    ok = treewave("trace", "latest", "--balancer", url, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "echo wave" in ok.stdout
