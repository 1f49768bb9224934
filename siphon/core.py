"""The SIP core: from received bytes to transactions, the script and the registrar.

Transports call :meth:`SipCore.receive` with the octets of one message and
where they came from; the core answers through the ``send`` callback the
server installs (responses go back to the packet source, over the same
connection for stream transports).
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from siphon.auth.service import AuthService
from siphon.metrics import register_outcome
from siphon.proxy.context import ResponseContext
from siphon.proxy.forwarder import Forwarder, ProxySession, Target
from siphon.proxy.routing import (
    BRANCH_PREFIX,
    Identity,
    flow_tokens,
    is_looped,
    next_hop_of,
    target_uri,
)
from siphon.registrar.aor import aor_of
from siphon.registrar.plan import RegisterInput
from siphon.registrar.service import Registrar
from siphon.script import registry as reg
from siphon.script.contact import Contact
from siphon.script.request import Action, ScriptRequest, Source
from siphon.sip.client_transaction import InviteServerRetransmitter
from siphon.sip.errors import SipSyntaxError
from siphon.sip.headers import parse_uint
from siphon.sip.message import Headers, Request, Response, make_response
from siphon.sip.parser import ParseError, parse_message
from siphon.sip.transaction import ServerTransaction, ServerTransactionTable, server_key
from siphon.sip.uri import parse_uri

log = logging.getLogger("siphon.core")

SUPPORTED_EXTENSIONS = frozenset({"path"})
_SCHEMES = frozenset({"sip", "sips", "tel"})
_COPY_ON_ERROR = ("Via", "From", "To", "Call-ID", "CSeq")
PROXIED = object()
"""_process result: the request was forwarded; responses come from the forwarder."""


class SipCore:
    """Dispatches SIP requests; sans sockets (``send`` is injected)."""

    def __init__(self, *, domains: list[str], registrar: Registrar, auth: AuthService,
                 send: Callable[[bytes, Source], None], server_header: str = "siphon",
                 max_message_size: int = 65535, max_headers: int = 256,
                 enforce_auth_aor_match: bool = False, max_inflight: int = 5000,
                 clock: Callable[[], float] = time.time) -> None:
        self.domains = frozenset(d.lower() for d in domains)
        self.registrar = registrar
        self.auth = auth
        self.send = send
        self.server_header = server_header
        self.max_message_size = max_message_size
        self.max_headers = max_headers
        self.enforce_auth_aor_match = enforce_auth_aor_match
        self.max_inflight = max_inflight
        self.clock = clock
        self.transactions = ServerTransactionTable(time.monotonic)
        self.identity = Identity()
        self.flow_transport: Callable[[str], str | None] = lambda conn_id: None
        """Transport of a live connection id (TCP/WS flow), None when it is gone."""
        self.forwarder: Forwarder | None = None
        self.ready = False
        self.draining = False
        self.inflight = 0
        self.counters: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    # ---- entry point -------------------------------------------------------------
    def receive(self, data: bytes, source: Source) -> None:
        """Handle the octets of one message (a datagram or a framed stream message)."""
        datagram = source.transport == "udp"
        if datagram:
            # A retransmission (same octets) is answered before any parsing: under
            # overload, retransmitted REGISTERs must not cost as much as new ones.
            tx = self.transactions.match_datagram(data)
            if tx is not None:
                self._replay(tx, source)
                return
        try:
            msg = parse_message(data, datagram=datagram,
                                max_size=self.max_message_size, max_headers=self.max_headers)
        except ParseError as exc:
            self._count("parse_errors")
            log.debug("bad message from %s: %s", source.remote_text, exc.reason)
            if exc.partial is not None and exc.partial.headers.get("Via"):
                self._reply_error(exc.partial, source, exc.status, exc.reason)
            return
        if isinstance(msg, Response):
            if self.forwarder is not None and self.forwarder.on_response(msg):
                return
            self._forward_stray(msg)
            return
        assert isinstance(msg, Request)
        if self.inflight >= self.max_inflight:
            self._count("overload_dropped")
            return
        self.inflight += 1
        task = asyncio.get_running_loop().create_task(
            self._handle(msg, source, data if datagram else None))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _replay(self, tx: ServerTransaction, source: Source) -> None:
        """A retransmitted request: send its transaction's last response, if any."""
        self._count("retransmissions")
        wire = tx.on_retransmission()
        if wire is not None:
            self.send(wire, source)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self.inflight -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("request handling failed", exc_info=task.exception())

    def _reply_error(self, partial: Request, source: Source, status: int, reason: str) -> None:
        headers = Headers()
        for name in _COPY_ON_ERROR:
            for value in partial.headers.get_all(name):
                headers.add(name, value)
        resp = Response(status, None, headers)
        resp.headers.add("Server", self.server_header)
        resp.headers.add("Warning", f'399 siphon "{reason[:120]}"')
        self.send(resp.encode(), source)

    # ---- transactions --------------------------------------------------------------
    async def _handle(self, req: Request, source: Source, datagram: bytes | None = None) -> None:
        method = req.method
        self._count(_REQUEST_COUNTERS.get(method) or _request_counter(method))
        if req.method == "ACK":
            tx = self.transactions.match(req)
            if tx is not None:
                tx.on_ack(time.monotonic())
                timer_g = tx.data.get("timer_g")
                if isinstance(timer_g, InviteServerRetransmitter):
                    timer_g.on_ack()
                return  # ACK for a non-2xx: absorbed hop by hop
            await self._process(req, source)  # ACK for a 2xx: end to end, via the script
            return
        key = server_key(req)
        tx = self.transactions.match(req, key)
        if tx is not None:
            self._replay(tx, source)
            return
        tx = self.transactions.create(req, reliable=source.transport != "udp", key=key,
                                      datagram=datagram)
        if tx is None:
            self.send(self._response(req, 503, "Service Unavailable",
                                     [("Retry-After", "5")]).encode(), source)
            return
        try:
            if req.method == "CANCEL":
                resp = self._cancel(req)
            else:
                resp = await self._process(req, source, tx)
        except Exception:
            log.exception("internal error handling %s %s", req.method, req.uri)
            resp = self._response(req, 500, "Server Internal Error")
        if resp is PROXIED:
            return  # the forwarder answers through _respond
        if resp is None:
            self.transactions.discard(tx)  # silent drop: a retransmission runs it again
            return
        if req.method == "REGISTER":
            self._count(_REGISTER_COUNTERS.get(resp.status)
                        or f"register_{register_outcome(resp.status)}")
        self._respond(tx, source, resp)

    def _respond(self, tx: ServerTransaction | None, source: Source, resp: Response) -> None:
        """Send a response upstream through the server transaction (if still there)."""
        wire = resp.encode()
        if tx is not None:
            tx.on_response(resp.status, wire, time.monotonic())
            if tx.is_invite and resp.status >= 300 and not tx.reliable:
                # Timer G: resend the final response until the ACK comes (§17.2.1).
                timer_g = InviteServerRetransmitter(wire, time.monotonic())
                tx.data["timer_g"] = timer_g
                self._arm_timer_g(timer_g, source)
        self._count(_RESPONSE_COUNTERS.get(resp.status) or f"responses_{resp.status}")
        self.send(wire, source)

    def _arm_timer_g(self, timer_g: InviteServerRetransmitter, source: Source) -> None:
        deadline = timer_g.next_deadline()
        if deadline is None:
            return

        def fire() -> None:
            for effect in timer_g.on_timer(time.monotonic()):
                self.send(effect.data, source)
            self._arm_timer_g(timer_g, source)

        asyncio.get_running_loop().call_later(max(0.0, deadline - time.monotonic()), fire)

    def _cancel(self, req: Request) -> Response:
        """CANCEL (§16.10): 200 and cancel the matching INVITE's branches, else 481."""
        if self.forwarder is not None and self.forwarder.cancel(req):
            return self._response(req, 200, "OK")
        return self._response(req, 481, None)

    def _forward_stray(self, resp: Response) -> None:
        """A response no branch waits for: a 2xx retransmission of a finished INVITE is
        forwarded by its Vias (§16.7 step 5, §18.1.2), anything else is dropped."""
        vias = resp.headers.get_list("Via")
        if not (200 <= resp.status < 300) or len(vias) < 2 or not vias[0].split(
                "branch=")[-1].startswith(BRANCH_PREFIX):
            self._count("responses_unmatched")
            return
        up = Response(resp.status, resp.reason, resp.headers.copy(), resp.body)
        up.headers.pop_first_value("Via")
        via = up.top_via
        if via is None or self.forwarder is None:
            return
        host = via.param("received") or via.host
        rport = via.param("rport")
        port = int(rport) if rport and (rport.isascii() and rport.isdigit()) else (via.port or 5060)
        dest = Source(via.transport.lower(), (host, port), ("", 0))
        self.send(up.encode(), dest)

    def _response(self, req: Request, status: int, reason: str | None = None,
                  headers: list[tuple[str, str]] | None = None,
                  to_tag: bool = True) -> Response:
        resp = make_response(req, status, reason,
                             to_tag=f"{random.getrandbits(48):012x}" if to_tag else None)
        for name, value in headers or ():
            resp.headers.add(name, value)
        resp.headers.add("Server", self.server_header)
        return resp

    # ---- request processing ----------------------------------------------------------
    async def _process(self, req: Request, source: Source,
                       tx: ServerTransaction | None = None) -> Response | object | None:
        if not self.ready or self.draining:
            return self._response(req, 503, "Service Unavailable", [("Retry-After", "2")])
        if req.ruri.scheme not in _SCHEMES:
            return self._response(req, 416, None)
        lower = req.headers.lower_names()
        if "proxy-require" in lower or "require" in lower:
            unsupported = [t for t in req.headers.get_list("Proxy-Require")
                           if t.lower() not in SUPPORTED_EXTENSIONS]
            if req.method == "REGISTER":
                unsupported += [t for t in req.headers.get_list("Require")
                                if t.lower() not in SUPPORTED_EXTENSIONS]
            if unsupported:
                return self._response(req, 420, None,
                                      [("Unsupported", ", ".join(unsupported))])
        mf = req.headers.get("Max-Forwards")
        if mf is not None and int(mf.strip()) == 0 and req.method != "REGISTER":
            return self._response(req, 483, None)
        handlers = reg.registry.request_handlers(req.method)
        if not handlers:
            return self._response(req, 500, "No Script Handler")
        if self.auth.http is not None:
            await self.auth.prefetch(req)
        sreq = ScriptRequest(req, source, self.domains, self.identity)
        for handler in handlers:
            try:
                result = handler.fn(sreq)
                if result is not None and asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("script handler %s raised on %s %s",
                               getattr(handler.fn, "__name__", handler.fn), req.method, req.uri)
                return self._response(req, 500, "Script Error")
        action = sreq.action
        if action is None:
            return None
        if action.kind == "reply":
            resp = self._response(req, action.code, action.reason, sreq.reply_headers)
            if sreq.reply_body is not None:
                resp.body, ctype = sreq.reply_body
                resp.headers.set("Content-Type", ctype)
            return resp
        if action.kind == "save":
            return await self._save(req, source, sreq)
        return await self._proxy(req, source, sreq, tx)

    async def _proxy(self, req: Request, source: Source, sreq: ScriptRequest,
                     tx: ServerTransaction | None) -> Response | object | None:
        """Carry out ``relay``/``fork``: stateful forwarding, or stateless for ACK."""
        action = sreq.action
        assert action is not None and self.forwarder is not None
        if is_looped(req, self.identity):
            return self._response(req, 482, None)
        try:
            targets = self._targets(action, sreq)
        except (SipSyntaxError, ValueError) as exc:
            log.info("bad proxy target in %s %s: %s", req.method, req.uri, exc)
            return None if req.method == "ACK" else self._response(req, 500, "No Valid Targets")
        if req.method == "ACK":
            for target in targets[:1]:
                await self.forwarder.forward_stateless(req, target, source.transport)
            return None
        if action.kind == "fork" and not targets:
            return self._response(req, 500, "No Targets")
        if req.method == "INVITE":
            self._respond(tx, source, self._response(req, 100, "Trying", to_tag=False))
        session = ProxySession(req, source, lambda r: self._respond(tx, source, r),
                               ResponseContext(0, req.method == "INVITE"))
        await self.forwarder.forward(session, targets, sreq.record_routed)
        return PROXIED

    def _targets(self, action: Action, sreq: ScriptRequest) -> list[Target]:
        if action.kind == "relay":
            if action.next_hop:
                hop = next_hop_of(action.next_hop)
                return [Target("", via_source=(hop.host, hop.port, hop.transport))]
            # In-dialog request towards a UA we reach over its own connection: our
            # Record-Route carried the flow token (not the flow the request came on).
            for token in flow_tokens(sreq.consumed_routes):
                transport = self.flow_transport(token)
                if transport is not None and token != sreq.source.conn_id:
                    return [Target("", conn_id=token, via_source=("", 0, transport))]
            return [Target("")]
        targets: list[Target] = []
        for item in action.targets:
            if isinstance(item, Contact):
                b = item.binding
                local = item.is_local
                flow = b.conn_id if local and b.transport != "udp" else ""
                src = _flow_destination(item) if local else None
                targets.append(Target(b.uri, list(b.path), flow, src))
            else:
                targets.append(Target(str(target_uri(item))))
        return targets

    async def _save(self, req: Request, source: Source, sreq: ScriptRequest) -> Response:
        try:
            to = req.to
            aor = aor_of(to.uri)
        except SipSyntaxError as exc:
            return self._response(req, 400, f"Invalid AoR: {exc.reason}"[:100])
        if to.uri.host.lower() not in self.domains:
            return self._response(req, 404, "Not Found (domain not served here)")
        if self.enforce_auth_aor_match and sreq.auth_user is not None and (
                sreq.auth_user != (to.uri.user or "")):
            return self._response(req, 403, "Forbidden (credentials do not match the AoR)")
        expires_text = req.headers.get("Expires")
        inp = RegisterInput(
            aor=aor,
            contacts=req.name_addrs("Contact"),
            expires_header=parse_uint(expires_text, "Expires", 2**32 - 1)
            if expires_text is not None else None,
            call_id=req.call_id,
            cseq=req.cseq[0],
            source=source.remote_text,
            transport=source.transport,
            local=source.local_text,
            conn_id=source.conn_id,
            user_agent=req.headers.get("User-Agent") or "",
            path=req.headers.get_list("Path"),
        )
        result = await self.registrar.save(inp)
        headers = list(result.headers)
        if result.status == 200:
            now = self.clock()
            for b in result.bindings:
                contact = f"<{b.uri}>;expires={max(0, int(b.expires_at - now))}"
                if b.q != 1.0:
                    contact += f";q={b.q:g}"
                headers.append(("Contact", contact))
            headers.append(("Date", _http_date(now)))
            headers.extend(("Path", p) for p in inp.path)
            headers.extend(sreq.reply_headers)
        return self._response(req, result.status, result.reason, headers)

    async def drain(self, timeout: float) -> None:
        """Stop taking new requests and wait (bounded) for those in flight."""
        self.draining = True
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)


_REQUEST_COUNTERS = {m: f"requests_{m}" for m in (
    "REGISTER", "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "MESSAGE", "SUBSCRIBE",
    "NOTIFY", "INFO", "PRACK", "UPDATE", "REFER", "PUBLISH")}
_RESPONSE_COUNTERS = {s: f"responses_{s}" for s in range(100, 700)}
_REGISTER_COUNTERS = {s: f"register_{register_outcome(s)}" for s in range(200, 700)}


def _request_counter(method: str) -> str:
    return f"requests_{method}" if method.isalpha() else "requests_other"


_date_cache: tuple[int, str] = (-1, "")


def _http_date(now: float) -> str:
    """RFC 1123 date of ``now`` for the Date header (formatted once per second)."""
    global _date_cache
    second = int(now)
    if _date_cache[0] != second:
        _date_cache = (second, email.utils.formatdate(second, usegmt=True))
    return _date_cache[1]


def _flow_destination(contact: Contact) -> tuple[str, int, str] | None:
    """Where to reach a binding this node accepted: its packet source (the NAT
    mapping) for stream flows, RFC 5626 outbound registrations, and contacts whose
    address is not the one the REGISTER came from (NAT); else None (route by URI)."""
    b = contact.binding
    if not b.source:
        return None
    host, _, port_text = b.source.rpartition(":")
    host = host.strip("[]")
    dest = (host, int(port_text), b.transport)
    if b.transport != "udp" or (b.instance and b.reg_id):
        return dest
    try:
        contact_host = parse_uri(b.uri).host.strip("[]")
    except SipSyntaxError:
        return dest
    try:
        ipaddress.ip_address(contact_host)
    except ValueError:
        return None  # a host name: route by URI
    return dest if contact_host != host else None
