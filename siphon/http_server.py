"""Serving ``siphon.http`` routes (and the built-in trunk registry) with aiohttp."""

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

    async def check(req: HttpRequest) -> Response:
        given = (req.header("authorization") or "").encode()
        if not hmac.compare_digest(given, expected):
            return Response(401, {"Content-Type": "application/json",
                                  "WWW-Authenticate": "Bearer"},
                            b'{"status": 401, "error": "unauthorized"}')
        result = fn(req)
        return await result if asyncio.iscoroutine(result) else result

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
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.rel_url.raw_path
        allowed: set[str] = set()
        chosen: Route | None = None
        params: dict[str, str] = {}
        for r in self.routes():
            found = r.match(path)
            if found is None:
                continue
            if request.method in r.methods:
                chosen, params = r, found
                break
            allowed |= r.methods
        if chosen is None:
            if allowed:
                return _json_error(405, "method not allowed",
                                   {"Allow": ", ".join(sorted(allowed))})
            return _json_error(404, "not found")
        if (request.content_length or 0) > self.max_body_bytes:
            return _json_error(413, f"body larger than {self.max_body_bytes} bytes")
        body = await request.content.read(self.max_body_bytes + 1)
        if len(body) > self.max_body_bytes:
            return _json_error(413, f"body larger than {self.max_body_bytes} bytes")
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        peer = request.transport.get_extra_info("peername") if request.transport else None
        req = HttpRequest(request.method, path, request.rel_url.raw_query_string, headers, body,
                          params, f"{peer[0]}:{peer[1]}" if peer else "")
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
                          getattr(chosen.fn, "__name__", chosen.fn), request.method, path)
            return _json_error(500, "handler error")
        return self._convert(result)

    @staticmethod
    def _convert(result: object) -> web.StreamResponse:
        if not isinstance(result, Response):
            log.error("HTTP handler returned %r, not http.Response", type(result).__name__)
            return _json_error(500, "bad response")
        if not 100 <= result.status <= 999:
            return _json_error(500, f"bad status {result.status}")
        resp = web.Response(status=result.status, body=result.body)
        for name, value in result.headers.items():
            try:
                resp.headers[str(name)] = str(value)
            except ValueError:
                log.warning("skipping invalid response header %r", name)
        return resp

    async def start(self, host: str, port: int) -> None:
        app = web.Application(client_max_size=self.max_body_bytes + 1)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
