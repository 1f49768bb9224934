"""Wire encoding of events (JSON via msgspec): one place for every backend.

Schema evolution: a released tag never changes; a new version of an event is a
new struct (``<kind>.v<N+1>``) and :func:`register_upcaster` maps the old tag to
a converter, applied on decode, so application code only ever sees the newest
version while years-old records keep decoding.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import msgspec

from events.schema import EVENT_TYPES, Event

Upcaster = Callable[[Any], Any]
"""Turns a decoded event of an old version into the next version."""

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(Event)
_array_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(list[Event])
_extra_types: list[type] = []
_upcasters: dict[type, Upcaster] = {}


class EventDecodeError(ValueError):
    """A stored record is not a known, well-formed event."""


def encode(event: Event) -> bytes:
    """Serialise one event to its stored form."""
    return _encoder.encode(event)


def _upcast(event: Any) -> Any:
    up = _upcasters.get(type(event))
    while up is not None:
        event = up(event)
        up = _upcasters.get(type(event))
    return event


def decode(data: bytes) -> Event:
    """Decode one stored record (upgraded to the newest version); raises
    :class:`EventDecodeError`."""
    try:
        event = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise EventDecodeError(str(exc)) from exc
    return _upcast(event) if _upcasters else event


def decode_array(data: bytes) -> list[Event]:
    """Decode a JSON array of stored records in one call (faster than one by one).

    Raises :class:`EventDecodeError` if any element is bad, without saying which:
    decode the elements one by one to find it.
    """
    try:
        events: list[Event] = _array_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise EventDecodeError(str(exc)) from exc
    if _upcasters:
        return [_upcast(e) for e in events]
    return events


def tag_of(cls: type) -> str:
    """The ``type`` tag a struct class is stored with."""
    return str(cls.__struct_config__.tag)  # type: ignore[attr-defined]


def _rebuild() -> None:
    global _decoder, _array_decoder
    types = (*EVENT_TYPES, *_extra_types)
    union: Any = functools.reduce(operator.or_, types)
    _decoder = msgspec.json.Decoder(union)
    _array_decoder = msgspec.json.Decoder(list[union])  # type: ignore[valid-type]


def register_upcaster(old_tag: str, upcast: Upcaster, *new_types: type) -> None:
    """From now on, events stored as ``old_tag`` are passed through ``upcast`` when
    decoded (chains apply: v1 -> v2 -> v3). ``new_types`` are the newer structs
    (the ones ``upcast`` returns, stored natively by newer writers) that the decoder
    must also know. The old struct stays decodable: its tag is never reused."""
    added = [t for t in new_types if t not in EVENT_TYPES and t not in _extra_types]
    _extra_types.extend(added)
    known = {tag_of(t): t for t in (*EVENT_TYPES, *_extra_types)}
    old = known.get(old_tag)
    if old is None:
        del _extra_types[len(_extra_types) - len(added):]
        raise ValueError(f"no event struct is tagged {old_tag!r}")
    _upcasters[old] = upcast
    if added:
        _rebuild()


def reset_upcasters() -> None:
    """Forget every registered upcaster and newer type (back to the released schema)."""
    _upcasters.clear()
    if _extra_types:
        _extra_types.clear()
        _rebuild()


# ---------------------------------------------------------------- slim (rebuild) decoding
#
# A rebuild only needs, of each binding event, its AoR, the binding key and expiry:
# which record's binding survives is decided on those, and only the survivors' full
# payloads are decoded at the end (``projections.registrar.Rebuild``). The slim
# structs below read the same stored JSON (unknown fields are skipped by msgspec);
# nothing about the stored format changes.


class SlimBinding(msgspec.Struct, gc=False):
    key: str
    expires_at: float


class _Slim(msgspec.Struct, tag_field="type", gc=False):
    ts: float


class SlimPut(_Slim):
    aor: str
    binding: SlimBinding


class SlimAdded(SlimPut, tag="binding.added.v1"):
    pass


class SlimRefreshed(SlimPut, tag="binding.refreshed.v1"):
    pass


class SlimRemoved(_Slim, tag="binding.removed.v1"):
    aor: str
    key: str


class SlimExpired(_Slim, tag="binding.expired.v1"):
    aor: str
    key: str
    expires_at: float


class SlimOther(_Slim):
    """An event of another projection (trunks): decoded in full when met."""


def _other(tag: str) -> type:
    return type(f"SlimOther_{tag.replace('.', '_')}", (SlimOther,), {}, tag=tag)


SLIM_OTHER_TYPES: tuple[type, ...] = tuple(
    _other(tag_of(t)) for t in EVENT_TYPES if tag_of(t) not in {
        "binding.added.v1", "binding.refreshed.v1", "binding.removed.v1",
        "binding.expired.v1"})
_slim_union: Any = functools.reduce(
    operator.or_, (SlimAdded, SlimRefreshed, SlimRemoved, SlimExpired, *SLIM_OTHER_TYPES))
_slim_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(_slim_union)
_slim_array_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(list[_slim_union])


def slim_usable() -> bool:
    """Whether slim decoding gives what a full decode would (no upcasters or newer
    event versions registered: those records need the full decoder)."""
    return not _upcasters and not _extra_types


def decode_slim(data: bytes) -> Any:
    """The slim view of one stored record; raises :class:`EventDecodeError`."""
    try:
        return _slim_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise EventDecodeError(str(exc)) from exc


def decode_slim_array(data: bytes) -> list[Any]:
    """Slim views of a JSON array of stored records (one call)."""
    try:
        return _slim_array_decoder.decode(data)  # type: ignore[no-any-return]
    except msgspec.DecodeError as exc:
        raise EventDecodeError(str(exc)) from exc
