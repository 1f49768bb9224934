"""SIP message model: headers, requests, responses and their wire form (pure code)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from siphon.sip.headers import (
    LIST_HEADERS,
    NameAddr,
    Via,
    canonical_name,
    parse_cseq,
    parse_name_addr,
    parse_via,
    split_list,
)
from siphon.sip.uri import SipUri, parse_uri

_TAG_RE = re.compile(r";\s*tag\s*=", re.IGNORECASE)

REASONS = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 200: "OK", 202: "Accepted", 300: "Multiple Choices",
    301: "Moved Permanently", 302: "Moved Temporarily", 305: "Use Proxy",
    380: "Alternative Service",
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    407: "Proxy Authentication Required", 408: "Request Timeout", 410: "Gone",
    413: "Request Entity Too Large", 414: "Request-URI Too Long", 415: "Unsupported Media Type",
    416: "Unsupported URI Scheme", 420: "Bad Extension", 421: "Extension Required",
    423: "Interval Too Brief", 430: "Flow Failed", 480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist", 482: "Loop Detected", 483: "Too Many Hops",
    484: "Address Incomplete", 485: "Ambiguous", 486: "Busy Here", 487: "Request Terminated",
    488: "Not Acceptable Here", 491: "Request Pending", 493: "Undecipherable",
    500: "Server Internal Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Server Time-out", 505: "Version Not Supported",
    513: "Message Too Large", 600: "Busy Everywhere", 603: "Decline",
    604: "Does Not Exist Anywhere", 606: "Not Acceptable",
}


_LOWER_CACHE: dict[str, str] = {}


_NAMES: dict[str, tuple[str, str]] = {}


def _names_of(name: str) -> tuple[str, str]:
    """(canonical, lower-case canonical) of a header name as written, cached."""
    full = canonical_name(name)
    known = (full, full.lower())
    if len(_NAMES) < 4096:
        _NAMES[name] = known
    return known


def _lname(name: str) -> str:
    """Lower-case full header name (compact forms expanded), cached."""
    lname = _LOWER_CACHE.get(name)
    if lname is None:
        lname = canonical_name(name).lower()
        if len(_LOWER_CACHE) < 4096:
            _LOWER_CACHE[name] = lname
    return lname


_NAME_ADDR_VIEWS = {n: "na:" + n for n in ("contact", "route", "record-route", "path")}
"""Keys of :meth:`Message.name_addrs` views in ``Headers.views`` (precomputed)."""


class Headers:
    """Ordered, case-insensitive multi-map of header fields.

    Values are kept as received (one entry per header line); list-valued
    headers are split on demand with :meth:`get_list`. ``views`` holds parsed
    forms of header values (see :class:`Message`), keyed by lower-case header
    name; a mutation of a header drops its view.
    """

    __slots__ = ("_items", "_lower", "views")

    def __init__(self, items: list[tuple[str, str]] | None = None) -> None:
        self.views: dict[str, Any] = {}
        if not items:
            self._items: list[tuple[str, str]] = []
            self._lower: list[str] = []
            return
        names = _NAMES
        try:
            known = [names[name] for name, _ in items]
        except KeyError:
            known = [names.get(name) or _names_of(name) for name, _ in items]
        self._items = [(k[0], item[1]) for k, item in zip(known, items, strict=True)]
        self._lower = [k[1] for k in known]

    @classmethod
    def _trusted(cls, items: list[tuple[str, str]], lower: list[str]) -> Headers:
        """Headers from canonical names and their lower-case forms (no checks)."""
        h = cls.__new__(cls)
        h._items = items
        h._lower = lower
        h.views = {}
        return h

    def _touch(self, lname: str) -> None:
        views = self.views
        if views:
            views.pop(lname, None)
            views.pop(_NAME_ADDR_VIEWS.get(lname) or "na:" + lname, None)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: str) -> bool:
        return (_LOWER_CACHE.get(name) or _lname(name)) in self._lower

    def get(self, name: str, default: str | None = None) -> str | None:
        """First value of ``name`` (case-insensitive, compact forms accepted)."""
        lname = _LOWER_CACHE.get(name) or _lname(name)
        lower = self._lower
        if lname in lower:
            return self._items[lower.index(lname)][1]
        return default

    def get_all(self, name: str) -> list[str]:
        """Every header line of ``name``, unsplit."""
        lname = _LOWER_CACHE.get(name) or _lname(name)
        lower = self._lower
        if lname not in lower:
            return []
        if lower.count(lname) == 1:
            return [self._items[lower.index(lname)][1]]
        return [item[1] for item, low in zip(self._items, lower, strict=True) if low == lname]

    def get_list(self, name: str) -> list[str]:
        """Every value of a list header, header lines and commas both split."""
        out: list[str] = []
        for value in self.get_all(name):
            out.extend(split_list(value))
        return out

    def lower_names(self) -> list[str]:
        """Lower-case full names of the header lines, in order."""
        return self._lower

    def count(self, name: str) -> int:
        return self._lower.count(_lname(name))

    def add(self, name: str, value: str, *, first: bool = False) -> None:
        known = _NAMES.get(name) or _names_of(name)
        if first:
            self._items.insert(0, (known[0], value))
            self._lower.insert(0, known[1])
        else:
            self._items.append((known[0], value))
            self._lower.append(known[1])
        self._touch(known[1])

    def insert_before(self, name: str, value: str) -> None:
        """Insert above the first existing ``name`` header (or append)."""
        lname = _lname(name)
        try:
            i = self._lower.index(lname)
        except ValueError:
            i = len(self._items)
        self._items.insert(i, (canonical_name(name), value))
        self._lower.insert(i, lname)
        self._touch(lname)

    def set(self, name: str, value: str) -> None:
        """Replace every ``name`` header by one with ``value`` (kept in place)."""
        lname = _lname(name)
        try:
            i = self._lower.index(lname)
        except ValueError:
            self.add(name, value)
            return
        self._items[i] = (canonical_name(name), value)
        for j in range(len(self._lower) - 1, i, -1):
            if self._lower[j] == lname:
                del self._items[j]
                del self._lower[j]
        self._touch(lname)

    def remove(self, name: str) -> None:
        lname = _lname(name)
        if lname not in self._lower:
            return
        keep = [k for k, low in enumerate(self._lower) if low != lname]
        self._items = [self._items[k] for k in keep]
        self._lower = [self._lower[k] for k in keep]
        self._touch(lname)

    def _first_index(self, name: str) -> int | None:
        try:
            return self._lower.index(_lname(name))
        except ValueError:
            return None

    def pop_first_value(self, name: str) -> str | None:
        """Remove and return the first value of a list header (e.g. the top Via)."""
        i = self._first_index(name)
        if i is None:
            return None
        n, v = self._items[i]
        values = split_list(v)
        if len(values) <= 1:
            del self._items[i]
            del self._lower[i]
        else:
            self._items[i] = (n, ", ".join(values[1:]))
        self._touch(_lname(name))
        return values[0] if values else None

    def replace_first_value(self, name: str, value: str) -> None:
        """Replace the first value of a list header in place (e.g. the top Via)."""
        i = self._first_index(name)
        if i is None:
            self.add(name, value)
            return
        n, v = self._items[i]
        self._items[i] = (n, ", ".join([value, *split_list(v)[1:]]))
        self._touch(_lname(name))

    def copy(self) -> Headers:
        h = Headers.__new__(Headers)
        h._items = list(self._items)
        h._lower = list(self._lower)
        h.views = {}
        return h

    def encode(self) -> str:
        return "".join([f"{n}: {v}\r\n" for n, v in self._items])


class Message:
    """Fields shared by requests and responses.

    Parsed views of the core headers (Vias, From, To, CSeq, Contacts) are
    computed once and kept in ``headers.views`` until that header changes.
    """

    __slots__ = ("body", "headers", "version")

    def __init__(self, headers: Headers | None = None, body: bytes = b"",
                 version: str = "SIP/2.0") -> None:
        self.headers = headers if headers is not None else Headers()
        self.body = body
        self.version = version

    @property
    def call_id(self) -> str:
        return self.headers.get("Call-ID", "") or ""

    @property
    def cseq(self) -> tuple[int, str]:
        headers = self.headers
        value = headers.views.get("cseq")
        if value is None:
            value = headers.views["cseq"] = parse_cseq(headers.get("CSeq", "") or "")
        return value  # type: ignore[no-any-return]

    @property
    def vias(self) -> list[Via]:
        headers = self.headers
        value = headers.views.get("via")
        if value is None:
            value = headers.views["via"] = [parse_via(v) for v in headers.get_list("Via")]
        return value  # type: ignore[no-any-return]

    @property
    def top_via(self) -> Via | None:
        vias = self.vias
        return vias[0] if vias else None

    @property
    def from_(self) -> NameAddr:
        headers = self.headers
        value = headers.views.get("from")
        if value is None:
            value = headers.views["from"] = parse_name_addr(headers.get("From", "") or "")
        return value  # type: ignore[no-any-return]

    @property
    def to(self) -> NameAddr:
        headers = self.headers
        value = headers.views.get("to")
        if value is None:
            value = headers.views["to"] = parse_name_addr(headers.get("To", "") or "")
        return value  # type: ignore[no-any-return]

    def name_addrs(self, name: str) -> list[NameAddr]:
        """Parsed values of a name-addr list header (Contact accepts ``*``)."""
        headers = self.headers
        lname = _LOWER_CACHE.get(name) or _lname(name)
        key = _NAME_ADDR_VIEWS.get(lname) or "na:" + lname  # not .to/.from_'s views
        value = headers.views.get(key)
        if value is None:
            wildcard = lname == "contact"
            value = headers.views[key] = [
                parse_name_addr(v, allow_wildcard=wildcard) for v in headers.get_list(name)]
        return value  # type: ignore[no-any-return]

    def _encode_with(self, start_line: str) -> bytes:
        self.headers.set("Content-Length", str(len(self.body)))
        return (start_line + "\r\n" + self.headers.encode() + "\r\n").encode(
            "utf-8", "surrogateescape"
        ) + self.body

    def is_list_header(self, name: str) -> bool:
        return canonical_name(name).lower() in LIST_HEADERS


class Request(Message):
    """A SIP request. ``uri`` is the Request-URI text; ``ruri`` its parsed form."""

    __slots__ = ("_ruri", "_ruri_of", "method", "uri")

    def __init__(self, method: str, uri: str, headers: Headers | None = None,
                 body: bytes = b"", version: str = "SIP/2.0") -> None:
        super().__init__(headers, body, version)
        self.method = method
        self.uri = uri
        self._ruri: SipUri | None = None
        self._ruri_of = ""
        """The ``uri`` text ``_ruri`` was parsed from (``uri`` may be reassigned)."""

    @property
    def ruri(self) -> SipUri:
        uri = self.uri
        if self._ruri is None or self._ruri_of != uri:
            self._ruri = parse_uri(uri)
            self._ruri_of = uri
        return self._ruri

    def set_uri(self, uri: SipUri | str) -> None:
        self.uri = str(uri)
        self._ruri = None

    def copy(self) -> Request:
        return Request(self.method, self.uri, self.headers.copy(), self.body, self.version)

    def encode(self) -> bytes:
        return self._encode_with(f"{self.method} {self.uri} {self.version}")

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri}>"


class Response(Message):
    """A SIP response."""

    __slots__ = ("reason", "status")

    def __init__(self, status: int, reason: str | None = None, headers: Headers | None = None,
                 body: bytes = b"", version: str = "SIP/2.0") -> None:
        super().__init__(headers, body, version)
        self.status = status
        self.reason = REASONS.get(status, "Unknown") if reason is None else reason

    def encode(self) -> bytes:
        return self._encode_with(f"{self.version} {self.status} {self.reason}")

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


_RESPONSE_COPY = frozenset(("via", "from", "call-id", "cseq"))


def make_response(request: Request, status: int, reason: str | None = None, *,
                  to_tag: str | None = None) -> Response:
    """A response to ``request`` with Via, From, To, Call-ID and CSeq copied (§8.2.6)."""
    items: list[tuple[str, str]] = []
    lower: list[str] = []
    copy = _RESPONSE_COPY
    for item, lname in zip(request.headers._items, request.headers._lower, strict=True):
        if lname in copy:
            items.append(item)
            lower.append(lname)
        elif lname == "to":
            value = item[1]
            if to_tag and status != 100 and not _TAG_RE.search(value):
                item = (item[0], f"{value};tag={to_tag}")
            items.append(item)
            lower.append(lname)
    return Response(status, reason, Headers._trusted(items, lower))
