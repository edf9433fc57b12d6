"""The per-deployment link secret: made once per deployment, never committed."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    os.replace(tmp, path)
    return True
