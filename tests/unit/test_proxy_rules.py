"""Pure proxy rules: loose routing, loop detection, next hop, best response."""

from siphon.proxy.context import Do, ResponseContext
from siphon.proxy.routing import (
    Identity,
    is_looped,
    loose_route,
    new_branch,
    next_hop,
    record_route_value,
)
from siphon.sip.message import Request
from siphon.sip.parser import parse_message


def _req(ruri: str, *extra: str, method: str = "BYE") -> Request:
    head = "".join(f"{h}\r\n" for h in extra)
    msg = parse_message((
        f"{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1\r\n"
        "From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>;tag=2\r\n"
        f"Call-ID: c\r\nCSeq: 2 {method}\r\n{head}Content-Length: 0\r\n\r\n").encode())
    assert isinstance(msg, Request)
    return msg


ME = Identity()
ME.add("127.0.0.1", 5060)
ME.domains.add("example.com")


def test_loose_route_pops_our_routes_only() -> None:
    req = _req("sip:b@10.0.0.9", "Route: <sip:127.0.0.1:5060;transport=udp;lr>, "
               "<sip:127.0.0.1;lr>, <sip:other.net;lr>")
    ok, consumed = loose_route(req, ME)
    assert ok and len(consumed) == 2
    assert req.headers.get_list("Route") == ["<sip:other.net;lr>"]
    hop = next_hop(req)
    assert (hop.host, hop.port, hop.transport) == ("other.net", 5060, "udp")


def test_no_route_goes_to_request_uri_with_transport_param() -> None:
    req = _req("sip:b@10.0.0.9:6000;transport=tcp")
    assert loose_route(req, ME) == (True, [])
    hop = next_hop(req)
    assert (hop.host, hop.port, hop.transport) == ("10.0.0.9", 6000, "tcp")


def test_strict_router_upstream_restores_request_uri() -> None:
    req = _req("sip:127.0.0.1:5060;lr", "Route: <sip:b@10.0.0.9:7000>")
    loose_route(req, ME)
    assert req.uri == "sip:b@10.0.0.9:7000"
    assert req.headers.get_list("Route") == []


def test_loop_detection_spots_the_same_request_coming_back() -> None:
    req = _req("sip:b@10.0.0.9", method="INVITE")
    branch = new_branch(req)
    looped = _req("sip:b@10.0.0.9",
                  f"Via: SIP/2.0/UDP 127.0.0.1:5060;branch={branch}", method="INVITE")
    assert is_looped(looped, ME)
    spiral = _req("sip:c@10.0.0.9",
                  f"Via: SIP/2.0/UDP 127.0.0.1:5060;branch={branch}", method="INVITE")
    assert not is_looped(spiral, ME)  # different Request-URI: a spiral, not a loop


def test_record_route_value() -> None:
    assert record_route_value("127.0.0.1", 5060, "UDP") == "<sip:127.0.0.1:5060;transport=udp;lr>"
    assert record_route_value("::1", 5060, "tcp") == "<sip:[::1]:5060;transport=tcp;lr>"


def test_first_2xx_wins_and_cancels_the_rest() -> None:
    ctx = ResponseContext(3, is_invite=True)
    assert ctx.on_response(0, 180).actions == [Do.FORWARD]
    assert ctx.on_response(1, 486).actions == []
    out = ctx.on_response(2, 200)
    assert out.actions == [Do.FORWARD, Do.CANCEL_OTHERS]
    assert ctx.on_response(0, 487).actions == []
    assert ctx.on_response(2, 200).actions == [Do.FORWARD]  # 2xx retransmissions go up


def test_6xx_ends_the_fork() -> None:
    ctx = ResponseContext(2, is_invite=True)
    assert ctx.on_response(0, 603).actions == [Do.FORWARD, Do.CANCEL_OTHERS]
    assert ctx.on_response(1, 200).actions == [Do.FORWARD]


def test_best_response_prefers_real_answers_and_lowest_class() -> None:
    ctx = ResponseContext(3, is_invite=True)
    ctx.on_response(0, 408, local=True)
    ctx.on_response(1, 503)
    out = ctx.on_response(2, 486)
    assert out.actions == [Do.SEND_BEST] and out.best == 2
    ctx = ResponseContext(2, is_invite=True)
    ctx.on_response(0, 408, local=True)
    out = ctx.on_response(1, 408, local=True)
    assert out.best in (0, 1)
    ctx = ResponseContext(2, is_invite=False)
    ctx.on_response(0, 404)
    assert ctx.on_response(1, 401).best == 1
