"""Failures the operator or the network causes: bad scripts, bad config, a damaged
event log, floods of malformed input. siphon must answer sanely or refuse to start
with a message that says where the problem is."""

from __future__ import annotations

import random
import socket
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import SiphonProcess
from sipclient import UdpClient, build_request, new_branch, new_tag

pytestmark = pytest.mark.integration

RAISING_SCRIPT = '''\
from siphon import proxy


@proxy.on_request
def route(request):
    if request.method == "MESSAGE":
        raise RuntimeError("boom from the script")
    request.reply(200, "Fine")


@proxy.on_request("INFO")
async def info(request):
    raise ValueError("async boom")
'''


def _request(ua: UdpClient, method: str) -> bytes:
    return build_request(
        method, "sip:bob@example.com", to="<sip:bob@example.com>",
        from_=f"<sip:alice@example.com>;tag={new_tag()}", call_id=f"{new_tag()}@it", cseq=1,
        via=f"SIP/2.0/UDP {ua.via_host};branch={new_branch()}")


@pytest.mark.timeout(60)
def test_script_exception_gets_500_and_the_server_keeps_serving(siphon: SiphonProcess) -> None:
    siphon.start(script_text=RAISING_SCRIPT)
    with UdpClient(siphon.sip_port) as ua:
        for _ in range(3):
            resp = ua.request(_request(ua, "MESSAGE"))
            assert resp is not None and resp.status == 500, resp
            resp = ua.request(_request(ua, "OPTIONS"))
            assert resp is not None and (resp.status, resp.reason) == (200, "Fine"), resp
        resp = ua.request(_request(ua, "INFO"))
        assert resp is not None and resp.status == 500, resp
        resp = ua.request(_request(ua, "OPTIONS"))
        assert resp is not None and resp.status == 200, resp
    out = siphon.output()
    assert "Traceback" in out and "RuntimeError: boom from the script" in out, siphon.tail()
    assert "ValueError: async boom" in out, siphon.tail()
    assert str(siphon.script_path) in out, "the traceback does not name the script file"
    status, _ = siphon.admin("GET", "/health")
    assert status == 200 and siphon.running


@pytest.mark.timeout(60)
def test_script_syntax_error_stops_startup_naming_file_and_line(siphon: SiphonProcess,
                                                                 run_cli) -> None:
    siphon.write_files(script_text="from siphon import proxy\n\n\n"
                                   "@proxy.on_request\ndef route(request)\n    pass\n")
    rc, out = run_cli(siphon.config_path)
    assert rc != 0, out
    assert str(siphon.script_path) in out, out
    assert "line 5" in out, out
    assert "Traceback" not in out, out


@pytest.mark.timeout(60)
def test_script_failing_at_import_stops_startup(siphon: SiphonProcess, run_cli) -> None:
    siphon.write_files(script_text="import no_such_module_for_siphon\n")
    rc, out = run_cli(siphon.config_path)
    assert rc != 0, out
    assert str(siphon.script_path) in out and "no_such_module_for_siphon" in out, out


@pytest.mark.timeout(60)
def test_unknown_config_key_exits_2_naming_the_key(siphon: SiphonProcess, run_cli) -> None:
    siphon.write_files({"registrar": {"max_contactz": 3}})
    rc, out = run_cli(siphon.config_path)
    assert rc == 2, out
    assert "registrar.max_contactz" in out, out
    assert str(siphon.config_path) in out, out

    siphon.write_files({"bogus_section": {"x": 1}})
    rc, out = run_cli(siphon.config_path)
    assert rc == 2 and "bogus_section" in out, out


def _log_with_records(siphon: SiphonProcess) -> int:
    """Start, register two users, stop cleanly; returns the number of records."""
    siphon.start()
    with UdpClient(siphon.sip_port) as ua:
        for user in ("alice", "bob"):
            resp, _ = ua.register(user, "secret")
            assert resp.status == 200, resp
    assert siphon.stop() == 0, siphon.tail()
    with sqlite3.connect(siphon.log_db) as db:
        return db.execute("SELECT COUNT(*) FROM records").fetchone()[0]


@pytest.mark.timeout(60)
def test_flipped_payload_byte_stops_startup_naming_offset_and_file(siphon: SiphonProcess,
                                                                   run_cli) -> None:
    assert _log_with_records(siphon) == 2
    db = sqlite3.connect(siphon.log_db)
    (payload,) = db.execute('SELECT payload FROM records WHERE "offset" = 1').fetchone()
    damaged = bytearray(payload)
    damaged[len(damaged) // 2] ^= 0x20
    db.execute('UPDATE records SET payload = ? WHERE "offset" = 1', (bytes(damaged),))
    db.commit()
    db.close()

    rc, out = run_cli(siphon.config_path)
    assert rc != 0, out
    assert "offset 1" in out, out
    assert str(siphon.log_db) in out, out
    assert "Traceback" not in out, out


@pytest.mark.timeout(60)
def test_undecodable_payload_stops_startup_naming_offset(siphon: SiphonProcess,
                                                         run_cli) -> None:
    import zlib

    assert _log_with_records(siphon) == 2
    garbage = b'{"type":"binding.added.v1","ts":"not a number"}'
    with sqlite3.connect(siphon.log_db) as db:
        db.execute('UPDATE records SET payload = ?, crc = ? WHERE "offset" = 0',
                   (garbage, zlib.crc32(garbage)))
    rc, out = run_cli(siphon.config_path)
    assert rc != 0, out
    assert "offset 0" in out and str(siphon.log_db) in out, out


@pytest.mark.timeout(60)
def test_garbage_log_file_stops_startup_naming_the_file(siphon: SiphonProcess,
                                                        run_cli) -> None:
    _log_with_records(siphon)
    for suffix in ("-wal", "-shm"):
        Path(f"{siphon.log_db}{suffix}").unlink(missing_ok=True)
    siphon.log_db.write_bytes(random.Random(7).randbytes(64 * 1024))
    rc, out = run_cli(siphon.config_path)
    assert rc != 0, out
    assert str(siphon.log_db) in out, out
    assert "Traceback" not in out, out


def _garbage_datagrams(n: int) -> list[bytes]:
    rnd = random.Random(4475)
    good = build_request("REGISTER", "sip:example.com", to="<sip:x@example.com>",
                         from_="<sip:x@example.com>;tag=1", call_id="flood@it", cseq=1,
                         via="SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKflood")
    out = []
    for i in range(n):
        kind = i % 8
        if kind == 0:
            out.append(rnd.randbytes(rnd.randint(1, 1400)))
        elif kind == 1:  # truncated request
            out.append(good[: rnd.randint(1, len(good) - 1)].rstrip(b"\r\n") + b"x")
        elif kind == 2:  # broken header line, answerable with a 400
            out.append(good.replace(b"Max-Forwards: 70", f"Max-Forwards {i}".encode()))
        elif kind == 3:  # bad Via / unique Call-ID: partial parse, 400
            out.append(good.replace(b"Call-ID: flood@it", f"Call-ID: f{i}@it".encode())
                       .replace(b"CSeq: 1 REGISTER", b"CSeq: x REGISTER"))
        elif kind == 4:  # big datagram of header lines
            out.append(good[:-2] + b"X-Pad: " + b"a" * rnd.randint(1000, 60000) + b"\r\n\r\n"
                       + b"\x00" * 10)
        elif kind == 5:
            out.append(b"SIP/2.0 200 OK\r\n" + rnd.randbytes(200))
        elif kind == 6:  # NULs and bare CRs
            out.append(good.replace(b"\r\n", b"\r", rnd.randint(1, 5)) + b"\x00\x00")
        else:
            out.append(b"INVITE sip:" + rnd.randbytes(50) + b" SIP/2.0\r\n\r\n")
    return out


@pytest.mark.timeout(90)
def test_malformed_flood_keeps_serving_without_growing(siphon: SiphonProcess) -> None:
    siphon.start()
    port = siphon.sip_port
    with UdpClient(port) as ua:  # warm up every code path once
        resp, _ = ua.register("alice", "secret")
        assert resp.status == 200, resp
        assert ua.options() is not None
    rss_before = siphon.rss_kb()

    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setblocking(False)
    datagrams = _garbage_datagrams(5000)
    answers = []

    def drain() -> None:
        try:
            while True:
                answers.append(sink.recv(65535).split(b"\r\n", 1)[0])
        except BlockingIOError:
            pass

    for i, data in enumerate(datagrams):
        sink.sendto(data, ("127.0.0.1", port))
        if i % 200 == 199:
            time.sleep(0.01)  # let the server drain its socket buffer now and then
            drain()
    time.sleep(0.3)
    drain()
    # The flood reached the parser: answerable garbage got 400s (UDP may drop some), the
    # few datagrams that still parse got the script's challenge; nothing was accepted.
    assert answers.count(b"SIP/2.0 400 Bad Request") > 200, answers[:10]
    assert not [a for a in answers if a[8:9] == b"2" or a[8:11] == b"500"], set(answers)

    rnd = random.Random(5060)
    conns = []
    for i in range(60):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            if i % 3 == 0:
                s.sendall(rnd.randbytes(rnd.randint(100, 20000)))
            elif i % 3 == 1:  # an endless header section: beyond max_message_size
                s.sendall(b"OPTIONS sip:x@example.com SIP/2.0\r\n")
                for _ in range(80):
                    s.sendall(b"X-Junk: " + b"j" * 1000 + b"\r\n")
            else:  # bogus Content-Length then garbage
                s.sendall(b"MESSAGE sip:x@example.com SIP/2.0\r\nContent-Length: -5\r\n\r\n"
                          + rnd.randbytes(500))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may hang up on garbage: fine
        conns.append(s)
    time.sleep(0.5)
    for s in conns:
        s.close()
    sink.close()

    assert siphon.running, siphon.tail()
    with UdpClient(port) as ua:
        resp = ua.options()
        assert resp is not None and resp.status == 200, resp
        resp, _ = ua.register("bob", "secret")
        assert resp.status == 200, resp
    status, _ = siphon.admin("GET", "/health")
    assert status == 200
    time.sleep(0.5)
    grown_mb = (siphon.rss_kb() - rss_before) / 1024
    assert grown_mb < 50, f"RSS grew by {grown_mb:.1f} MB during the flood"
    assert "Traceback" not in siphon.output(), siphon.tail(100)
