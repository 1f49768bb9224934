"""Structured SIP header values (RFC 3261 §20, §25): name-addr, Via, CSeq, lists."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from siphon.sip.errors import SipSyntaxError
from siphon.sip.uri import SipUri, parse_host, parse_uri

COMPACT_FORMS = {
    "i": "Call-ID", "m": "Contact", "e": "Content-Encoding", "l": "Content-Length",
    "c": "Content-Type", "f": "From", "s": "Subject", "k": "Supported", "t": "To",
    "v": "Via", "o": "Event", "r": "Refer-To", "b": "Referred-By", "x": "Session-Expires",
    "u": "Allow-Events", "a": "Accept-Contact", "j": "Reject-Contact",
    "d": "Request-Disposition", "y": "Identity", "n": "Identity-Info",
}
_CANONICAL = {
    name.lower(): name
    for name in (
        "Accept", "Accept-Encoding", "Accept-Language", "Alert-Info", "Allow",
        "Authentication-Info", "Authorization", "Call-ID", "Call-Info", "Contact",
        "Content-Disposition",
        "Content-Encoding", "Content-Language", "Content-Length", "Content-Type", "CSeq", "Date",
        "Error-Info", "Expires", "From", "In-Reply-To", "Max-Forwards", "Min-Expires",
        "MIME-Version", "Organization", "Path", "Priority", "Proxy-Authenticate",
        "Proxy-Authorization", "Proxy-Require", "Record-Route", "Reply-To", "Require",
        "Retry-After", "Route", "Server", "Subject", "Supported", "Timestamp", "To",
        "Unsupported", "User-Agent", "Via", "Warning", "WWW-Authenticate", "Event",
        "Allow-Events", "Session-Expires", "Min-SE", "RSeq", "RAck", "Flow-Timer",
    )
}
# Headers whose grammar is a comma-separated list (may be split / combined).
LIST_HEADERS = frozenset(
    name.lower()
    for name in (
        "Via", "Contact", "Route", "Record-Route", "Path", "Allow", "Supported", "Require",
        "Proxy-Require", "Unsupported", "Accept", "Accept-Encoding", "Accept-Language",
        "Content-Encoding", "Content-Language", "Allow-Events", "Alert-Info", "Call-Info",
        "Error-Info", "In-Reply-To", "Warning",
    )
)
# Headers that must not appear more than once (RFC 3261 §20 / RFC 4475 §3.3.8).
SINGLE_HEADERS = frozenset(
    ("to", "from", "call-id", "cseq", "max-forwards", "content-length", "content-type", "expires")
)
_TOKEN_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"
)
_LWS = " \t"
_CSEQ_RE = re.compile(r"(\d{1,10})[ \t]+(\S+)")


def canonical_name(name: str) -> str:
    """Full, conventionally capitalised header name (expands compact forms)."""
    known = _CANON_CACHE.get(name)
    if known is not None:
        return known
    full = _canonical(name)
    if len(_CANON_CACHE) < 4096:
        _CANON_CACHE[name] = full
    return full


_CANON_CACHE: dict[str, str] = {}


def _canonical(name: str) -> str:
    lname = name.lower()
    full = COMPACT_FORMS.get(lname)
    if full is not None:
        return full
    return _CANONICAL.get(lname, name)


_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")


def is_token(text: str) -> bool:
    return _TOKEN_RE.fullmatch(text) is not None


def split_list(value: str) -> list[str]:
    """Split a comma-separated header value, honouring quotes and <...>."""
    if "," not in value:
        v = value.strip()
        return [v] if v else []
    out: list[str] = []
    depth = 0
    quoted = False
    start = 0
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            out.append(value[start:i].strip())
            start = i + 1
        i += 1
    out.append(value[start:].strip())
    return out


def _read_quoted(text: str, pos: int) -> tuple[str, int]:
    """Read a quoted-string starting at ``text[pos] == '"'``; returns (raw incl quotes, end)."""
    i = pos + 1
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == '"':
            return text[pos : i + 1], i + 1
        i += 1
    raise SipSyntaxError("unterminated quoted string")


def _skip_lws(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in _LWS:
        pos += 1
    return pos


_PARAM_RE = re.compile(
    r"[ \t]*;[ \t]*([A-Za-z0-9\-.!%*_+`'~]+)"
    r"(?:[ \t]*=[ \t]*(\"(?:[^\"\\]|\\.)*\"|[^;, \t\"]+))?"
)
_LWS_RE = re.compile(r"[ \t]*")


def parse_params(text: str, pos: int) -> tuple[list[tuple[str, str | None]], int]:
    """Parse ``*( SEMI generic-param )`` from ``pos``; stops at ',' or the end."""
    params: list[tuple[str, str | None]] = []
    n = len(text)
    match = _PARAM_RE.match
    while True:
        m = match(text, pos)
        if m is None:
            break
        params.append((m.group(1), m.group(2)))
        pos = m.end()
    pos = _LWS_RE.match(text, pos).end()  # type: ignore[union-attr]
    if pos < n and text[pos] != ",":
        if text[pos] == ";":
            raise SipSyntaxError("empty or malformed parameter")
        if text[pos] == "=":
            raise SipSyntaxError("empty parameter value")
        raise SipSyntaxError(f"unexpected {text[pos]!r} in parameters")
    return params, pos


def get_param(params: list[tuple[str, str | None]], name: str) -> str | None:
    """Parameter value ("" for a flag) by case-insensitive name, None when absent."""
    lname = name.lower()
    for key, value in params:
        if key.lower() == lname:
            return "" if value is None else value
    return None


def unquote_param(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        inner = value[1:-1]
        return re.sub(r"\\(.)", r"\1", inner) if "\\" in inner else inner
    return value


def format_params(params: list[tuple[str, str | None]]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params)


@dataclass(slots=True)
class NameAddr:
    """``[display-name] <uri> *(;param)`` or ``addr-spec *(;param)`` (From, To, Contact, Route)."""

    uri: SipUri
    display: str | None = None
    params: list[tuple[str, str | None]] = field(default_factory=list)
    wildcard: bool = False

    def param(self, name: str) -> str | None:
        return get_param(self.params, name)

    def set_param(self, name: str, value: str | None) -> None:
        lname = name.lower()
        self.params = [(k, v) for k, v in self.params if k.lower() != lname]
        self.params.append((name, value))

    @property
    def tag(self) -> str | None:
        return self.param("tag")

    def copy(self) -> NameAddr:
        """A copy whose URI and parameter list can change independently."""
        return NameAddr(self.uri.copy(), self.display, list(self.params), self.wildcard)

    def __str__(self) -> str:
        if self.wildcard:
            return "*"
        head = f"{self.display} " if self.display else ""
        return f"{head}<{self.uri}>{format_params(self.params)}"


# Everyday name-addr: optional quoted display name, <uri>, plain token parameters.
# Anything else (token display names, addr-spec, LWS, quoted values) takes the
# general path of parse_name_addr, which accepts a superset of this.
_FAST_NAME_ADDR_RE = re.compile(
    r'(?:("(?:[^"\\\r\n]|\\.)*")[ \t]*)?<([^<>\s"]+)>'
    r"((?:;[A-Za-z0-9\-.!%*_+`'~]+(?:=[A-Za-z0-9\-.!%*_+`'~:\[\]]+)?)*)")


def _simple_params(text: str) -> list[tuple[str, str | None]]:
    """``;a=b;c`` (already validated by a fast-path regex) as a parameter list."""
    params: list[tuple[str, str | None]] = []
    for part in text[1:].split(";"):
        key, sep, val = part.partition("=")
        params.append((key, val if sep else None))
    return params


_RECENT: dict[str, NameAddr] = {}
"""Recently parsed everyday name-addrs (a REGISTER pair repeats From, To and Contact;
so do refreshes); parse_name_addr hands out copies, these stay private."""
_RECENT_MAX = 4096


def parse_name_addr(value: str, *, allow_wildcard: bool = False) -> NameAddr:
    """Parse one From/To/Contact/Route value (strict about RFC 4475 §3.1.2 cases)."""
    known = _RECENT.get(value)
    if known is not None:
        return known.copy()
    m = _FAST_NAME_ADDR_RE.fullmatch(value)
    if m is not None:
        ptext = m.group(3)
        parsed = NameAddr(parse_uri(m.group(2)), m.group(1),
                          _simple_params(ptext) if ptext else [])
        if len(_RECENT) >= _RECENT_MAX:
            _RECENT.clear()
        _RECENT[value] = parsed.copy()
        return parsed
    text = value.strip()
    if allow_wildcard and text == "*":
        return NameAddr(SipUri("sip"), wildcard=True)
    n = len(text)
    pos = 0
    display: str | None = None
    if text.startswith('"'):
        display, pos = _read_quoted(text, 0)
        pos = _skip_lws(text, pos)
        if pos >= n or text[pos] != "<":
            raise SipSyntaxError("quoted display name not followed by <uri>")
    else:
        lt = text.find("<")
        if lt >= 0:
            words = text[:lt].split()
            for word in words:
                if not is_token(word):
                    raise SipSyntaxError(f"bad display name {text[:lt].strip()!r}")
            display = " ".join(words) or None
            pos = lt
    if pos < n and text[pos] == "<":
        end = text.find(">", pos)
        if end < 0:
            raise SipSyntaxError("missing '>' in name-addr")
        inner = text[pos + 1 : end]
        if not inner or inner != inner.strip():
            raise SipSyntaxError("whitespace inside <addr-spec>")
        uri = parse_uri(inner)
        params, pos = parse_params(text, end + 1)
    else:
        # addr-spec form: the URI ends at the first ';', and must not carry headers.
        end = pos
        while end < n and text[end] not in "; \t,":
            end += 1
        uri_text = text[pos:end]
        if "?" in uri_text:
            raise SipSyntaxError("URI with '?' must be enclosed in <>")
        uri = parse_uri(uri_text)
        params, pos = parse_params(text, end)
    if pos != n:
        raise SipSyntaxError(f"trailing characters in {text!r}")
    return NameAddr(uri, display, params)


@dataclass(slots=True)
class Via:
    """One Via value: ``SIP/2.0/<transport> host[:port] *(;param)``."""

    transport: str
    host: str
    port: int | None = None
    params: list[tuple[str, str | None]] = field(default_factory=list)

    def param(self, name: str) -> str | None:
        return get_param(self.params, name)

    def set_param(self, name: str, value: str | None) -> None:
        lname = name.lower()
        for i, (key, _) in enumerate(self.params):
            if key.lower() == lname:
                self.params[i] = (key, value)
                return
        self.params.append((name, value))

    @property
    def branch(self) -> str | None:
        return self.param("branch")

    @property
    def sent_by(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"SIP/2.0/{self.transport} {self.sent_by}{format_params(self.params)}"


_VIA_RE = re.compile(
    r"([A-Za-z0-9\-.!%*_+`'~]+)[ \t]*/[ \t]*([0-9.]+)[ \t]*/[ \t]*([A-Za-z0-9\-.!%*_+`'~]+)[ \t]+"
)


# Everyday Via: SIP/2.0/<transport> host[:port] and plain token parameters.
_FAST_VIA_RE = re.compile(
    r"SIP/2\.0/([A-Za-z]+) ([A-Za-z0-9](?:[A-Za-z0-9\-.]*[A-Za-z0-9.])?)(?::(\d{1,5}))?"
    r"((?:;[A-Za-z0-9\-.!%*_+`'~]+(?:=[A-Za-z0-9\-.!%*_+`'~:\[\]]+)?)*)")


def parse_via(value: str) -> Via:
    """Parse a single Via value (LWS around '/' allowed)."""
    m = _FAST_VIA_RE.fullmatch(value)
    if m is not None:
        port = m.group(3)
        if port is None or int(port) <= 65535:
            ptext = m.group(4)
            return Via(m.group(1).upper(), m.group(2), int(port) if port else None,
                       _simple_params(ptext) if ptext else [])
    text = value.strip()
    m = _VIA_RE.match(text)
    if not m:
        raise SipSyntaxError(f"bad Via {text!r}")
    if m.group(1).upper() != "SIP" or m.group(2) != "2.0":
        raise SipSyntaxError(f"unsupported Via protocol {m.group(1)}/{m.group(2)}", 505)
    pos = m.end()
    end = pos
    n = len(text)
    while end < n and text[end] not in "; \t":
        end += 1
    host, port = parse_host(text[pos:end])
    params, pos = parse_params(text, end)
    if pos != n:
        raise SipSyntaxError(f"trailing characters in Via {text!r}")
    return Via(m.group(3).upper(), host, port, params)


def parse_cseq(value: str) -> tuple[int, str]:
    m = _CSEQ_RE.fullmatch(value.strip())
    if not m or int(m.group(1)) >= 2**31:
        raise SipSyntaxError(f"bad CSeq {value.strip()!r}")
    return int(m.group(1)), m.group(2)


def parse_uint(value: str, name: str, limit: int) -> int:
    text = value.strip()
    if not (text.isdigit() and text.isascii()) or len(text) > 12 or int(text) > limit:
        raise SipSyntaxError(f"bad {name} {text[:40]!r}")
    return int(text)
