"""``proxy``, ``registrar``, ``auth`` and ``log``: what ``from siphon import ...`` gives scripts.

The namespaces are process-wide singletons; the server binds them to its
runtime (registrar service, auth service, domains) before loading a script.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from siphon.auth.digest import AuthStatus
from siphon.auth.service import AuthService
from siphon.registrar.aor import normalize_aor
from siphon.registrar.service import Registrar
from siphon.script import registry as reg
from siphon.script.contact import Contact
from siphon.script.request import Action, ScriptRequest
from siphon.sip.errors import SipSyntaxError
from siphon.trunks import TrunkService

_script_log = logging.getLogger("siphon.script")


class Runtime(Protocol):
    registrar: Registrar
    trunk_service: TrunkService
    auth: AuthService
    node: str
    started_at: float
    realm: str

    def clock(self) -> float: ...


_runtime: Runtime | None = None
_background: set[asyncio.Task[Any]] = set()


def bind(runtime: Runtime | None) -> None:
    """Attach the namespaces to a running server (None detaches)."""
    global _runtime
    _runtime = runtime


def _rt() -> Runtime:
    if _runtime is None:
        raise RuntimeError("siphon runtime is not running (scripts run inside `siphon run`)")
    return _runtime


def contacts_of(aor: str) -> list[Contact]:
    """Script-facing live contacts of an AoR, best first."""
    rt = _rt()
    now = rt.clock()
    return [
        Contact(aor, b, now, b.node == rt.node and b.registered_at >= rt.started_at)
        for b in rt.registrar.lookup(aor)
    ]


class ProxyNamespace:
    """``@proxy.on_request`` and friends."""

    def on_request(self, arg: Any = None) -> Any:
        """Register a request handler: bare, ``on_request()`` or ``on_request("INVITE|BYE")``."""
        if callable(arg):
            reg.registry.on_request.append(reg.Handler(arg))
            return arg
        if arg is not None and not isinstance(arg, str):
            raise TypeError("proxy.on_request takes a method filter string or a function")
        methods = frozenset(m for m in arg.split("|") if m) if arg else None

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            reg.registry.on_request.append(reg.Handler(fn, methods))
            return fn

        return decorate


class RegistrarNamespace:
    """``registrar.save``, ``lookup``, ``on_change``..."""

    def on_change(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Register ``fn(aor, event_type, contacts)``, called for every binding event."""
        if not callable(fn):
            raise TypeError("registrar.on_change is a bare decorator")
        reg.registry.on_change.append(reg.Handler(fn))
        return fn

    def save(self, request: ScriptRequest, force: bool = False, aliases: Any = None,
             flow_token: Any = None) -> bool:
        """Store the REGISTER's bindings; siphon sends the 200 OK (or the error) itself."""
        if request.method != "REGISTER":
            raise ValueError(f"registrar.save needs a REGISTER, got {request.method}")
        request.action = Action("save")
        return True

    def lookup(self, uri: Any) -> list[Contact]:
        """Live contacts of the AoR of ``uri`` ordered by q, then recency."""
        try:
            aor = normalize_aor(uri)
        except SipSyntaxError:
            return []
        return contacts_of(aor)

    def is_registered(self, uri: Any) -> bool:
        return bool(self.lookup(uri))

    def remove(self, uri: Any) -> None:
        """Remove every binding of the AoR (appends removal events)."""
        aor = normalize_aor(uri)
        task = asyncio.get_running_loop().create_task(_rt().registrar.remove_aor(aor, "script"))
        _background.add(task)
        task.add_done_callback(_background.discard)

    expire = remove

    async def aor_count(self) -> int:
        return len(_rt().registrar.state.aors)


class AuthNamespace:
    """Digest authentication helpers."""

    def _require(self, request: ScriptRequest, realm: str | None, password: str | None,
                 ha1: str | None, proxy: bool) -> bool:
        if password is not None and ha1 is not None:
            raise ValueError("give either password= or ha1=, not both")
        rt = _rt()
        realm = realm or rt.realm
        result = rt.auth.check(request.msg, realm, proxy, ha1=ha1, password=password)
        if result.ok:
            request.auth_user = result.username
            request.msg.headers.remove("Authorization")
            request.msg.headers.remove("Proxy-Authorization")
            return True
        stale = result.status is AuthStatus.STALE
        request.reply_headers = [
            (n, v) for n, v in request.reply_headers
            if n.lower() not in ("www-authenticate", "proxy-authenticate")
        ]
        request.reply_headers.extend(rt.auth.challenge_headers(realm, stale, proxy))
        if proxy:
            request.action = Action("reply", 407, "Proxy Authentication Required")
        else:
            request.action = Action("reply", 401, "Unauthorized")
        return False

    def require_digest(self, request: ScriptRequest, realm: str | None = None,
                       password: str | None = None, ha1: str | None = None) -> bool:
        """True when the request carries valid credentials; otherwise arms a 401
        challenge (``stale=true`` for an expired nonce) and returns False."""
        return self._require(request, realm, password, ha1, proxy=False)

    require_www_digest = require_digest

    def require_proxy_digest(self, request: ScriptRequest, realm: str | None = None,
                             password: str | None = None, ha1: str | None = None) -> bool:
        """Like :meth:`require_digest` with 407 / Proxy-Authenticate."""
        return self._require(request, realm, password, ha1, proxy=True)

    def verify_digest(self, request: ScriptRequest, realm: str | None = None,
                      password: str | None = None, ha1: str | None = None) -> bool:
        """Check credentials without arming any reply."""
        rt = _rt()
        return rt.auth.check(request.msg, realm or rt.realm, ha1=ha1, password=password).ok


class LogNamespace:
    """Script logging into the server log (logger ``siphon.script``)."""

    def _emit(self, level: int, msg: object) -> None:
        if not isinstance(msg, str):
            raise TypeError(f"log messages must be str, got {type(msg).__name__}")
        _script_log.log(level, msg)

    def debug(self, msg: str) -> None:
        self._emit(logging.DEBUG, msg)

    def info(self, msg: str) -> None:
        self._emit(logging.INFO, msg)

    def warning(self, msg: str) -> None:
        self._emit(logging.WARNING, msg)

    warn = warning

    def error(self, msg: str) -> None:
        self._emit(logging.ERROR, msg)


class TrunksNamespace:
    """The built-in trunk registry as scripts see it (state from the log)."""

    def get(self, trunk_id: str) -> dict[str, Any] | None:
        """The record of a live trunk (``sip_uri``, ``transport``, ``enabled``...)."""
        return _rt().trunk_service.view(trunk_id)

    def live(self, enabled: bool | None = None, transport: str | None = None) -> list[
            dict[str, Any]]:
        """Live trunks, optionally only enabled ones / one transport, ordered by id."""
        return _rt().trunk_service.live(enabled=enabled, transport=transport)

    def on_change(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Register ``fn(trunk_id, event_type, trunk)``; event types: registered,
        heartbeat, deregistered, expired; ``trunk`` is the live record or None."""
        if not callable(fn):
            raise TypeError("trunks.on_change is a bare decorator")
        reg.registry.trunk_on_change.append(reg.Handler(fn))
        return fn


proxy = ProxyNamespace()
trunks = TrunksNamespace()
registrar = RegistrarNamespace()
auth = AuthNamespace()
log = LogNamespace()
