"""The deployment generator: random topologies, and the compose or Swarm files rendered from one."""

__all__ = ["dashboard", "generate", "render", "words"]
