"""RFC 4475 torture messages against a running node, over UDP and TCP.

Every row of expectations.tsv is fed byte-exact (binary read, never reformatted):
over UDP from its own socket (the server answers the packet source), and, for
requests, over a fresh TCP connection. All messages of a phase are sent at once
and the answers collected together, so "no answer" waits overlap.
"""

from __future__ import annotations

import csv
import re
import selectors
import socket
import time
from dataclasses import dataclass

import pytest
from conftest import CONFORMANCE, CONFORMANCE_SCRIPT, SiphonProcess
from sipclient import SipResponse, UdpClient, parse_response, read_stream_response

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

NO_ANSWER_WAIT = 1.5
"""Seconds to wait, after the last message of a phase, for answers that may not come."""

HANDLED = "handled"
"""Processed like any other message: a final response that is not a syntax (400) nor
server (5xx) error. With the conformance script an OPTIONS/INVITE/MESSAGE to an
unregistered user gets 404; a REGISTER without credentials is stored (200)."""
NONE = "no answer"


@dataclass
class Row:
    file: str
    section: str
    start_line: str
    klass: str
    what: str
    data: bytes

    @property
    def is_request(self) -> bool:
        return self.start_line == "request"

    @property
    def method(self) -> str:
        return self.data.split(b" ", 1)[0].decode("latin-1")

    @property
    def call_id(self) -> str | None:
        m = re.search(rb"(?im)^(?:call-id|i)[ \t]*:[ \t]*(\S+)", self.data)
        return m.group(1).decode("latin-1") if m else None

    @property
    def complete_on_stream(self) -> bool:
        """Whether the octets form a complete message on a byte stream (RFC 3261 §18.3):
        an empty line ends the header section and Content-Length octets follow."""
        end = self.data.find(b"\r\n\r\n")
        if end < 0:
            return False
        m = re.search(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\S+)", self.data[:end])
        if m is None:
            return True
        if not m.group(1).isdigit():
            return False  # the framer cannot frame it: dropping the connection is all it can do
        return int(m.group(1)) <= len(self.data) - end - 4


# Rows of class "semantic": what the row's last column asks, as outcomes.
SEMANTIC: dict[str, tuple[object, ...]] = {
    "TC_BADBRANCH_V.dat": (HANDLED,),
    "TC_INSUF_I.dat": (400,),
    "TC_UNKSCM_V.dat": (416,),
    "TC_NOVELSC_V.dat": (416,),
    "TC_UNKSM2_V.dat": tuple(s for s in range(400, 500) if s != 401),
    "TC_BEXT01_V.dat": (420,),
    "TC_INVUT_V.dat": (415, HANDLED),  # a proxy forwards (here: nobody registered -> 404)
    "TC_REGAUT01_V.dat": (401,),
    "TC_MULTI01_I.dat": (400,),
    "TC_MCL01_I.dat": (400,),
    "TC_BCAST_V.dat": (NONE,),
    "TC_ZEROMF_V.dat": (483,),
    "TC_CPARAM01_V.dat": (200,),
    "TC_CPARAM02_V.dat": (200,),
    "TC_REGESCRT_V.dat": (200,),
    "TC_SDP01_V.dat": (406, HANDLED),
}


def load_rows() -> list[Row]:
    with (CONFORMANCE / "expectations.tsv").open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert rows, "expectations.tsv is empty"
    return [
        Row(r["file"], r["rfc4475_section"], r["start_line"], r["class"],
            r["what_a_registrar_proxy_must_do"], (CONFORMANCE / r["file"]).read_bytes())
        for r in rows
    ]


def expected(row: Row) -> tuple[object, ...]:
    """Acceptable outcomes for a row: status codes, HANDLED or NONE."""
    if not row.is_request:
        return (NONE,)  # no client transactions here: responses are dropped, never crash
    if row.klass in ("valid", "backcompat"):
        return (HANDLED,)
    if row.klass == "invalid":
        if "505" in row.what:
            return (505,)
        if "or drop" in row.what:
            return (400, NONE)
        if "or ignore" in row.what:
            return (400, HANDLED)
        assert "reject (400)" in row.what, f"unexpected wording for {row.file}: {row.what}"
        return (400,)
    if row.klass == "semantic":
        assert row.file in SEMANTIC, f"no expectation coded for semantic row {row.file}"
        return SEMANTIC[row.file]
    raise AssertionError(f"unknown class {row.klass!r} for {row.file}")


def outcome_ok(resp: SipResponse | None, allowed: tuple[object, ...]) -> bool:
    if resp is None:
        return NONE in allowed
    if resp.status in allowed:
        return True
    return HANDLED in allowed and resp.status >= 200 and resp.status != 400 and resp.status < 500


def describe(resp: SipResponse | None) -> str:
    if resp is None:
        return "no answer"
    warning = resp.get("Warning")
    return f"{resp.status} {resp.reason}" + (f" ({warning})" if warning else "")


def pick(responses: list[SipResponse], call_id: str | None) -> SipResponse | None:
    """The final response to the row's (first) request: same Call-ID when it has one."""
    finals = [r for r in responses if r.status >= 200]
    if call_id is not None:
        return next((r for r in finals if r.call_id == call_id), None)
    return finals[0] if finals else None


def send_udp(port: int, rows: list[Row]) -> dict[str, list[SipResponse]]:
    """Each row from its own socket; collect every datagram that comes back."""
    sel = selectors.DefaultSelector()
    got: dict[str, list[SipResponse]] = {r.file: [] for r in rows}
    socks = []
    try:
        for row in rows:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            socks.append(s)
            sel.register(s, selectors.EVENT_READ, row.file)
            s.sendto(row.data, ("127.0.0.1", port))
        deadline = time.monotonic() + NO_ANSWER_WAIT
        while (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                data = key.fileobj.recv(65535)  # type: ignore[union-attr]
                got[key.data].append(parse_response(data))
    finally:
        sel.close()
        for s in socks:
            s.close()
    return got


def send_tcp(port: int, rows: list[Row]) -> dict[str, tuple[list[SipResponse], bool]]:
    """Each row over a fresh connection; collect responses and whether it was closed."""
    sel = selectors.DefaultSelector()
    got: dict[str, tuple[list[SipResponse], bool]] = {}
    bufs: dict[str, bytes] = {}
    socks = []
    try:
        for row in rows:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(row.data)
            s.setblocking(False)
            socks.append(s)
            sel.register(s, selectors.EVENT_READ, row.file)
            got[row.file] = ([], False)
            bufs[row.file] = b""
        deadline = time.monotonic() + NO_ANSWER_WAIT
        while (left := deadline - time.monotonic()) > 0 and sel.get_map():
            for key, _ in sel.select(left):
                name = key.data
                try:
                    data = key.fileobj.recv(65535)  # type: ignore[union-attr]
                except ConnectionResetError:
                    data = b""
                if not data:
                    sel.unregister(key.fileobj)
                    got[name] = (got[name][0], True)
                    continue
                bufs[name] += data
                while (split := read_stream_response(bufs[name])) is not None:
                    msg, bufs[name] = split
                    got[name][0].append(parse_response(msg))
    finally:
        sel.close()
        for s in socks:
            s.close()  # a message still waiting for its body (TC_CLERR_I) is abandoned
    return got


def test_rfc4475_torture_messages(siphon: SiphonProcess) -> None:
    rows = load_rows()
    assert len(rows) >= 50, f"only {len(rows)} rows in expectations.tsv"
    siphon.start(script_text=CONFORMANCE_SCRIPT)
    port = siphon.sip_port
    failures: list[str] = []

    # ---- UDP: every row -------------------------------------------------------------
    udp = send_udp(port, rows)
    udp_final: dict[str, SipResponse | None] = {}
    for row in rows:
        resp = pick(udp[row.file], row.call_id)
        udp_final[row.file] = resp
        allowed = expected(row)
        if not outcome_ok(resp, allowed):
            failures.append(f"UDP {row.file} ({row.klass}: {row.what}): got {describe(resp)}, "
                            f"expected one of {allowed}")
        strays = [r for r in udp[row.file] if row.call_id and r.call_id != row.call_id]
        if strays:
            failures.append(f"UDP {row.file}: responses for another request: {strays}")
    assert siphon.running, f"siphon died during the UDP phase\n{siphon.tail()}"

    # ---- TCP: every request, each on a fresh connection ------------------------------
    requests = [r for r in rows if r.is_request]
    tcp = send_tcp(port, requests)
    for row in requests:
        responses, closed = tcp[row.file]
        resp = pick(responses, row.call_id)
        allowed = expected(row)
        if not row.complete_on_stream:
            # The stream has not delivered a whole message: the server keeps waiting for
            # the rest (or closes a connection it cannot frame). Never a wrong answer.
            allowed = (*allowed, NONE)
        if not outcome_ok(resp, allowed):
            failures.append(f"TCP {row.file} ({row.klass}: {row.what}): got {describe(resp)}"
                            f"{' (connection closed)' if closed else ''}, "
                            f"expected one of {allowed}")
        if resp is not None and udp_final[row.file] is not None and (
                resp.status != udp_final[row.file].status):  # type: ignore[union-attr]
            failures.append(f"{row.file}: UDP got {describe(udp_final[row.file])} but TCP "
                            f"got {describe(resp)}")
    assert siphon.running, f"siphon died during the TCP phase\n{siphon.tail()}"

    # ---- headers the semantic rows ask for -------------------------------------------
    bext = udp_final.get("TC_BEXT01_V.dat")
    if bext is not None and bext.status == 420:
        tags = {t.strip() for v in bext.get_all("Unsupported") for t in v.split(",")}
        proxy_require = {"noProxiesSupportThis", "norDoAnyProxiesSupportThis"}
        if not proxy_require <= tags:
            failures.append(f"TC_BEXT01_V: Unsupported {tags} lacks {proxy_require - tags}")
    regaut = udp_final.get("TC_REGAUT01_V.dat")
    if regaut is not None and regaut.status == 401:
        challenges = regaut.get_all("WWW-Authenticate")
        if not challenges or not all(c.startswith("Digest ") for c in challenges):
            failures.append(f"TC_REGAUT01_V: 401 without a Digest challenge: {challenges}")

    # ---- what was stored -------------------------------------------------------------
    bindings = siphon.registrations()
    by_aor: dict[str, list[dict]] = {}
    for b in bindings:
        by_aor.setdefault(b["aor"], []).append(b)

    accepted_aors = set()
    for row in rows:
        resp = udp_final[row.file]
        if row.method == "REGISTER" and resp is not None and resp.status == 200:
            m = re.search(rb"(?im)^(?:to|t)[ \t]*:[ \t]*<?(sip:[^;>\r\n]+)", row.data)
            assert m, row.file
            accepted_aors.add(m.group(1).decode())
    for aor in by_aor:
        if aor.replace("\x00", "%00") not in accepted_aors:
            failures.append(f"binding stored for {aor!r}, which no accepted REGISTER named: "
                            f"{by_aor[aor]}")
    for b in bindings:
        if not b["aor"].startswith("sip:") or not b["uri"].startswith(("sip:", "sips:")):
            failures.append(f"non-SIP binding stored (TC_UNKSM2_V?): {b}")

    watson = siphon.contacts("sip:watson@example.com") or []
    uris = {c["uri"]: c for c in watson}
    cparam01 = uris.get("sip:+19725552222@gw1.example.net")
    if cparam01 is None:
        failures.append(f"TC_CPARAM01_V: no binding sip:+19725552222@gw1.example.net: {watson}")
    elif ["unknownparam", None] not in cparam01.get("params", []):
        failures.append(f"TC_CPARAM01_V: header param unknownparam not kept: {cparam01}")
    cparam02 = uris.get("sip:+19725552222@gw1.example.net;unknownparam")
    if cparam02 is None:
        failures.append(f"TC_CPARAM02_V: URI parameter ;unknownparam not kept: {watson}")
    elif ["unknownparam", None] in cparam02.get("params", []):
        failures.append(f"TC_CPARAM02_V: URI param turned into a header param: {cparam02}")

    user = siphon.contacts("sip:user@example.com") or []
    if [c["uri"] for c in user] != ["sip:user@example.com?Route=%3Csip:sip.example.com%3E"]:
        failures.append(f"TC_REGESCRT_V (and not TC_REGBADCT_I): expected exactly the "
                        f"escaped-header Contact URI, got {user}")

    # ---- still serving ---------------------------------------------------------------
    with UdpClient(port) as client:
        resp = client.options()
    assert resp is not None and resp.status >= 200, f"no answer to OPTIONS\n{siphon.tail()}"
    status, body = siphon.admin("GET", "/health")
    assert status == 200 and body["status"] == "ok", body
    assert siphon.running
    assert "Traceback" not in siphon.output(), siphon.tail(200)

    assert not failures, "\n".join(failures) + "\n" + siphon.tail(30)
