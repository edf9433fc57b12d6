"""The cluster as local processes (`treewave run`): the plan of ports, peers and
arguments (`plan`, pure), the children and their stopping (`children`), the run's
processes and files (`cluster`), the supervisor with backoff and readiness
(`supervisor`), SIGHUP reloads (`reload`), the run directory (`rundir`)."""

__all__ = [
    "children",
    "cluster",
    "console",
    "errors",
    "plan",
    "ports",
    "reload",
    "rundir",
    "supervisor",
]
