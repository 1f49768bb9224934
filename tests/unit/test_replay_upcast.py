"""Event schema evolution: a ``binding.added.v2`` (renamed + extra field) defined here,
an upcaster from v1 registered in events.codec; old records upgrade on read and a log
mixing both versions verifies."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import zlib
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from events import codec
from events.codec import EventDecodeError, decode, encode, register_upcaster, reset_upcasters
from events.embedded import EmbeddedLog
from events.schema import Binding, BindingAdded
from siphon.cli import main

T0 = 1_700_000_000.0
ALICE = "sip:alice@example.com"


class BindingAddedV2(msgspec.Struct, frozen=True, tag_field="type", tag="binding.added.v2",
                     omit_defaults=True):
    """v2: ``binding`` renamed ``contact``; new ``origin``."""

    ts: float
    node: str
    aor: str
    contact: Binding
    origin: str = "sip"


class BindingAddedV3(msgspec.Struct, frozen=True, tag_field="type", tag="binding.added.v3",
                     omit_defaults=True):
    """v3: ``origin`` became a list."""

    ts: float
    node: str
    aor: str
    contact: Binding
    origins: list[str] = msgspec.field(default_factory=list)


def v1_to_v2(ev: BindingAdded) -> BindingAddedV2:
    return BindingAddedV2(ts=ev.ts, node=ev.node, aor=ev.aor, contact=ev.binding,
                          origin="upcast-from-v1")


def v2_to_v3(ev: BindingAddedV2) -> BindingAddedV3:
    return BindingAddedV3(ts=ev.ts, node=ev.node, aor=ev.aor, contact=ev.contact,
                          origins=[ev.origin])


@pytest.fixture
def evolved() -> Iterator[None]:
    register_upcaster("binding.added.v1", v1_to_v2, BindingAddedV2)
    try:
        yield
    finally:
        reset_upcasters()


def binding(i: int, cseq: int) -> Binding:
    return Binding(key=f"k{i}", uri=f"sip:a@10.0.0.{i}", expires_at=T0 + 3600, call_id="c1",
                   cseq=cseq)


def test_v1_records_upgrade_on_read_and_v2_decodes_natively(evolved: None) -> None:
    old = BindingAdded(ts=T0, node="n1", aor=ALICE, binding=binding(1, 1))
    stored = encode(old)
    assert json.loads(stored)["type"] == "binding.added.v1"  # the released tag is untouched
    up = decode(stored)
    assert type(up) is BindingAddedV2
    assert (up.contact, up.origin, up.aor, up.ts) == (old.binding, "upcast-from-v1", ALICE, T0)
    new = BindingAddedV2(ts=T0 + 1, node="n2", aor=ALICE, contact=binding(1, 2), origin="ws")
    assert json.loads(encode(new))["type"] == "binding.added.v2"
    assert decode(encode(new)) == new
    assert codec.decode_array(b"[" + stored + b"," + encode(new) + b"]") == [up, new]


def test_upcasters_chain_and_reset_restores_the_released_schema() -> None:
    old = encode(BindingAdded(ts=T0, node="n1", aor=ALICE, binding=binding(1, 1)))
    v2 = encode(BindingAddedV2(ts=T0, node="n1", aor=ALICE, contact=binding(1, 1)))
    register_upcaster("binding.added.v1", v1_to_v2, BindingAddedV2)
    register_upcaster("binding.added.v2", v2_to_v3, BindingAddedV3)
    try:
        assert decode(old).origins == ["upcast-from-v1"]  # type: ignore[attr-defined]
        assert decode(v2).origins == ["sip"]  # type: ignore[attr-defined]
    finally:
        reset_upcasters()
    assert type(decode(old)) is BindingAdded
    with pytest.raises(EventDecodeError):
        decode(v2)
    with pytest.raises(ValueError, match="no event struct is tagged"):
        register_upcaster("binding.added.v9", v1_to_v2)


async def mixed_log(path: Path) -> None:
    """v1 events appended by this siphon, then v2 records as a newer writer stores them."""
    log = EmbeddedLog(path)
    await log.open()
    await log.append([BindingAdded(ts=T0 + i, node="old", aor=ALICE, binding=binding(i, i))
                      for i in range(3)])
    await log.close()
    with sqlite3.connect(path) as db:
        for off in range(3, 6):
            payload = encode(BindingAddedV2(ts=T0 + off, node="new", aor=ALICE,  # type: ignore[arg-type]
                                            contact=binding(off % 2, off), origin="ws"))
            db.execute('INSERT INTO records ("offset", ts, key, payload, crc) '
                       "VALUES (?, ?, ?, ?, ?)", (off, T0 + off, ALICE, payload,
                                                  zlib.crc32(payload)))


def test_replay_verify_accepts_a_log_mixing_both_versions(
        evolved: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "log.db"
    asyncio.run(mixed_log(path))
    cfg = tmp_path / "siphon.yaml"
    cfg.write_text(f"listen: {{udp: ['127.0.0.1:15060']}}\ndomain: {{local: [example.com]}}\n"
                   f"registrar: {{path: '{path}'}}\nauth: {{nonce_secret: test}}\n")
    assert main(["replay", "verify", "-c", str(cfg), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["records"] == 6 and report["problems"] == []
    # application code (here the history listing) sees the newest version only
    assert main(["replay", "state", "-c", str(cfg), "--aor", ALICE, "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    events = [r for r in rows if r["kind"] == "event"]
    assert [(e["offset"], e["type"], e["node"]) for e in events] == [
        (0, "binding.added.v2", "old"), (1, "binding.added.v2", "old"),
        (2, "binding.added.v2", "old"), (3, "binding.added.v2", "new"),
        (4, "binding.added.v2", "new"), (5, "binding.added.v2", "new")]


def test_without_the_upcaster_a_v2_record_is_named_as_undecodable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "log.db"
    asyncio.run(mixed_log(path))
    cfg = tmp_path / "siphon.yaml"
    cfg.write_text(f"listen: {{udp: ['127.0.0.1:15060']}}\ndomain: {{local: [example.com]}}\n"
                   f"registrar: {{path: '{path}'}}\nauth: {{nonce_secret: test}}\n")
    assert main(["replay", "verify", "-c", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "[damaged] partition 0 offset 3: undecodable payload" in out
    assert "binding.added.v2" in out
