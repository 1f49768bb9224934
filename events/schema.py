"""Versioned event schema: the only truth siphon keeps.

Every event is a msgspec struct tagged with ``<kind>.v<N>``. A tag, once
released, is never changed nor removed: replay reads years of history, so a
new version of an event gets a new struct (and an upcaster in
``events.codec``), the old one stays decodable.
"""

from __future__ import annotations

import msgspec


class Binding(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """One registered contact as recorded in a binding event."""

    key: str
    """Identity of the binding inside its AoR: ``+sip.instance`` (plus
    ``reg-id``) when the UA sent one, else the normalised Contact URI."""
    uri: str
    """Contact URI exactly as registered (with its URI parameters)."""
    expires_at: float
    """Absolute expiry, Unix seconds."""
    q: float = 1.0
    call_id: str = ""
    cseq: int = 0
    source: str = ""
    """Packet source of the REGISTER, ``ip:port``."""
    transport: str = "udp"
    """Arrival transport, lower case."""
    local: str = ""
    """Local listener address the REGISTER arrived on, ``ip:port``."""
    conn_id: str = ""
    """Stream connection the REGISTER came over (empty for UDP)."""
    instance: str = ""
    reg_id: int = 0
    path: tuple[str, ...] = ()
    params: tuple[tuple[str, str | None], ...] = ()
    """Contact header parameters other than expires and q. (Stored as JSON arrays;
    tuples in memory: smaller, and the empty one is shared.)"""
    user_agent: str = ""
    registered_at: float = 0.0
    """When this binding was created or last refreshed, Unix seconds."""
    node: str = ""
    """Node that accepted the REGISTER (and holds its flow)."""


class _Event(msgspec.Struct, frozen=True, tag_field="type", omit_defaults=True, gc=False):
    ts: float
    """When the event was produced, Unix seconds."""
    node: str
    """Node id of the producer."""


class BindingAdded(_Event, tag="binding.added.v1"):
    """A new binding for an AoR (``registered``)."""

    aor: str
    binding: Binding


class BindingRefreshed(_Event, tag="binding.refreshed.v1"):
    """An existing binding (same key) re-registered (``refreshed``)."""

    aor: str
    binding: Binding


class BindingRemoved(_Event, tag="binding.removed.v1"):
    """A binding removed by Expires 0, ``*``, admin DELETE (``deregistered``)."""

    aor: str
    key: str
    reason: str = "deregistered"
    """``deregistered`` (by the UA), ``admin`` or ``replaced``."""
    call_id: str = ""
    cseq: int = 0
    source: str = ""
    transport: str = ""
    user_agent: str = ""


class BindingExpired(_Event, tag="binding.expired.v1"):
    """A binding whose lifetime ran out, appended by the expiry sweeper."""

    aor: str
    key: str
    expires_at: float


RegistrarEvent = BindingAdded | BindingRefreshed | BindingRemoved | BindingExpired


class Trunk(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """A SIP trunk as registered over the trunk registry's REST API."""

    sip_uri: str
    transport: str = "udp"
    enabled: bool = True
    attributes: dict[str, object] = msgspec.field(default_factory=dict)
    """Other fields of the registered JSON record (e.g. ``max_channels``), kept as given."""


class TrunkRegistered(_Event, tag="trunk.registered.v1"):
    """A trunk registered or replaced (PUT); its lease starts now."""

    trunk_id: str
    trunk: Trunk
    lease_expires_at: float
    replaced: bool = False


class TrunkHeartbeat(_Event, tag="trunk.heartbeat.v1"):
    """A heartbeat that moved the trunk's lease (see ``siphon.trunks`` on thinning)."""

    trunk_id: str
    lease_expires_at: float


class TrunkDeregistered(_Event, tag="trunk.deregistered.v1"):
    """A trunk removed over the API (DELETE)."""

    trunk_id: str


class TrunkExpired(_Event, tag="trunk.expired.v1"):
    """A trunk whose lease ran out without a heartbeat, appended by the sweeper."""

    trunk_id: str
    lease_expires_at: float


TrunkEvent = TrunkRegistered | TrunkHeartbeat | TrunkDeregistered | TrunkExpired

Event = RegistrarEvent | TrunkEvent
"""Union of every event type the log may hold."""

EVENT_TYPES: tuple[type, ...] = (
    BindingAdded, BindingRefreshed, BindingRemoved, BindingExpired,
    TrunkRegistered, TrunkHeartbeat, TrunkDeregistered, TrunkExpired,
)
TRUNK_EVENT_TYPES: tuple[type, ...] = (
    TrunkRegistered, TrunkHeartbeat, TrunkDeregistered, TrunkExpired)


def event_key(event: Event) -> str:
    """Partitioning key: events with the same key keep their relative order (an AoR,
    or ``trunk:<id>``)."""
    if isinstance(event, TRUNK_EVENT_TYPES):
        return f"trunk:{event.trunk_id}"
    return event.aor  # type: ignore[union-attr]
