"""Trunk registry projection: trunk id -> trunk and lease, built only from log events.

Like the registrar projection, ``apply`` is pure and deterministic; liveness at
a given time is asked with ``now`` (a lease that ran out is not live even
before the sweeper's ``trunk.expired`` event removes it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from events.schema import (
    Event,
    Trunk,
    TrunkDeregistered,
    TrunkExpired,
    TrunkHeartbeat,
    TrunkRegistered,
)

TRUNK_CHANGES = {
    TrunkRegistered: "registered",
    TrunkHeartbeat: "heartbeat",
    TrunkDeregistered: "deregistered",
    TrunkExpired: "expired",
}


@dataclass(slots=True)
class TrunkEntry:
    trunk: Trunk
    lease_expires_at: float
    registered_at: float
    last_heartbeat: float
    """Time of the last heartbeat recorded in the log (or the registration)."""


@dataclass(slots=True)
class TrunkState:
    trunks: dict[str, TrunkEntry] = field(default_factory=dict)


def apply(state: TrunkState, event: Event) -> str | None:
    """Apply one event; returns its change type, or None when it changes nothing here."""
    if isinstance(event, TrunkRegistered):
        state.trunks[event.trunk_id] = TrunkEntry(event.trunk, event.lease_expires_at, event.ts,
                                                  event.ts)
        return "registered"
    if isinstance(event, TrunkHeartbeat):
        entry = state.trunks.get(event.trunk_id)
        if entry is None:
            return None
        entry.lease_expires_at = max(entry.lease_expires_at, event.lease_expires_at)
        entry.last_heartbeat = event.ts
        return "heartbeat"
    if isinstance(event, TrunkDeregistered):
        return "deregistered" if state.trunks.pop(event.trunk_id, None) is not None else None
    if isinstance(event, TrunkExpired):
        entry = state.trunks.get(event.trunk_id)
        if entry is None or entry.lease_expires_at != event.lease_expires_at:
            return None  # renewed after the sweeper saw it lapse
        del state.trunks[event.trunk_id]
        return "expired"
    return None


def is_live(entry: TrunkEntry, now: float) -> bool:
    return entry.lease_expires_at > now


def live(state: TrunkState, now: float, *, enabled: bool | None = None,
         transport: str | None = None) -> list[tuple[str, TrunkEntry]]:
    """Live trunks, optionally filtered, ordered by id."""
    out = []
    for trunk_id in sorted(state.trunks):
        entry = state.trunks[trunk_id]
        if not is_live(entry, now):
            continue
        if enabled is not None and entry.trunk.enabled != enabled:
            continue
        if transport is not None and entry.trunk.transport != transport:
            continue
        out.append((trunk_id, entry))
    return out


def lapsed(state: TrunkState, now: float) -> list[tuple[str, TrunkEntry]]:
    """Trunks whose lease ran out but whose expiry event is not applied yet."""
    return [(tid, e) for tid, e in state.trunks.items() if not is_live(e, now)]
