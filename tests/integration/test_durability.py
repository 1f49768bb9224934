"""Durability: every REGISTER answered 200 survives kill -9 and restarts."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
import urllib.parse

import pytest
from conftest import SiphonProcess
from sipclient import (
    UdpClient,
    authorization,
    build_request,
    md5_challenge,
    new_branch,
    new_tag,
    parse_response,
)

pytestmark = pytest.mark.integration

LOAD_PASSWORD = "load-secret"
LOAD_SCRIPT = f'''\
from siphon import auth, proxy, registrar


@proxy.on_request
def route(request):
    if request.method == "REGISTER":
        if auth.require_digest(request, password={LOAD_PASSWORD!r}):
            registrar.save(request)
        return
    request.reply(200, "OK")
'''


class LoadClient(asyncio.DatagramProtocol):
    """Many concurrent REGISTER 401/200 dialogues over one UDP socket, by Call-ID."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: dict[str, asyncio.Queue] = {}
        self.local_port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.local_port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            resp = parse_response(data)
        except ValueError:
            return
        queue = self.waiting.get(resp.call_id or "")
        if queue is not None:
            queue.put_nowait(resp)

    async def exchange(self, call_id: str, data: bytes, server: tuple[str, int],
                       timeout: float):
        queue = self.waiting.setdefault(call_id, asyncio.Queue())
        assert self.transport is not None
        self.transport.sendto(data, server)
        deadline = time.monotonic() + timeout
        while True:
            resp = await asyncio.wait_for(queue.get(), max(0.001, deadline - time.monotonic()))
            if resp.status >= 200:
                return resp


async def register_load(port: int, count: int, duration: float, kill_after: int,
                        kill, first: int = 0) -> tuple[set[str], dict[str, int], int]:
    """Start ``count`` registrations spread over ``duration`` seconds; call ``kill()``
    once ``kill_after`` of them were answered 200. Returns the AoRs answered 200,
    other outcomes counted by kind, and how many were in flight at the kill."""
    loop = asyncio.get_running_loop()
    transports = []
    clients: list[LoadClient] = []
    for _ in range(8):
        transport, client = await loop.create_datagram_endpoint(
            LoadClient, local_addr=("127.0.0.1", 0))
        transports.append(transport)
        clients.append(client)
    server = ("127.0.0.1", port)
    acked: set[str] = set()
    outcomes: dict[str, int] = {}
    state = {"killed": False, "in_flight": 0, "in_flight_at_kill": -1}

    def note(kind: str) -> None:
        outcomes[kind] = outcomes.get(kind, 0) + 1

    async def one(i: int) -> None:
        client = clients[i % len(clients)]
        user = f"load{i:05d}"
        aor = f"sip:{user}@example.com"
        call_id = f"{secrets.token_hex(8)}-{i}@load"
        tag = new_tag()
        via_host = f"127.0.0.1:{client.local_port}"

        def req(cseq: int, auth: str | None) -> bytes:
            return build_request(
                "REGISTER", "sip:example.com", to=f"<{aor}>", from_=f"<{aor}>;tag={tag}",
                call_id=call_id, cseq=cseq, via=f"SIP/2.0/UDP {via_host};branch={new_branch()}",
                contact=f"<sip:{user}@192.0.2.{i % 250 + 1}:5060>", expires=3600,
                extra=[("Authorization", auth)] if auth else None)

        state["in_flight"] += 1
        try:
            challenge = await client.exchange(call_id, req(1, None), server, 2.0)
            if challenge.status != 401:
                note(f"first {challenge.status}")
                return
            auth = authorization(md5_challenge(challenge), method="REGISTER", uri="sip:example.com",
                                 username=user, password=LOAD_PASSWORD)
            second = await client.exchange(call_id, req(2, auth), server, 2.0)
            if second.status == 200:
                acked.add(aor)
                note("200")
                if len(acked) >= kill_after and not state["killed"]:
                    state["killed"] = True
                    state["in_flight_at_kill"] = state["in_flight"] - 1
                    kill()
            else:
                note(f"second {second.status}")
        except TimeoutError:
            note("timeout (killed)" if state["killed"] else "timeout")
        finally:
            state["in_flight"] -= 1
            client.waiting.pop(call_id, None)

    tasks = []
    start = time.monotonic()
    for n, i in enumerate(range(first, first + count)):
        if state["killed"]:
            break  # nothing listens any more: stop generating
        due = start + duration * n / count
        if (delay := due - time.monotonic()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    for transport in transports:
        transport.close()
    outcomes["started"] = len(tasks)
    return acked, outcomes, state["in_flight_at_kill"]


@pytest.mark.timeout(90)
async def test_kill9_under_load_loses_no_acknowledged_registration(
        siphon: SiphonProcess) -> None:
    siphon.start(script_text=LOAD_SCRIPT)
    acked_total: set[str] = set()
    # Two crash cycles: the second one appends to a log recovered from the first crash.
    for cycle, first in enumerate((0, 2000)):
        pid = siphon.pid
        acked, outcomes, in_flight = await register_load(
            siphon.sip_port, count=2000, duration=2.0, kill_after=600, first=first,
            kill=lambda pid=pid: os.kill(pid, signal.SIGKILL))
        siphon.proc.wait(10)  # type: ignore[union-attr]
        assert siphon.proc.returncode == -signal.SIGKILL, (  # type: ignore[union-attr]
            f"cycle {cycle}: the server was not killed mid-load (outcomes {outcomes})\n"
            f"{siphon.tail()}")
        assert len(acked) >= 600, f"cycle {cycle}: too few registrations: {outcomes}"
        assert in_flight > 0, f"cycle {cycle}: nothing was in flight at the kill: {outcomes}"
        acked_total |= acked

        siphon.restart()
        listed = siphon.aors()
        lost = sorted(acked_total - listed)
        assert not lost, (
            f"cycle {cycle}: {len(lost)} of {len(acked_total)} registrations answered 200 "
            f"before kill -9 are gone after the restart, e.g. {lost[:10]} "
            f"(outcomes {outcomes})\n{siphon.tail()}")
        assert listed <= {f"sip:load{i:05d}@example.com" for i in range(first + 2000)}

    # Every sampled AoR carries the contact it registered.
    sample = sorted(acked_total)[:: max(1, len(acked_total) // 20)]
    for aor in sample:
        contacts = siphon.contacts(aor)
        assert contacts is not None and len(contacts) == 1, (aor, contacts)
        i = int(urllib.parse.urlsplit(aor).path.split("@")[0].removeprefix("load"))
        assert contacts[0]["uri"] == f"sip:load{i:05d}@192.0.2.{i % 250 + 1}:5060"

    # The restarted node keeps serving and writing.
    with UdpClient(siphon.sip_port) as client:
        resp, _ = client.register("late", LOAD_PASSWORD)
    assert resp.status == 200, resp
    assert siphon.contacts("sip:late@example.com") is not None


@pytest.mark.timeout(60)
def test_restart_keeps_binding_and_admin_delete_removes_it(siphon: SiphonProcess) -> None:
    siphon.start()
    with UdpClient(siphon.sip_port) as client:
        resp, _ = client.register("alice", "secret", contact="<sip:alice@192.0.2.10:5070>",
                                  expires=1800)
    assert resp.status == 200, resp
    before = siphon.contacts("sip:alice@example.com")
    assert before is not None and before[0]["uri"] == "sip:alice@192.0.2.10:5070"

    assert siphon.stop() == 0, f"SIGTERM did not stop siphon cleanly\n{siphon.tail()}"
    siphon.restart()
    after = siphon.contacts("sip:alice@example.com")
    assert after is not None, f"binding lost across a clean restart\n{siphon.tail()}"
    assert [(c["uri"], c["call_id"], c["cseq"], c["registered_at"], c["expires_at"])
            for c in after] == [
        (c["uri"], c["call_id"], c["cseq"], c["registered_at"], c["expires_at"]) for c in before]

    status, body = siphon.admin("DELETE", "/admin/registrations/sip:alice@example.com")
    assert status == 200 and body["bindings"] == 1, (status, body)
    assert siphon.contacts("sip:alice@example.com") is None
    status, body = siphon.admin("DELETE", "/admin/registrations/sip:alice@example.com")
    assert status == 404, (status, body)
    siphon.wait_output("on_change sip:alice@example.com deregistered 0")

    # The removal is durable too.
    siphon.restart()
    assert siphon.contacts("sip:alice@example.com") is None
    assert "sip:alice@example.com" not in siphon.aors()
