"""The API reference page (`/api/docs`) in real headless Chromium against a real cluster
whose balancer requires its API token: it lists every operation of the document, and a
newcomer can authorize with the token and submit tasks with "Try it out"."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import SMALL, open_page, wait_for
from tests.support.http import get_json
from treewave.balancer.openapi import openapi_document
from treewave.wire.secretfile import ensure_secret

pytestmark = pytest.mark.browser

OPERATIONS_JS = """
return Array.from(document.querySelectorAll('.opblock')).map(b => [
  b.querySelector('.opblock-summary-method').textContent.trim().toLowerCase(),
  b.querySelector('.opblock-summary-path').getAttribute('data-path'),
]);
"""


def queued_at(url: str, name: str) -> int:
    tree: dict[str, Any] = get_json(url + "/api/tree", timeout=30)
    return sum(n["queued"] + n["running"] for n in tree["nodes"] if n["name"] == name)


def test_docs_page_lists_every_operation_and_submits_tasks_with_the_token(
    driver: Any, start_cluster: Callable[..., Any], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    token_file = tmp_path / "api-token"
    ensure_secret(token_file)
    token = token_file.read_text(encoding="utf-8").strip()
    cluster = start_cluster(
        SMALL,
        tmp_path / "cluster",
        balancer_args=("--require-token", "--api-token-file", str(token_file)),
    )
    # The status page links to the reference.
    open_page(driver, cluster.balancer_url)
    link = wait_for("the API link", lambda: driver.find_element(By.CSS_SELECTOR, "a.api-link"))
    assert link.get_attribute("href") == cluster.balancer_url + "/api/docs"

    open_page(driver, cluster.balancer_url + "/api/docs")
    documented = {(m, p) for p, ops in openapi_document()["paths"].items() for m in ops}

    def listed() -> set[tuple[str, str]] | None:
        shown = {(m, p) for m, p in driver.execute_script(OPERATIONS_JS)}
        return shown if shown == documented else None

    wait_for("every operation on the page", listed, timeout=30)

    # Authorize with the token, as a person would.
    driver.find_element(By.CSS_SELECTOR, ".auth-wrapper .authorize").click()
    bearer = wait_for(
        "the bearer token field",
        lambda: next(
            c
            for c in driver.find_elements(By.CSS_SELECTOR, ".modal-ux .auth-container")
            if "bearerAuth" in c.text
        ),
        timeout=10,
    )
    bearer.find_element(By.CSS_SELECTOR, "input").send_keys(token)
    bearer.find_element(By.CSS_SELECTOR, "button.authorize").click()
    wait_for("authorized", lambda: "Logout" in bearer.text or None, timeout=10)
    driver.find_element(By.CSS_SELECTOR, ".modal-ux .btn-done").click()

    # Try it out: POST /api/tasks, 3 tasks at delta.
    before = queued_at(cluster.balancer_url, "delta")
    block = driver.find_element(By.ID, "operations-cluster-post_api_tasks")
    block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait_for(
        "the try-it-out button",
        lambda: block.find_element(By.CSS_SELECTOR, ".try-out__btn"),
        timeout=10,
    ).click()
    body = wait_for(
        "the body editor", lambda: block.find_element(By.CSS_SELECTOR, "textarea.body-param__text")
    )
    body.send_keys(Keys.CONTROL, "a")
    body.send_keys(Keys.DELETE)
    body.send_keys('{"node": "delta", "count": 3}')
    block.find_element(By.CSS_SELECTOR, "button.execute").click()

    def answered() -> str | None:
        cells = block.find_elements(
            By.CSS_SELECTOR, ".live-responses-table .response .response-col_status"
        )
        return cells[0].text.strip() if cells and cells[0].text.strip() else None

    status = wait_for("the live response", answered, timeout=30)
    assert status == "202", block.text
    assert '"accepted": 3' in block.text.replace("\n", " ") or '"accepted":3' in block.text
    assert queued_at(cluster.balancer_url, "delta") == before + 3
