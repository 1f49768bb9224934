"""``siphon.http``: operators' own REST routes served from the siphon process.

Scripts declare routes with ``@http.route("/trunks/{id}", methods=[...])`` and
startup hooks with ``@http.on_startup``; handlers (sync or async) receive a
:class:`HttpRequest` and return an :class:`http.Response <Response>`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from siphon.script import registry as reg


class Response:
    """An HTTP response: ``Response(status=200, headers=None, body=None)``."""

    def __init__(self, status: int = 200, headers: dict[str, str] | None = None,
                 body: bytes | str | None = None) -> None:
        if body is not None and not isinstance(body, (bytes, str)):
            raise TypeError(f"body must be bytes or str, not {type(body).__name__}")
        self.status = status
        self.headers: dict[str, str] = dict(headers or {})
        self._body = body.encode() if isinstance(body, str) else (body or b"")

    @property
    def body(self) -> bytes:
        return self._body

    def raise_for_status(self) -> None:
        if self.status >= 400:
            raise RuntimeError(f"HTTP {self.status}")

    def __repr__(self) -> str:
        return f"<Response {self.status} {len(self._body)} bytes>"


class HttpRequest:
    """What a route handler receives: ``method``, ``path`` (the URL path without the query
    string, as received), ``path_params``, ``query_params``, ``headers`` (lower-case names;
    repeated headers joined with ", "), ``client`` ("ip:port"), ``body()``, ``json()``,
    ``header(name)``.

    The server builds requests lazily: ``headers``, ``query_params`` and ``client`` are
    only worked out when a handler reads them, so a route that looks at none of them (a
    trunk heartbeat) costs a few attribute stores.
    """

    def __init__(self, method: str, path: str, query: str, headers: dict[str, str],
                 body: bytes, path_params: dict[str, str], client: str = "") -> None:
        self.method = method
        self.path = path
        self.path_params = path_params
        self._query = query
        self._query_params: dict[str, str] | None = None
        self._headers: dict[str, str] | None = headers
        self._wire_headers: Any = None
        self._body = body
        self._client: str | None = client
        self._transport: Any = None

    @classmethod
    def from_wire(cls, method: str, path: str, query: str, headers: Any, body: bytes,
                  path_params: dict[str, str], transport: Any = None) -> HttpRequest:
        """A request over a server's case-insensitive multi-dict of headers (aiohttp's
        ``CIMultiDictProxy``: ``getall``, ``items``) and its transport (for ``client``);
        nothing is copied or parsed until asked for."""
        req = cls.__new__(cls)
        req.method = method
        req.path = path
        req.path_params = path_params
        req._query = query
        req._query_params = None
        req._headers = None
        req._wire_headers = headers
        req._body = body
        req._client = None
        req._transport = transport
        return req

    @property
    def headers(self) -> dict[str, str]:
        """Lower-case names; repeated headers joined with ", "."""
        if self._headers is None:
            joined: dict[str, str] = {}
            for name, value in (self._wire_headers or {}).items():
                key = name.lower()
                joined[key] = f"{joined[key]}, {value}" if key in joined else value
            self._headers = joined
        return self._headers

    @headers.setter
    def headers(self, value: dict[str, str]) -> None:
        self._headers = value

    @property
    def query_params(self) -> dict[str, str]:
        if self._query_params is None:
            self._query_params = dict(parse_qsl(self._query, keep_blank_values=True))
        return self._query_params

    @query_params.setter
    def query_params(self, value: dict[str, str]) -> None:
        self._query_params = value

    @property
    def client(self) -> str:
        """The peer as "ip:port" ("" when unknown)."""
        if self._client is None:
            peer = self._transport.get_extra_info("peername") if self._transport else None
            self._client = f"{peer[0]}:{peer[1]}" if peer else ""
        return self._client

    @client.setter
    def client(self, value: str) -> None:
        self._client = value

    def body(self) -> bytes:
        """The whole request body (b"" when empty)."""
        return self._body

    def json(self) -> Any:
        """The body parsed as JSON (raises ValueError when it is not)."""
        return json.loads(self._body or b"null")

    def header(self, name: str) -> str | None:
        """One header by name (any case); repeated headers joined with ", "."""
        if self._headers is not None:
            return self._headers.get(name.lower())
        values = self._wire_headers.getall(name, None) if self._wire_headers else None
        if not values:
            return None
        return values[0] if len(values) == 1 else ", ".join(values)


_PARAM = re.compile(r"\{(\*?)([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(slots=True)
class Route:
    """A registered route: its pattern, methods and handler."""

    path: str
    methods: frozenset[str]
    fn: Callable[..., Any]
    regex: re.Pattern[str]

    def match(self, path: str) -> dict[str, str] | None:
        m = self.regex.fullmatch(path)
        if m is None:
            return None
        params = m.groupdict()
        for k, v in params.items():
            if "%" in v or "+" in v:
                params[k] = unquote_plus(v)
        return params


def compile_route(path: str) -> re.Pattern[str]:
    """``/trunks/{id}`` -> a regex; ``{name}`` is one segment, ``{*name}`` the rest."""
    if not path.startswith("/"):
        raise ValueError(f"route path must start with '/': {path!r}")
    out = ""
    pos = 0
    for m in _PARAM.finditer(path):
        out += re.escape(path[pos:m.start()])
        rest = m.group(1) == "*"
        if rest and m.end() != len(path):
            raise ValueError(f"{{*{m.group(2)}}} must be the last segment of {path!r}")
        out += f"(?P<{m.group(2)}>.+)" if rest else f"(?P<{m.group(2)}>[^/]+)"
        pos = m.end()
    out += re.escape(path[pos:])
    return re.compile(out)


class HttpNamespace:
    """The ``http`` object scripts import."""

    Response = Response
    Request = HttpRequest

    def route(self, path: str, methods: list[str] | None = None) -> Callable[..., Any]:
        """Register a handler for ``path`` (default method GET)."""
        wanted = frozenset(m.upper() for m in (methods or ["GET"]))
        regex = compile_route(path)

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            reg.registry.http_routes.append(Route(path, wanted, fn, regex))
            return fn

        return decorate

    def on_startup(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Run ``fn()`` once, before the HTTP listener accepts requests."""
        reg.registry.http_startup.append(reg.Handler(fn))
        return fn

    def middleware(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Run ``fn(req)`` before the route; returning a Response short-circuits."""
        reg.registry.http_middleware.append(reg.Handler(fn))
        return fn


http = HttpNamespace()
