"""The registrar's decision for one REGISTER (RFC 3261 §10.3), as pure code.

Given the AoR's current bindings (from the projection) and what the REGISTER
asks for, :func:`plan_register` returns either the events to append or the
error response to send. Nothing here touches the log or the clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from events.schema import Binding, BindingAdded, BindingRefreshed, BindingRemoved, Event
from siphon.registrar.aor import contact_key
from siphon.sip.headers import NameAddr, unquote_param


@dataclass(slots=True, frozen=True)
class Limits:
    default_expires: int = 3600
    min_expires: int = 60
    max_expires: int = 7200
    max_contacts: int = 10


@dataclass(slots=True)
class RegisterInput:
    """What a REGISTER asks for, already parsed."""

    aor: str
    contacts: list[NameAddr]
    expires_header: int | None
    call_id: str
    cseq: int
    source: str = ""
    transport: str = "udp"
    local: str = ""
    conn_id: str = ""
    user_agent: str = ""
    path: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Plan:
    """Outcome: ``events`` to append (then 200), or an error ``status``."""

    status: int = 200
    reason: str = "OK"
    events: list[Event] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)


def _out_of_order(existing: Binding, req: RegisterInput) -> bool:
    return existing.call_id == req.call_id and req.cseq <= existing.cseq


def plan_register(req: RegisterInput, current: dict[str, Binding], now: float, limits: Limits,
                  node: str) -> Plan:
    """Decide what a REGISTER does to ``current`` (the AoR's bindings by key)."""
    live = {k: b for k, b in current.items() if b.expires_at > now}
    if any(c.wildcard for c in req.contacts):
        if len(req.contacts) != 1 or req.expires_header != 0:
            return Plan(400, "Wildcard Contact requires Expires: 0 and no other Contact")
        if any(_out_of_order(b, req) for b in live.values()):
            return Plan(500, "Out of order CSeq")
        return Plan(events=[_removed(req, key, now, node) for key in live])

    wanted: dict[str, tuple[NameAddr, int, str, int]] = {}
    for contact in req.contacts:
        if not contact.uri.is_sip:
            return Plan(400, f"Unsupported Contact URI scheme {contact.uri.scheme}")
        expires = _requested_expires(contact, req.expires_header, limits.default_expires)
        if 0 < expires < limits.min_expires:
            return Plan(423, "Interval Too Brief",
                        headers=[("Min-Expires", str(limits.min_expires))])
        expires = min(expires, limits.max_expires)
        instance = unquote_param(contact.param("+sip.instance") or "")
        reg_id_text = contact.param("reg-id") or "0"
        reg_id = int(reg_id_text) if (reg_id_text.isascii() and reg_id_text.isdigit()) else 0
        wanted[contact_key(contact.uri, instance, reg_id)] = (contact, expires, instance, reg_id)

    events: list[Event] = []
    remaining = set(live)
    for key, (contact, expires, instance, reg_id) in wanted.items():
        existing = live.get(key)
        if existing is not None and _out_of_order(existing, req):
            return Plan(500, "Out of order CSeq")
        if expires == 0:
            if existing is not None:
                events.append(_removed(req, key, now, node))
                remaining.discard(key)
            continue
        binding = _binding(req, key, contact, expires, instance, reg_id, now, node)
        remaining.add(key)
        if existing is not None:
            events.append(BindingRefreshed(ts=now, node=node, aor=req.aor, binding=binding))
        else:
            events.append(BindingAdded(ts=now, node=node, aor=req.aor, binding=binding))
    if len(remaining) > limits.max_contacts:
        return Plan(403, f"Too Many Contacts (max {limits.max_contacts})")
    return Plan(events=events)


def _requested_expires(contact: NameAddr, header: int | None, default: int) -> int:
    text = contact.param("expires")
    if text is not None and (text.isascii() and text.isdigit()):
        return int(text)
    return header if header is not None else default


def _removed(req: RegisterInput, key: str, now: float, node: str) -> BindingRemoved:
    return BindingRemoved(
        ts=now, node=node, aor=req.aor, key=key, call_id=req.call_id, cseq=req.cseq,
        source=req.source, transport=req.transport, user_agent=req.user_agent,
    )


def _binding(req: RegisterInput, key: str, contact: NameAddr, expires: int, instance: str,
             reg_id: int, now: float, node: str) -> Binding:
    q = 1.0
    q_text = contact.param("q")
    if q_text:
        try:
            q = min(1.0, max(0.0, float(q_text)))
        except ValueError:
            q = 1.0
    params = tuple([(k, v) for k, v in contact.params if k.lower() not in ("expires", "q")])
    return Binding(
        key=key,
        uri=str(contact.uri),
        expires_at=now + expires,
        q=q,
        call_id=req.call_id,
        cseq=req.cseq,
        source=req.source,
        transport=req.transport,
        local=req.local,
        conn_id=req.conn_id,
        instance=instance,
        reg_id=reg_id,
        path=tuple(req.path),
        params=params,
        user_agent=req.user_agent,
        registered_at=now,
        node=node,
    )
