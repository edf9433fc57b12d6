"""The balancer's sans-IO machine (`machine`), the effects it returns (`effects`) and
its bookkeeping records (`records`)."""

__all__ = ["effects", "machine", "records"]
