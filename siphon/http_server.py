"""Serving ``siphon.http`` routes (and the built-in trunk registry) with aiohttp.

The listener is aiohttp's low-level server (``web.Server``): siphon does its own
routing (first route whose pattern and method fit, 405 with ``Allow`` otherwise), so
aiohttp's ``Application`` router, middleware chain and access log would only add
per-request work on the event loop that also serves SIP. ``Expect: 100-continue``,
which the Application's router used to answer, is answered here.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from siphon.script.http_api import HttpRequest, Response, Route, compile_route

log = logging.getLogger("siphon.http")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _json_error(status: int, message: str, headers: dict[str, str] | None = None
                ) -> web.Response:
    return web.Response(status=status, headers=headers,
                        body=json.dumps({"status": status, "error": message}).encode(),
                        content_type="application/json")


def protected(fn: Callable[..., Any], token: str | None) -> Callable[..., Any]:
    """Wrap a route handler so it needs ``Authorization: Bearer <token>`` (if set)."""
    if not token:
        return fn
    expected = f"Bearer {token}".encode()

    def check(req: HttpRequest) -> Any:
        # Not a coroutine itself: a refusal is answered at once, and an allowed request
        # is handed straight to ``fn`` (whose coroutine, if any, the server awaits).
        given = (req.header("authorization") or "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            return Response(401, {"Content-Type": "application/json",
                                  "WWW-Authenticate": "Bearer"},
                            b'{"status": 401, "error": "unauthorized"}')
        return fn(req)

    check.__name__ = getattr(fn, "__name__", "check")
    return check


def route(path: str, methods: list[str], fn: Callable[..., Any]) -> Route:
    return Route(path, frozenset(methods), fn, compile_route(path))


class HttpServer:
    """One HTTP listener dispatching to routes (first match whose methods fit)."""

    def __init__(self, routes: Callable[[], list[Route]], *, max_body_bytes: int = 1 << 20,
                 middleware: Callable[[], list[Any]] = lambda: []) -> None:
        self.routes = routes
        self.middleware = middleware
        self.max_body_bytes = max_body_bytes
        self._runner: web.ServerRunner | None = None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        url = request.rel_url
        path = url.raw_path
        method = request.method
        allowed: set[str] = set()
        chosen: Route | None = None
        params: dict[str, str] = {}
        for r in self.routes():
            found = r.match(path)
            if found is None:
                continue
            if method in r.methods:
                chosen, params = r, found
                break
            allowed |= r.methods
        if chosen is None:
            if allowed:
                return _json_error(405, "method not allowed",
                                   {"Allow": ", ".join(sorted(allowed))})
            return _json_error(404, "not found")
        body = b""
        if request.body_exists:
            body_or_error = await self._read_body(request)
            if isinstance(body_or_error, web.Response):
                return body_or_error
            body = body_or_error
        req = HttpRequest.from_wire(method, path, url.raw_query_string, request.headers, body,
                                    params, request.transport)
        try:
            for mw in self.middleware():
                early = mw.fn(req)
                if asyncio.iscoroutine(early):
                    early = await early
                if early is not None:
                    return self._convert(early)
            result = chosen.fn(req)
            if asyncio.iscoroutine(result):
                result = await result
        except Exception:
            log.exception("HTTP handler %s failed on %s %s",
                          getattr(chosen.fn, "__name__", chosen.fn), method, path)
            return _json_error(500, "handler error")
        return self._convert(result)

    async def _read_body(self, request: web.BaseRequest) -> bytes | web.Response:
        """The whole body, or a 413 answer when it is larger than ``max_body_bytes``
        (refused before ``100 Continue`` when Content-Length says so)."""
        limit = self.max_body_bytes
        if (request.content_length or 0) > limit:
            return _json_error(413, f"body larger than {limit} bytes")
        expect = request.headers.get("Expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                return _json_error(417, f"unsupported Expect: {expect}")
            if request.version >= (1, 1):
                await request.writer.write(_CONTINUE)
                request.writer.output_size = 0
        chunks: list[bytes] = []
        size = 0
        while True:  # StreamReader.read(n) answers what has arrived: read until EOF
            chunk = await request.content.read(limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                return _json_error(413, f"body larger than {limit} bytes")
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    @staticmethod
    def _convert(result: object) -> web.StreamResponse:
        if not isinstance(result, Response):
            log.error("HTTP handler returned %r, not http.Response", type(result).__name__)
            return _json_error(500, "bad response")
        if not 100 <= result.status <= 999:
            return _json_error(500, f"bad status {result.status}")
        resp = web.Response(status=result.status, body=result.body)
        if result.headers:
            for name, value in result.headers.items():
                try:
                    resp.headers[str(name)] = str(value)
                except ValueError:
                    log.warning("skipping invalid response header %r", name)
        return resp

    async def start(self, host: str, port: int) -> None:
        server = web.Server(self.handle, access_log=None)
        self._runner = web.ServerRunner(server)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
