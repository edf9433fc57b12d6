"""Every setting a command reads, validated once, here, whatever its source.

A setting has one flag, at most one `TREEWAVE_*` environment variable and one value
parser (`argtypes`), shared by every command that takes it. One precedence rule, highest
first:

1. the command-line flag;
2. the environment variable (an empty value counts as unset);
3. the topology file's `settings` (only `wave_timeout_s`, `rebalance_interval_s` and
   `policy`, resolved by `core.precedence.effective_settings` when the first two leave
   them unset);
4. the built-in default.

A bad value is one line naming the setting and where it came from, exit code 2: argparse
reports a bad flag, `resolve` a bad environment value (`SettingError`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from treewave.cli import argtypes
from treewave.wire.links import DEFAULT_PEER_TEMPLATE

__all__ = [
    "ACCESS_OPTIONS",
    "BALANCER_STATE_DIR",
    "BALANCER_URL",
    "HOST",
    "LOG_LEVEL",
    "NAME",
    "PEERS",
    "PEER_URL_TEMPLATE",
    "POLICY",
    "REBALANCE_INTERVAL",
    "SECRET_FILE",
    "STATE_DIR",
    "STATUS_INTERVAL",
    "TOKEN_FOR_READS",
    "TOPOLOGY",
    "TRACE_HISTORY",
    "TRACE_PUSH",
    "TRACE_SAMPLE",
    "TRACE_WAVES",
    "WAVE_TIMEOUT",
    "Option",
    "SettingError",
    "add_options",
    "resolve",
]


class SettingError(ValueError):
    """A setting with a bad value; the message names the setting and its source."""


@dataclass(frozen=True)
class Option:
    """One setting as a command takes it."""

    flag: str
    parse: Callable[[str], Any]
    help: str
    env: str | None = None
    default: Any = None
    metavar: str | None = None
    fallback: str | None = None
    """Where the value comes from when neither the flag nor the environment gives one and
    there is no built-in default (e.g. the topology file's settings), for the help."""

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    def with_default(self, default: Any, help: str | None = None) -> Option:
        """The same setting with another default (e.g. another service's port)."""
        return Option(
            self.flag, self.parse, help or self.help, self.env, default, self.metavar, self.fallback
        )


TOPOLOGY = Option(
    "--topology", Path, "topology file", "TREEWAVE_TOPOLOGY", Path("topology.json"), "FILE"
)
HOST = Option("--host", argtypes.non_empty, "address to listen on", "TREEWAVE_HOST", "127.0.0.1")
PORT = Option("--port", argtypes.port, "port to listen on", "TREEWAVE_PORT", None, "PORT")
PEER_URL_TEMPLATE = Option(
    "--peer-url-template",
    argtypes.peer_url_template,
    "WebSocket URL of a server, {name} replaced",
    "TREEWAVE_PEER_URL_TEMPLATE",
    DEFAULT_PEER_TEMPLATE,
    "URL",
)
PEERS = Option(
    "--peers",
    Path,
    "JSON file mapping server names to WebSocket URLs (overrides the template)",
    "TREEWAVE_PEERS",
    metavar="FILE",
)
SECRET_FILE = Option(
    "--secret-file",
    Path,
    "file holding the per-deployment link secret (else TREEWAVE_SECRET; neither: links "
    "are not authenticated)",
    "TREEWAVE_SECRET_FILE",
    metavar="FILE",
)
LOG_LEVEL = Option(
    "--log-level",
    argtypes.log_level,
    f"log level, one of {', '.join(argtypes.LOG_LEVELS)}",
    "TREEWAVE_LOG_LEVEL",
    "INFO",
    "LEVEL",
)
NAME = Option("--name", argtypes.non_empty, "this server's name", "TREEWAVE_NAME", metavar="NAME")
STATE_DIR = Option(
    "--state-dir",
    Path,
    "where the server keeps its queue across restarts",
    "TREEWAVE_STATE_DIR",
    metavar="DIR",
    fallback="in memory only",
)
BALANCER_STATE_DIR = Option(
    "--state-dir",
    Path,
    "where the balancer keeps the desired topology and a migration in progress across restarts",
    "TREEWAVE_STATE_DIR",
    metavar="DIR",
    fallback="in memory only",
)
REBALANCE_INTERVAL = Option(
    "--rebalance-interval",
    argtypes.topology_setting("rebalance_interval_s"),
    "seconds between rebalancing rounds, 0 = off",
    "TREEWAVE_REBALANCE_S",
    metavar="S",
    fallback="the topology's rebalance_interval_s",
)
WAVE_TIMEOUT = Option(
    "--wave-timeout",
    argtypes.topology_setting("wave_timeout_s"),
    "wave deadline in seconds",
    "TREEWAVE_WAVE_TIMEOUT_S",
    metavar="S",
    fallback="the topology's wave_timeout_s",
)
POLICY = Option(
    "--policy",
    argtypes.policy_name,
    "balancing policy by name (else the topology file's policy, lpt unless set)",
    "TREEWAVE_POLICY",
    metavar="NAME",
)
STATUS_INTERVAL = Option(
    "--status-interval",
    argtypes.at_least(1.0),
    "seconds between live status updates, at least 1",
    "TREEWAVE_STATUS_INTERVAL_S",
    2.0,
    "S",
)
BALANCER_URL = Option(
    "--balancer",
    argtypes.balancer_url,
    "the balancer's URL",
    "TREEWAVE_BALANCER",
    argtypes.DEFAULT_BALANCER,
    "URL",
)

TRACE_HISTORY = Option(
    "--trace-history",
    argtypes.non_negative_int,
    "traced waves kept for /api/waves, 0 = no tracing",
    "TREEWAVE_TRACE_HISTORY",
    50,
    "N",
)
TRACE_SAMPLE = Option(
    "--trace-sample",
    argtypes.fraction,
    "share of periodic rebalancing waves traced, 0-1",
    "TREEWAVE_TRACE_SAMPLE",
    0.1,
    "SHARE",
)
TRACE_PUSH = Option(
    "--trace-push",
    argtypes.non_negative_float,
    "seconds a server gathers its finished waves' trace parts before pushing them to the "
    "balancer in one frame, 0 = each at once",
    "TREEWAVE_TRACE_PUSH_S",
    1.0,
    "SECONDS",
)
TRACE_WAVES = Option(
    "--trace-waves",
    argtypes.non_negative_int,
    "recent waves whose trace this server keeps, 0 = none",
    "TREEWAVE_TRACE_WAVES",
    64,
    "N",
)
API_TOKEN_FILE = Option(
    "--api-token-file",
    Path,
    "file holding the API token (else $TREEWAVE_API_TOKEN); make one with "
    "`treewave secret --out FILE`",
    "TREEWAVE_API_TOKEN_FILE",
    metavar="FILE",
)
REQUIRE_TOKEN = Option(
    "--require-token",
    argtypes.switch,
    "require the token on POST/PUT/PATCH/DELETE even on loopback (always on when the API "
    "is published beyond loopback)",
    "TREEWAVE_REQUIRE_TOKEN",
    False,
)
PUBLISHED_ADDRESS = Option(
    "--published-address",
    argtypes.non_empty,
    "the address the API is published on, when not --host (compose passes its "
    "TREEWAVE_BIND_ADDRESS); anything but loopback requires the token",
    "TREEWAVE_PUBLISHED_ADDRESS",
    metavar="ADDR",
)
ALLOWED_HOSTS = Option(
    "--allowed-hosts",
    str,
    "comma-separated Host names served besides IP addresses, localhost and 'balancer' "
    "('.example.org' for a domain, '*' for any)",
    "TREEWAVE_ALLOWED_HOSTS",
    "",
    "NAMES",
)
ALLOWED_ORIGINS = Option(
    "--allowed-origins",
    str,
    "comma-separated origins (https://name[:port]) besides the balancer's own that may "
    "send state-changing requests (e.g. behind a TLS proxy)",
    "TREEWAVE_ALLOWED_ORIGINS",
    "",
    "ORIGINS",
)
TOKEN_FOR_READS = Option(
    "--token-for-reads",
    argtypes.switch,
    "require the token for reads too: the status page, GET /api/* and the event stream "
    "(not /healthz, /metrics, /static/); needs a token",
    "TREEWAVE_TOKEN_FOR_READS",
    False,
)
ACCESS_OPTIONS = (
    API_TOKEN_FILE,
    REQUIRE_TOKEN,
    TOKEN_FOR_READS,
    PUBLISHED_ADDRESS,
    ALLOWED_HOSTS,
    ALLOWED_ORIGINS,
)
"""Who may read and change the cluster through the balancer's API
(treewave/balancer/access.py)."""

_OPTIONS_KEY = "_treewave_options"


def add_options(
    parser: argparse.ArgumentParser, *options: Option, title: str | None = None
) -> None:
    """Add the options' flags (under a help heading `title`, if given); their defaults
    are filled in by `resolve` after parsing (nothing is read from the environment while
    the parser is built)."""
    target = parser.add_argument_group(title) if title else parser
    for option in options:
        where = [f"${option.env}"] if option.env else []
        if option.default not in (None, "", False):
            where.append(str(option.default))
        elif option.fallback:
            where.append(option.fallback)
        help_text = option.help + (f" (default: {' or '.join(where)})" if where else "")
        if option.parse is argtypes.switch:  # a flag without a value turns it on
            target.add_argument(
                option.flag,
                dest=option.dest,
                action="store_const",
                const=True,
                default=None,
                help=help_text.replace("%", "%%"),
            )
            continue
        target.add_argument(
            option.flag,
            dest=option.dest,
            type=option.parse,
            default=None,
            metavar=option.metavar,
            help=help_text.replace("%", "%%"),
        )
    known = parser.get_default(_OPTIONS_KEY) or ()
    parser.set_defaults(**{_OPTIONS_KEY: (*known, *options)})


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> None:
    """Fill every option the flags left unset from the environment, else the default;
    a bad environment value is a `SettingError` naming the variable."""
    env = os.environ if environ is None else environ
    for option in getattr(args, _OPTIONS_KEY, ()):
        if getattr(args, option.dest, None) is not None:
            continue
        text = env.get(option.env, "") if option.env else ""
        if not text:
            setattr(args, option.dest, option.default)
            continue
        try:
            value = option.parse(text)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise SettingError(f"{option.env} (environment, for {option.flag}): {exc}") from None
        setattr(args, option.dest, value)
