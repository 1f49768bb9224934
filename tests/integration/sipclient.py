"""A deliberately small SIP UAC for the integration tests (independent of siphon.sip).

Only the digest arithmetic is borrowed from siphon (``compute_ha1`` /
``compute_response``); message building and response parsing are done here
so a server-side parser bug cannot hide itself.
"""

from __future__ import annotations

import re
import secrets
import socket
import time
from dataclasses import dataclass, field

from siphon.auth.digest import compute_ha1, compute_response


@dataclass
class SipResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    raw: bytes = b""

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]

    @property
    def call_id(self) -> str | None:
        return self.get("Call-ID") or self.get("i")

    @property
    def cseq(self) -> str | None:
        return self.get("CSeq")

    def __repr__(self) -> str:
        return f"<SipResponse {self.status} {self.reason} call-id={self.call_id}>"


def parse_response(data: bytes) -> SipResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("utf-8", "replace").split("\r\n")
    m = re.fullmatch(r"SIP/2\.0 (\d{3}) ?(.*)", lines[0])
    if not m:
        raise ValueError(f"not a SIP response: {lines[0]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:
            headers[-1] = (headers[-1][0], headers[-1][1] + " " + line.strip())
            continue
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return SipResponse(int(m.group(1)), m.group(2), headers, body, data)


def read_stream_response(buf: bytes) -> tuple[bytes, bytes] | None:
    """Split one complete response off a TCP byte buffer: (message, rest) or None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].decode("latin-1")
    m = re.search(r"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)", head)
    length = int(m.group(1)) if m else 0
    total = end + 4 + length
    if len(buf) < total:
        return None
    return buf[:total], buf[total:]


def new_branch() -> str:
    return "z9hG4bK" + secrets.token_hex(8)


def new_tag() -> str:
    return secrets.token_hex(5)


def build_request(method: str, ruri: str, *, to: str, from_: str, call_id: str, cseq: int,
                  via: str, contact: str | list[str] | None = None,
                  expires: int | None = None, extra: list[tuple[str, str]] | None = None,
                  body: bytes = b"", max_forwards: int = 70) -> bytes:
    lines = [
        f"{method} {ruri} SIP/2.0",
        f"Via: {via}",
        f"Max-Forwards: {max_forwards}",
        f"From: {from_}",
        f"To: {to}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
    ]
    contacts = [contact] if isinstance(contact, str) else (contact or [])
    lines += [f"Contact: {c}" for c in contacts]
    if expires is not None:
        lines.append(f"Expires: {expires}")
    lines += [f"{n}: {v}" for n, v in extra or []]
    lines.append("User-Agent: siphon-integration-tests")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def parse_challenge(value: str) -> dict[str, str]:
    """Parameters of a ``Digest ...`` challenge."""
    scheme, _, rest = value.partition(" ")
    assert scheme.lower() == "digest", value
    params = {}
    for m in re.finditer(r'([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]+)', rest):
        v = m.group(2)
        params[m.group(1).lower()] = v[1:-1] if v.startswith('"') else v
    return params


def authorization(challenge_value: str, *, method: str, uri: str, username: str,
                  password: str, nc: int = 1, cnonce: str | None = None) -> str:
    """An ``Authorization`` value answering ``challenge_value`` (qop=auth)."""
    ch = parse_challenge(challenge_value)
    algorithm = ch.get("algorithm", "MD5")
    cnonce = cnonce or secrets.token_hex(8)
    ncs = f"{nc:08x}"
    ha1 = compute_ha1(algorithm, username, ch["realm"], password)
    response = compute_response(algorithm, ha1, ch["nonce"], ncs, cnonce, "auth", method, uri)
    return (f'Digest username="{username}", realm="{ch["realm"]}", nonce="{ch["nonce"]}", '
            f'uri="{uri}", response="{response}", algorithm={algorithm}, qop=auth, '
            f'nc={ncs}, cnonce="{cnonce}"')


def md5_challenge(resp: SipResponse) -> str:
    for value in resp.get_all("WWW-Authenticate"):
        if "algorithm=MD5" in value or "algorithm" not in value:
            return value
    raise AssertionError(f"no MD5 challenge in {resp.raw!r}")


class UdpClient:
    """A blocking UDP UAC on 127.0.0.1 talking to one server."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.server = (host, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.local_port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> UdpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def via_host(self) -> str:
        return f"127.0.0.1:{self.local_port}"

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.server)

    def recv(self, timeout: float = 2.0, call_id: str | None = None,
             final: bool = True) -> SipResponse | None:
        """Next response (with ``call_id`` if given, final only if ``final``) or None."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data, _ = self.sock.recvfrom(65535)
            except TimeoutError:
                return None
            resp = parse_response(data)
            if call_id is not None and resp.call_id != call_id:
                continue
            if final and resp.status < 200:
                continue
            return resp

    def request(self, data: bytes, timeout: float = 3.0,
                call_id: str | None = None) -> SipResponse | None:
        self.send(data)
        return self.recv(timeout, call_id)

    def register(self, user: str, password: str | None = None, *, domain: str = "example.com",
                 contact: str | list[str] | None = None, expires: int | None = None,
                 call_id: str | None = None, cseq: int = 1,
                 extra: list[tuple[str, str]] | None = None) -> tuple[SipResponse, int]:
        """REGISTER ``user@domain``, answering a 401 with digest credentials when a
        password is given. Returns the final response and the last CSeq used."""
        aor = f"sip:{user}@{domain}"
        ruri = f"sip:{domain}"
        call_id = call_id or f"{secrets.token_hex(8)}@it"
        tag = new_tag()
        if contact is None:
            contact = f"<sip:{user}@127.0.0.1:{self.local_port}>"

        def build(seq: int, auth: str | None) -> bytes:
            headers = list(extra or [])
            if auth is not None:
                headers.append(("Authorization", auth))
            return build_request(
                "REGISTER", ruri, to=f"<{aor}>", from_=f"<{aor}>;tag={tag}", call_id=call_id,
                cseq=seq, via=f"SIP/2.0/UDP {self.via_host};branch={new_branch()};rport",
                contact=contact, expires=expires, extra=headers)

        resp = self.request(build(cseq, None), call_id=call_id)
        assert resp is not None, f"no answer to REGISTER {aor}"
        if resp.status == 401 and password is not None:
            cseq += 1
            auth = authorization(md5_challenge(resp), method="REGISTER", uri=ruri,
                                 username=user, password=password)
            resp = self.request(build(cseq, auth), call_id=call_id)
            assert resp is not None, f"no answer to authenticated REGISTER {aor}"
        return resp, cseq

    def options(self, ruri: str = "sip:127.0.0.1", timeout: float = 3.0) -> SipResponse | None:
        call_id = f"{secrets.token_hex(8)}@it"
        data = build_request(
            "OPTIONS", ruri, to=f"<{ruri}>", from_=f"<sip:probe@example.com>;tag={new_tag()}",
            call_id=call_id, cseq=1, via=f"SIP/2.0/UDP {self.via_host};branch={new_branch()}")
        return self.request(data, timeout, call_id)
