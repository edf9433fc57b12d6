"""What the browser tests share: the page's probes, the viewport and a small topology."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from tests.support.waiting import wait_for as poll
from treewave.core.topology import ServerSpec, Settings, Topology

T = TypeVar("T")

__all__ = ["SMALL", "VIEWPORT", "all_reported", "open_page", "servers_on_page", "wait_for"]


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0) -> T:
    """Poll a page probe; any exception (a DOM mid-update) or None means "not yet"."""
    return poll(what, probe, timeout, retry_on=(Exception,))


VIEWPORT = {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False}

# Every cpu starts busy with a long task, so tasks added later stay queued.
SMALL = Topology.from_servers(
    [
        ServerSpec(name="aurora", cpus=2, tasks=2, children=("birch", "cedar")),
        ServerSpec(name="birch", cpus=1, tasks=1, children=("delta", "ember")),
        ServerSpec(name="cedar", cpus=2, tasks=2, children=("ember", "fjord")),
        ServerSpec(name="delta", cpus=1, tasks=1),
        ServerSpec(name="ember", cpus=2, tasks=2),
        ServerSpec(name="fjord", cpus=1, tasks=1),
    ],
    Settings(task_time_s=900, rebalance_interval_s=0, wave_timeout_s=3),
)


SERVERS_JS = """
return Array.from(document.querySelectorAll('#tree g.server')).map(g => ({
  name: g.dataset.name,
  queued: g.dataset.queued === '' ? null : Number(g.dataset.queued),
  running: g.dataset.running === '' ? null : Number(g.dataset.running),
  missing: g.dataset.missing === 'true',
  text: g.textContent,
  cls: g.getAttribute('class'),
}));
"""


def servers_on_page(driver: Any) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in driver.execute_script(SERVERS_JS)}


def open_page(driver: Any, url: str) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", VIEWPORT)
    driver.get(url)


def all_reported(driver: Any, names: set[str]) -> dict[str, dict[str, Any]] | None:
    shown = servers_on_page(driver)
    if set(shown) != names or any(s["missing"] for s in shown.values()):
        return None
    return shown
