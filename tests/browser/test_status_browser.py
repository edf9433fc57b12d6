"""The status page in a real headless Chromium against a real cluster (one process per
server plus the balancer). Screenshots go to artifacts/ (status-page.png, status-page-30.png).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import (
    SMALL,
    all_reported,
    open_page,
    servers_on_page,
    wait_for,
)
from tests.support.http import get_json
from treewave.core.randomtree import TreeShape, random_topology
from treewave.core.topology import Settings
from treewave.generator.words import random_names

pytestmark = pytest.mark.browser


def test_page_shows_the_cluster_and_finn_raises_every_queue(
    driver: Any, start_cluster: Callable[..., Any], tmp_path: Path, artifacts: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    small_cluster = start_cluster(SMALL, tmp_path / "cluster")
    names = set(SMALL.names)
    open_page(driver, small_cluster.balancer_url)
    before = wait_for("every server on the page", lambda: all_reported(driver, names))
    for name, s in before.items():
        assert name in s["text"]
        assert s["queued"] is not None
    assert "live" in driver.find_element(By.ID, "conn").text
    # The policy in force, as the API reports it.
    policy = get_json(small_cluster.balancer_url + "/api/status")["policy"]
    assert driver.find_element(By.ID, "policy-name").text == policy == "lpt"

    tasks = driver.find_element(By.ID, "finn-tasks")
    tasks.clear()
    tasks.send_keys("2")
    driver.find_element(By.ID, "finn-button").click()

    def risen() -> dict[str, dict[str, Any]] | None:
        now = all_reported(driver, names)
        if now is None:
            return None
        ok = all(now[n]["queued"] >= before[n]["queued"] + 2 for n in names)
        return now if ok else None

    after = wait_for("every queued count to rise by 2", risen, timeout=20)
    for name in names:
        assert f"q {after[name]['queued']}" in after[name]["text"]
    notice = driver.find_element(By.ID, "notice")
    assert notice.is_displayed()
    assert "Finn wave" in notice.text
    assert "complete" in notice.text
    wait_for(
        "the Finn wave in the wave list",
        lambda: "FINN" in driver.find_element(By.ID, "waves-body").text.upper(),
    )

    # A bad request: the balancer's error is shown in the page, not swallowed.
    count = driver.find_element(By.ID, "submit-count")
    count.clear()
    count.send_keys("0")
    Select(driver.find_element(By.ID, "submit-node")).select_by_value("delta")
    driver.find_element(By.ID, "submit-button").click()
    error = driver.find_element(By.ID, "error")
    wait_for("the error area", error.is_displayed, timeout=10)
    text = driver.find_element(By.ID, "error-text").text
    assert "HTTP 422" in text, text
    assert "count" in text, text
    assert "/api/tasks" in text, text

    # And a good one still works after it.
    count.clear()
    count.send_keys("3")
    driver.find_element(By.ID, "submit-button").click()
    wait_for(
        "delta's queue to grow by 3",
        lambda: (servers_on_page(driver)["delta"]["queued"] or 0) >= after["delta"]["queued"] + 3,
        timeout=15,
    )
    assert not driver.find_element(By.ID, "error").is_displayed()

    # Show the error once more for the screenshot, so it documents the error area too.
    count.clear()
    count.send_keys("0")
    driver.find_element(By.ID, "submit-button").click()
    wait_for("the error area", error.is_displayed, timeout=10)
    driver.save_screenshot(str(artifacts / "status-page.png"))


def test_page_with_30_servers_is_readable_and_greys_out_a_lost_server(
    driver: Any, start_cluster: Callable[..., Any], tmp_path: Path, artifacts: Path
) -> None:
    from selenium.webdriver.common.by import By

    topo = random_topology(
        30,
        seed=11,
        shape=TreeShape(max_children=3, extra_parents=4, cpus=(2, 4), tasks=(0, 5)),
        names=random_names(30, 11),
        settings=Settings(task_time_s=900, rebalance_interval_s=0, wave_timeout_s=2),
    )
    names = set(topo.names)
    cluster = start_cluster(topo, tmp_path / "cluster30", timeout_s=150)
    open_page(driver, cluster.balancer_url)
    wait_for("all 30 servers reported", lambda: all_reported(driver, names), timeout=60)

    # Readable at 1280x800: the whole tree on screen, no overlaps, names not tiny.
    boxes = driver.execute_script(
        """
        return Array.from(document.querySelectorAll('#tree g.server')).map(g => {
          const r = g.querySelector('rect.box').getBoundingClientRect();
          const t = g.querySelector('text.name').getBoundingClientRect();
          return {name: g.dataset.name, x: r.x, y: r.y, w: r.width, h: r.height,
                  textH: t.height, textW: t.width};
        });"""
    )
    assert len(boxes) == 30
    for b in boxes:
        assert b["x"] >= 0
        assert b["y"] >= 0
        assert b["x"] + b["w"] <= 1280, b
        assert b["y"] + b["h"] <= 800, b
        assert b["textH"] >= 11, f"name text too small: {b}"
        assert b["textW"] <= b["w"], f"name overflows its box: {b}"
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            apart = (
                a["x"] + a["w"] <= b["x"]
                or b["x"] + b["w"] <= a["x"]
                or a["y"] + a["h"] <= b["y"]
                or b["y"] + b["h"] <= a["y"]
            )
            assert apart, f"{a['name']} overlaps {b['name']}"

    # Rebalance from the page: the moves appear in the page.
    driver.find_element(By.ID, "rebalance-button").click()
    notice = driver.find_element(By.ID, "notice")
    wait_for("the rebalance result", lambda: "Rebalance" in notice.text, timeout=30)
    moved = "0 tasks moved" not in notice.text
    if moved:
        wait_for(
            "the moves list",
            lambda: "→" in driver.find_element(By.ID, "moves").text,
            timeout=10,
        )

    # Lose a leaf: the next snapshot is partial and the page greys that server out.
    lost = topo.leaves[-1]
    cluster.stop_server(lost)
    wait_for(
        f"{lost} greyed out",
        lambda: (
            servers_on_page(driver)[lost]["missing"]
            and "missing" in servers_on_page(driver)[lost]["cls"]
        ),
        timeout=30,
    )
    shown = servers_on_page(driver)
    assert all(not shown[n]["missing"] for n in names - {lost})
    assert "no reply" in shown[lost]["text"]
    line = driver.find_element(By.ID, "echo-line").text
    assert "partial" in line
    assert lost in line
    driver.save_screenshot(str(artifacts / "status-page-30.png"))


def test_page_shows_a_retiring_server_live_until_it_is_retired(
    driver: Any, start_cluster: Callable[..., Any], tmp_path: Path
) -> None:
    """A topology without `fjord` is posted while the page is open: the page redraws the
    new tree, its card of retiring servers shows fjord with what it still holds (its running
    task within the grace, its queued ones moving out), and the card goes once fjord is
    retired, every task it held now elsewhere."""
    from selenium.webdriver.common.by import By

    cluster = start_cluster(SMALL, tmp_path / "cluster")
    names = set(SMALL.names)
    open_page(driver, cluster.balancer_url)
    wait_for("every server on the page", lambda: all_reported(driver, names))
    assert not driver.find_element(By.ID, "retiring-card").is_displayed()
    get_json(cluster.balancer_url + "/api/tasks", "POST", {"node": "fjord", "count": 3})

    data = SMALL.to_json_data()
    data["settings"] = {**data["settings"], "drain_grace_s": 6}
    data["servers"] = [
        {**s, "children": [c for c in s.get("children", []) if c != "fjord"]}
        for s in data["servers"]
        if s["name"] != "fjord"
    ]
    get_json(cluster.balancer_url + "/api/topology", "POST", data)

    def fjord_retiring() -> str | None:
        card = driver.find_element(By.ID, "retiring-card")
        items = driver.find_elements(By.CSS_SELECTOR, '#retiring li[data-server="fjord"]')
        shown = card.is_displayed() and items and "grace left" in items[0].text
        return items[0].text if shown else None

    text = wait_for("fjord in the card of retiring servers", fjord_retiring, timeout=20)
    assert "1 running" in text, text  # its start-up task, within the grace
    wait_for(
        "the new tree on the page",
        lambda: all_reported(driver, names - {"fjord"}),
        timeout=20,
    )
    wait_for(
        "the card gone once fjord is retired",
        lambda: not driver.find_element(By.ID, "retiring-card").is_displayed() or None,
        timeout=60,
    )
    state = get_json(cluster.balancer_url + "/api/topology")
    assert state["migration"]["state"] == "steady", state["migration"]
    assert state["migration"]["retired"]["fjord"]["moved"] == 4, state["migration"]
    tree = get_json(cluster.balancer_url + "/api/tree")
    assert (
        sum(n["queued"] + n["running"] for n in tree["nodes"])
        == sum(s.tasks for s in SMALL.servers) + 3
    )
