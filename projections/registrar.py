"""Registrar projection: AoR -> bindings, built only by applying log events.

``apply`` is a pure, deterministic function of (state, event): no clock, no
I/O. Expiry is therefore visible in two steps: :func:`lookup` hides bindings
whose ``expires_at`` has passed (it takes ``now``), and the binding leaves the
state when the sweeper's ``binding.expired`` event is applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from events.schema import (
    Binding,
    BindingAdded,
    BindingExpired,
    BindingRefreshed,
    BindingRemoved,
    Event,
)

CHANGE_TYPES = {
    BindingAdded: "registered",
    BindingRefreshed: "refreshed",
    BindingRemoved: "deregistered",
    BindingExpired: "expired",
}


@dataclass(slots=True)
class RegistrarState:
    """Every AoR's bindings (by binding key, in arrival order) and the log position."""

    aors: dict[str, dict[str, Binding]] = field(default_factory=dict)
    position: dict[int, int] = field(default_factory=dict)
    """Next offset to apply, per partition."""

    def binding_count(self) -> int:
        return sum(len(b) for b in self.aors.values())


def _put(state: RegistrarState, event: BindingAdded | BindingRefreshed) -> str:
    aors = state.aors
    bindings = aors.get(event.aor)
    if bindings is None:
        bindings = aors[event.aor] = {}
    binding = event.binding
    bindings.pop(binding.key, None)  # re-insert: arrival order = recency
    bindings[binding.key] = binding
    return "registered" if type(event) is BindingAdded else "refreshed"


def _drop(state: RegistrarState, event: BindingRemoved | BindingExpired) -> str | None:
    bindings = state.aors.get(event.aor)
    current = bindings.get(event.key) if bindings else None
    if current is None:
        return None
    if type(event) is BindingExpired and current.expires_at != event.expires_at:
        return None  # the binding was renewed after the sweeper saw it lapse
    del bindings[event.key]  # type: ignore[index]
    if not bindings:
        del state.aors[event.aor]
    return "deregistered" if type(event) is BindingRemoved else "expired"


_APPLY = {BindingAdded: _put, BindingRefreshed: _put, BindingRemoved: _drop,
          BindingExpired: _drop}


def apply(state: RegistrarState, event: Event) -> str | None:
    """Apply one event; returns its on_change type, or None if it changed nothing
    the registrar knows (another projection's event, or a removal of an unknown key)."""
    fn = _APPLY.get(type(event))
    return fn(state, event) if fn is not None else None  # type: ignore[operator]


def apply_record(state: RegistrarState, partition: int, offset: int, event: Event) -> str | None:
    """Apply an event read from the log and advance the position past it."""
    change = apply(state, event)
    state.position[partition] = offset + 1
    return change


def lookup(state: RegistrarState, aor: str, now: float) -> list[Binding]:
    """Live bindings of ``aor``: q descending, then most recently registered first."""
    bindings = state.aors.get(aor)
    if not bindings:
        return []
    # Newest arrival first, so equal (q, time) ties also favour the latest binding.
    live = [b for b in reversed(bindings.values()) if b.expires_at > now]
    live.sort(key=lambda b: (-b.q, -b.registered_at))
    return live


def expired(state: RegistrarState, now: float, limit: int = 10_000) -> list[tuple[str, Binding]]:
    """Bindings whose lifetime has ended but whose expiry event is not yet applied."""
    out: list[tuple[str, Binding]] = []
    for aor, bindings in state.aors.items():
        for binding in bindings.values():
            if binding.expires_at <= now:
                out.append((aor, binding))
                if len(out) >= limit:
                    return out
    return out


def binding_view(aor: str, b: Binding, at: float) -> dict[str, object]:
    """A binding as JSON-ready dict, as the admin API and the replay tools show it
    (remaining lifetime counted from ``at``)."""
    return {
        "aor": aor,
        "uri": b.uri,
        "q": b.q,
        "expires_remaining": max(0, int(b.expires_at - at)),
        "expires_at": b.expires_at,
        "source": b.source,
        "transport": b.transport,
        "instance": b.instance or None,
        "reg_id": b.reg_id or None,
        "path": list(b.path),
        "params": [[k, v] for k, v in b.params],
        "user_agent": b.user_agent,
        "call_id": b.call_id,
        "cseq": b.cseq,
        "node": b.node,
        "registered_at": b.registered_at,
    }

