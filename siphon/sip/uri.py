"""SIP, SIPS, tel and other URIs (RFC 3261 §19.1, §25; RFC 3966), pure code."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote

from siphon.sip.errors import SipSyntaxError

_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-.]*[A-Za-z0-9.])?")
_IPV4_RE = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
# Characters never allowed unescaped anywhere in a SIP URI.
_FORBIDDEN = re.compile(r'[ \t\r\n<>"{}|\\^`]')
_DEFAULT_PORTS = {"sip": 5060, "sips": 5061}
# URI parameters that must match when present in either URI (§19.1.4).
_STRICT_PARAMS = ("user", "ttl", "method", "maddr", "transport")


def unescape(text: str) -> str:
    """Undo %HH escapes (invalid escapes are kept literally)."""
    return unquote(text, errors="surrogateescape") if "%" in text else text


@dataclass(slots=True)
class SipUri:
    """A ``sip:``/``sips:``/``tel:`` URI, or any other scheme kept opaque.

    ``user``, ``password``, parameter names/values and ``headers`` are kept as
    received (escaped); compare with :func:`uri_equal`.
    """

    scheme: str
    host: str = ""
    user: str | None = None
    password: str | None = None
    port: int | None = None
    params: list[tuple[str, str | None]] = field(default_factory=list)
    headers: str | None = None
    opaque: str | None = None
    """For schemes other than sip/sips/tel: everything after ``scheme:``."""

    @property
    def is_sip(self) -> bool:
        return self.scheme in ("sip", "sips")

    @property
    def is_tel(self) -> bool:
        return self.scheme == "tel"

    def param(self, name: str) -> str | None:
        """Value of a URI parameter ("" for a flag), None when absent."""
        name = name.lower()
        for key, value in self.params:
            if key.lower() == name:
                return "" if value is None else value
        return None

    def has_param(self, name: str) -> bool:
        return self.param(name) is not None

    def set_param(self, name: str, value: str | None) -> None:
        lname = name.lower()
        self.params = [(k, v) for k, v in self.params if k.lower() != lname]
        self.params.append((name, value))

    def remove_param(self, name: str) -> None:
        lname = name.lower()
        self.params = [(k, v) for k, v in self.params if k.lower() != lname]

    @property
    def hostport(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    @property
    def effective_port(self) -> int:
        """Port to use when none is given (5060/5061)."""
        return self.port if self.port is not None else _DEFAULT_PORTS.get(self.scheme, 5060)

    def copy(self) -> SipUri:
        return SipUri(self.scheme, self.host, self.user, self.password, self.port,
                      list(self.params), self.headers, self.opaque)

    def __str__(self) -> str:
        if self.opaque is not None:
            return f"{self.scheme}:{self.opaque}"
        if self.scheme == "tel":
            out = f"tel:{self.user or ''}"
        else:
            out = f"{self.scheme}:"
            if self.user is not None:
                out += self.user
                if self.password is not None:
                    out += ":" + self.password
                out += "@"
            out += self.hostport
        for key, value in self.params:
            out += f";{key}" if value is None else f";{key}={value}"
        if self.headers is not None:
            out += "?" + self.headers
        return out


def _split_params(text: str) -> list[tuple[str, str | None]]:
    params: list[tuple[str, str | None]] = []
    if not text:
        return params
    for part in text.split(";"):
        if not part:
            raise SipSyntaxError("empty URI parameter")
        key, sep, value = part.partition("=")
        if not key or (sep and not value):
            raise SipSyntaxError(f"bad URI parameter {part!r}")
        params.append((key, value if sep else None))
    return params


def parse_host(text: str) -> tuple[str, int | None]:
    """Split ``host[:port]`` and validate both; raises SipSyntaxError."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SipSyntaxError(f"bad IPv6 reference in {text!r}")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise SipSyntaxError(f"bad host {text!r}")
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = None
        if not _HOSTNAME_RE.fullmatch(host) and not _IPV4_RE.fullmatch(host):
            raise SipSyntaxError(f"bad host {host!r}")
    port: int | None = None
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5 \
                or int(port_text) > 65535:
            raise SipSyntaxError(f"bad port {port_text!r}")
        port = int(port_text)
    return host, port


# The everyday SIP URI: simple user part, host name or IPv4, optional port, simple
# parameters, no headers. Anything else takes the general path below.
_FAST_SIP_RE = re.compile(
    r"(sips?):(?:([A-Za-z0-9\-_.!~*'()&=+$,%]+)@)?"
    r"([A-Za-z0-9](?:[A-Za-z0-9\-.]*[A-Za-z0-9.])?)(?::(\d{1,5}))?"
    r"((?:;[A-Za-z0-9\-_.!~*'()%+]+(?:=[A-Za-z0-9\-_.!~*'()%+\[\]:]+)?)*)",
    re.IGNORECASE,
)


_RECENT: dict[str, SipUri] = {}
"""Recently parsed URI texts (the same AoRs, contacts and Request-URIs come back in
every REGISTER pair and refresh); parse_uri hands out copies, these stay private."""
_RECENT_MAX = 4096


def parse_uri(text: str) -> SipUri:
    """Parse a URI; unknown schemes are kept opaque. Raises SipSyntaxError."""
    known = _RECENT.get(text)
    if known is not None:
        return known.copy()
    uri = _parse_uri(text)
    if len(_RECENT) >= _RECENT_MAX:
        _RECENT.clear()
    _RECENT[text] = uri.copy()
    return uri


def _parse_uri(text: str) -> SipUri:
    m = _FAST_SIP_RE.fullmatch(text)
    if m is not None:
        port_text = m.group(4)
        port = int(port_text) if port_text is not None else None
        if port is None or port <= 65535:
            ptext = m.group(5)
            params: list[tuple[str, str | None]] = []
            if ptext:
                for part in ptext[1:].split(";"):
                    key, sep, value = part.partition("=")
                    params.append((key, value if sep else None))
            return SipUri(m.group(1).lower(), m.group(3), m.group(2), None, port, params)
    return _parse_uri_general(text)


def _parse_uri_general(text: str) -> SipUri:
    scheme, sep, rest = text.partition(":")
    if not sep or not _SCHEME_RE.fullmatch(scheme):
        raise SipSyntaxError(f"bad URI {text!r}")
    if _FORBIDDEN.search(rest):
        raise SipSyntaxError(f"illegal character in URI {text!r}")
    scheme = scheme.lower()
    if scheme == "tel":
        number, _, ptext = rest.partition(";")
        if not number:
            raise SipSyntaxError(f"bad tel URI {text!r}")
        return SipUri("tel", user=number, params=_split_params(ptext))
    if scheme not in ("sip", "sips"):
        if not rest:
            raise SipSyntaxError(f"bad URI {text!r}")
        return SipUri(scheme, opaque=rest)
    user = password = None
    at = rest.find("@")
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1 :]
        user, psep, pw = userinfo.partition(":")
        if not user:
            raise SipSyntaxError(f"empty user part in {text!r}")
        password = pw if psep else None
    headers: str | None = None
    qpos = rest.find("?")
    if qpos >= 0:
        rest, headers = rest[:qpos], rest[qpos + 1 :]
    hostport, _, ptext = rest.partition(";")
    if not hostport:
        raise SipSyntaxError(f"missing host in {text!r}")
    host, port = parse_host(hostport)
    return SipUri(scheme, host, user, password, port, _split_params(ptext), headers)


def _norm(value: str | None) -> str | None:
    return None if value is None else unescape(value).lower()


def uri_equal(a: SipUri, b: SipUri) -> bool:
    """URI equality per RFC 3261 §19.1.4."""
    if a.scheme != b.scheme:
        return False
    if a.opaque is not None or b.opaque is not None:
        return a.opaque == b.opaque
    if a.scheme == "tel":
        return (a.user or "").replace("-", "") == (b.user or "").replace("-", "") and _params_equal(
            a, b
        )
    if unescape(a.user or "") != unescape(b.user or ""):
        return False
    if unescape(a.password or "") != unescape(b.password or ""):
        return False
    if a.host.lower() != b.host.lower() or a.port != b.port:
        return False
    if not _params_equal(a, b):
        return False
    return _headers_of(a) == _headers_of(b)


def _params_equal(a: SipUri, b: SipUri) -> bool:
    pa = {unescape(k).lower(): _norm(v) for k, v in a.params}
    pb = {unescape(k).lower(): _norm(v) for k, v in b.params}
    for name in _STRICT_PARAMS:
        if pa.get(name, "\0") != pb.get(name, "\0"):
            return False
    return all(pa[name] == pb[name] for name in pa.keys() & pb.keys())


def _headers_of(uri: SipUri) -> dict[str, str]:
    if not uri.headers:
        return {}
    out: dict[str, str] = {}
    for part in uri.headers.split("&"):
        key, _, value = part.partition("=")
        out[unescape(key).lower()] = unescape(value)
    return out
