"""Server transactions driven by a fake clock (no sleeping)."""

from siphon.sip.message import Request
from siphon.sip.parser import parse_message
from siphon.sip.transaction import T1, ServerTransactionTable, State


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _req(branch: str = "z9hG4bK-abc", method: str = "REGISTER") -> Request:
    msg = parse_message((
        f"{method} sip:example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 10.0.0.1:5062;branch={branch}\r\n"
        "From: <sip:a@example.com>;tag=1\r\nTo: <sip:a@example.com>\r\n"
        f"Call-ID: x\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n").encode())
    assert isinstance(msg, Request)
    return msg


def test_retransmission_replays_final_response_until_timer_j() -> None:
    clock = Clock()
    table = ServerTransactionTable(clock)
    tx = table.create(_req(), reliable=False)
    assert tx is not None and tx.state is State.TRYING
    assert table.match(_req()) is tx
    assert tx.on_retransmission() is None  # absorbed while the TU works
    tx.on_response(200, b"SIP/2.0 200 OK...", clock.now)
    assert tx.state is State.COMPLETED
    assert table.match(_req()).on_retransmission() == b"SIP/2.0 200 OK..."
    clock.now += 64 * T1 - 0.01
    table.expire()
    assert table.match(_req()) is tx
    clock.now += 0.02
    table.expire()
    assert table.match(_req()) is None


def test_reliable_transport_forgets_at_once_and_branches_differ() -> None:
    clock = Clock()
    table = ServerTransactionTable(clock)
    tx = table.create(_req(), reliable=True)
    assert tx is not None
    assert table.match(_req("z9hG4bK-other")) is None
    tx.on_response(401, b"401", clock.now)
    table.expire()
    assert len(table) == 0


def test_rfc2543_matching_without_magic_cookie() -> None:
    table = ServerTransactionTable(Clock())
    tx = table.create(_req("390skdjuw"), reliable=False)
    assert table.match(_req("390skdjuw")) is tx


def test_invite_ack_for_error_is_absorbed_and_2xx_terminates() -> None:
    clock = Clock()
    table = ServerTransactionTable(clock)
    tx = table.create(_req(method="INVITE"), reliable=False)
    assert tx is not None
    tx.on_response(486, b"486", clock.now)
    ack = _req(method="ACK")
    assert table.match(ack) is tx
    tx.on_ack(clock.now)
    assert tx.state is State.CONFIRMED
    ok = table.create(_req("z9hG4bK-2", method="INVITE"), reliable=False)
    assert ok is not None
    ok.on_response(200, b"200", clock.now)
    assert ok.state is State.TERMINATED


def test_table_is_bounded() -> None:
    table = ServerTransactionTable(Clock(), max_size=2)
    assert table.create(_req("z9hG4bK-1"), False) is not None
    assert table.create(_req("z9hG4bK-2"), False) is not None
    assert table.create(_req("z9hG4bK-3"), False) is None


def test_finished_transactions_are_released_when_they_leave_the_table() -> None:
    import gc
    import weakref

    class Probe:  # lives exactly as long as the transaction holding it
        pass

    clock = Clock()
    table = ServerTransactionTable(clock)
    tx = table.create(_req(method="INVITE"), reliable=True)
    assert tx is not None
    probe = Probe()
    tx.data["probe"] = probe
    tx.on_response(486, b"486", clock.now)  # timer H scheduled 32 s ahead
    tx.on_ack(clock.now)  # timer I: 0 s over TCP
    clock.now += 0.1
    table.expire()
    assert len(table) == 0
    ref = weakref.ref(probe)
    del tx, probe
    gc.collect()
    assert ref() is None  # the stale timer-H heap entry does not keep it alive


def test_unanswered_sweep_survives_a_clock_stepping_back() -> None:
    clock = Clock()
    table = ServerTransactionTable(clock)
    assert table.create(_req("z9hG4bK-a"), reliable=False) is not None
    clock.now -= 200  # the injected clock steps back
    assert table.create(_req("z9hG4bK-b"), reliable=False) is not None
    clock.now += 200 + 64 * T1 * 4 + 1
    table.expire()
    assert len(table) == 0  # both unanswered transactions are gone
