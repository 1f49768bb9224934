"""Bytes to SIP messages: framing, parsing and validation (RFC 3261 §7, §18.3, §20).

Pure code: datagrams go through :func:`parse_datagram`, byte streams through a
:class:`StreamFramer` and then :func:`parse_message`. Every failure is a
:class:`SipSyntaxError` carrying the status a server should answer with; when
the start line and header fields could be split, ``exc.partial`` holds the
request so a response (400, 505...) can still be built.
"""

from __future__ import annotations

import re

from siphon.sip.errors import SipNeedMoreData, SipSyntaxError
from siphon.sip.headers import (
    SINGLE_HEADERS,
    canonical_name,
    is_token,
    parse_cseq,
    parse_name_addr,
    parse_uint,
)
from siphon.sip.message import Headers, Message, Request, Response

DEFAULT_MAX_SIZE = 65_535
DEFAULT_MAX_HEADERS = 256
_STATUS_RE = re.compile(r"SIP/(\d+\.\d+) (\d{3}) (.*)", re.DOTALL)
_VERSION_RE = re.compile(r"SIP/\d+\.\d+")


class ParseError(SipSyntaxError):
    """A message that failed parsing or validation; ``partial`` when a reply is possible."""

    def __init__(self, reason: str, status: int = 400, partial: Request | None = None) -> None:
        super().__init__(reason, status)
        self.partial = partial


def _split_head(data: bytes) -> tuple[bytes, int] | None:
    """Header section and the index where the body starts, None if incomplete."""
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        return data[:end], end + 4
    end = data.find(b"\n\n")
    if end >= 0:
        return data[:end], end + 2
    return None


_TOKEN = r"[A-Za-z0-9\-.!%*_+`'~]+"
_FIELD_RE = re.compile(rf"({_TOKEN})[ \t]*:[ \t]*(.*)")
# One field per well-formed line (after unfolding), trailing blanks dropped: one
# C-level scan instead of a loop per line (a line that does not match is malformed).
_FIELDS_RE = re.compile(
    rf"^({_TOKEN})[ \t]*:[ \t]*((?:[^\n]*[^ \t\n])?)[ \t]*$", re.MULTILINE)
_SPACE_RE = re.compile(r"\s")
_FOLD_RE = re.compile(r"[ \t]*\n[ \t]+")


def _header_lines(head: str, max_headers: int) -> tuple[str, list[tuple[str, str]]]:
    head = head.replace("\r\n", "\n")
    start, _, rest = head.partition("\n")
    if rest[:1] in (" ", "\t"):
        raise SipSyntaxError("continuation line before any header")
    if "\n " in rest or "\n\t" in rest:
        rest = _FOLD_RE.sub(" ", rest)  # unfold continuation lines (LWS)
    if not rest:
        return start, []
    fields: list[tuple[str, str]] = _FIELDS_RE.findall(rest)
    if len(fields) != rest.count("\n") + 1:  # (a match per well-formed line)
        for line in rest.split("\n"):
            if _FIELD_RE.fullmatch(line) is None:
                raise SipSyntaxError(f"malformed header line {line[:60]!r}")
        raise SipSyntaxError("malformed header section")  # pragma: no cover - defensive
    if len(fields) > max_headers:
        raise SipSyntaxError("too many header fields", 513)
    return start, fields


def _parse_start(start: str, fields: list[tuple[str, str]]) -> Message:
    headers = Headers(fields)
    if start.startswith("SIP/"):
        m = _STATUS_RE.fullmatch(start)
        if not m:
            raise SipSyntaxError(f"bad status line {start[:60]!r}")
        status = int(m.group(2))
        if not 100 <= status <= 699:
            raise SipSyntaxError(f"status code {status} out of range")
        return Response(status, m.group(3), headers, version=f"SIP/{m.group(1)}")
    parts = start.split(" ")
    if len(parts) != 3 or not is_token(parts[0]) or not _VERSION_RE.fullmatch(parts[2]):
        raise SipSyntaxError(f"bad request line {start[:80]!r}")
    return Request(parts[0], parts[1], headers, version=parts[2])


def parse_message(data: bytes, *, datagram: bool = True, max_size: int = DEFAULT_MAX_SIZE,
                  max_headers: int = DEFAULT_MAX_HEADERS, validate: bool = True) -> Message:
    """Parse one complete message. For datagrams, octets past Content-Length are ignored
    and a missing Content-Length means "the rest of the datagram"."""
    if len(data) > max_size:
        raise ParseError(f"message of {len(data)} octets exceeds {max_size}", 513)
    while data.startswith(b"\r\n"):
        data = data[2:]
    split = _split_head(data)
    if split is None:
        if not datagram:
            raise ParseError("no end of header section")
        split = (data.rstrip(b"\r\n"), len(data))  # a datagram ends the header section
    head_bytes, body_start = split
    try:
        start, fields = _header_lines(head_bytes.decode("utf-8", "surrogateescape"), max_headers)
    except SipSyntaxError as exc:
        raise ParseError(exc.reason, exc.status) from None
    try:
        msg = _parse_start(start, fields)
    except SipSyntaxError as exc:
        # A broken request line with usable header fields can still be answered 400.
        method = start.split(" ", 1)[0]
        partial = Request(method, "", Headers(fields)) if is_token(method) else None
        raise ParseError(exc.reason, exc.status, partial) from None
    partial = msg if isinstance(msg, Request) else None
    try:
        lengths = msg.headers.get_all("Content-Length")
        if len(lengths) > 1:
            raise SipSyntaxError("several Content-Length values")
        available = len(data) - body_start
        if lengths:
            clen = parse_uint(lengths[0], "Content-Length", max_size)
            if clen > available:
                raise SipSyntaxError(
                    f"Content-Length {clen} exceeds the {available} octets received")
        else:
            clen = available if datagram else 0
        msg.body = data[body_start : body_start + clen]
        if validate:
            if isinstance(msg, Request):
                validate_request(msg)
            else:
                validate_response(msg)
    except SipSyntaxError as exc:
        raise ParseError(exc.reason, exc.status, partial) from None
    return msg


def parse_datagram(data: bytes, **kwargs: int) -> Message:
    """Parse a UDP datagram (see :func:`parse_message`)."""
    return parse_message(data, datagram=True, **kwargs)  # type: ignore[arg-type]


def _check_common(msg: Message) -> None:
    h = msg.headers
    lower = h.lower_names()
    if len(lower) > len(set(lower)):  # some header repeats: is it a single one?
        for name in SINGLE_HEADERS:
            if lower.count(name) > 1:
                raise SipSyntaxError(f"several {canonical_name(name)} header fields")
    items = list(h)
    for lname, name in _REQUIRED:
        if lname not in lower or not items[lower.index(lname)][1]:
            raise SipSyntaxError(f"missing {name} header")
    if not msg.vias:  # parses (and caches) every Via
        raise SipSyntaxError("missing Via header")
    msg.from_  # noqa: B018 - parse and cache
    msg.to  # noqa: B018
    if _SPACE_RE.search(items[lower.index("call-id")][1]):
        raise SipSyntaxError("bad Call-ID")
    if "max-forwards" in lower:
        parse_uint(items[lower.index("max-forwards")][1], "Max-Forwards", 255)


_REQUIRED = (("to", "To"), ("from", "From"), ("call-id", "Call-ID"), ("cseq", "CSeq"))


def validate_request(req: Request) -> None:
    """Semantic checks a proxy/registrar needs before acting; raises SipSyntaxError."""
    if req.version != "SIP/2.0":
        raise SipSyntaxError(f"SIP version {req.version} not supported", 505)
    try:
        uri = req.ruri
    except SipSyntaxError as exc:
        raise SipSyntaxError(f"bad Request-URI: {exc.reason}") from None
    if uri.headers is not None:
        raise SipSyntaxError("headers are not allowed in the Request-URI")
    _check_common(req)
    h = req.headers
    _seq, method = req.cseq
    if method != req.method:
        raise SipSyntaxError(f"CSeq method {method} does not match {req.method}")
    lower = h.lower_names()
    if "expires" in lower:
        parse_uint(h.get("Expires") or "", "Expires", 2**32 - 1)
    if "contact" in lower:
        for contact in req.name_addrs("Contact"):
            if contact.params:
                exp = contact.param("expires")
                if exp is not None:
                    parse_uint(exp, "Contact expires", 2**32 - 1)
    for lname, name in _ROUTING:
        if lname in lower:
            for value in h.get_list(name):
                parse_name_addr(value)


_ROUTING = (("route", "Route"), ("record-route", "Record-Route"), ("path", "Path"))


def validate_response(resp: Response) -> None:
    """Checks before a response may be matched or forwarded."""
    if resp.version != "SIP/2.0":
        raise SipSyntaxError(f"SIP version {resp.version} not supported", 505)
    _check_common(resp)
    parse_cseq(resp.headers.get("CSeq") or "")


class StreamFramer:
    """Cuts a TCP/TLS byte stream into messages using Content-Length (§18.3).

    ``feed(data)`` returns the complete messages' octets; keep-alive CRLFs
    between messages are skipped (``pongs`` counts double-CRLF pings, RFC 5626).
    """

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self._buf = bytearray()
        self.max_size = max_size
        self.pings = 0

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while True:
            while self._buf[:2] == b"\r\n":
                if self._buf[:4] == b"\r\n\r\n":
                    self.pings += 1
                    del self._buf[:4]
                else:
                    del self._buf[:2]
            if not self._buf:
                return out
            try:
                frame = self._next_frame()
            except SipNeedMoreData:
                if len(self._buf) > self.max_size:
                    raise SipSyntaxError("message exceeds the size limit", 513) from None
                return out
            out.append(frame)

    def _next_frame(self) -> bytes:
        split = _split_head(bytes(self._buf[: self.max_size + 4]))
        if split is None:
            raise SipNeedMoreData
        head, body_start = split
        clen = 0
        for line in head.split(b"\n")[1:]:
            name, sep, value = line.partition(b":")
            if sep and canonical_name(name.strip().decode("latin-1")) == "Content-Length":
                text = value.strip().decode("latin-1")
                if not (text.isascii() and text.isdigit()):
                    raise SipSyntaxError("bad Content-Length")
                clen = int(text)
                break
        total = body_start + clen
        if total > self.max_size:
            raise SipSyntaxError("message exceeds the size limit", 513)
        if len(self._buf) < total:
            raise SipNeedMoreData
        frame = bytes(self._buf[:total])
        del self._buf[:total]
        return frame

