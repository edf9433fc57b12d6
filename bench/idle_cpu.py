"""Where an idle Compose stack's CPU goes: its containers and the Docker machinery.

    python -m bench.idle_cpu PROJECT [--window 30]

`docker stats` shows only what runs inside the containers. A healthcheck is also a
`docker exec`: dockerd, containerd and a runc process per check do work outside any
container, and every container has a containerd shim. This samples, over one window,

- each container of the compose project: its cgroup's CPU time (`cpuacct.usage` on
  cgroup v1, `cpu.stat usage_usec` on v2), grouped by compose service kind
  (node / balancer / prometheus / other);
- dockerd, containerd and the project's containerd shims: `/proc/PID/stat` utime+stime
  (runc, started per exec and per healthcheck by a shim, is charged to the shim when it
  exits: children's times are in the shim's cutime/cstime, read too);

and reports each as a percentage of the whole machine (100 % = every core busy), so the
figure does not depend on what else the machine runs. Needs to run on the Docker host
(reads /proc and /sys/fs/cgroup); used by bench/compose_footprint.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ContainerInfo", "containers", "idle_cpu"]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    service: str
    pid: int


def containers(project: str) -> list[ContainerInfo]:
    """Running containers of a compose project: id, service name, init pid."""
    ids = subprocess.run(
        [
            "docker",
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            f"label=com.docker.compose.project={project}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if not ids:
        return []
    inspected = json.loads(
        subprocess.run(
            ["docker", "inspect", *ids], capture_output=True, text=True, check=True
        ).stdout
    )
    return [
        ContainerInfo(
            c["Id"], c["Config"]["Labels"].get("com.docker.compose.service", "?"), c["State"]["Pid"]
        )
        for c in inspected
    ]


def _cgroup_ns(container_id: str) -> int | None:
    """CPU time of a container's cgroup in ns (cgroup v1 with the cgroupfs or systemd
    driver, or v2)."""
    candidates = [
        Path(f"/sys/fs/cgroup/cpuacct/docker/{container_id}/cpuacct.usage"),
        Path(f"/sys/fs/cgroup/cpu,cpuacct/docker/{container_id}/cpuacct.usage"),
        Path(f"/sys/fs/cgroup/cpuacct/system.slice/docker-{container_id}.scope/cpuacct.usage"),
    ]
    for path in candidates:
        if path.exists():
            return int(path.read_text())
    for path in (
        Path(f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/cpu.stat"),
        Path(f"/sys/fs/cgroup/docker/{container_id}/cpu.stat"),
    ):
        if path.exists():
            for line in path.read_text().splitlines():
                key, value = line.split()
                if key == "usage_usec":
                    return int(value) * 1000
    return None


def _proc_ns(pid: int, children: bool = False) -> int | None:
    """utime+stime (and the waited-for children's, if asked) of a process, in ns."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks * 1_000_000_000 // CLOCK_TICKS


def _ppid(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(raw[raw.rindex(")") + 2 :].split()[1])


def _docker_daemons() -> dict[int, str]:
    """The dockerd of /var/run/docker.pid and the containerd it runs (other engines on
    the machine, e.g. a multi-host lab's, are left out)."""
    try:
        dockerd = int(Path("/var/run/docker.pid").read_text())
    except (OSError, ValueError):
        return {}
    found = {dockerd: "dockerd"}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if comm == "containerd" and _ppid(int(entry.name)) in (dockerd, 1):
                found[int(entry.name)] = "containerd"
    return found


def _kind(service: str, nodes: frozenset[str] | None) -> str:
    if service in ("balancer", "prometheus"):
        return service
    if nodes is None or service in nodes:
        return "nodes"
    return "other"


def _snapshot(
    infos: list[ContainerInfo], daemons: list[int], shims: list[int]
) -> dict[str, int | None]:
    snap: dict[str, int | None] = {}
    for c in infos:
        snap[f"c:{c.id}"] = _cgroup_ns(c.id)
    for pid in daemons:
        snap[f"d:{pid}"] = _proc_ns(pid)
    for pid in shims:
        snap[f"s:{pid}"] = _proc_ns(pid, children=True)
    return snap


def idle_cpu(
    project: str, window_s: float = 30.0, nodes: frozenset[str] | None = None
) -> dict[str, float]:
    """Percent of the machine (all cores) used over `window_s` by each group: the
    project's node / balancer / prometheus containers, its containerd shims (runc for
    each healthcheck included), dockerd and containerd; plus `stack_total`."""
    infos = containers(project)
    daemons = _docker_daemons()
    shims = sorted({p for c in infos if c.pid and (p := _ppid(c.pid)) is not None})
    before = _snapshot(infos, list(daemons), shims)
    t0 = time.monotonic()
    time.sleep(window_s)
    after = _snapshot(infos, list(daemons), shims)
    elapsed = time.monotonic() - t0
    capacity_ns = elapsed * (os.cpu_count() or 1) * 1e9

    groups: dict[str, float] = {}

    def add(group: str, key: str) -> None:
        b, a = before.get(key), after.get(key)
        if a is not None and b is not None:
            groups[group] = groups.get(group, 0.0) + (a - b)

    for c in infos:
        add(_kind(c.service, nodes), f"c:{c.id}")
    for pid, name in daemons.items():
        add(name, f"d:{pid}")
    for pid in shims:
        add("shims", f"s:{pid}")
    result = {k: round(100 * v / capacity_ns, 2) for k, v in sorted(groups.items())}
    result["stack_total"] = round(sum(result.values()), 2)
    result["window_s"] = round(elapsed, 1)
    result["containers"] = len(infos)
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("project", help="compose project name (docker compose -p)")
    p.add_argument("--window", type=float, default=30.0, help="seconds to sample (30)")
    args = p.parse_args(argv)
    print(json.dumps(idle_cpu(args.project, args.window), indent=2))
    print(f"load average: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
