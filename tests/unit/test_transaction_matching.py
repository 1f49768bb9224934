"""Server transaction matching: branch reuse, lapsed transactions, timer L (fake clock)."""

from siphon.sip.message import Request
from siphon.sip.parser import parse_message
from siphon.sip.transaction import T1, ServerTransactionTable, State


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _req(call_id: str = "x", cseq: int = 1, method: str = "REGISTER",
         branch: str = "z9hG4bKkdjuw") -> Request:
    msg = parse_message((
        f"{method} sip:example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP saturn.example.com:5060;branch={branch}\r\n"
        "From: <sip:a@example.com>;tag=1\r\nTo: <sip:a@example.com>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n").encode())
    assert isinstance(msg, Request)
    return msg


def test_a_different_request_reusing_a_branch_is_a_new_transaction() -> None:
    # RFC 4475 TC_CPARAM01_V / TC_CPARAM02_V share branch, sent-by and method.
    table = ServerTransactionTable(Clock())
    tx = table.create(_req("cparam01"), reliable=False)
    assert tx is not None
    tx.on_response(200, b"200 for cparam01", 1000.0)
    assert table.match(_req("cparam01")) is tx  # a real retransmission
    assert table.match(_req("cparam02")) is None  # another Call-ID
    assert table.match(_req("cparam01", cseq=2)) is None  # another CSeq


def test_a_lapsed_transaction_no_longer_matches() -> None:
    clock = Clock()
    table = ServerTransactionTable(clock)
    tx = table.create(_req(), reliable=False)
    assert tx is not None
    tx.on_response(200, b"200", clock.now)
    clock.now += 64 * T1 + 0.01
    assert table.match(_req()) is None  # without waiting for an expire() sweep
    assert len(table) == 0


def test_finished_transactions_are_swept_as_new_ones_arrive() -> None:
    clock = Clock()
    table = ServerTransactionTable(clock)
    for i in range(100):
        tx = table.create(_req(f"c{i}"), reliable=True)
        assert tx is not None
        tx.on_response(200, b"200", clock.now)  # reliable: timer J = 0
    clock.now += 1.5
    assert table.create(_req("next"), reliable=True) is not None
    assert len(table) == 1


def test_invite_answered_2xx_absorbs_retransmissions_for_timer_l() -> None:
    clock = Clock()
    table = ServerTransactionTable(clock)
    tx = table.create(_req(method="INVITE"), reliable=False)
    assert tx is not None
    tx.on_response(200, b"200", clock.now)
    assert tx.state is State.TERMINATED
    clock.now += 64 * T1 - 0.01
    again = table.match(_req(method="INVITE"))
    assert again is tx and again.on_retransmission() is None  # absorbed
    clock.now += 0.02
    assert table.match(_req(method="INVITE")) is None


def _datagram(call_id: str = "x", branch: str = "z9hG4bKkdjuw") -> bytes:
    return (f"REGISTER sip:example.com SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP saturn.example.com:5060;branch={branch}\r\n"
            "From: <sip:a@example.com>;tag=1\r\nTo: <sip:a@example.com>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n").encode()


def test_identical_datagram_matches_its_transaction_without_parsing() -> None:
    clock = Clock()
    table = ServerTransactionTable(clock)
    data = _datagram()
    request = parse_message(data)
    assert isinstance(request, Request)
    tx = table.create(request, reliable=False, datagram=data)
    assert tx is not None
    assert table.match_datagram(bytes(data)) is tx  # a retransmission: same octets
    assert table.match_datagram(_datagram(branch="z9hG4bKother")) is None
    assert table.match_datagram(_datagram(call_id="y")) is None
    tx.on_response(200, b"200", clock.now)
    assert table.match_datagram(data) is tx
    clock.now += 64 * T1 + 0.01  # timer J ran out: a new transaction, not a replay
    assert table.match_datagram(data) is None


def test_datagram_index_does_not_outgrow_the_table() -> None:
    clock = Clock()
    table = ServerTransactionTable(clock)
    for i in range(5000):
        data = _datagram(call_id=f"c{i}")
        request = parse_message(data)
        assert isinstance(request, Request)
        tx = table.create(request, reliable=True, datagram=data)
        assert tx is not None
        tx.on_response(200, b"200", clock.now)  # reliable: gone at the next sweep
        clock.now += 0.01
    assert len(table) < 200
    assert len(table._datagrams) <= 2 * len(table) + 1024
