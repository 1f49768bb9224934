"""Wire encoding of events (JSON via msgspec): one place for every backend."""

from __future__ import annotations

import msgspec

from events.schema import Event

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)


class EventDecodeError(ValueError):
    """A stored record is not a known, well-formed event."""


def encode(event: Event) -> bytes:
    """Serialise one event to its stored form."""
    return _encoder.encode(event)


def decode(data: bytes) -> Event:
    """Decode one stored record; raises :class:`EventDecodeError`."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise EventDecodeError(str(exc)) from exc
