"""The request object scripts receive in ``@proxy.on_request`` handlers.

Scripts do not send anything themselves: ``reply``, ``registrar.save``,
``relay`` and ``fork`` fill one action slot (last call wins) that the core
carries out once the handlers have returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from siphon.proxy.routing import Identity, loose_route
from siphon.sip.errors import SipSyntaxError
from siphon.sip.headers import parse_name_addr
from siphon.sip.message import Request
from siphon.sip.uri import SipUri, parse_uri


@dataclass(slots=True)
class Source:
    """Where a message came from and over what."""

    transport: str
    """Lower case: udp, tcp, ws..."""
    remote: tuple[str, int]
    local: tuple[str, int]
    conn_id: str = ""

    @property
    def remote_text(self) -> str:
        host, port = self.remote
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def local_text(self) -> str:
        host, port = self.local
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(slots=True)
class Action:
    kind: str
    """``reply``, ``save``, ``relay`` or ``fork``."""
    code: int = 0
    reason: str | None = None
    targets: list[Any] = field(default_factory=list)
    next_hop: str | None = None


class ScriptUri:
    """A copy of a URI as scripts see it (``is_local`` against ``domain.local``)."""

    __slots__ = ("_uri", "is_local")

    def __init__(self, uri: SipUri, local_domains: frozenset[str]) -> None:
        self._uri = uri
        self.is_local = uri.host.lower() in local_domains

    def __getattr__(self, name: str) -> Any:
        return getattr(self._uri, name)

    @property
    def params(self) -> dict[str, str]:
        return {k: "" if v is None else v for k, v in self._uri.params}

    @property
    def sip_uri(self) -> SipUri:
        return self._uri

    def __str__(self) -> str:
        return str(self._uri)

    def __repr__(self) -> str:
        return f"<SipUri {self._uri}>"


class ScriptRequest:
    """A SIP request as handed to ``@proxy.on_request`` handlers."""

    def __init__(self, msg: Request, source: Source, local_domains: frozenset[str],
                 identity: Identity | None = None) -> None:
        self.msg = msg
        self._identity = identity
        self.source = source
        self._domains = local_domains
        self.action: Action | None = None
        self.reply_headers: list[tuple[str, str]] = []
        self.reply_body: tuple[bytes, str] | None = None
        self.auth_user: str | None = None
        self.record_routed = False
        self.consumed_routes: list[str] = []

    # ---- read-only views -------------------------------------------------------
    @property
    def method(self) -> str:
        return self.msg.method

    @property
    def ruri(self) -> ScriptUri:
        return ScriptUri(self.msg.ruri.copy(), self._domains)

    @ruri.setter
    def ruri(self, value: object) -> None:
        try:
            uri = value.sip_uri if isinstance(value, ScriptUri) else parse_uri(str(value))
        except SipSyntaxError as exc:
            raise ValueError(f"invalid Request-URI {value!r}: {exc.reason}") from None
        self.msg.set_uri(uri)

    def _name_addr_uri(self, name: str) -> ScriptUri | None:
        try:
            return ScriptUri(parse_name_addr(self.msg.headers.get(name) or "").uri, frozenset())
        except SipSyntaxError:
            return None

    @property
    def from_uri(self) -> ScriptUri | None:
        return self._name_addr_uri("From")

    @property
    def to_uri(self) -> ScriptUri | None:
        return self._name_addr_uri("To")

    @property
    def from_tag(self) -> str | None:
        return self.msg.from_.tag

    @property
    def to_tag(self) -> str | None:
        return self.msg.to.tag

    @property
    def in_dialog(self) -> bool:
        return bool(self.from_tag) and bool(self.to_tag)

    @property
    def call_id(self) -> str:
        return self.msg.call_id

    @property
    def cseq(self) -> tuple[int, str]:
        return self.msg.cseq

    @property
    def max_forwards(self) -> int:
        value = self.msg.headers.get("Max-Forwards")
        return int(value) if value and (value.strip().isascii() and value.strip().isdigit()) else 70

    @property
    def body(self) -> bytes | None:
        return self.msg.body or None

    @property
    def content_type(self) -> str | None:
        return self.msg.headers.get("Content-Type")

    @property
    def transport(self) -> str:
        return self.source.transport

    @property
    def source_ip(self) -> str:
        return self.source.remote[0]

    @property
    def source_port(self) -> int:
        return self.source.remote[1]

    @property
    def user_agent(self) -> str | None:
        return self.msg.headers.get("User-Agent")

    @property
    def event(self) -> str | None:
        return self.msg.headers.get("Event")

    @property
    def contact_expires(self) -> int | None:
        contacts = self.msg.headers.get_list("Contact")
        if contacts:
            try:
                value = parse_name_addr(contacts[0], allow_wildcard=True).param("expires")
            except SipSyntaxError:
                value = None
            if value is not None and (value.isascii() and value.isdigit()):
                return int(value)
        expires = self.msg.headers.get("Expires")
        text = (expires or "").strip()
        return int(text) if text.isascii() and text.isdigit() else None

    # ---- headers -----------------------------------------------------------------
    def get_header(self, name: str) -> str | None:
        return self.msg.headers.get(name)

    header = get_header

    def has_header(self, name: str) -> bool:
        return name in self.msg.headers

    def set_header(self, name: str, value: str) -> None:
        self.msg.headers.set(name, str(value))

    def remove_header(self, name: str) -> None:
        self.msg.headers.remove(name)

    def set_reply_header(self, name: str, value: str) -> None:
        lname = name.lower()
        self.reply_headers = [(n, v) for n, v in self.reply_headers if n.lower() != lname]
        self.reply_headers.append((name, str(value)))

    def add_reply_header(self, name: str, value: str) -> None:
        self.reply_headers.append((name, str(value)))

    def set_reply_body(self, body: bytes | str, content_type: str) -> None:
        self.reply_body = (body.encode() if isinstance(body, str) else body, content_type)

    # ---- actions -----------------------------------------------------------------
    def reply(self, code: int, reason: str | None = None, reliable: bool = False) -> None:
        """Answer the request with ``code`` once the handlers return."""
        if not isinstance(code, int) or not 100 <= code <= 699:
            raise ValueError(f"reply code must be an int in 100..699, got {code!r}")
        self.action = Action("reply", code, reason)

    def fix_nated_register(self) -> None:
        """Add ``received``/``rport`` with the packet source to the top Via (RFC 3581)."""
        top = self.msg.top_via
        if top is None:
            return
        top.set_param("received", self.source.remote[0])
        top.set_param("rport", str(self.source.remote[1]))
        self.msg.headers.replace_first_value("Via", str(top))

    def record_route(self) -> None:
        self.record_routed = True

    def relay(self, next_hop: str | None = None, **_: Any) -> None:
        self.action = Action("relay", next_hop=next_hop)

    def fork(self, targets: list[Any], strategy: str = "parallel", **_: Any) -> None:
        self.action = Action("fork", targets=list(targets), reason=strategy)

    def loose_route(self) -> bool:
        """RFC 3261 §16.4: remove our own Route entries (and undo a strict router's
        rewrite). True when the request can be relayed: no Route at all, or routes
        remain / were consumed; False when there is no identity to compare with."""
        if self._identity is None:
            return not self.msg.headers.get_list("Route")
        ok, consumed = loose_route(self.msg, self._identity)
        self.consumed_routes.extend(consumed)
        return ok

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.msg.uri} from {self.source.remote_text}>"
