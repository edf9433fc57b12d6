"""Rendering: deterministic, one service per server, safe defaults, no drift from the
committed default files."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from treewave.cli.main import main
from treewave.core.topology import Topology
from treewave.generator.generate import generate
from treewave.generator.render import (
    COMPOSE_FILE,
    DASHBOARD_FILE,
    DASHBOARD_PROVISIONING_FILE,
    DATASOURCE_PROVISIONING_FILE,
    PROMETHEUS_FILE,
    periodic_intervals,
    render,
)
from treewave.wire.topology_file import load_topology

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "compose.template.yml"
RENDERED = (
    COMPOSE_FILE,
    PROMETHEUS_FILE,
    DASHBOARD_FILE,
    DATASOURCE_PROVISIONING_FILE,
    DASHBOARD_PROVISIONING_FILE,
)
SUPPORT_SERVICES = {"secret", "balancer", "prometheus", "grafana"}


def _render(topology: Topology, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "topology.json").write_text(topology.dumps(), encoding="utf-8")
    render(topology, "topology.json", out, template=TEMPLATE, build_context=".")
    compose: dict[str, Any] = yaml.safe_load((out / COMPOSE_FILE).read_text())
    return compose


@pytest.fixture
def topology() -> Topology:
    return generate(9, seed=21, extra_parents=2)


def test_render_is_deterministic(tmp_path: Path, topology: Topology) -> None:
    _render(topology, tmp_path / "a")
    _render(topology, tmp_path / "b")
    for rel in RENDERED:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_one_service_per_server(tmp_path: Path, topology: Topology) -> None:
    services = _render(topology, tmp_path)["services"]
    assert set(services) == set(topology.names) | SUPPORT_SERVICES
    for name in topology.names:
        command = services[name]["command"]
        assert command[:3] == ["node", "--name", name]
        assert "ws://{name}:8000/ws" in command
        assert "/var/lib/treewave" in command
        volumes = services[name]["volumes"]
        assert {"type": "volume", "source": f"state-{name}", "target": "/var/lib/treewave"} in (
            volumes
        )
        topo = next(v for v in volumes if v["target"] == "/etc/treewave/topology.json")
        assert topo["source"] == "./topology.json"
        assert topo["read_only"] is True
    assert services["balancer"]["command"][0] == "balancer"


def test_every_service_has_init_restart_and_healthcheck(tmp_path: Path, topology: Topology) -> None:
    services = _render(topology, tmp_path)["services"]
    # The one-shot that makes the link secret exits when done: no healthcheck, no restart
    # unless it fails, and no network at all.
    secret = services.pop("secret")
    assert secret["init"] is True
    assert secret["restart"] == "on-failure"
    assert secret["network_mode"] == "none"
    assert secret["command"] == [
        "secret",
        "--out",
        "/run/treewave/secret",
        "--out",
        "/run/treewave-api/token",
    ]
    for name, service in services.items():
        assert service["init"] is True, name
        assert service["restart"] == "unless-stopped", name
        test = service["healthcheck"]["test"]
        assert test[0] in {"CMD", "CMD-SHELL"}, name
        assert any(
            "/healthz" in part or "/-/healthy" in part or "/api/health" in part for part in test
        )


def test_only_three_ports_published(tmp_path: Path, topology: Topology) -> None:
    services = _render(topology, tmp_path)["services"]
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert published == {
        "balancer": ["${TREEWAVE_BIND_ADDRESS:-127.0.0.1}:${TREEWAVE_BALANCER_PORT:-7999}:7999"],
        "prometheus": [
            "${TREEWAVE_BIND_ADDRESS:-127.0.0.1}:${TREEWAVE_PROMETHEUS_PORT:-9090}:9090"
        ],
        "grafana": ["${TREEWAVE_BIND_ADDRESS:-127.0.0.1}:${TREEWAVE_GRAFANA_PORT:-3000}:3000"],
    }
    for name in topology.names:
        assert services[name]["networks"] == ["servers"]


def test_image_built_once_and_base_images_from_env(tmp_path: Path, topology: Topology) -> None:
    services = _render(topology, tmp_path)["services"]
    built = [name for name, s in services.items() if "build" in s]
    assert built == ["balancer"]
    build = services["balancer"]["build"]
    assert build["dockerfile"] == "docker/Dockerfile"
    assert build["args"] == {"PYTHON_IMAGE": "${PYTHON_IMAGE:-python:3.12-slim}"}
    for name in [*topology.names, "balancer"]:
        assert services[name]["image"] == "${TREEWAVE_IMAGE:-treewave:local}"
        assert services[name]["pull_policy"] == "never"
    assert services["prometheus"]["image"] == "${PROMETHEUS_IMAGE:-prom/prometheus:v2.53.0}"
    assert services["grafana"]["image"] == "${GRAFANA_IMAGE:-grafana/grafana:11.1.0}"


def test_depends_on_conditions(tmp_path: Path, topology: Topology) -> None:
    services = _render(topology, tmp_path)["services"]
    secret_made = {"secret": {"condition": "service_completed_successfully"}}
    assert services["balancer"]["depends_on"] == {
        **secret_made,
        topology.root: {"condition": "service_healthy"},
    }
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    for name in topology.names:
        assert services[name]["depends_on"] == secret_made


def test_links_authenticated_by_a_secret_in_a_volume(tmp_path: Path, topology: Topology) -> None:
    services = _render(topology, tmp_path)["services"]
    for name in [*topology.names, "balancer"]:
        command = services[name]["command"]
        assert command[command.index("--secret-file") + 1] == "/run/treewave/secret", name
        mount = next(v for v in services[name]["volumes"] if v["target"] == "/run/treewave")
        assert mount == {
            "type": "volume",
            "source": "link-secret",
            "target": "/run/treewave",
            "read_only": True,
        }


def test_api_token_made_once_and_seen_only_by_the_balancer(
    tmp_path: Path, topology: Topology
) -> None:
    services = _render(topology, tmp_path)["services"]
    token_mounts = {
        name: [
            v for v in s.get("volumes", []) if isinstance(v, dict) and v["source"] == "api-token"
        ]
        for name, s in services.items()
    }
    assert {name for name, mounts in token_mounts.items() if mounts} == {"secret", "balancer"}
    assert token_mounts["balancer"] == [
        {"type": "volume", "source": "api-token", "target": "/run/treewave-api", "read_only": True}
    ]
    env = services["balancer"]["environment"]
    assert env["TREEWAVE_API_TOKEN_FILE"] == "/run/treewave-api/token"
    # The balancer learns where compose publishes it, so a non-loopback bind requires
    # the token (the container itself always listens on 0.0.0.0).
    assert env["TREEWAVE_PUBLISHED_ADDRESS"] == "${TREEWAVE_BIND_ADDRESS:-127.0.0.1}"
    assert env["TREEWAVE_ALLOWED_HOSTS"] == "${TREEWAVE_ALLOWED_HOSTS:-}"
    # Reads behind the token: off unless the variable is set where compose runs.
    assert env["TREEWAVE_TOKEN_FOR_READS"] == "${TREEWAVE_TOKEN_FOR_READS:-}"


def test_grafana_settings(tmp_path: Path, topology: Topology) -> None:
    env = _render(topology, tmp_path)["services"]["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    password = env["GF_SECURITY_ADMIN_PASSWORD"]
    assert password.startswith("${GRAFANA_ADMIN_PASSWORD")
    assert not password.endswith(":-admin}")
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == (
        "/var/lib/grafana/dashboards/" + DASHBOARD_FILE.name
    )


def test_prometheus_targets_exactly_the_servers(tmp_path: Path, topology: Topology) -> None:
    _render(topology, tmp_path)
    config = yaml.safe_load((tmp_path / PROMETHEUS_FILE).read_text())
    assert config["global"]["scrape_interval"] == "5s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"treewave-nodes", "treewave-balancer", "prometheus"}
    node_targets = {
        (tuple(sc["targets"]), sc["labels"]["server"])
        for sc in jobs["treewave-nodes"]["static_configs"]
    }
    assert node_targets == {((f"{n}:8000",), n) for n in topology.names}
    assert jobs["treewave-balancer"]["static_configs"] == [{"targets": ["balancer:7999"]}]


@pytest.mark.parametrize("rel", RENDERED, ids=str)
def test_committed_files_do_not_drift(tmp_path: Path, rel: Path) -> None:
    """The committed default deployment is exactly the render of the committed topology."""
    shutil.copy(REPO / "topology.json", tmp_path / "topology.json")
    topology = load_topology(REPO / "topology.json")
    # Rendered elsewhere, so name the build context the root render gets by default.
    render(topology, "topology.json", tmp_path, template=TEMPLATE, build_context=".")
    committed = REPO / rel
    assert committed.is_file(), f"{rel} is not committed; run `treewave render`"
    assert (tmp_path / rel).read_bytes() == committed.read_bytes(), (
        f"{rel} differs from the render of topology.json; run `treewave render` and commit"
    )


def test_default_build_context_points_at_the_source_tree(tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    topology = generate(3, seed=1)
    out.mkdir()
    (out / "t.json").write_text(topology.dumps(), encoding="utf-8")
    render(topology, "t.json", out, template=TEMPLATE)
    compose = yaml.safe_load((out / COMPOSE_FILE).read_text())
    context = out / compose["services"]["balancer"]["build"]["context"]
    assert (context / "docker" / "Dockerfile").resolve() == (REPO / "docker/Dockerfile").resolve()


def _compose_available() -> str | None:
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if probe.returncode != 0:
        return "the docker compose v2 plugin is not installed"
    return None


def test_compose_config_validates(tmp_path: Path, topology: Topology) -> None:
    reason = _compose_available()
    if reason:
        pytest.skip(f"cannot validate with `docker compose config`: {reason}")
    _render(topology, tmp_path)
    result = subprocess.run(
        ["docker", "compose", "-f", str(tmp_path / COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --- the CLI ---------------------------------------------------------------------------


def test_cli_generate_and_render(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "topo.json"
    code = main(
        [
            "generate",
            "--nodes",
            "6",
            "--seed",
            "3",
            "--extra-parents",
            "1",
            "--cpus",
            "2-3",
            "--out",
            str(out),
            "--render",
            "--template",
            str(TEMPLATE),
        ]
    )
    assert code == 0
    topology = load_topology(out)
    assert out.read_text() == generate(6, 3, extra_parents=1, cpus=(2, 3)).dumps()
    assert all(2 <= s.cpus <= 3 for s in topology.servers)
    printed = capsys.readouterr().out
    for rel in RENDERED:
        assert (tmp_path / rel).is_file()
        assert str(tmp_path / rel) in printed


def test_cli_render_bad_topology(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    servers = [{"name": "grafana", "cpus": 1, "children": ["ghost"]}, {"name": "b", "cpus": 1}]
    bad.write_text(json.dumps({"servers": servers}))
    assert main(["render", "--topology", str(bad), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"treewave render: {bad} is not a valid topology:"
    problem_lines = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(problem_lines) >= 2
    assert "reserved" in err
    assert "unknown child 'ghost'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o" / COMPOSE_FILE).exists()


def test_cli_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--nodes", "3", "--tasks", "4-1"])
    assert exc.value.code == 2


def test_periodic_work_is_sized_by_the_tree() -> None:
    # A 10-server stack keeps 5 s for both; a 300-server one runs at most 2 healthchecks
    # (docker execs) and 20 scrapes a second; the healthcheck interval moves in doublings.
    assert periodic_intervals(10)["node_healthcheck_interval_s"] == 5
    assert periodic_intervals(10)["scrape_interval_s"] == 5
    assert periodic_intervals(100)["scrape_interval_s"] == 5
    big = periodic_intervals(300)
    assert big["node_healthcheck_interval_s"] == 160
    assert periodic_intervals(30)["node_healthcheck_interval_s"] == 20
    assert periodic_intervals(100)["node_healthcheck_interval_s"] == 80
    assert big["root_healthcheck_interval_s"] == 5
    assert big["scrape_interval_s"] == 15
    assert periodic_intervals(3000)["scrape_interval_s"] == 15
    # The start period covers start-up at about 1 s per server, in doublings from 30 s.
    assert periodic_intervals(10)["healthcheck_start_period_s"] == 30
    assert periodic_intervals(100)["healthcheck_start_period_s"] == 120
    assert big["healthcheck_start_period_s"] == 480
    for servers in (1, 7, 30, 99, 101, 300, 1000):
        every = periodic_intervals(servers)
        assert servers / every["node_healthcheck_interval_s"] <= 2
        assert every["healthcheck_start_period_s"] >= max(30, servers)
        # Once healthy, unhealthy only after failing for about the start period (or 3 checks).
        for kind, interval in (("fast", 5), ("node", every["node_healthcheck_interval_s"])):
            tries = every[f"{kind}_healthcheck_retries"]
            assert tries >= 3
            assert (
                tries * (interval + every["healthcheck_timeout_s"])
                >= every["healthcheck_start_period_s"]
            )
        assert 5 <= every["scrape_interval_s"] <= 15
    assert periodic_intervals(10)["fast_healthcheck_retries"] == 3
    assert big["fast_healthcheck_retries"] == 32


def test_a_large_stack_checks_its_servers_less_often_but_its_root_as_often(
    tmp_path: Path,
) -> None:
    topology = generate(300, 7, extra_parents=30)
    services = _render(topology, tmp_path)["services"]
    for name in topology.names:
        check = services[name]["healthcheck"]
        assert check["interval"] == ("5s" if name == topology.root else "160s"), name
        assert "/healthz" in check["test"][-1]
        # The root, checked every 5 s, tolerates failures for the whole 480 s start-up.
        assert check["retries"] == (32 if name == topology.root else 3), name
        assert check["start_period"] == "480s"
    for name in ("balancer", "prometheus"):
        assert services[name]["healthcheck"]["retries"] == 32
    prometheus = yaml.safe_load((tmp_path / PROMETHEUS_FILE).read_text(encoding="utf-8"))
    assert prometheus["global"]["scrape_interval"] == "15s"
