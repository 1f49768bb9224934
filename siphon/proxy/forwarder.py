"""Stateful forwarding (RFC 3261 §16.6-16.10): branches, client transactions, CANCEL.

The forwarder owns the proxy sessions of requests the script relayed or
forked. It builds each branch's request, drives the sans-IO client
transactions with loop timers, feeds responses to the pure response context
and sends upstream what the context decides.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from siphon.proxy.context import Do, ResponseContext
from siphon.proxy.routing import (
    Identity,
    NextHop,
    new_branch,
    next_hop,
    record_route_value,
    stateless_branch,
)
from siphon.script.request import Source
from siphon.sip.client_transaction import (
    ClientTransaction,
    Deliver,
    Send,
    Terminated,
    Timeout,
    TransportError,
)
from siphon.sip.errors import SipSyntaxError
from siphon.sip.headers import parse_via
from siphon.sip.message import Headers, Request, Response, make_response

log = logging.getLogger("siphon.proxy")

TIMER_C = 180.0
"""Seconds an INVITE branch may stay without a final response (§16.8, > 3 min)."""

Sender = Callable[[bytes, NextHop, str], Awaitable[bool]]
"""``send(data, hop, conn_id)``: send over ``conn_id`` if given and alive, else to ``hop``."""


@dataclass(slots=True)
class Target:
    """Where one branch goes: its Request-URI, extra Route set and optional flow."""

    uri: str
    routes: list[str] = field(default_factory=list)
    conn_id: str = ""
    """Existing connection (TCP/WS flow) to send over."""
    via_source: tuple[str, int, str] | None = None
    """(ip, port, transport) the binding registered from (NAT-mapped address)."""


@dataclass(slots=True)
class Branch:
    session: ProxySession
    index: int
    branch: str
    request: Request
    hop: NextHop
    conn_id: str
    tx: ClientTransaction | None = None
    timer: asyncio.TimerHandle | None = None
    provisional: bool = False
    final: Response | None = None
    cancel_pending: bool = False
    cancelled: bool = False
    timer_c: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class ProxySession:
    request: Request
    source: Source
    respond: Callable[[Response], None]
    context: ResponseContext
    branches: list[Branch] = field(default_factory=list)
    key: tuple[str, ...] = ()


class Forwarder:
    """Forwards requests statefully and routes responses back upstream."""

    def __init__(self, *, identity: Identity, send: Sender,
                 via_address: Callable[[str], tuple[str, int]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.identity = identity
        self.send = send
        self.via_address = via_address
        self.clock = clock
        self.branches: dict[str, Branch] = {}
        self.sessions: dict[tuple[str, ...], ProxySession] = {}
        self.counters: dict[str, int] = {}

    # ---- building branch requests -----------------------------------------------------
    def _outgoing(self, req: Request, target: Target, record_route: bool,
                  in_transport: str) -> tuple[Request, NextHop, str]:
        out = req.copy()
        if target.uri:
            out.set_uri(target.uri)
        if target.routes:
            existing = out.headers.get_list("Route")
            out.headers.remove("Route")
            out.headers.add("Route", ", ".join([*target.routes, *existing]))
        mf = out.headers.get("Max-Forwards")
        out.headers.set("Max-Forwards",
                        str(int(mf) - 1) if mf and mf.isascii() and mf.isdigit() else "70")
        if target.via_source is not None and not target.routes:
            ip, port, transport = target.via_source
            hop = NextHop(ip, port, transport)
        else:
            hop = next_hop(out, in_transport if in_transport in ("udp", "tcp") else "udp")
        if target.conn_id:
            hop = NextHop(hop.host, hop.port, target.via_source[2] if target.via_source
                          else hop.transport)
        if record_route and out.method not in ("REGISTER", "ACK", "CANCEL"):
            host, port = self.via_address(hop.transport)
            values = [record_route_value(host, port, hop.transport, target.conn_id)]
            if hop.transport != in_transport:
                ihost, iport = self.via_address(in_transport)
                values.append(record_route_value(ihost, iport, in_transport))
            for value in reversed(values):
                out.headers.add("Record-Route", value, first=True)
        return out, hop, target.conn_id

    def _add_via(self, out: Request, hop: NextHop, branch: str) -> None:
        host, port = self.via_address(hop.transport)
        hostpart = f"[{host}]" if ":" in host else host
        transport = hop.transport.upper()
        out.headers.insert_before(
            "Via", f"SIP/2.0/{transport} {hostpart}:{port};branch={branch};rport")

    # ---- forwarding ---------------------------------------------------------------------
    async def forward(self, session: ProxySession, targets: list[Target],
                      record_route: bool) -> None:
        """Start one branch per target; a branch that cannot start fails locally."""
        req = session.request
        is_invite = req.method == "INVITE"
        if is_invite:
            session.key = _invite_key(req)
            self.sessions[session.key] = session
        for target in targets:
            index = session.context.add_branch()
            try:
                out, hop, conn_id = self._outgoing(req, target, record_route,
                                                   session.source.transport)
            except (SipSyntaxError, ValueError) as exc:
                log.info("branch %s of %s not tried: %s", target.uri, req.call_id, exc)
                self._local_final(session, index, 503, "Service Unavailable")
                continue
            branch_id = new_branch(out)
            self._add_via(out, hop, branch_id)
            br = Branch(session, index, branch_id, out, hop, conn_id)
            session.branches.append(br)
            self.branches[branch_id] = br
        for br in list(session.branches):
            await self._start(br)
        if not targets:
            self._local_final(session, session.context.add_branch(), 500, "No Targets")

    async def _start(self, br: Branch) -> None:
        wire = br.request.encode()
        reliable = br.hop.transport != "udp" or bool(br.conn_id)
        br.tx = ClientTransaction(wire, br.request.method, reliable=reliable, now=self.clock(),
                                  parsed=br.request)
        if br.request.method == "INVITE":
            loop = asyncio.get_running_loop()
            br.timer_c = loop.call_later(TIMER_C, lambda: loop.create_task(self._timer_c(br)))
        await self._run_effects(br, br.tx.start(self.clock()))

    async def _timer_c(self, br: Branch) -> None:
        """§16.8 timer C: a branch ringing for too long is cancelled and fails with 408."""
        if br.final is None:
            await self._cancel_branch(br)
            self._drop_tx(br)
            self._local_final(br.session, br.index, 408, "Request Timeout", br)

    async def _run_effects(self, br: Branch, effects: list[object]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                ok = await self.send(effect.data, br.hop, br.conn_id)
                if not ok and br.final is None:
                    code = 430 if br.conn_id else 503
                    reason = "Flow Failed" if br.conn_id else "Service Unavailable"
                    self._drop_tx(br)
                    self._local_final(br.session, br.index, code, reason, br)
                    return
            elif isinstance(effect, TransportError):
                self._drop_tx(br)
                if br.final is None:
                    self._local_final(br.session, br.index, 503, "Service Unavailable", br)
            elif isinstance(effect, Timeout):
                self._drop_tx(br)
                if br.final is None:
                    self._local_final(br.session, br.index, 408, "Request Timeout", br)
            elif isinstance(effect, Terminated):
                self._drop_tx(br)
            elif isinstance(effect, Deliver):
                pass  # responses are delivered by on_response with the message in hand
        self._arm(br)

    def _arm(self, br: Branch) -> None:
        if br.timer is not None:
            br.timer.cancel()
            br.timer = None
        if br.tx is None:
            return
        deadline = br.tx.next_deadline()
        if deadline is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, deadline - self.clock())
        br.timer = loop.call_later(delay, lambda: loop.create_task(self._fire(br)))

    async def _fire(self, br: Branch) -> None:
        br.timer = None
        if br.tx is not None:
            await self._run_effects(br, br.tx.on_timer(self.clock()))

    def _drop_tx(self, br: Branch) -> None:
        if br.timer is not None:
            br.timer.cancel()
            br.timer = None
        br.tx = None
        self._maybe_forget(br.session)

    def _maybe_forget(self, session: ProxySession) -> None:
        """Drop a session once every branch has a final response and no transaction."""
        if session.context.done and all(b.tx is None for b in session.branches):
            for b in session.branches:
                self.branches.pop(b.branch, None)
                if b.timer_c is not None:
                    b.timer_c.cancel()
                    b.timer_c = None
            if session.key:
                self.sessions.pop(session.key, None)
            session.branches = []  # no session <-> branch cycles left for the GC

    # ---- responses ----------------------------------------------------------------------
    def on_response(self, resp: Response) -> bool:
        """A response from downstream: True when it matched one of our branches."""
        values = resp.headers.get_list("Via")
        if not values:
            return False
        try:
            top = parse_via(values[0])
        except SipSyntaxError:
            return False
        br = self.branches.get(top.branch or "")
        if br is None:
            return False
        asyncio.get_running_loop().create_task(self._on_branch_response(br, resp))
        return True

    async def _on_branch_response(self, br: Branch, resp: Response) -> None:
        method = resp.cseq[1] if resp.headers.get("CSeq") else ""
        if method == "CANCEL":
            return  # the 200 to our CANCEL: nothing to pass on
        if br.tx is not None:
            effects = br.tx.on_response(resp.status, self.clock(),
                                        to_header=resp.headers.get("To"))
            deliver = any(isinstance(e, Deliver) for e in effects)
            await self._run_effects(br, effects)
        else:
            # transaction over: only retransmitted 2xx to INVITE still go upstream
            deliver = 200 <= resp.status < 300 and br.request.method == "INVITE"
        if not deliver:
            return
        if resp.status < 200:
            br.provisional = True
            if br.cancel_pending:
                await self._send_cancel(br)
        elif br.final is None:
            br.final = resp
        self._decide(br.session, br.index, resp.status, _strip_top_via(resp), local=False)
        self._maybe_forget(br.session)

    def _local_final(self, session: ProxySession, index: int, status: int, reason: str,
                     br: Branch | None = None) -> None:
        resp = make_response(session.request, status, reason)
        if br is not None and br.final is None:
            br.final = resp
        self._decide(session, index, status, resp, local=True)
        self._maybe_forget(session)

    def _decide(self, session: ProxySession, index: int, status: int, resp: Response,
                local: bool) -> None:
        outcome = session.context.on_response(index, status, local)
        for action in outcome.actions:
            if action is Do.FORWARD:
                session.respond(resp)
            elif action is Do.CANCEL_OTHERS:
                for other in session.branches:
                    if other.index != index and other.final is None:
                        asyncio.get_running_loop().create_task(self._cancel_branch(other))
            elif action is Do.SEND_BEST and outcome.best is not None:
                session.respond(self._best_response(session, outcome.best))

    def _best_response(self, session: ProxySession, best: int) -> Response:
        chosen: Response | None = None
        challenges: list[tuple[str, str]] = []
        for br in session.branches:
            if br.final is None:
                continue
            if br.index == best:
                chosen = br.final
            for name in ("WWW-Authenticate", "Proxy-Authenticate"):
                challenges += [(name, v) for v in br.final.headers.get_all(name)]
        if chosen is None:
            return make_response(session.request, 500, "Server Internal Error")
        if chosen.status in (401, 407):
            chosen = _strip_top_via(chosen) if _has_our_via(chosen, self) else chosen
            for name in ("WWW-Authenticate", "Proxy-Authenticate"):
                chosen.headers.remove(name)
            for name, value in challenges:
                chosen.headers.add(name, value)
        elif _has_our_via(chosen, self):
            chosen = _strip_top_via(chosen)
        if chosen.status == 503:
            chosen.status, chosen.reason = 500, "Server Internal Error"  # §16.7 step 6
        return chosen

    # ---- CANCEL -------------------------------------------------------------------------
    async def _cancel_branch(self, br: Branch) -> None:
        if br.cancelled or br.final is not None:
            return
        if br.provisional:
            await self._send_cancel(br)
        else:
            br.cancel_pending = True  # §9.1: wait for a provisional before cancelling

    async def _send_cancel(self, br: Branch) -> None:
        if br.cancelled:
            return
        br.cancelled = True
        cancel = _build_cancel(br.request)
        tx = ClientTransaction(cancel.encode(), "CANCEL",
                               reliable=br.hop.transport != "udp" or bool(br.conn_id),
                               now=self.clock())
        for effect in tx.start(self.clock()):
            if isinstance(effect, Send):
                await self.send(effect.data, br.hop, br.conn_id)

    def cancel(self, cancel: Request) -> bool:
        """Upstream CANCEL: True if it matched a pending INVITE (the caller answers 200;
        487 goes upstream for the INVITE once the branches are cancelled)."""
        session = self.sessions.get(_invite_key(cancel))
        if session is None:
            return False
        if not session.context.sent_final:
            session.context.sent_final = True
            # after the caller's 200 to the CANCEL, which is sent on return
            asyncio.get_running_loop().call_soon(
                session.respond, make_response(session.request, 487, "Request Terminated"))
        for br in session.branches:
            if br.final is None:
                asyncio.get_running_loop().create_task(self._cancel_branch(br))
        return True

    async def forward_stateless(self, req: Request, target: Target, in_transport: str) -> bool:
        """Forward without a transaction (ACK for a 2xx)."""
        try:
            out, hop, conn_id = self._outgoing(req, target, False, in_transport)
        except (SipSyntaxError, ValueError):
            return False
        # Same ACK in, same branch out, so a retransmitted ACK looks like one (§16.11).
        upstream = req.top_via
        seed = upstream.branch if upstream is not None and upstream.branch else req.call_id
        self._add_via(out, hop, stateless_branch(out, seed or ""))
        return await self.send(out.encode(), hop, conn_id)


def _invite_key(req: Request) -> tuple[str, ...]:
    via = req.top_via
    branch = via.branch if via is not None else ""
    sent_by = via.sent_by.lower() if via is not None else ""
    return (branch or "", sent_by, req.call_id)


def _strip_top_via(resp: Response) -> Response:
    headers = resp.headers.copy()
    headers.pop_first_value("Via")
    return Response(resp.status, resp.reason, headers, resp.body, resp.version)


def _has_our_via(resp: Response, fwd: Forwarder) -> bool:
    values = resp.headers.get_list("Via")
    if not values:
        return False
    try:
        return (parse_via(values[0]).branch or "") in fwd.branches
    except SipSyntaxError:
        return False


def _build_cancel(invite: Request) -> Request:
    """CANCEL for a branch (§9.1): same R-URI, top Via, Call-ID, From, To, CSeq number."""
    headers = Headers()
    via = invite.headers.get_list("Via")[0]
    headers.add("Via", via)
    for name in ("Route", "From", "To", "Call-ID"):
        for value in invite.headers.get_all(name):
            headers.add(name, value)
    headers.add("CSeq", f"{invite.cseq[0]} CANCEL")
    headers.add("Max-Forwards", "70")
    return Request("CANCEL", invite.uri, headers)
