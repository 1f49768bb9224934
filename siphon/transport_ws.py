"""SIP over WebSocket (RFC 7118) on aiohttp's WebSocket server.

Each text or binary frame carries one SIP message. The ``sip`` subprotocol
is echoed when the client offers it. Messages are handed to the same receiver
as UDP/TCP with transport ``ws`` (``wss`` with TLS) and a connection id, so
responses and requests to a binding go back over the very same connection.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from collections.abc import Callable

from aiohttp import WSMsgType, web

from siphon.script.request import Source

log = logging.getLogger("siphon.transport.ws")

_ids = itertools.count(1)


class WsConnection:
    """One accepted WebSocket: a queue-backed writer so sends never block the caller."""

    def __init__(self, ws: web.WebSocketResponse, conn_id: str) -> None:
        self.ws = ws
        self.conn_id = conn_id
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1000)
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        while True:
            data = await self._queue.get()
            if data is None or self.ws.closed:
                return
            try:
                await self.ws.send_str(data.decode("utf-8", "surrogateescape"))
            except (ConnectionError, RuntimeError) as exc:
                log.debug("ws %s send failed: %s", self.conn_id, exc)
                return

    def send(self, data: bytes) -> bool:
        if self.ws.closed:
            return False
        try:
            self._queue.put_nowait(data)
        except asyncio.QueueFull:
            log.warning("ws %s: send queue full, dropping %d octets", self.conn_id, len(data))
            return False
        return True

    def close(self) -> None:
        try:
            self._queue.put_nowait(None)
        except asyncio.QueueFull:
            self._writer.cancel()


class WsServer:
    """A ``ws``/``wss`` listener; any request path is accepted for the upgrade."""

    def __init__(self, receiver: Callable[[bytes, Source], None], *, secure: bool = False,
                 max_message_size: int = 65535, max_connections: int = 10000) -> None:
        self.receiver = receiver
        self.transport = "wss" if secure else "ws"
        self.max_message_size = max_message_size
        self.max_connections = max_connections
        self.connections: dict[str, WsConnection] = {}
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if len(self.connections) >= self.max_connections:
            return web.Response(status=503, text="too many connections")
        ws = web.WebSocketResponse(protocols=("sip",), max_msg_size=self.max_message_size,
                                   heartbeat=None)
        if not ws.can_prepare(request).ok:
            return web.Response(status=426, text="SIP over WebSocket: upgrade required",
                                headers={"Upgrade": "websocket"})
        await ws.prepare(request)
        conn = WsConnection(ws, f"{self.transport}-{next(_ids)}")
        self.connections[conn.conn_id] = conn
        peer = request.transport.get_extra_info("peername") if request.transport else None
        local = request.transport.get_extra_info("sockname") if request.transport else None
        source = Source(self.transport, (peer[0], peer[1]) if peer else ("", 0),
                        (local[0], local[1]) if local else ("", 0), conn.conn_id)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    data = msg.data.encode("utf-8", "surrogateescape")
                elif msg.type == WSMsgType.BINARY:
                    data = msg.data
                else:
                    break
                if data.strip():
                    self.receiver(data, source)
        finally:
            self.connections.pop(conn.conn_id, None)
            conn.close()
        return ws

    async def start(self, host: str, port: int,
                    ssl_context: ssl.SSLContext | None = None) -> tuple[str, int]:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        await site.start()
        server = site._server  # aiohttp keeps the asyncio server here
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname() if sockets else (host, port)
        return bound[0], bound[1]

    def send(self, conn_id: str, data: bytes) -> bool:
        conn = self.connections.get(conn_id)
        return conn.send(data) if conn is not None else False

    async def close(self) -> None:
        for conn in list(self.connections.values()):
            await conn.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
