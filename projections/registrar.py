"""Registrar projection: AoR -> bindings, built only by applying log events.

``apply`` is a pure, deterministic function of (state, event): no clock, no
I/O. Expiry is therefore visible in two steps: :func:`lookup` hides bindings
whose ``expires_at`` has passed (it takes ``now``), and the binding leaves the
state when the sweeper's ``binding.expired`` event is applied.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from events import codec
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


_intern = sys.intern
_EMPTY: tuple[Any, ...] = ()
_ONE = 1.0
_replace = msgspec.structs.replace
_force = msgspec.structs.force_setattr


def _compact_own(b: Binding) -> Binding:
    """:func:`compact` done in place, on a binding nobody else holds (just decoded)."""
    params = b.params
    if params:
        _force(b, "params", tuple([(_intern(k), v if v is None or len(v) > 8 else _intern(v))
                                   for k, v in params]))
    if b.path.__class__ is not tuple:
        _force(b, "path", tuple(b.path) if b.path else _EMPTY)
    _force(b, "node", _intern(b.node))
    _force(b, "local", _intern(b.local))
    _force(b, "user_agent", _intern(b.user_agent))
    _force(b, "transport", _intern(b.transport))
    if b.q == 1.0:
        _force(b, "q", _ONE)
    return b


compact_decoded = _compact_own
""":func:`compact` in place, for a binding just decoded that nothing else holds."""


def compact(b: Binding) -> Binding:
    """The binding as the projection keeps it: values that repeat across bindings
    (node, listener, user agent, transport, parameter names, ``q`` 1.0) shared, ``path``
    and ``params`` as tuples (the shared ``()`` when empty). Every way into the state
    (apply, rebuild, snapshot) goes through here, so states compare equal.

    Sharing a string equal to the one held changes no value, so it is done in place
    (the binding stays equal, and hashes the same, as before); a binding built with
    lists for ``path``/``params`` is copied with tuples instead."""
    if b.path.__class__ is not tuple or b.params.__class__ is not tuple:
        b = _replace(b, path=tuple(b.path) if b.path else _EMPTY,
                     params=tuple(tuple(p) for p in b.params) if b.params else _EMPTY)
    return _compact_own(b)


def _store(state: RegistrarState, event: BindingAdded | BindingRefreshed,
           binding: Binding) -> str:
    aors = state.aors
    bindings = aors.get(event.aor)
    if bindings is None:
        bindings = aors[event.aor] = {}
    bindings.pop(binding.key, None)  # re-insert: arrival order = recency
    bindings[binding.key] = binding
    return "registered" if type(event) is BindingAdded else "refreshed"


def _put(state: RegistrarState, event: BindingAdded | BindingRefreshed) -> str:
    return _store(state, event, compact(event.binding))


def _put_as_decoded(state: RegistrarState, event: BindingAdded | BindingRefreshed) -> str:
    """:func:`_put` without :func:`compact` (see :func:`apply_uncompacted`)."""
    return _store(state, event, event.binding)


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


_APPLY_AS_DECODED = {BindingAdded: _put_as_decoded, BindingRefreshed: _put_as_decoded,
                     BindingRemoved: _drop, BindingExpired: _drop}


def apply_uncompacted(state: RegistrarState, event: Event) -> str | None:
    """:func:`apply` keeping bindings as given; for a bulk replay that then calls
    :func:`compact_state` once (cheaper than compacting each binding it will drop)."""
    fn = _APPLY_AS_DECODED.get(type(event))
    return fn(state, event) if fn is not None else None  # type: ignore[operator]


def compact_state(state: RegistrarState) -> None:
    """:func:`compact` every binding of ``state`` (in place)."""
    for bindings in state.aors.values():
        for key, b in bindings.items():
            c = compact(b)
            if c is not b:
                bindings[key] = c


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



# ----------------------------------------------------------------------- fast rebuild

OnBad = Callable[[int, int, str], None]
"""Called with (partition, offset, reason) for a record that does not decode; raises
to stop, returns to skip the record."""


def rebuild_pays(state: RegistrarState, records: int) -> bool:
    """Whether :class:`Rebuild` beats applying every event for ``records`` records on
    top of ``state``: it decodes each record slimly, then the survivors in full, so it
    wins when records supersede one another (a long history), not for a short tail
    on top of a snapshot where most records leave a binding of their own."""
    return records >= FAST_REBUILD_MIN and (not state.aors or records >= 4 * len(state.aors))


FAST_REBUILD_MIN = 50_000
"""Fewer records than this are applied one by one (the difference is small then)."""


class NeedFullRebuild(Exception):
    """A record that won (its binding is live at the end) does not decode in full:
    only a rebuild through :func:`apply` reports it as the log's policy says."""


class Rebuild:
    """Replays stored payloads into a :class:`RegistrarState` faster than decoding
    every event and calling :func:`apply`, with the same result.

    Each record is decoded slimly (type, AoR, binding key, expiry: what decides which
    binding survives); a binding's full payload is decoded only if it is still there
    at the end (:meth:`finish`). Events of other projections are decoded in full and
    handed to ``on_other`` in log order. The given state is left alone until
    :meth:`finish` (so a :class:`NeedFullRebuild` leaves it as it was).
    """

    def __init__(self, state: RegistrarState, on_other: Callable[[Any], object],
                 on_bad: OnBad) -> None:
        self.state = state
        self.aors: dict[str, dict[str, Any]] = {a: dict(d) for a, d in state.aors.items()}
        """AoR -> key -> the stored payload of its binding, or a decoded Binding."""
        self.position: dict[int, int] = {}
        self.on_other = on_other
        self.on_bad = on_bad
        self.count = 0
        """Records fed, skipped ones included (see ``skipped``)."""
        self.skipped = 0
        """Records that did not decode and that ``on_bad`` let pass."""
        self.last_ts: float | None = None
        """Newest event time fed (of the records that decoded)."""

    def feed(self, partition: int, offsets: range | list[int], payloads: list[bytes]) -> None:
        """Apply the records at ``offsets`` (ascending, one per payload) of ``partition``."""
        n = len(payloads)
        if not n:
            return
        dec = codec._slim_decoder.decode
        aors = self.aors
        added, refreshed, removed, expired = (
            codec.SlimAdded, codec.SlimRefreshed, codec.SlimRemoved, codec.SlimExpired)
        last_ts = self.last_ts if self.last_ts is not None else float("-inf")
        i = 0
        good_last = -1  # the last record applied (not skipped as undecodable)
        while i < n:
            run_start = i
            try:
                for payload in (payloads if i == 0 else payloads[i:]):
                    ev = dec(payload)
                    if ev.ts > last_ts:
                        last_ts = ev.ts
                    t = type(ev)
                    if t is refreshed or t is added:
                        b = ev.binding
                        d = aors.get(ev.aor)
                        if d is None:
                            aors[ev.aor] = {b.key: payload}
                        else:
                            k = b.key
                            if k in d:
                                del d[k]  # re-insert: arrival order = recency
                            d[k] = payload
                    elif t is removed:
                        d = aors.get(ev.aor)
                        if d is not None and ev.key in d:
                            del d[ev.key]
                            if not d:
                                del aors[ev.aor]
                    elif t is expired:
                        d = aors.get(ev.aor)
                        cur = d.get(ev.key) if d is not None else None
                        if cur is not None and ev.expires_at == (
                                _expiry(cur) if type(cur) is bytes else cur.expires_at):
                            del d[ev.key]  # type: ignore[union-attr]
                            if not d:
                                del aors[ev.aor]
                    else:
                        self._other(partition, offsets[i], payload)
                    i += 1
                good_last = i - 1
            except msgspec.DecodeError:
                if i > run_start:
                    good_last = i - 1
                if self._slowly(partition, offsets[i], payloads[i]):
                    good_last = i
                i += 1
        if last_ts != float("-inf"):
            self.last_ts = last_ts
        if good_last >= 0:
            self.position[partition] = offsets[good_last] + 1
        self.count += n

    def _other(self, partition: int, offset: int, payload: bytes) -> None:
        try:
            event = codec.decode(payload)
        except codec.EventDecodeError as exc:
            self.on_bad(partition, offset, f"undecodable payload: {exc}")
            self.skipped += 1
            return
        self.on_other(event)

    def _slowly(self, partition: int, offset: int, payload: bytes) -> bool:
        """A record the slim decoder refused: decode it in full (or report it)."""
        try:
            event = codec.decode(payload)
        except codec.EventDecodeError as exc:
            self.on_bad(partition, offset, f"undecodable payload: {exc}")
            self.skipped += 1
            return False
        if self.last_ts is None or event.ts > self.last_ts:
            self.last_ts = event.ts
        t = type(event)
        if t is BindingAdded or t is BindingRefreshed:
            b = compact(event.binding)  # type: ignore[union-attr]
            d = self.aors.setdefault(event.aor, {})  # type: ignore[union-attr]
            d.pop(b.key, None)
            d[b.key] = b
        elif t is BindingRemoved or t is BindingExpired:
            d = self.aors.get(event.aor)  # type: ignore[union-attr]
            cur = d.get(event.key) if d else None  # type: ignore[union-attr]
            if cur is not None and (t is BindingRemoved or event.expires_at == (  # type: ignore
                    _expiry(cur) if type(cur) is bytes else cur.expires_at)):
                del d[event.key]  # type: ignore[index, union-attr]
                if not d:
                    del self.aors[event.aor]  # type: ignore[union-attr]
        else:
            self.on_other(event)
        return True

    def finish(self) -> RegistrarState:
        """Decode the surviving bindings and install them (and the position) in the
        state; raises :class:`NeedFullRebuild` (state untouched) if one does not decode.

        The dicts and key strings built while replaying become the state's (only the
        payloads are replaced, in place): freeing them and allocating new ones would
        leave holes all over the heap that the process keeps (RSS)."""
        pending: list[tuple[str, dict[str, Any], str, bytes]] = []
        for aor, d in self.aors.items():
            for key, e in d.items():
                if type(e) is bytes:
                    pending.append((aor, d, key, e))
                    if len(pending) >= _FINISH_CHUNK:
                        _install(pending)
        _install(pending)
        state = self.state
        state.aors = self.aors
        state.position.update(self.position)
        self.aors = {}
        return state


def _expiry(payload: bytes) -> float:
    """``expires_at`` of a stored binding.added/refreshed record (already slim-decoded
    once, so it decodes)."""
    return float(codec._slim_decoder.decode(payload).binding.expires_at)


_FINISH_CHUNK = 2_000


def _install(pending: list[tuple[str, dict[str, Any], str, bytes]]) -> None:
    """Decode a chunk of surviving payloads and put their bindings in place (small
    chunks: the decoded events' other parts are freed and reused right away)."""
    if not pending:
        return
    try:
        events = codec.decode_array(b"[" + b",".join([p for _, _, _, p in pending]) + b"]")
    except codec.EventDecodeError as exc:
        raise NeedFullRebuild(str(exc)) from None
    if len(events) != len(pending):
        raise NeedFullRebuild("a stored payload is not one JSON value")
    put = (BindingAdded, BindingRefreshed)
    for (aor, d, key, _), ev in zip(pending, events, strict=True):
        if type(ev) not in put or ev.aor != aor or ev.binding.key != key:
            raise NeedFullRebuild(f"record of {aor} {key} decodes differently")
        b = ev.binding
        _force(b, "key", key)  # equal: share the dict's key string
        d[key] = _compact_own(b)
    pending.clear()
