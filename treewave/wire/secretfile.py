"""The per-deployment link secret: made once per deployment, never committed."""

from __future__ import annotations

import secrets
from pathlib import Path

from treewave.wire.atomicfile import write_atomic

__all__ = ["ensure_secret", "read_secret"]


def read_secret(path: Path, what: str = "link secret") -> str:
    """The secret in `path` (stripped); a missing or empty file is a clear error naming
    `what` it should hold."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if len(text) < 16:
        raise ValueError(f"the {what} in {path} is too short (need 16+ characters)")
    return text


def ensure_secret(path: Path) -> bool:
    """Write a new random secret to `path` unless one is there; True if it wrote one."""
    if path.exists():
        read_secret(path)
        return False
    write_atomic(path, secrets.token_urlsafe(32) + "\n", mode=0o640)
    return True
