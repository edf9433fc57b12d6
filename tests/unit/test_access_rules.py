"""The balancer's access rules as pure functions: Host names, origins, when the token is
required (for changes, and for reads with --token-for-reads), the read-session cookie, and
the once-a-minute log limiter."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from treewave.balancer.access import (
    AccessSettings,
    access_settings,
    host_allowed,
    is_loopback,
    origin_allowed,
    read_needs_token,
    read_refusal,
    session_cookie_value,
)
from treewave.cli.settings import ACCESS_OPTIONS, SettingError, add_options, resolve
from treewave.wire.http import RejectionLog


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        (None, True),  # HTTP/1.0 healthchecks send no Host; browsers always do
        ("127.0.0.1:7999", True),
        ("10.1.2.3", True),  # an IP literal cannot be rebound
        ("[::1]:7999", True),
        ("localhost:7999", True),
        ("LOCALHOST.", True),
        ("app.localhost", True),
        ("balancer:7999", True),
        ("evil.example", False),
        ("127.0.0.1.nip.io", False),
        ("localhost.evil.example", False),
        ("balancer.evil.example", False),
        ("", False),
        ("evil.example/x", False),
        ("a@127.0.0.1", False),
        ("127.0.0.1:notaport", False),
    ],
)
def test_host_names_served_by_default(host: str | None, allowed: bool) -> None:
    assert host_allowed(host, ()) is allowed


def test_configured_host_names() -> None:
    allowed = ("treewave.example.org", ".lab.example")
    assert host_allowed("treewave.example.org:443", allowed)
    assert host_allowed("TreeWave.Example.org", allowed)
    assert host_allowed("lab.example", allowed)
    assert host_allowed("a.b.lab.example", allowed)
    assert not host_allowed("evillab.example", allowed)
    assert not host_allowed("treewave.example.org.evil", allowed)
    assert host_allowed("anything.at.all", ("*",))


@pytest.mark.parametrize(
    ("origin", "host", "ok"),
    [
        ("http://127.0.0.1:7999", "127.0.0.1:7999", True),
        ("http://localhost:7999", "localhost:7999", True),
        ("http://balancer", "balancer:80", True),  # default ports are the same port
        ("http://127.0.0.1:7998", "127.0.0.1:7999", False),
        ("https://127.0.0.1:7999", "127.0.0.1:7999", False),
        ("http://localhost:7999", "127.0.0.1:7999", False),
        ("http://evil.example", "127.0.0.1:7999", False),
        ("null", "127.0.0.1:7999", False),
        ("http://127.0.0.1:7999", None, False),
        ("http://127.0.0.1:7999/path", "127.0.0.1:7999", False),
        ("", "127.0.0.1:7999", False),
    ],
)
def test_own_origin(origin: str, host: str | None, ok: bool) -> None:
    assert origin_allowed(origin, "http", host, ()) is ok


def test_configured_origins() -> None:
    allowed = ("https://treewave.example.org",)
    assert origin_allowed("https://treewave.example.org", "http", "treewave.example.org", allowed)
    assert origin_allowed("https://treewave.example.org:443", "http", None, allowed)
    assert not origin_allowed("http://treewave.example.org", "http", "other", allowed)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.0.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("", False),
        ("::", False),
        ("192.0.2.2", False),
        ("treewave.example.org", False),
    ],
)
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def parse(*argv: str) -> argparse.Namespace:
    """The balancer's access flags and their TREEWAVE_* variables, as `treewave balancer`
    reads them."""
    p = argparse.ArgumentParser()
    add_options(p, *ACCESS_OPTIONS)
    args = p.parse_args(list(argv))
    resolve(args)
    return args


@pytest.fixture(autouse=True)
def no_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "TREEWAVE_API_TOKEN",
        "TREEWAVE_API_TOKEN_FILE",
        "TREEWAVE_REQUIRE_TOKEN",
        "TREEWAVE_TOKEN_FOR_READS",
        "TREEWAVE_PUBLISHED_ADDRESS",
        "TREEWAVE_ALLOWED_HOSTS",
        "TREEWAVE_ALLOWED_ORIGINS",
    ):
        monkeypatch.delenv(name, raising=False)


def test_token_required_exactly_beyond_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "token"
    token.write_text("t" * 32 + "\n", encoding="utf-8")
    assert access_settings(parse(), "127.0.0.1") == AccessSettings()
    local = access_settings(parse("--api-token-file", str(token)), "127.0.0.1")
    assert local.token == "t" * 32
    assert local.require_token is False
    for host, published in (("0.0.0.0", None), ("127.0.0.1", "192.0.2.2"), ("::", None)):
        argv = ["--api-token-file", str(token)]
        if published:
            argv += ["--published-address", published]
        assert access_settings(parse(*argv), host).require_token is True, (host, published)
    # Compose: the container binds 0.0.0.0 but is published on loopback only.
    monkeypatch.setenv("TREEWAVE_PUBLISHED_ADDRESS", "127.0.0.1")
    assert access_settings(parse("--api-token-file", str(token)), "0.0.0.0").require_token is False
    monkeypatch.setenv("TREEWAVE_REQUIRE_TOKEN", "1")
    assert access_settings(parse("--api-token-file", str(token)), "0.0.0.0").require_token is True


def test_published_name_is_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TREEWAVE_API_TOKEN", "s" * 20)
    got = access_settings(
        parse("--published-address", "Tree.Example.org", "--allowed-hosts", "a.example, b"),
        "0.0.0.0",
    )
    assert got.allowed_hosts == ("a.example", "b", "tree.example.org")
    assert got.token == "s" * 20


@pytest.mark.parametrize(
    ("argv", "env", "words"),
    [
        (["--require-token"], {}, "--require-token is set"),
        (["--token-for-reads"], {}, "--token-for-reads is set, so reads and changes need"),
        (["--published-address", "0.0.0.0"], {}, "beyond loopback"),
        ([], {"TREEWAVE_API_TOKEN": "short"}, "too short"),
        (["--api-token-file", "/nonexistent/token"], {}, "cannot read the API token"),
        (["--allowed-hosts", "https://x.example"], {}, "allowed host"),
        (["--allowed-hosts", "x.example:80"], {}, "allowed host"),
        (["--allowed-origins", "x.example"], {}, "allowed origin"),
        (["--allowed-origins", "https://x.example/app"], {}, "allowed origin"),
    ],
)
def test_bad_settings_are_clear_errors(
    argv: list[str], env: dict[str, str], words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=words):
        access_settings(parse(*argv), "127.0.0.1")


def test_rejections_logged_once_a_minute_per_client() -> None:
    limiter = RejectionLog(every_s=60, keep=3)
    assert limiter.should_log("a", 0.0)
    assert not limiter.should_log("a", 1.0)
    assert not limiter.should_log("a", 59.9)
    assert limiter.should_log("b", 2.0)
    assert limiter.should_log("a", 60.0)
    assert not limiter.should_log("a", 100.0)
    # Many clients cannot grow the table without bound: old entries are dropped.
    for i in range(100):
        limiter.should_log(f"c{i}", 200.0 + i * 61)
    assert len(limiter.last) <= 3


# --- reads behind the token --------------------------------------------------------------------

TOKEN = "r" * 43
READS = AccessSettings(token=TOKEN, token_for_reads=True)


def test_token_for_reads_from_flag_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n", encoding="utf-8")
    off = access_settings(parse("--api-token-file", str(token)), "127.0.0.1")
    assert off.token_for_reads is False
    got = access_settings(parse("--api-token-file", str(token), "--token-for-reads"), "127.0.0.1")
    assert got.token_for_reads is True
    monkeypatch.setenv("TREEWAVE_TOKEN_FOR_READS", "yes")
    assert access_settings(parse("--api-token-file", str(token)), "127.0.0.1").token_for_reads
    monkeypatch.setenv("TREEWAVE_TOKEN_FOR_READS", "maybe")
    with pytest.raises(SettingError, match=r"TREEWAVE_TOKEN_FOR_READS.*'maybe'"):
        parse()
    with pytest.raises(ValueError, match="none is configured"):
        AccessSettings(token_for_reads=True)


@pytest.mark.parametrize(
    ("path", "needs"),
    [
        ("/", True),
        ("/api/tree", True),
        ("/api/status", True),
        ("/api/events", True),
        ("/api/topology", True),
        ("/api/waves/w1", True),
        ("/api/anything-later", True),
        ("/healthz", False),
        ("/metrics", False),
        ("/static/status.js", False),
        ("/healthz/", True),
        ("/metricsx", True),
    ],
)
def test_which_reads_need_the_token(path: str, needs: bool) -> None:
    assert read_needs_token(path) is needs


def test_session_cookie_is_derived_from_the_token_not_the_token() -> None:
    value = session_cookie_value(TOKEN)
    assert value == session_cookie_value(TOKEN)
    assert TOKEN not in value
    assert len(value) == 64
    assert set(value) <= set("0123456789abcdef")
    assert session_cookie_value("s" * 43) != value


@pytest.mark.parametrize(
    ("authorization", "cookie", "refusal"),
    [
        (None, None, "token_missing"),
        (f"Bearer {TOKEN}", None, None),
        (f"bearer  {TOKEN} ", None, None),
        ("Bearer " + "x" * 43, None, "token_wrong"),
        (f"Basic {TOKEN}", None, "token_wrong"),
        (TOKEN, None, "token_wrong"),
        (None, session_cookie_value(TOKEN), None),
        (None, TOKEN, "token_wrong"),  # the raw token is not the cookie
        (None, session_cookie_value("s" * 43), "token_wrong"),  # another token's session
        (None, "", "token_wrong"),
        # The header, when sent, decides: a good cookie does not excuse a wrong header.
        ("Bearer nope", session_cookie_value(TOKEN), "token_wrong"),
    ],
)
def test_read_refusals(authorization: str | None, cookie: str | None, refusal: str | None) -> None:
    assert read_refusal(READS, "/api/status", authorization, cookie) == refusal


def test_reads_open_without_the_setting_and_on_open_paths() -> None:
    assert read_refusal(AccessSettings(token=TOKEN), "/api/status", None, None) is None
    assert read_refusal(AccessSettings(), "/", "Bearer junk", "junk") is None
    for path in ("/healthz", "/metrics", "/static/session.js"):
        assert read_refusal(READS, path, None, None) is None
        assert read_refusal(READS, path, "Bearer junk", None) is None
