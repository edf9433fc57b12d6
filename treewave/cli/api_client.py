"""The CLI's client of the balancer's HTTP API (standard library only): JSON in and out,
the API token, no proxy for a local balancer, an API error as one line, and answers read
through the API's own models (`treewave.core.api`)."""

from __future__ import annotations

import http.client
import ipaddress
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from treewave.cli.errors import CommandError
from treewave.core.messages import describe_errors

__all__ = ["Client"]


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Client:
    base: str
    timeout: float = 30.0
    token: str = ""
    """The balancer's API token, sent as `Authorization: Bearer` when set."""

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def get_as(self, path: str, model: type[M]) -> M:
        """`GET path`, read through the API's model of that answer (`treewave.core.api`)."""
        return self.read(self.get(path), model, f"GET {path}")

    def post_as(self, path: str, body: Mapping[str, Any], model: type[M]) -> M:
        return self.read(self.post(path, body), model, f"POST {path}")

    @staticmethod
    def read(answer: Any, model: type[M], what: str) -> M:
        try:
            return model.model_validate(answer)
        except ValidationError as exc:
            raise CommandError(
                f"unexpected answer to {what} (is this a treewave balancer of this version?): "
                + describe_errors(exc)
            ) from None

    def post(self, path: str, body: Mapping[str, Any]) -> Any:
        return self.request("POST", path, body)

    def request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        # A local balancer is never reached through a proxy from the environment.
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(self.base) else []
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise CommandError(_api_error(exc)) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise CommandError(
                f"cannot reach the balancer at {self.base}: {_one_line(str(reason))}"
            ) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise CommandError(
                f"the balancer at {self.base} answered {method} {path} with something that "
                "is not JSON"
            ) from None


def _api_error(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
    except (ValueError, OSError, http.client.HTTPException):
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return _one_line(body["error"])
    return f"the balancer answered HTTP {exc.code} {exc.reason}"


def _one_line(text: str) -> str:
    return " ".join(text.split())
