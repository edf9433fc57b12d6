"""Static checks of the Grafana dashboard and provisioning (Grafana cannot run here; the
e2e test runs every query against a live Prometheus)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from treewave.generator.dashboard import (
    DASHBOARD_TITLE,
    DASHBOARD_UID,
    DATASOURCE_UID,
    build_dashboard,
    iter_exprs,
)
from treewave.generator.generate import generate

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_PATH = REPO / "grafana/dashboards/treewave.json"
DATASOURCE_FILE = REPO / "grafana/provisioning/datasources/prometheus.yml"
PROVIDER_FILE = REPO / "grafana/provisioning/dashboards/treewave.yml"

# The metrics the node and the balancer document (see the design's metric contract).
KNOWN_METRICS = {
    "treewave_node_cpus",
    "treewave_node_running",
    "treewave_node_queued",
    "treewave_node_pressure",
    "treewave_node_expected_work_seconds",
    "treewave_node_completed_total",
    "treewave_node_transferred_in_total",
    "treewave_node_transferred_out_total",
    "treewave_node_wave_messages_total",
    "treewave_node_invalid_messages_total",
    "treewave_waves_total",
    "treewave_wave_duration_seconds",
    "treewave_wave_messages_total",
    "treewave_rebalance_runs_total",
    "treewave_tasks_moved_total",
    "treewave_max_pressure",
    "treewave_expected_makespan_seconds",
    "treewave_imbalance",
    "treewave_server_pressure",
    "treewave_topology_server_info",
    "treewave_topology_edge_info",
    "up",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))
    return data


def _targets(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for p in dashboard["panels"] for t in p.get("targets", [])]


def test_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == DASHBOARD_UID == "treewave-tree"
    assert dashboard["title"] == DASHBOARD_TITLE == "treewave — tree load"
    assert 36 <= dashboard["schemaVersion"] <= 41
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_datasource_uid_everywhere_matches_provisioning(dashboard: dict[str, Any]) -> None:
    provisioned = yaml.safe_load(DATASOURCE_FILE.read_text())["datasources"]
    assert len(provisioned) == 1
    assert provisioned[0]["uid"] == DATASOURCE_UID
    assert provisioned[0]["type"] == "prometheus"
    assert provisioned[0]["url"] == "http://prometheus:9090"
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


@pytest.mark.parametrize("expr", iter_exprs(build_dashboard(generate(5, seed=0))))
def test_expr_is_balanced_and_uses_known_metrics(expr: str) -> None:
    assert expr.count('"') % 2 == 0, expr
    bare = _strip_strings(expr)
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for char in bare:
        if char in "([{":
            stack.append(char)
        elif char in pairs:
            assert stack, f"unbalanced {char!r} in {expr}"
            assert stack.pop() == pairs[char], f"mismatched {char!r} in {expr}"
    assert not stack, f"unclosed {stack} in {expr}"
    metrics = set(re.findall(r"\btreewave_[a-z_]+", bare)) | set(re.findall(r"\bup\b", bare))
    assert metrics, f"no metric in {expr}"
    for metric in metrics:
        base = metric
        for suffix in HISTOGRAM_SUFFIXES:
            if metric.endswith(suffix) and metric.removesuffix(suffix) in KNOWN_METRICS:
                base = metric.removesuffix(suffix)
        assert base in KNOWN_METRICS, f"{metric} is not a documented metric"


def _promtool() -> list[str] | None:
    """A way to run the real promtool: installed, or inside the Prometheus image."""
    if shutil.which("promtool"):
        return ["promtool"]
    image = os.environ.get("PROMETHEUS_IMAGE")
    if image and shutil.which("docker"):
        present = subprocess.run(
            ["docker", "image", "inspect", image], capture_output=True, check=False
        )
        if present.returncode == 0:
            return ["docker", "run", "--rm", "-i", "--entrypoint", "promtool", image]
    return None


def test_every_expr_parses_with_promtool(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Recording rules make promtool parse each expression exactly as Prometheus would."""
    promtool = _promtool()
    if promtool is None:
        pytest.skip("promtool is not installed and no local PROMETHEUS_IMAGE to run it from")
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"treewave:dashboard_expr_{i}", "expr": expr}
                    for i, expr in enumerate(iter_exprs(dashboard))
                ],
            }
        ]
    }
    text = yaml.safe_dump(rules, sort_keys=False)
    if promtool[0] == "docker":
        result = subprocess.run(
            [*promtool, "check", "rules", "/dev/stdin"],
            input=text,
            capture_output=True,
            text=True,
            check=False,
        )
    else:
        path = tmp_path / "rules.yml"
        path.write_text(text)
        result = subprocess.run(
            [*promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules['groups'][0]['rules'])} rules found" in result.stdout


def test_node_graph_frames(dashboard: dict[str, Any]) -> None:
    """Nodes frame fields id/title (labels) and mainstat/color (calculated, real names);
    edges frame fields id/source/target (labels). Grafana's Node Graph matches field
    *names*, which rename/organize transformations do not change."""
    (panel,) = [p for p in dashboard["panels"] if p["type"] == "nodeGraph"]
    targets = {t["refId"]: t for t in panel["targets"]}
    assert set(targets) == {"nodes", "edges"}
    for target in targets.values():
        assert target["instant"] is True
        assert target["format"] == "table"
    nodes = targets["nodes"]["expr"]
    assert "treewave_node_pressure" in nodes
    assert "label_replace(" in nodes
    assert re.search(r'"id", "\$1", "server"', nodes)
    assert re.search(r'"title", "\$1", "server"', nodes)
    edges = targets["edges"]["expr"]
    assert edges == "max by (id, source, target) (treewave_topology_edge_info)"
    aliases = {}
    for step in panel["transformations"]:
        assert step["id"] == "calculateField"
        assert step["filter"] == {"id": "byRefId", "options": "nodes"}
        assert step["options"]["timeSeries"] is False  # else frames get joined into one
        aliases[step["options"]["alias"]] = step["options"]
    assert set(aliases) == {"mainstat", "color"}
    assert aliases["color"]["reduce"]["include"] == ["mainstat"]
    colour = panel["fieldConfig"]["overrides"][0]
    assert colour["matcher"] == {"id": "byName", "options": "color"}


def test_server_variable_lists_the_topology() -> None:
    topology = generate(6, seed=2)
    (variable,) = build_dashboard(topology)["templating"]["list"]
    assert variable["name"] == "server"
    assert variable["query"].split(",") == list(topology.names)
    assert variable["allValue"] == ".+"


def test_provisioning_and_compose_agree() -> None:
    provider = yaml.safe_load(PROVIDER_FILE.read_text())["providers"][0]
    assert provider["type"] == "file"
    dashboards_dir = provider["options"]["path"]
    assert dashboards_dir == "/var/lib/grafana/dashboards"
    grafana = yaml.safe_load((REPO / "compose.yml").read_text())["services"]["grafana"]
    mounts = {v["target"]: v for v in grafana["volumes"] if isinstance(v, dict)}
    assert mounts[dashboards_dir]["source"] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"]["source"] == "./grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD_PATH.name}"
    assert (REPO / "grafana/dashboards" / Path(home).name).is_file()
