"""Calls to UAs registered over TCP and WebSocket reach them over their own connection
(RFC 5626 §5.3 connection reuse); a dead flow or a silent branch fails the branch."""

from __future__ import annotations

import asyncio
import secrets
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from siphon.sip.message import Request, Response, make_response
from siphon.sip.parser import StreamFramer, parse_message
from tests.integration.conftest import EXAMPLES, SiphonProcess, free_port
from tests.integration.sipclient import (
    UdpClient,
    authorization,
    build_request,
    md5_challenge,
)
from tests.integration.sipclient import parse_response as parse_test_response

pytestmark = pytest.mark.integration

SIPP = Path(__file__).parent / "sipp"
RECIPE = (EXAMPLES / "registrar.py").read_text()


class StreamUA:
    """A minimal UA on one stream connection (TCP or WebSocket) for these tests."""

    def __init__(self, send: Callable[[bytes], Awaitable[None]],
                 recv: Callable[[], Awaitable[bytes]], transport: str, contact_host: str):
        self._send = send
        self._recv = recv
        self.transport = transport
        self.contact_host = contact_host
        self.tag = secrets.token_hex(4)

    async def send(self, data: bytes) -> None:
        await self._send(data)

    async def recv(self, timeout: float = 10.0) -> Request | Response:
        msg = parse_message(await asyncio.wait_for(self._recv(), timeout), datagram=False)
        assert isinstance(msg, (Request, Response))
        return msg

    async def register(self, user: str, password: str) -> Response:
        call_id = secrets.token_hex(8)
        contact = f"<sip:{user}@{self.contact_host};transport={self.transport}>"
        via = f"SIP/2.0/{self.transport.upper()} {self.contact_host};branch=z9hG4bK{{}}"
        resp: Response | None = None
        auth: list[tuple[str, str]] = []
        for cseq in (1, 2):
            await self.send(build_request(
                "REGISTER", "sip:example.com", to=f"<sip:{user}@example.com>",
                from_=f"<sip:{user}@example.com>;tag={self.tag}", call_id=call_id, cseq=cseq,
                via=via.format(secrets.token_hex(6)), contact=contact, expires=600,
                extra=auth))
            msg = await self.recv()
            assert isinstance(msg, Response), msg
            resp = msg
            if resp.status != 401:
                break
            challenge = md5_challenge(parse_test_response(resp.encode()))
            auth = [("Authorization", authorization(
                challenge, method="REGISTER", uri="sip:example.com", username=user,
                password=password))]
        assert resp is not None and resp.status == 200, resp
        return resp

    async def next_request(self, method: str) -> Request:
        while True:
            msg = await self.recv()
            if isinstance(msg, Request) and msg.method == method:
                return msg

    async def answer(self, invite: Request, status: int = 200) -> None:
        for code in (180, status):
            resp = make_response(invite, code, to_tag=self.tag)
            for rr in invite.headers.get_all("Record-Route"):
                resp.headers.add("Record-Route", rr)
            resp.headers.add("Contact",
                             f"<sip:bob@{self.contact_host};transport={self.transport}>")
            await self.send(resp.encode())

    async def reply(self, req: Request, status: int) -> None:
        await self.send(make_response(req, status, to_tag=self.tag).encode())


async def _tcp_ua(port: int) -> tuple[StreamUA, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    framer = StreamFramer()
    pending: list[bytes] = []

    async def send(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    async def recv() -> bytes:
        while not pending:
            chunk = await reader.read(65536)
            if not chunk:
                raise ConnectionError("siphon closed the connection")
            pending.extend(framer.feed(chunk))
        return pending.pop(0)

    host, lport = writer.get_extra_info("sockname")[:2]
    return StreamUA(send, recv, "tcp", f"{host}:{lport}"), writer


def _call(node: SiphonProcess, user: str = "bob") -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["sipp", f"127.0.0.1:{node.sip_port}", "-sf", str(SIPP / "uac_call.xml"), "-s", user,
         "-key", "domain", "example.com", "-m", "1", "-p", str(free_port()), "-nostdin",
         "-timeout", "40s"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


async def _finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    out, _ = await asyncio.to_thread(proc.communicate, None, 60)
    return proc.returncode, out.decode(errors="replace")


async def _take_call(ua: StreamUA) -> None:
    invite = await ua.next_request("INVITE")
    assert invite.headers.get("Record-Route"), "the proxy must record-route"
    await ua.answer(invite)
    ack = await ua.next_request("ACK")
    assert ack.headers.get("Call-ID") == invite.headers.get("Call-ID")
    bye = await ua.next_request("BYE")
    await ua.reply(bye, 200)


@pytest.mark.timeout(90)
async def test_tcp_registered_ua_is_called_over_its_connection(siphon: SiphonProcess) -> None:
    siphon.start(script_text=RECIPE)
    ua, writer = await _tcp_ua(siphon.sip_port)
    try:
        await ua.register("bob", "secret")
        status, body = siphon.admin("GET", "/admin/registrations/sip:bob@example.com")
        assert status == 200 and body["contacts"][0]["transport"] == "tcp"
        caller = _call(siphon)
        await _take_call(ua)
        rc, out = await _finish(caller)
        assert rc == 0, f"{out[-3000:]}\n{siphon.tail()}"
    finally:
        writer.close()


@pytest.mark.timeout(90)
async def test_websocket_ua_registers_and_is_called(siphon: SiphonProcess) -> None:
    ws_port = free_port()
    siphon.start({"listen": {"ws": [f"127.0.0.1:{ws_port}"]}}, script_text=RECIPE)
    async with aiohttp.ClientSession() as session, session.ws_connect(
            f"http://127.0.0.1:{ws_port}/", protocols=("sip",)) as ws:
        assert ws.protocol == "sip"

        async def send(data: bytes) -> None:
            await ws.send_str(data.decode())

        async def recv() -> bytes:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            return msg.data.encode()

        ua = StreamUA(send, recv, "ws", "df7jal23ls0d.invalid")
        await ua.register("bob", "secret")
        caller = _call(siphon)
        await _take_call(ua)
        rc, out = await _finish(caller)
        assert rc == 0, f"{out[-3000:]}\n{siphon.tail()}"


@pytest.mark.timeout(90)
async def test_call_to_a_closed_flow_fails_fast(siphon: SiphonProcess) -> None:
    siphon.start(script_text=RECIPE)
    ua, writer = await _tcp_ua(siphon.sip_port)
    await ua.register("bob", "secret")
    writer.close()
    await asyncio.sleep(0.3)
    started = time.monotonic()
    rc, out = await _finish(_call(siphon))
    assert rc != 0
    assert "430" in out or "480" in out or "503" in out or "500" in out, out[-2000:]
    assert time.monotonic() - started < 10, "a dead flow must fail the branch quickly"


@pytest.mark.timeout(120)
async def test_silent_branch_times_out_with_408(siphon: SiphonProcess) -> None:
    siphon.start(script_text=RECIPE)
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # bound, so no ICMP error: it just never answers
    port = silent.getsockname()[1]
    try:
        with UdpClient(siphon.sip_port) as client:
            resp, _ = client.register("bob", "secret", contact=f"<sip:bob@127.0.0.1:{port}>")
            assert resp.status == 200
        started = time.monotonic()
        rc, out = await _finish(_call(siphon))
        elapsed = time.monotonic() - started
        assert rc != 0 and "408" in out, out[-2000:]
        assert 30 <= elapsed <= 45, f"timer B is 64*T1 = 32 s, took {elapsed:.1f}s"
        assert silent.recv(65536).startswith(b"INVITE ")
    finally:
        silent.close()
