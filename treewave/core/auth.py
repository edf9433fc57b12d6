"""Link authentication from a per-deployment secret: a server accepts a link only from
its topology neighbours and the balancer, each proving it knows the secret."""

from __future__ import annotations

import hashlib
import hmac


def link_token(secret: str, sender: str, receiver: str) -> str:
    """The token `sender` presents when opening a link to `receiver` ("" without a secret)."""
    if not secret:
        return ""
    mac = hmac.new(secret.encode(), f"{sender}->{receiver}".encode(), hashlib.sha256)
    return mac.hexdigest()


def token_ok(secret: str, sender: str, receiver: str, token: str) -> bool:
    if not secret:
        return True
    return hmac.compare_digest(link_token(secret, sender, receiver), token)
