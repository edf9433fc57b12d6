"""Link authentication by challenge-response: a server accepts a link only from its topology
neighbours and the balancer, each proving it knows the per-deployment secret.

The acceptor opens every link with a fresh random nonce (a `Challenge`); the dialer's hello
answers with HMAC(secret, nonce, sender, receiver). A hello recorded on one link is worth
nothing on the next, whose nonce differs, so sniffing the network does not let a third party
in. Without a secret (local development) links are not authenticated and no challenge is
sent.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import aiohttp

from treewave.core.errors import RemoteProtocolError
from treewave.core.messages import Challenge, Hello, parse_message

__all__ = ["HELLO_TIMEOUT_S", "dialer_hello", "hello_proof", "new_nonce", "proof_ok"]

HELLO_TIMEOUT_S = 5.0
"""How long either side waits for the other's part of the handshake."""


def new_nonce() -> str:
    """A fresh challenge: 128 random bits, never reused."""
    return secrets.token_hex(16)


def hello_proof(secret: str, nonce: str, sender: str, receiver: str) -> str:
    """What `sender` answers to `receiver`'s challenge `nonce` ("" without a secret)."""
    if not secret:
        return ""
    text = f"treewave-link\n{nonce}\n{sender}\n{receiver}"
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def proof_ok(secret: str, nonce: str, sender: str, receiver: str, proof: str) -> bool:
    """Whether `proof` answers this link's challenge; always true without a secret."""
    if not secret:
        return True
    return hmac.compare_digest(hello_proof(secret, nonce, sender, receiver), proof)


async def dialer_hello(
    ws: aiohttp.ClientWebSocketResponse, sender: str, receiver: str, secret: str
) -> Hello:
    """The hello to send on a freshly dialled link: with a secret, read the acceptor's
    challenge first (RemoteProtocolError if it sends anything else or nothing in time)."""
    if not secret:
        return Hello(sender=sender)
    try:
        frame = await ws.receive(timeout=HELLO_TIMEOUT_S)
    except TimeoutError:
        raise RemoteProtocolError(
            f"{receiver} sent no challenge within {HELLO_TIMEOUT_S} s", reason="no_challenge"
        ) from None
    if frame.type != aiohttp.WSMsgType.TEXT:
        raise RemoteProtocolError(f"{receiver} did not open with a challenge", reason="bad_hello")
    msg = parse_message(frame.data)
    if not isinstance(msg, Challenge):
        raise RemoteProtocolError(
            f"{receiver} opened with {msg.type}, not a challenge", reason="bad_hello"
        )
    return Hello(sender=sender, token=hello_proof(secret, msg.nonce, sender, receiver))
