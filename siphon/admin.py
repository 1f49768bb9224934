"""Admin HTTP API (aiohttp): registrations, health and readiness."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from urllib.parse import unquote

from aiohttp import web

from projections.registrar import binding_view
from siphon.metrics import CONTENT_TYPE
from siphon.registrar.service import Registrar

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminApi:
    """Routes of the admin listener; ``is_ready`` tells when SIP is being served."""

    def __init__(self, registrar: Registrar, is_ready: Callable[[], bool],
                 token: str | None = None, protect_reads: bool = False,
                 clock: Callable[[], float] = time.time,
                 metrics: Callable[[], bytes] | None = None) -> None:
        self.metrics = metrics
        self.registrar = registrar
        self.is_ready = is_ready
        self.token = token
        self.protect_reads = protect_reads
        self.clock = clock
        self.started = time.monotonic()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.add_routes([
            web.get("/admin/registrations", self.list_registrations),
            web.get("/admin/registrations/{aor:.+}", self.get_registration),
            web.delete("/admin/registrations/{aor:.+}", self.delete_registration),
            web.get("/admin/stats", self.stats),
            web.get("/health", self.health),
            web.get("/admin/health", self.health),
            web.get("/ready", self.ready),
            web.get("/admin/ready", self.ready),
            web.get("/metrics", self.render_metrics),
        ])
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.token and request.method != "OPTIONS" and (
                self.protect_reads or request.method not in ("GET", "HEAD")):
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {self.token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return web.json_response({"error": "unauthorized"}, status=401,
                                         headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    async def list_registrations(self, request: web.Request) -> web.Response:
        """All live bindings, one object each, paginated by ``limit``/``offset`` over AoRs."""
        try:
            limit = int(request.query.get("limit", "1000"))
            offset = int(request.query.get("offset", "0"))
        except ValueError:
            return web.json_response({"error": "limit and offset must be integers"}, status=400)
        if not 1 <= limit <= 100_000 or offset < 0:
            return web.json_response({"error": "limit must be 1..100000, offset >= 0"},
                                     status=400)
        now = self.clock()
        aors = sorted(self.registrar.state.aors)
        page = aors[offset : offset + limit]
        items = [binding_view(aor, b, now) for aor in page for b in self.registrar.lookup(aor)]
        headers = {"X-Total-AoRs": str(len(aors))}
        if offset + limit < len(aors):
            headers["Link"] = (f'</admin/registrations?limit={limit}&offset={offset + limit}>; '
                               'rel="next"')
        return web.json_response(items, headers=headers)

    async def get_registration(self, request: web.Request) -> web.Response:
        aor = unquote(request.match_info["aor"])
        now = self.clock()
        bindings = self.registrar.lookup(aor)
        if not bindings:
            return web.json_response({"error": "not found", "aor": aor}, status=404)
        return web.json_response(
            {"aor": aor, "contacts": [binding_view(aor, b, now) for b in bindings]})

    async def delete_registration(self, request: web.Request) -> web.Response:
        aor = unquote(request.match_info["aor"])
        if not self.registrar.lookup(aor):
            return web.json_response({"error": "not found", "aor": aor}, status=404)
        removed = await self.registrar.remove_aor(aor, "admin")
        return web.json_response({"status": "removed", "aor": aor, "bindings": removed})

    async def stats(self, request: web.Request) -> web.Response:
        state = self.registrar.state
        return web.json_response({
            "uptime_seconds": int(time.monotonic() - self.started),
            "registrations_active": len(state.aors),
            "bindings": state.binding_count(),
            "log_position": {str(k): v for k, v in state.position.items()},
        })

    async def render_metrics(self, request: web.Request) -> web.Response:
        """Prometheus text exposition of the node's metrics."""
        if self.metrics is None:
            return web.json_response({"error": "metrics disabled"}, status=404)
        return web.Response(body=self.metrics(), headers={"Content-Type": CONTENT_TYPE})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "uptime_seconds": int(time.monotonic() - self.started)})

    async def ready(self, request: web.Request) -> web.Response:
        if self.is_ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "starting"}, status=503)
