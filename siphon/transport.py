"""UDP and TCP transports: thin asyncio adapters around the sans-IO core."""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from collections.abc import Callable

from siphon.script.request import Source
from siphon.sip.errors import SipSyntaxError
from siphon.sip.parser import StreamFramer
from siphon.transport_ws import WsServer

log = logging.getLogger("siphon.transport")

Receiver = Callable[[bytes, Source], None]
_conn_ids = itertools.count(1)


def _addr(sockname: tuple) -> tuple[str, int]:
    return sockname[0], sockname[1]


class UdpProtocol(asyncio.DatagramProtocol):
    """One UDP listener."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.transport: asyncio.DatagramTransport | None = None
        self.local: tuple[str, int] = ("", 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.local = _addr(transport.get_extra_info("sockname"))

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if data.strip(b"\r\n\0 ") == b"":
            return  # keep-alive
        self.receiver(data, Source("udp", _addr(addr), self.local))

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error on %s: %s", self.local, exc)

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)


class TcpConnection(asyncio.Protocol):
    """One accepted TCP connection, framed by Content-Length."""

    def __init__(self, server: TcpServer) -> None:
        self.server = server
        self.conn_id = f"tcp-{next(_conn_ids)}"
        self.framer = StreamFramer(server.max_message_size)
        self.transport: asyncio.Transport | None = None
        self.remote: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.remote = _addr(transport.get_extra_info("peername"))
        self.local = _addr(transport.get_extra_info("sockname"))
        if len(self.server.connections) >= self.server.max_connections:
            log.warning("refusing TCP connection from %s: %d connections open",
                        self.remote, len(self.server.connections))
            transport.abort()
            return
        self.server.connections[self.conn_id] = self
        self._arm_idle()

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(self.server.idle_timeout, self._on_idle)

    def _on_idle(self) -> None:
        log.debug("closing idle TCP connection %s from %s", self.conn_id, self.remote)
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._arm_idle()
        try:
            frames = self.framer.feed(data)
        except SipSyntaxError as exc:
            log.info("closing TCP connection from %s: %s", self.remote, exc.reason)
            if self.transport is not None:
                self.transport.close()
            return
        for frame in frames:
            self.server.receiver(frame, Source("tcp", self.remote, self.local, self.conn_id))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self.server.connections.pop(self.conn_id, None)
        self.transport = None

    def send(self, data: bytes) -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(data)
        return True


class TcpServer:
    """A TCP listener and its open connections."""

    def __init__(self, receiver: Receiver, *, max_message_size: int, idle_timeout: float,
                 max_connections: int) -> None:
        self.receiver = receiver
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.connections: dict[str, TcpConnection] = {}
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: TcpConnection(self), host, port,
                                               reuse_address=True)
        return _addr(self.server.sockets[0].getsockname())

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections.values()):
            if conn.transport is not None:
                conn.transport.close()


class Transports:
    """Every listener of the node; routes outgoing octets back to their source."""

    def __init__(self, receiver: Receiver, *, max_message_size: int = 65535,
                 idle_timeout: float = 600.0, max_connections: int = 10000,
                 udp_receive_buffer: int = 512 * 1024) -> None:
        self.receiver = receiver
        self.udp_receive_buffer = udp_receive_buffer
        self.udp: dict[tuple[str, int], UdpProtocol] = {}
        self.tcp: list[TcpServer] = []
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.ws: WsServer | None = None
        self.bound: list[tuple[str, str, int]] = []
        """(transport, host, port) actually bound (port 0 resolved)."""

    async def listen_udp(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # A modest receive buffer: under overload a deep queue only makes every answer
        # late (clients retransmit, then give up); the send side never queues much.
        for opt, size in ((socket.SO_RCVBUF, self.udp_receive_buffer),
                          (socket.SO_SNDBUF, 4 * 1024 * 1024)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
            except OSError:
                pass
        sock.bind((host, port))
        _, proto = await loop.create_datagram_endpoint(lambda: UdpProtocol(self.receiver),
                                                       sock=sock)
        bound = proto.local
        self.udp[bound] = proto
        if host in ("0.0.0.0", "::"):
            self.udp[(host, bound[1])] = proto
        self.bound.append(("udp", bound[0], bound[1]))
        return bound

    async def listen_ws(self, host: str, port: int) -> tuple[str, int]:
        """A SIP-over-WebSocket listener (RFC 7118)."""
        if self.ws is None:
            self.ws = WsServer(self.receiver, max_message_size=self.max_message_size,
                               max_connections=self.max_connections)
        bound = await self.ws.start(host, port)
        self.bound.append(("ws", bound[0], bound[1]))
        return bound

    async def listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        server = TcpServer(self.receiver, max_message_size=self.max_message_size,
                           idle_timeout=self.idle_timeout, max_connections=self.max_connections)
        bound = await server.start(host, port)
        self.tcp.append(server)
        self.bound.append(("tcp", bound[0], bound[1]))
        return bound

    def connection(self, conn_id: str) -> TcpConnection | None:
        for server in self.tcp:
            conn = server.connections.get(conn_id)
            if conn is not None:
                return conn
        return None

    def flow_transport(self, conn_id: str) -> str | None:
        """``tcp``/``ws`` when ``conn_id`` is an open connection, else None."""
        if self.connection(conn_id) is not None:
            return "tcp"
        if self.ws is not None and conn_id in self.ws.connections:
            return self.ws.transport
        return None

    async def send_to(self, data: bytes, host: str, port: int, transport: str,
                      conn_id: str = "") -> bool:
        """Send a request downstream: over ``conn_id`` when given (the flow a binding
        came in on; False if it is gone), else to ``host:port`` over ``transport``
        (reusing an open TCP connection to that address, or connecting)."""
        if conn_id:
            conn = self.connection(conn_id)
            if conn is not None:
                return conn.send(data)
            if self.ws is not None:
                return self.ws.send(conn_id, data)
            return False
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            log.info("cannot resolve %s: %s", host, exc)
            return False
        if not infos:
            return False
        addr = infos[0][4][:2]
        if transport == "udp":
            proto = next((p for p in self.udp.values() if p.transport is not None), None)
            if proto is None:
                return False
            proto.send(data, addr)
            return True
        if transport != "tcp" or not self.tcp:
            return False
        server = self.tcp[0]
        for conn in server.connections.values():
            if conn.remote == (addr[0], addr[1]) and conn.transport is not None:
                return conn.send(data)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: TcpConnection(server), addr[0], addr[1]), 2.0)
        except (OSError, TimeoutError) as exc:
            log.info("cannot connect to %s:%d over tcp: %s", addr[0], addr[1], exc)
            return False
        return conn.send(data)

    def send(self, data: bytes, dest: Source) -> None:
        """Send back to where ``dest`` came from (same connection for streams)."""
        if dest.conn_id:
            conn = self.connection(dest.conn_id)
            if conn is not None:
                conn.send(data)
                return
            if self.ws is not None and self.ws.send(dest.conn_id, data):
                return
            log.debug("connection %s is gone; dropping %d octets", dest.conn_id, len(data))
            return
        proto = self.udp.get(dest.local) or next(iter(self.udp.values()), None)
        if proto is not None:
            proto.send(data, dest.remote)

    async def close(self) -> None:
        for proto in set(self.udp.values()):
            if proto.transport is not None:
                proto.transport.close()
        for server in self.tcp:
            await server.close()
        if self.ws is not None:
            await self.ws.close()
