"""Value types shared by every command: one parser per kind of setting, used for its
flag and its environment variable alike, so the same setting is validated the same way
everywhere. A bad value raises `argparse.ArgumentTypeError` with a message naming it."""

from __future__ import annotations

import argparse
import math
import urllib.parse
from collections.abc import Callable

from pydantic import ValidationError

from treewave.core.policies import UnknownPolicy, get_policy
from treewave.core.topology import Settings

__all__ = [
    "DEFAULT_BALANCER",
    "LOG_LEVELS",
    "at_least",
    "balancer_url",
    "fraction",
    "log_level",
    "non_empty",
    "non_negative_float",
    "non_negative_int",
    "peer_url_template",
    "port",
    "positive_float",
    "positive_int",
    "switch",
    "topology_setting",
]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_BALANCER = "http://127.0.0.1:7999"


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be negative")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def non_negative_float(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def positive_float(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def at_least(least: float) -> Callable[[str], float]:
    """A number of seconds (or the like) that may not be below `least`."""

    def parse(text: str) -> float:
        value = _finite(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {least:g}")
        return value

    parse.__name__ = f"at least {least:g}"
    return parse


def topology_setting(field: str) -> Callable[[str], float]:
    """A value of one of the topology file's `settings`, checked against the very bounds
    the file is checked against (so `--wave-timeout 0` fails like `"wave_timeout_s": 0`)."""

    def parse(text: str) -> float:
        value = _finite(text)
        try:
            Settings.model_validate({field: value})
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"]
            raise argparse.ArgumentTypeError(
                f"{text!r}: {reason[:1].lower()}{reason[1:]}"
            ) from None
        return value

    parse.__name__ = field
    return parse


def policy_name(text: str) -> str:
    """A registered balancing policy (`core.policies`); an unknown one lists the known."""
    try:
        return get_policy(text).name
    except UnknownPolicy as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


policy_name.__name__ = "policy"


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1-65535)")
    return value


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty value is not allowed")
    return text.strip()


def log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def peer_url_template(text: str) -> str:
    if not text.startswith(("ws://", "wss://")) or "{name}" not in text:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a ws:// or wss:// URL with {{name}} in it, like ws://{{name}}:8000/ws"
        )
    return text


def balancer_url(text: str) -> str:
    """An http(s) URL, normalised (no trailing slash)."""
    url = text.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s) URL like {DEFAULT_BALANCER}")
    return url


def switch(text: str) -> bool:
    """An on/off setting given as text (its environment variable; the flag takes none)."""
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not one of 1, true, yes, on, 0, false, no, off")


def fraction(text: str) -> float:
    """A share between 0 and 1."""
    value = _finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
    return value
