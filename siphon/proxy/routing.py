"""Proxy routing rules of RFC 3261 §16 as pure functions.

Who we are (:class:`Identity`), loose routing of a received request (§16.4),
the branch parameter with its loop-detection hash (§16.6 step 8, §16.3 step
4), Record-Route values and the next hop of a forwarded request (§16.6 step
6-7, §16.12 strict-router compatibility).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

from siphon.sip.errors import SipSyntaxError
from siphon.sip.headers import parse_name_addr
from siphon.sip.message import Request
from siphon.sip.uri import SipUri, parse_uri

BRANCH_PREFIX = "z9hG4bK-sph"


@dataclass(slots=True)
class Identity:
    """The addresses and domains that identify this proxy."""

    addresses: set[tuple[str, int]] = field(default_factory=set)
    """(host lower-cased, port) of every listener and advertised name."""
    hosts: set[str] = field(default_factory=set)
    """Hosts of the above, for Route URIs without a port."""
    domains: set[str] = field(default_factory=set)
    """``domain.local`` entries: ours on any port."""

    def add(self, host: str, port: int) -> None:
        self.addresses.add((host.lower(), port))
        self.hosts.add(host.lower())

    def is_us(self, uri: SipUri) -> bool:
        host = uri.host.lower()
        if host in self.domains and uri.user is None:
            return True
        if uri.port is None:
            return host in self.hosts
        return (host, uri.port) in self.addresses


def _route_uri(value: str) -> SipUri | None:
    try:
        return parse_name_addr(value).uri
    except SipSyntaxError:
        return None


def loose_route(req: Request, me: Identity) -> tuple[bool, list[str]]:
    """Apply §16.4 to ``req`` in place; returns (True when routing may proceed,
    the Route values consumed).

    - A Request-URI that is one of our Record-Route values means the previous
      hop was a strict router: the last Route becomes the Request-URI (§16.4).
    - A top Route that is ours is removed, with any following ones that are
      ours too (double Record-Route).
    - No Route at all: True (nothing to do). A top Route that is not ours: True,
      untouched (the request is routed to it).
    """
    consumed: list[str] = []
    ruri = req.ruri
    routes = req.headers.get_list("Route")
    if ruri.has_param("lr") and me.is_us(ruri) and routes:
        # strict-router upstream: restore the Request-URI from the last Route
        last = routes[-1]
        uri = _route_uri(last)
        if uri is not None:
            consumed.append(str(ruri))
            req.set_uri(uri)
            routes = routes[:-1]
            _set_routes(req, routes)
    while routes:
        uri = _route_uri(routes[0])
        if uri is None or not me.is_us(uri):
            break
        consumed.append(routes[0])
        routes = routes[1:]
    if consumed:
        _set_routes(req, routes)
    return True, consumed


def _set_routes(req: Request, routes: list[str]) -> None:
    """Replace the Route header field values, keeping the field near its old place."""
    if not routes:
        req.headers.remove("Route")
        return
    req.headers.set("Route", ", ".join(routes))


def loop_hash(req: Request) -> str:
    """Hash of the fields §16.6 step 8 names for loop detection."""
    h = hashlib.blake2s(digest_size=6)
    for part in (
        req.uri,
        req.headers.get("From") or "",
        req.headers.get("To") or "",
        req.call_id,
        str(req.cseq[0]),
        ",".join(req.headers.get_list("Proxy-Require")),
        ",".join(req.headers.get_list("Proxy-Authorization")),
        ",".join(req.headers.get_list("Route")),
    ):
        h.update(part.encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.hexdigest()


def new_branch(req: Request) -> str:
    """A unique branch whose middle part is the request's loop-detection hash."""
    return f"{BRANCH_PREFIX}{loop_hash(req)}.{secrets.token_hex(6)}"


def stateless_branch(req: Request, upstream_branch: str) -> str:
    """A branch that is the same for every retransmission of a statelessly forwarded
    request: derived from the upstream branch instead of random."""
    tail = hashlib.blake2s(upstream_branch.encode(), digest_size=6).hexdigest()
    return f"{BRANCH_PREFIX}{loop_hash(req)}.{tail}"


def is_looped(req: Request, me: Identity) -> bool:
    """§16.3 step 4: one of the Vias is ours with the same loop hash (the request
    came back unchanged: a loop, not a spiral)."""
    expected = loop_hash(req)
    for via in req.vias:
        branch = via.branch or ""
        if not branch.startswith(BRANCH_PREFIX):
            continue
        if (via.host.lower(), via.port or 5060) in me.addresses or via.host.lower() in me.hosts:
            if branch[len(BRANCH_PREFIX):].split(".", 1)[0] == expected:
                return True
    return False


def record_route_value(host: str, port: int, transport: str, flow: str = "") -> str:
    """A Record-Route value for one of our listeners (always loose routing). ``flow``
    (a connection id) goes in the user part, so that in-dialog requests coming back
    through us can be sent over that connection (RFC 5626 §5.3 flow tokens)."""
    hostpart = f"[{host}]" if ":" in host and not host.startswith("[") else host
    user = f"{flow}@" if flow else ""
    return f"<sip:{user}{hostpart}:{port};transport={transport.lower()};lr>"


def flow_tokens(consumed: list[str]) -> list[str]:
    """Flow tokens in the Route values ``loose_route`` consumed (our own Record-Routes)."""
    out: list[str] = []
    for value in consumed:
        uri = _route_uri(value)
        if uri is not None and uri.user:
            out.append(uri.user)
    return out


@dataclass(slots=True)
class NextHop:
    host: str
    port: int
    transport: str
    """Lower case: udp, tcp, ws..."""


def next_hop(req: Request, default_transport: str = "udp") -> NextHop:
    """Where a forwarded request goes: the top Route (loose router) or the Request-URI
    (§16.6 step 7, RFC 3263 §4 without DNS SRV: maddr, then host; transport param)."""
    routes = req.headers.get_list("Route")
    uri = _route_uri(routes[0]) if routes else None
    return hop_for_uri(uri if uri is not None else req.ruri, default_transport)


def hop_for_uri(uri: SipUri, default_transport: str = "udp") -> NextHop:
    """Host, port and transport to reach ``uri``."""
    if uri.opaque is not None or uri.is_tel:
        raise SipSyntaxError(f"cannot route to {uri}")
    host = uri.param("maddr") or uri.host
    transport = (uri.param("transport") or "").lower()
    if not transport:
        transport = "tls" if uri.scheme == "sips" else default_transport
    port = uri.port or (5061 if transport in ("tls", "wss") else 5060)
    return NextHop(host.strip("[]"), port, transport)


def next_hop_of(text: str) -> NextHop:
    """Next hop for a URI string (``relay(next_hop=...)``)."""
    return hop_for_uri(parse_uri(text.strip().strip("<>")))


def target_uri(target: object) -> SipUri:
    """Parse a fork target (a URI string, a Contact's ``uri``)."""
    text = str(target)
    uri = parse_uri(text.strip().strip("<>"))
    if not uri.is_sip:
        raise SipSyntaxError(f"unsupported target scheme {uri.scheme}")
    return uri
