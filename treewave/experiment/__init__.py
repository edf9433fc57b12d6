"""`treewave experiment`: balancing policies compared on one topology and one workload.

A spec (`spec.py`) names the topology, the workload (`workloads.py`), the policies, the
seeds and the runner: `model` (`model.py`, a discrete-event model running the policies'
own code), `local` (`local.py`, a real `treewave run` cluster) or `compose` (`compose.py`,
a Docker Compose stack per run); both real runners drive their cluster through its URLs
with `drive.py`. `run.py` runs it, `report.py` prints the table and writes the raw results
and an HTML report.
"""

__all__ = ["compose", "drive", "local", "model", "report", "results", "run", "spec", "workloads"]
