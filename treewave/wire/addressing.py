"""Where each server listens: a URL template (compose) or an explicit map (local runs)."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["peer_url"]


def peer_url(name: str, template: str, overrides: Mapping[str, str] | None = None) -> str:
    """`overrides[name]` if present, else the template with `{name}` filled in."""
    if overrides and name in overrides:
        return overrides[name]
    return template.replace("{name}", name)
