"""The Grafana "tree load" dashboard, built as data so tests can inspect every query.

The Node Graph panel finds its fields by their *names* (`id`, `title`, `mainstat`, `color`;
edges `id`, `source`, `target`), not by display names. Grafana's rename/organize
transformations only change display names, so the names come from PromQL labels
(`label_replace`) and from "Add field from calculation", whose alias is a real field name.
The queries are label-driven; the topology contributes the server variable and the
description, so each topology renders its own file.
"""

from __future__ import annotations

import json
from typing import Any

from treewave.core.topology import Topology

__all__ = [
    "DASHBOARD_TITLE",
    "DASHBOARD_UID",
    "DATASOURCE_UID",
    "build_dashboard",
    "dashboard_json",
    "iter_exprs",
]

DATASOURCE_UID = "treewave-prometheus"
DASHBOARD_UID = "treewave-tree"
DASHBOARD_TITLE = "treewave — tree load"
DATASOURCE = {"type": "prometheus", "uid": DATASOURCE_UID}
SERVER_FILTER = 'server=~"$server"'

# Nodes of the graph: every server of the topology (from the balancer's info metric), with
# its live pressure when the node reports one and NaN (drawn without a stat) when it does
# not, so an edge never points at a node missing from the nodes frame.
NODES_EXPR = (
    "label_replace(label_replace(max by (server) (treewave_node_pressure) "
    "or on (server) (max by (server) (treewave_topology_server_info) * NaN), "
    '"id", "$1", "server", "(.+)"), "title", "$1", "server", "(.+)")'
)
EDGES_EXPR = "max by (id, source, target) (treewave_topology_edge_info)"


def _target(ref_id: str, expr: str, legend: str = "", *, instant: bool = False) -> dict[str, Any]:
    target: dict[str, Any] = {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "refId": ref_id,
    }
    if instant:
        target.update({"format": "table", "instant": True, "range": False})
    else:
        target.update({"legendFormat": legend or "__auto", "range": True})
    return target


def _timeseries(
    panel_id: int,
    title: str,
    grid: tuple[int, int, int, int],
    targets: list[dict[str, Any]],
    unit: str = "short",
    description: str = "",
) -> dict[str, Any]:
    x, y, w, h = grid
    return {
        "datasource": DATASOURCE,
        "description": description,
        "fieldConfig": {
            "defaults": {
                "custom": {"drawStyle": "line", "fillOpacity": 10, "lineWidth": 1},
                "unit": unit,
            },
            "overrides": [],
        },
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "id": panel_id,
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets,
        "title": title,
        "type": "timeseries",
    }


def _node_graph_panel(overload_s: float) -> dict[str, Any]:
    only_nodes = {"id": "byRefId", "options": "nodes"}
    return {
        "datasource": DATASOURCE,
        "description": (
            "The topology (parent -> child) with each server's pressure (expected "
            "seconds of work per CPU; a running task counts for what is left of it) as its "
            "main stat and colour, red at the overload threshold. A server without a stat "
            "is not reporting."
        ),
        "fieldConfig": {
            "defaults": {},
            "overrides": [
                {
                    "matcher": {"id": "byName", "options": "color"},
                    "properties": [
                        {"id": "color", "value": {"mode": "continuous-GrYlRd"}},
                        {"id": "min", "value": 0},
                        {"id": "max", "value": overload_s},
                    ],
                }
            ],
        },
        "gridPos": {"h": 14, "w": 24, "x": 0, "y": 0},
        "id": 1,
        "options": {
            "edges": {},
            "nodes": {"mainStatUnit": "s"},
        },
        "targets": [
            _target("nodes", NODES_EXPR, instant=True),
            _target("edges", EDGES_EXPR, instant=True),
        ],
        "title": "Tree load (pressure = expected work per CPU, seconds)",
        "transformations": [
            {
                "id": "calculateField",
                "filter": only_nodes,
                "options": {
                    "alias": "mainstat",
                    "mode": "reduceRow",
                    "reduce": {"reducer": "sum"},
                    "replaceFields": False,
                    "timeSeries": False,
                },
            },
            {
                "id": "calculateField",
                "filter": only_nodes,
                "options": {
                    "alias": "color",
                    "mode": "reduceRow",
                    "reduce": {"include": ["mainstat"], "reducer": "sum"},
                    "replaceFields": False,
                    "timeSeries": False,
                },
            },
        ],
        "type": "nodeGraph",
    }


def _panels(overload_s: float) -> list[dict[str, Any]]:
    by_server = f"{{{SERVER_FILTER}}}"
    return [
        _node_graph_panel(overload_s),
        _timeseries(
            2,
            "Running tasks per server",
            (0, 14, 12, 8),
            [_target("A", f"sum by (server) (treewave_node_running{by_server})", "{{server}}")],
        ),
        _timeseries(
            3,
            "Queued tasks per server",
            (12, 14, 12, 8),
            [_target("A", f"sum by (server) (treewave_node_queued{by_server})", "{{server}}")],
        ),
        _timeseries(
            4,
            "Imbalance, maximum pressure and expected makespan (last Echo)",
            (0, 22, 12, 8),
            [
                _target("A", "max(treewave_imbalance)", "imbalance"),
                _target("B", "max(treewave_max_pressure)", "max pressure"),
                _target("C", "max(treewave_expected_makespan_seconds)", "expected makespan"),
            ],
            unit="s",
            description="Seconds: pressure is expected work per CPU; the expected makespan "
            "is the largest expected finish time over the servers.",
        ),
        _timeseries(
            5,
            "Tasks completed per second",
            (12, 22, 12, 8),
            [
                _target(
                    "A",
                    f"sum by (server) (rate(treewave_node_completed_total{by_server}[1m]))",
                    "{{server}}",
                )
            ],
            unit="ops",
        ),
        _timeseries(
            6,
            "Wave duration by algorithm",
            (0, 30, 12, 8),
            [
                _target(
                    "A",
                    "histogram_quantile(0.5, sum by (algorithm, le) "
                    "(rate(treewave_wave_duration_seconds_bucket[1m])))",
                    "{{algorithm}} p50",
                ),
                _target(
                    "B",
                    "histogram_quantile(0.95, sum by (algorithm, le) "
                    "(rate(treewave_wave_duration_seconds_bucket[1m])))",
                    "{{algorithm}} p95",
                ),
            ],
            unit="s",
        ),
        _timeseries(
            7,
            "Waves per second by algorithm and outcome",
            (12, 30, 12, 8),
            [
                _target(
                    "A",
                    "sum by (algorithm, outcome) (rate(treewave_waves_total[1m]))",
                    "{{algorithm}} {{outcome}}",
                )
            ],
            unit="ops",
        ),
        _timeseries(
            8,
            "Task transfers per second",
            (0, 38, 12, 8),
            [
                _target(
                    "A",
                    f"sum by (server) (rate(treewave_node_transferred_in_total{by_server}[1m]))",
                    "{{server}} in",
                ),
                _target(
                    "B",
                    f"sum by (server) (rate(treewave_node_transferred_out_total{by_server}[1m]))",
                    "{{server}} out",
                ),
            ],
            unit="ops",
        ),
        _timeseries(
            9,
            "Wave messages per second and tasks moved",
            (12, 38, 12, 8),
            [
                _target(
                    "A",
                    "sum by (algorithm) (rate(treewave_wave_messages_total[1m]))",
                    "{{algorithm}} messages",
                ),
                _target(
                    "B", "sum(rate(treewave_tasks_moved_total[1m]))", "tasks moved by rebalance"
                ),
            ],
            unit="ops",
        ),
        _timeseries(
            10,
            "Pressure per server (expected work per CPU)",
            (0, 46, 12, 8),
            [_target("A", f"max by (server) (treewave_node_pressure{by_server})", "{{server}}")],
            unit="s",
        ),
        _timeseries(
            11,
            "Expected work per server",
            (12, 46, 12, 8),
            [
                _target(
                    "A",
                    f"max by (server) (treewave_node_expected_work_seconds{by_server})",
                    "{{server}}",
                )
            ],
            unit="s",
        ),
    ]


def _server_variable(topology: Topology) -> dict[str, Any]:
    names = list(topology.names)
    return {
        "allValue": ".+",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "description": "Servers of the rendered topology",
        "hide": 0,
        "includeAll": True,
        "label": "server",
        "multi": True,
        "name": "server",
        "options": [
            {"selected": True, "text": "All", "value": "$__all"},
            *({"selected": False, "text": n, "value": n} for n in names),
        ],
        "query": ",".join(names),
        "skipUrlSync": False,
        "type": "custom",
    }


def build_dashboard(topology: Topology) -> dict[str, Any]:
    """The dashboard for `topology` as JSON-ready data (deterministic)."""
    return {
        "annotations": {"list": []},
        "description": (
            f"Load of the treewave tree: {len(topology)} servers, "
            f"{len(topology.edges)} links, root {topology.root}."
        ),
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "links": [],
        "panels": _panels(topology.settings.task_time_s * topology.settings.overload_percent / 100),
        "refresh": "5s",
        "schemaVersion": 39,
        "tags": ["treewave"],
        "templating": {"list": [_server_variable(topology)]},
        "time": {"from": "now-15m", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": DASHBOARD_TITLE,
        "uid": DASHBOARD_UID,
        "version": 1,
    }


def dashboard_json(topology: Topology) -> str:
    """The dashboard file's text: stable key order, two-space indent, trailing newline."""
    return json.dumps(build_dashboard(topology), indent=2, ensure_ascii=False) + "\n"


def iter_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard, in panel order (for tests and checks)."""
    return [t["expr"] for p in dashboard.get("panels", []) for t in p.get("targets", [])]
