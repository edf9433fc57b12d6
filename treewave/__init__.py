"""treewave: topology-aware load balancing of a server tree with the Echo and Finn waves.

One import namespace: the pure core (`treewave.core`), the link layer (`treewave.wire`),
the two services (`treewave.node`, `treewave.balancer`), the deployment generator
(`treewave.generator`), the cluster as local processes (`treewave.local`) and the console
script (`treewave.cli`).
"""

__all__: list[str] = []
