"""The balancer's sans-IO machine (`machine`) and the effects it returns (`effects`)."""

__all__ = ["effects", "machine"]
