"""The Swarm target: `treewave render --target swarm` gives a stack file deployable with
`docker stack deploy` (one pinned service per server, dnsrr, Swarm secrets and configs),
sharing its parts with the compose target."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from treewave.cli.main import main
from treewave.core.topology import Topology
from treewave.generator.generate import generate
from treewave.generator.render import (
    PLACEMENT_FILE,
    PROMETHEUS_FILE,
    STACK_FILE,
    SWARM_SECRET_FILES,
    place_servers,
    render,
    render_swarm,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def topology() -> Topology:
    return generate(10, seed=5, extra_parents=2)


def _render(topology: Topology, out: Path, hosts: int = 3, **kw: Any) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "topology.json").write_text(topology.dumps(), encoding="utf-8")
    render_swarm(topology, "topology.json", out, hosts=hosts, **kw)
    stack: dict[str, Any] = yaml.safe_load((out / STACK_FILE).read_text())
    return stack


def test_render_is_deterministic_and_keeps_its_secrets(tmp_path: Path, topology: Topology) -> None:
    _render(topology, tmp_path / "a")
    _render(topology, tmp_path / "b")
    for rel in (STACK_FILE, PROMETHEUS_FILE):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    first = {rel: (tmp_path / "a" / rel).read_text() for rel in SWARM_SECRET_FILES}
    _render(topology, tmp_path / "a")  # a second render must not replace them
    assert {rel: (tmp_path / "a" / rel).read_text() for rel in SWARM_SECRET_FILES} == first
    # Made per deployment: another directory gets other secrets.
    for rel in SWARM_SECRET_FILES:
        assert (tmp_path / "b" / rel).read_text() != first[rel]


def test_one_pinned_service_per_server(tmp_path: Path, topology: Topology) -> None:
    services = _render(topology, tmp_path, hosts=3, cpu_per_slot=0.25)["services"]
    assert set(services) == set(topology.names) | {"balancer", "prometheus"}
    placement = place_servers(topology, 3)
    assert [placement[n] for n in topology.names] == ["h1", "h2", "h3"] * 3 + ["h1"]
    for server in topology.servers:
        svc = services[server.name]
        assert svc["command"][:3] == ["node", "--name", server.name]
        assert "ws://{name}:8000/ws" in svc["command"]
        deploy = svc["deploy"]
        assert deploy["endpoint_mode"] == "dnsrr"
        assert deploy["restart_policy"]["condition"] == "any"
        assert deploy["placement"]["constraints"] == [
            f"node.labels.treewave.host == {placement[server.name]}"
        ]
        assert float(deploy["resources"]["reservations"]["cpus"]) == server.cpus * 0.25
        assert svc["healthcheck"]["test"][:2] == ["CMD", "bash"]
        assert "/dev/tcp/127.0.0.1/8000 " in svc["healthcheck"]["test"][-1]
        assert svc["volumes"] == [
            {"type": "volume", "source": f"state-{server.name}", "target": "/var/lib/treewave"}
        ]
        assert svc["networks"] == ["servers"]
        assert "ports" not in svc
        assert "depends_on" not in svc  # Swarm ignores it: services converge in any order
        assert "build" not in svc


def test_secrets_are_swarm_secrets_never_in_the_stack_file(
    tmp_path: Path, topology: Topology
) -> None:
    stack = _render(topology, tmp_path)
    text = (tmp_path / STACK_FILE).read_text()
    for rel in SWARM_SECRET_FILES:
        path = tmp_path / rel
        value = path.read_text().strip()
        assert len(value) >= 32
        assert value not in text
        assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0, "not readable by others"
    assert stack["secrets"] == {
        "link-secret": {"file": "./secrets/link-secret"},
        "api-token": {"file": "./secrets/api-token"},
    }
    for server in topology.names:
        svc = stack["services"][server]
        assert [s["source"] for s in svc["secrets"]] == ["link-secret"]
        assert svc["command"][-2:] == ["--secret-file", "/run/secrets/link-secret"]
    balancer = stack["services"]["balancer"]
    assert [s["source"] for s in balancer["secrets"]] == ["link-secret", "api-token"]
    assert balancer["environment"]["TREEWAVE_API_TOKEN_FILE"] == "/run/secrets/api-token"
    assert balancer["environment"]["TREEWAVE_PUBLISHED_ADDRESS"] == "0.0.0.0"
    assert balancer["environment"]["TREEWAVE_TOKEN_FOR_READS"] == "${TREEWAVE_TOKEN_FOR_READS:-}"


def test_balancer_and_prometheus_published_in_host_mode_on_host_1(
    tmp_path: Path, topology: Topology
) -> None:
    services = _render(topology, tmp_path)["services"]
    published = {n: s["ports"] for n, s in services.items() if "ports" in s}
    assert set(published) == {"balancer", "prometheus"}
    for name, ports in published.items():
        assert [p["mode"] for p in ports] == ["host"], name
        constraints = services[name]["deploy"]["placement"]["constraints"]
        assert constraints == ["node.labels.treewave.host == h1"]
    assert published["balancer"][0]["target"] == 7999
    assert published["prometheus"][0]["target"] == 9090


def test_configs_are_named_by_content(tmp_path: Path, topology: Topology) -> None:
    """Swarm configs cannot change: a changed topology must get a new config name, so a
    re-deploy rolls the services onto it instead of failing."""
    a = _render(topology, tmp_path / "a")["configs"]
    b = _render(generate(11, seed=5), tmp_path / "b")["configs"]
    assert a["topology"]["file"] == "./topology.json"
    assert a["prometheus"]["file"] == "./prometheus/prometheus.yml"
    assert a["topology"]["name"] != b["topology"]["name"]
    assert a["topology"]["name"].startswith("treewave-topology-")


def test_shared_parts_render_alike_in_both_targets(tmp_path: Path, topology: Topology) -> None:
    stack = _render(topology, tmp_path / "swarm")
    compose_dir = tmp_path / "compose"
    compose_dir.mkdir()
    (compose_dir / "topology.json").write_text(topology.dumps(), encoding="utf-8")
    render(topology, "topology.json", compose_dir, template=REPO / "compose.template.yml")
    compose = yaml.safe_load((compose_dir / "compose.yml").read_text())
    # The same Prometheus config (service names resolve alike under both).
    assert (tmp_path / "swarm" / PROMETHEUS_FILE).read_text() == (
        compose_dir / PROMETHEUS_FILE
    ).read_text()
    for name in (*topology.names, "balancer"):
        swarm_cmd, compose_cmd = (
            stack["services"][name]["command"],
            compose["services"][name]["command"],
        )
        assert swarm_cmd[:-1] == compose_cmd[:-1], name  # all but where the secret is
        assert (
            stack["services"][name]["healthcheck"]["test"]
            == compose["services"][name]["healthcheck"]["test"]
        )


def test_stack_file_loads_with_docker_stack_config(tmp_path: Path, topology: Topology) -> None:
    if shutil.which("docker") is None:
        pytest.skip("cannot validate with `docker stack config`: no docker CLI")
    probe = subprocess.run(
        ["docker", "stack", "config", "--help"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip("cannot validate with `docker stack config`: this docker CLI lacks it")
    _render(topology, tmp_path)
    result = subprocess.run(
        ["docker", "stack", "config", "-c", str(tmp_path / STACK_FILE)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "endpoint_mode: dnsrr" in result.stdout


def test_cli_render_swarm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    topo = tmp_path / "topology.json"
    topo.write_text(generate(6, seed=1).dumps(), encoding="utf-8")
    out = tmp_path / "deploy"
    code = main(["render", "--target", "swarm", "--hosts", "2", "--topology", str(topo),
                 "--out-dir", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    for rel in (STACK_FILE, PROMETHEUS_FILE, *SWARM_SECRET_FILES):
        assert (out / rel).is_file()
        assert str(out / rel) in printed
    assert not (out / "compose.yml").exists()
    stack = yaml.safe_load((out / STACK_FILE).read_text())
    assert stack["configs"]["topology"]["file"] == "../topology.json"
    hosts = {s["deploy"]["placement"]["constraints"][0][-2:] for s in stack["services"].values()}
    assert hosts == {"h1", "h2"}


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--hosts", "7"], "more than the 6 servers"),
        (["--template", "compose.template.yml"], "--template is for --target compose"),
    ],
)
def test_cli_render_swarm_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], words: str
) -> None:
    topo = tmp_path / "topology.json"
    topo.write_text(generate(6, seed=1).dumps(), encoding="utf-8")
    out = tmp_path / "deploy"
    code = main(["render", "--target", "swarm", "--topology", str(topo), "--out-dir", str(out),
                 *args])  # fmt: skip
    assert code != 0
    assert words in capsys.readouterr().err
    assert not (out / STACK_FILE).exists()


@pytest.mark.parametrize("args", [["--hosts", "0"], ["--target", "kubernetes"],
                                  ["--cpu-per-slot", "0"]])  # fmt: skip
def test_cli_render_usage_errors_exit_2(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["render", *args])
    assert exc.value.code == 2
    assert capsys.readouterr().err


def test_balancer_state_survives_its_task_on_its_pinned_host(
    tmp_path: Path, topology: Topology
) -> None:
    """The desired topology and a drain in progress live in a volume on the balancer's host,
    so a recreated balancer task resumes a migration."""
    stack = _render(topology, tmp_path)
    balancer = stack["services"]["balancer"]
    state_dir = balancer["command"][balancer["command"].index("--state-dir") + 1]
    mounts = {v["target"]: v["source"] for v in balancer["volumes"]}
    assert mounts[state_dir] == "balancer-state"
    assert "balancer-state" in stack["volumes"]


def _pinned_hosts(stack: dict[str, Any]) -> dict[str, str]:
    return {
        name: svc["deploy"]["placement"]["constraints"][0].rsplit(" ", 1)[1]
        for name, svc in stack["services"].items()
        if name not in ("balancer", "prometheus")
    }


def _without(topology: Topology, removed: str) -> Topology:
    data = topology.to_json_data()
    data["servers"] = [
        {**s, "children": [c for c in s["children"] if c != removed]}
        for s in data["servers"]
        if s["name"] != removed
    ]
    return Topology.parse(data)


# Leaves wherever the tests remove a server: root r on h1; a b c d e f g on h2 h3 h1 h2 ...
STAR = Topology.parse(
    {
        "servers": [
            {"name": "r", "cpus": 1, "children": list("abcdefg")},
            *({"name": n, "cpus": 1, "children": []} for n in "abcdefg"),
        ]
    }
)


def test_a_re_render_never_moves_a_server(tmp_path: Path) -> None:
    """A server's queue is in a volume on its host: removing a server from the middle of the
    file, or adding one, leaves every other server where it was (a pure round-robin by
    position would move every server after the removed one, each to start empty)."""
    first = _pinned_hosts(_render(STAR, tmp_path))
    assert list(first.values()) == ["h1", "h2", "h3"] * 2 + ["h1", "h2"]
    smaller = _without(STAR, "b")  # on h3
    second = _pinned_hosts(_render(smaller, tmp_path))
    assert second == {n: h for n, h in first.items() if n != "b"}
    # A new server goes to the host with the fewest (h3 lost one), not by its position.
    data = smaller.to_json_data()
    data["servers"].append({"name": "newcomer", "cpus": 1, "tasks": 0, "children": []})
    data["servers"][0]["children"].append("newcomer")
    third = _pinned_hosts(_render(Topology.parse(data), tmp_path))
    assert third == {**second, "newcomer": "h3"}


def test_a_server_that_comes_back_returns_to_its_host(tmp_path: Path) -> None:
    """The placement file remembers removed servers: one that comes back in a later topology
    (e.g. while still retiring, so with its queue) is pinned to the host holding its volume."""
    first = _pinned_hosts(_render(STAR, tmp_path))
    _render(_without(STAR, "a"), tmp_path)
    assert json.loads((tmp_path / PLACEMENT_FILE).read_text())["a"] == "h2"
    assert _pinned_hosts(_render(STAR, tmp_path)) == first


def test_fewer_hosts_than_placed_servers_need_is_refused(tmp_path: Path) -> None:
    _render(STAR, tmp_path, hosts=3)
    stack_before = (tmp_path / STACK_FILE).read_bytes()
    with pytest.raises(ValueError, match=r"--hosts 2 leaves out the host of b \(on h3\), e "):
        _render(STAR, tmp_path, hosts=2)
    assert (tmp_path / STACK_FILE).read_bytes() == stack_before
    # Once the servers of h3 are gone from the topology, two hosts do.
    smaller = _without(_without(STAR, "b"), "e")
    assert set(_pinned_hosts(_render(smaller, tmp_path, hosts=2)).values()) == {"h1", "h2"}


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{not json", "not a readable placement file"),
        ('["h1"]', "expected an object of server name -> host"),
        ('{"oak": "host-1", "elm": 3}', "not a host label (h1, h2, ...) for elm, oak"),
    ],
)
def test_a_broken_placement_file_is_named_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, words: str
) -> None:
    topo = tmp_path / "topology.json"
    topo.write_text(generate(6, seed=1).dumps(), encoding="utf-8")
    out = tmp_path / "deploy"
    out.mkdir()
    (out / PLACEMENT_FILE).write_text(content, encoding="utf-8")
    code = main(["render", "--target", "swarm", "--topology", str(topo), "--out-dir", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert words in err, err
    assert "placement.json" in err, err
    assert not (out / STACK_FILE).exists()
    assert (out / PLACEMENT_FILE).read_text(encoding="utf-8") == content
