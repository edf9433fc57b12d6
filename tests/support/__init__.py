"""What tests and benchmarks share: free ports, JSON over HTTP, counters read from
`/metrics`, waiting for a condition, the `treewave` command, launching clusters as real
processes, and `docker compose` for one project.

Imported as `tests.support` (pytest puts the repository root on `sys.path`, see
`pythonpath` in pyproject.toml; benchmarks run as `python -m bench.NAME` from the root).
"""
