"""The status page against a balancer that requires its API token, and a hostile page in
the same browser: real headless Chromium, real processes (issue 15)."""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import SMALL, all_reported, open_page, servers_on_page, wait_for
from tests.support.http import get_json, get_text
from tests.support.metrics import counter_by
from treewave.wire.secretfile import ensure_secret

pytestmark = pytest.mark.browser


def rejected(url: str) -> dict[str, float]:
    text = get_text(url + "/metrics", timeout=10)
    return counter_by(text, "treewave_api_rejected", "reason")


def queued(url: str) -> dict[str, int]:
    """Tasks held by each server, from a complete Echo (retried: just after start-up a
    link between servers may still be dialling)."""

    def complete() -> dict[str, Any] | None:
        tree: dict[str, Any] = get_json(url + "/api/tree", timeout=30)
        return tree if tree["complete"] else None

    tree = wait_for("a complete Echo", complete, timeout=30)
    return {n["name"]: n["queued"] + n["running"] for n in tree["nodes"]}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-token"
    ensure_secret(path)
    return path


def enter_a_wrong_token(driver: Any) -> None:
    """Type a wrong token into the page's form: the page says it was not accepted."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "token-input").send_keys("not-the-token-at-all")
    driver.find_element(By.ID, "token-button").click()
    wait_for(
        "the form to say the token was refused",
        lambda: "did not accept" in driver.find_element(By.ID, "token-hint").text,
        timeout=10,
    )


def test_page_asks_for_the_token_once_and_its_buttons_work(
    driver: Any, start_cluster: Callable[..., Any], tmp_path: Path, token_file: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    token = token_file.read_text(encoding="utf-8").strip()
    cluster = start_cluster(
        SMALL,
        tmp_path / "cluster",
        balancer_args=("--require-token", "--api-token-file", str(token_file)),
    )
    names = set(SMALL.names)
    open_page(driver, cluster.balancer_url)
    before = wait_for("every server on the page", lambda: all_reported(driver, names))
    form = driver.find_element(By.ID, "token-form")
    assert not form.is_displayed()

    # Run Finn: refused with 401, so the page asks for the token.
    driver.find_element(By.ID, "finn-button").click()
    wait_for("the token form", form.is_displayed, timeout=10)
    assert "needs its API token" in driver.find_element(By.ID, "token-hint").text
    # A wrong token: asked again, saying so.
    enter_a_wrong_token(driver)
    assert form.is_displayed()
    driver.find_element(By.ID, "token-input").send_keys(token)
    driver.find_element(By.ID, "token-button").click()
    notice = driver.find_element(By.ID, "notice")
    wait_for("the Finn notice", lambda: "Finn wave" in notice.text, timeout=20)
    assert "complete" in notice.text
    assert not form.is_displayed()
    assert driver.execute_script("return sessionStorage.getItem('treewave.apiToken')") == token

    def risen() -> dict[str, dict[str, Any]] | None:
        now = all_reported(driver, names)
        ok = now is not None and all(now[n]["queued"] >= before[n]["queued"] + 1 for n in names)
        return now if ok else None

    after = wait_for("every queue to rise by 1", risen, timeout=20)

    # The other buttons use the kept token: no question this time.
    count = driver.find_element(By.ID, "submit-count")
    count.clear()
    count.send_keys("3")
    Select(driver.find_element(By.ID, "submit-node")).select_by_value("delta")
    driver.find_element(By.ID, "submit-button").click()
    wait_for(
        "delta's queue to grow by 3",
        lambda: (servers_on_page(driver)["delta"]["queued"] or 0) >= after["delta"]["queued"] + 3,
        timeout=15,
    )
    driver.find_element(By.ID, "rebalance-button").click()
    wait_for("the rebalance notice", lambda: "Rebalance:" in notice.text, timeout=20)
    # Pressure is expected work per cpu, in seconds (not a percentage of anything).
    shown = re.search(r"max pressure (\d+\.\d\d) s → (\d+\.\d\d) s per cpu", notice.text)
    assert shown, notice.text
    assert float(shown[2]) <= float(shown[1]), notice.text
    assert not form.is_displayed()
    assert not driver.find_element(By.ID, "error").is_displayed()

    # The token lasts for the tab, across a reload.
    open_page(driver, cluster.balancer_url)
    wait_for("every server on the page", lambda: all_reported(driver, names))
    driver.find_element(By.ID, "rebalance-button").click()
    notice = driver.find_element(By.ID, "notice")
    wait_for("the rebalance notice", lambda: "Rebalance:" in notice.text, timeout=20)
    assert not driver.find_element(By.ID, "token-form").is_displayed()

    counts = rejected(cluster.balancer_url)
    assert counts["token_missing"] == 1, counts
    assert counts["token_wrong"] == 1, counts

    # Cancelled: nothing is done and the page says why.
    driver.execute_script("sessionStorage.clear()")
    held = queued(cluster.balancer_url)
    driver.find_element(By.ID, "submit-button").click()
    form = driver.find_element(By.ID, "token-form")
    wait_for("the token form", form.is_displayed, timeout=10)
    driver.find_element(By.ID, "token-cancel").click()
    error = driver.find_element(By.ID, "error")
    wait_for("the error area", error.is_displayed, timeout=10)
    assert "needs its API token" in driver.find_element(By.ID, "error-text").text
    assert queued(cluster.balancer_url) == held


def test_with_reads_protected_the_page_asks_for_the_token_then_shows_every_server_live(
    driver: Any, start_cluster: Callable[..., Any], tmp_path: Path, token_file: Path
) -> None:
    from selenium.webdriver.common.by import By

    token = token_file.read_text(encoding="utf-8").strip()
    cluster = start_cluster(
        SMALL,
        tmp_path / "cluster",
        balancer_args=("--token-for-reads", "--api-token-file", str(token_file)),
    )
    names = set(SMALL.names)
    open_page(driver, cluster.balancer_url)
    # The locked page: it asks for the token and shows nothing of the cluster.
    form = driver.find_element(By.ID, "token-form")
    wait_for("the token form", form.is_displayed, timeout=10)
    assert (
        "needs its API token to show the cluster" in driver.find_element(By.ID, "token-hint").text
    )
    source = driver.page_source
    assert not driver.find_elements(By.ID, "tree")
    for name in names:
        assert name not in source, name
    # A wrong token: asked again, saying so; still locked.
    enter_a_wrong_token(driver)
    assert not driver.find_elements(By.ID, "tree")
    # The right token: the session opens, the page loads again with the tree, and the event
    # stream (which cannot send a header) keeps it live through the session cookie.
    driver.find_element(By.ID, "token-input").send_keys(token)
    driver.find_element(By.ID, "token-button").click()
    wait_for("the status page", lambda: driver.find_elements(By.ID, "tree"), timeout=15)
    shown = wait_for("every server on the page", lambda: all_reported(driver, names))
    assert set(shown) == names
    conn = driver.find_element(By.ID, "conn")
    wait_for("the live stream", lambda: conn.text == "live", timeout=15)
    seen = int(driver.find_element(By.TAG_NAME, "body").get_attribute("data-snapshots") or 0)
    wait_for(
        "a snapshot from the stream",
        lambda: (
            int(driver.find_element(By.TAG_NAME, "body").get_attribute("data-snapshots")) > seen
        ),
        timeout=15,
    )
    # The session cookie is out of the page's reach (HttpOnly); the token is kept for the
    # tab, so the buttons work without asking again.
    assert driver.execute_script("return document.cookie") == ""
    assert driver.execute_script("return sessionStorage.getItem('treewave.apiToken')") == token
    driver.find_element(By.ID, "rebalance-button").click()
    notice = driver.find_element(By.ID, "notice")
    wait_for("the rebalance notice", lambda: "Rebalance:" in notice.text, timeout=20)
    assert not driver.find_element(By.ID, "token-form").is_displayed()
    assert not driver.find_element(By.ID, "error").is_displayed()
    # The trace panel reads /api/waves with the cookie too.
    waves = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/api/waves').then(r => done(r.status), e => done(String(e)));"
    )
    assert waves == 200
    counts = rejected(cluster.balancer_url)
    assert counts["token_missing"] >= 1, counts  # the first page load
    assert counts["token_wrong"] == 1, counts  # the wrong token, once


EVIL_PAGE = """<!doctype html><title>evil</title>
<form id="f" method="POST" action="{target}/api/finn" enctype="text/plain">
<input name='{{"tasks_per_node": 5, "x": "' value='"}}'></form>
<script>
window.attempts = (async () => {{
  const body = JSON.stringify({{node: "delta", count: 50}});
  const out = [];
  // Simple requests: no preflight, so they reach the server.
  for (const type of ["text/plain", "application/x-www-form-urlencoded"]) {{
    try {{
      await fetch("{target}/api/tasks", {{method: "POST", mode: "no-cors",
        headers: {{"Content-Type": type}}, body}});
      out.push(type + ": sent");
    }} catch (e) {{ out.push(type + ": " + e); }}
  }}
  // A JSON post needs a preflight the balancer does not grant.
  try {{
    await fetch("{target}/api/tasks", {{method: "POST",
      headers: {{"Content-Type": "application/json"}}, body}});
    out.push("json: sent");
  }} catch (e) {{ out.push("json: blocked"); }}
  return out;
}})();
</script>"""


@pytest.fixture
def evil_site(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """A web server on another origin serving a page that attacks `target`."""
    pages: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path, b"")
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def page(target: str) -> str:
        pages["/evil.html"] = EVIL_PAGE.format(target=target).encode()
        return f"http://localhost:{server.server_address[1]}/evil.html"

    try:
        yield page
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_a_page_on_another_origin_cannot_change_the_cluster(
    driver: Any,
    start_cluster: Callable[..., Any],
    tmp_path: Path,
    evil_site: Callable[[str], str],
) -> None:
    cluster = start_cluster(SMALL, tmp_path / "cluster")
    before = queued(cluster.balancer_url)
    counts = rejected(cluster.balancer_url)
    driver.get(evil_site(cluster.balancer_url))
    attempts = driver.execute_async_script(
        "const done = arguments[arguments.length - 1]; window.attempts.then(done);"
    )
    assert attempts == [
        "text/plain: sent",
        "application/x-www-form-urlencoded: sent",
        "json: blocked",
    ], attempts
    # And a plain HTML form post, the oldest cross-site request there is.
    driver.execute_script("document.getElementById('f').submit();")
    wait_for("the form's answer", lambda: "/api/finn" in driver.current_url, timeout=10)
    assert queued(cluster.balancer_url) == before
    after = rejected(cluster.balancer_url)
    # Each sent request was refused for its Origin (checked before the Content-Type).
    assert after["origin"] - counts["origin"] == 3, after
