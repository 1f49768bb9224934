"""Client transactions and server timer G driven by a fake clock (no sleeping)."""

from __future__ import annotations

import pytest

from siphon.sip.client_transaction import (
    ClientState,
    ClientTransaction,
    Deliver,
    Effect,
    InviteServerRetransmitter,
    Send,
    Terminated,
    Timeout,
    TransportError,
    branch,
    build_ack,
    transaction_id,
)
from siphon.sip.message import Request, Response, make_response
from siphon.sip.parser import parse_message
from siphon.sip.transaction import MAGIC_COOKIE

BRANCH = "z9hG4bK-proxy-1"
START = 1000.0


def _request(method: str = "INVITE", via_branch: str = BRANCH) -> bytes:
    return (
        f"{method} sip:bob@10.0.0.9:5070;transport=udp SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 10.0.0.2:5060;branch={via_branch}\r\n"
        "Via: SIP/2.0/UDP 10.0.0.1:5062;branch=z9hG4bK-uac;received=10.0.0.1\r\n"
        "Route: <sip:10.0.0.5;lr>\r\n"
        "Route: <sip:10.0.0.6;lr>\r\n"
        "Max-Forwards: 69\r\n"
        'From: "Alice" <sip:alice@example.com>;tag=a1\r\n'
        "To: <sip:bob@example.com>\r\n"
        "Call-ID: call-1@10.0.0.1\r\n"
        f"CSeq: 7 {method}\r\n"
        "Contact: <sip:alice@10.0.0.1:5062>\r\n"
        "Content-Type: application/sdp\r\n"
        "Content-Length: 4\r\n\r\nv=0\n"
    ).encode()


def _tx(method: str = "INVITE", reliable: bool = False) -> ClientTransaction:
    return ClientTransaction(_request(method), method, reliable, START)


def _sends(effects: list[Effect]) -> list[bytes]:
    return [e.data for e in effects if isinstance(e, Send)]


def _run_timers(tx: ClientTransaction | InviteServerRetransmitter, until: float
                ) -> list[tuple[float, list[Effect]]]:
    """Drive ``tx`` like a driver would: sleep to next_deadline, fire, repeat."""
    fired: list[tuple[float, list[Effect]]] = []
    while (deadline := tx.next_deadline()) is not None and deadline <= until:
        fired.append((deadline - START, list(tx.on_timer(deadline))))
    return fired


# -- INVITE client transaction (§17.1.1) ----------------------------------------------------

def test_invite_timer_a_doubles_and_timer_b_times_out_at_32s() -> None:
    tx = _tx()
    assert tx.state is ClientState.CALLING
    assert tx.start(START) == [Send(_request())]
    fired = _run_timers(tx, START + 100)
    retransmits = [t for t, effects in fired if effects == [Send(_request())]]
    assert retransmits == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]  # intervals 0.5, 1, 2, 4, 8, 16
    assert fired[-1] == (32.0, [Timeout(), Terminated()])
    assert tx.state is ClientState.TERMINATED
    assert tx.next_deadline() is None
    assert tx.on_timer(START + 200) == []


def test_reliable_invite_never_retransmits_but_times_out() -> None:
    tx = _tx(reliable=True)
    assert _sends(tx.start(START)) == [_request()]
    assert tx.next_deadline() == START + 32
    assert tx.on_timer(START + 31.9) == []
    assert tx.on_timer(START + 32) == [Timeout(), Terminated()]


def test_provisional_stops_timer_a() -> None:
    tx = _tx()
    tx.start(START)
    assert tx.on_timer(START + 0.5) == [Send(_request())]
    assert tx.on_response(100, START + 0.7) == [Deliver(100)]
    assert tx.state is ClientState.PROCEEDING
    assert tx.next_deadline() is None  # A and B stop; the proxy's timer C takes over
    assert tx.on_timer(START + 60) == []
    assert tx.on_response(180, START + 2) == [Deliver(180)]
    assert tx.on_response(183, START + 3) == [Deliver(183)]


def _busy(tx: ClientTransaction) -> Response:
    invite = parse_message(tx.request)
    assert isinstance(invite, Request)
    return make_response(invite, 486, to_tag="b0b")


@pytest.mark.parametrize("provisional", [False, True])
def test_486_sends_one_ack_and_retransmissions_resend_it(provisional: bool) -> None:
    tx = _tx()
    tx.start(START)
    if provisional:
        tx.on_response(180, START + 0.2)
    busy = _busy(tx)
    effects = tx.on_response(486, START + 1, busy.headers.get("To"))
    assert [e for e in effects if not isinstance(e, Send)] == [Deliver(486)]
    (ack_bytes,) = _sends(effects)
    assert tx.state is ClientState.COMPLETED and tx.ack == ack_bytes

    ack = parse_message(ack_bytes)
    assert isinstance(ack, Request)
    assert ack.method == "ACK"
    assert ack.uri == "sip:bob@10.0.0.9:5070;transport=udp"
    assert ack.headers.get("CSeq") == "7 ACK"
    assert ack.headers.get("Call-ID") == "call-1@10.0.0.1"
    assert ack.headers.get("From") == '"Alice" <sip:alice@example.com>;tag=a1'
    assert ack.to.tag == "b0b"
    assert [v.branch for v in ack.vias] == [BRANCH]  # only the top Via
    assert ack.headers.get_list("Route") == ["<sip:10.0.0.5;lr>", "<sip:10.0.0.6;lr>"]
    assert ack.body == b"" and "Contact" not in ack.headers
    assert transaction_id(ack)[0] == transaction_id(busy)[0]

    # A retransmitted 486: the same ACK again, nothing for the TU.
    assert tx.on_response(486, START + 2) == [Send(ack_bytes)]
    assert tx.on_response(486, START + 3, busy.headers.get("To")) == [Send(ack_bytes)]
    assert tx.on_timer(START + 1 + 31.9) == []  # no request retransmissions in Completed
    assert tx.next_deadline() == START + 1 + 32  # timer D
    assert tx.on_timer(START + 33) == [Terminated()]
    assert tx.on_response(486, START + 34) == []


def test_reliable_486_terminates_at_once() -> None:
    tx = _tx(reliable=True)
    tx.start(START)
    busy = _busy(tx)
    effects = tx.on_response(486, START + 1, busy.headers.get("To"))
    assert len(_sends(effects)) == 1
    assert effects[1:] == [Deliver(486), Terminated()]  # timer D = 0
    assert tx.next_deadline() is None


def test_non_2xx_final_needs_the_to_header() -> None:
    tx = _tx()
    tx.start(START)
    with pytest.raises(ValueError):
        tx.on_response(404, START + 1)
    assert tx.state is ClientState.CALLING


def test_2xx_is_delivered_each_time_and_terminates() -> None:
    tx = _tx()
    tx.start(START)
    tx.on_response(180, START + 0.1)
    assert tx.on_response(200, START + 1) == [Deliver(200), Terminated()]
    assert tx.state is ClientState.TERMINATED and tx.ack is None
    assert tx.on_response(200, START + 1.5) == [Deliver(200)]  # retransmitted 2xx
    assert tx.on_response(180, START + 1.6) == []
    assert tx.next_deadline() is None


def test_2xx_before_any_provisional_over_udp() -> None:
    tx = _tx()
    tx.start(START)
    tx.on_timer(START + 0.5)
    assert tx.on_response(200, START + 0.6) == [Deliver(200), Terminated()]
    assert tx.on_timer(START + 1.5) == []


def test_late_driver_gets_one_retransmission_and_the_timeout_wins() -> None:
    tx = _tx()
    tx.start(START)
    assert tx.on_timer(START + 5) == [Send(_request())]  # no burst of catch-up sends
    assert tx.next_deadline() == START + 6
    assert tx.on_timer(START + 40) == [Timeout(), Terminated()]


def test_transport_error() -> None:
    tx = _tx("OPTIONS")
    tx.start(START)
    assert tx.on_transport_error() == [TransportError(), Terminated()]
    assert tx.on_transport_error() == []


def test_custom_timer_values() -> None:
    tx = ClientTransaction(_request(), "INVITE", False, START, t1=0.1)
    tx.start(START)
    fired = _run_timers(tx, START + 100)
    assert [round(t, 6) for t, _ in fired] == [0.1, 0.3, 0.7, 1.5, 3.1, 6.3, 6.4]
    assert fired[-1][1] == [Timeout(), Terminated()]


# -- non-INVITE client transaction (§17.1.2) ------------------------------------------------

def test_non_invite_timer_e_caps_at_t2_and_timer_f_at_32s() -> None:
    tx = _tx("OPTIONS")
    assert tx.state is ClientState.TRYING
    tx.start(START)
    fired = _run_timers(tx, START + 100)
    times = [t for t, effects in fired if effects == [Send(_request("OPTIONS"))]]
    intervals = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert intervals == [0.5, 1, 2, 4, 4, 4, 4, 4, 4, 4]
    assert times[-1] == 31.5
    assert fired[-1] == (32.0, [Timeout(), Terminated()])


def test_non_invite_proceeding_retransmits_every_t2_and_f_still_runs() -> None:
    tx = _tx("REGISTER")
    tx.start(START)
    assert tx.on_response(100, START + 0.1) == [Deliver(100)]
    assert tx.state is ClientState.PROCEEDING
    fired = _run_timers(tx, START + 100)
    times = [t for t, effects in fired if isinstance(effects[0], Send)]
    assert times[:3] == [0.5, 4.5, 8.5]  # E already armed, then T2 apart
    assert fired[-1] == (32.0, [Timeout(), Terminated()])


def test_reliable_non_invite_no_retransmission() -> None:
    tx = _tx("OPTIONS", reliable=True)
    tx.start(START)
    assert tx.next_deadline() == START + 32
    assert _run_timers(tx, START + 100) == [(32.0, [Timeout(), Terminated()])]


def test_non_invite_final_then_timer_k() -> None:
    tx = _tx("OPTIONS")
    tx.start(START)
    tx.on_timer(START + 0.5)
    assert tx.on_response(200, START + 1) == [Deliver(200)]
    assert tx.state is ClientState.COMPLETED and tx.final_status == 200
    assert tx.on_response(200, START + 2) == []  # retransmission absorbed
    assert tx.on_response(180, START + 2) == []
    assert tx.next_deadline() == START + 1 + 5  # timer K = T4
    assert tx.on_timer(START + 5.9) == []
    assert tx.on_timer(START + 6) == [Terminated()]
    assert tx.state is ClientState.TERMINATED


def test_non_invite_reliable_timer_k_is_zero() -> None:
    tx = _tx("BYE", reliable=True)
    tx.start(START)
    assert tx.on_response(481, START + 1) == [Deliver(481), Terminated()]
    assert tx.next_deadline() is None


def test_start_only_once() -> None:
    tx = _tx("OPTIONS")
    assert len(tx.start(START)) == 1
    assert tx.start(START + 1) == []


# -- timer G (§17.2.1) ----------------------------------------------------------------------

def test_timer_g_schedule_until_timer_h() -> None:
    rt = InviteServerRetransmitter(b"SIP/2.0 486 Busy Here...", START)
    fired = _run_timers(rt, START + 100)
    sends = [t for t, effects in fired if effects == [Send(b"SIP/2.0 486 Busy Here...")]]
    intervals = [b - a for a, b in zip([0.0, *sends], sends, strict=False)]
    assert intervals == [0.5, 1, 2, 4, 4, 4, 4, 4, 4, 4]
    assert fired[-1] == (32.0, [])
    assert rt.timed_out and rt.done and rt.next_deadline() is None


def test_timer_g_stops_on_ack() -> None:
    rt = InviteServerRetransmitter(b"resp", START)
    assert rt.on_timer(START + 0.4) == []
    assert rt.on_timer(START + 0.5) == [Send(b"resp")]
    assert rt.next_deadline() == START + 1.5
    rt.on_ack()
    assert rt.acked and rt.next_deadline() is None
    assert rt.on_timer(START + 1.5) == []


def test_timer_g_reliable_only_runs_h() -> None:
    rt = InviteServerRetransmitter(b"resp", START, reliable=True)
    assert rt.next_deadline() == START + 32
    assert rt.on_timer(START + 32) == []
    assert rt.timed_out


# -- branch ids and matching (§17.1.3) ------------------------------------------------------

def test_branch_is_unique_and_has_magic_cookie() -> None:
    ids = {branch() for _ in range(1000)}
    assert len(ids) == 1000
    for value in ids:
        assert value.startswith(MAGIC_COOKIE) and len(value) > len(MAGIC_COOKIE) + 16
    # Usable as a Via parameter.
    msg = parse_message(_request(via_branch=next(iter(ids))))
    assert msg.top_via is not None and msg.top_via.branch in ids


def test_transaction_id_matches_responses_by_branch_and_method() -> None:
    tx = _tx()
    invite = parse_message(tx.request)
    assert isinstance(invite, Request)
    assert tx.key == (BRANCH, "INVITE") == transaction_id(invite)
    assert transaction_id(make_response(invite, 180)) == tx.key

    cancel = parse_message(_request("CANCEL"))
    assert isinstance(cancel, Request)
    assert transaction_id(make_response(cancel, 200)) == (BRANCH, "CANCEL") != tx.key

    other = parse_message(_request(via_branch="z9hG4bK-other"))
    assert isinstance(other, Request)
    assert transaction_id(make_response(other, 200)) != tx.key


def test_build_ack_without_route() -> None:
    invite = Request("INVITE", "sip:bob@example.com")
    invite.headers.add("Via", "SIP/2.0/TCP p.example.com;branch=z9hG4bKx, SIP/2.0/TCP a")
    invite.headers.add("From", "<sip:a@example.com>;tag=1")
    invite.headers.add("To", "<sip:bob@example.com>")
    invite.headers.add("Call-ID", "c")
    invite.headers.add("CSeq", "3 INVITE")
    ack = build_ack(invite, "<sip:bob@example.com>;tag=9")
    parsed = parse_message(ack.encode())
    assert isinstance(parsed, Request)
    assert parsed.headers.get_list("Via") == ["SIP/2.0/TCP p.example.com;branch=z9hG4bKx"]
    assert "Route" not in parsed.headers
    assert parsed.headers.get("Max-Forwards") == "70"
    assert parsed.cseq == (3, "ACK") and parsed.to.tag == "9"
