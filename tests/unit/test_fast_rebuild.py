"""The fast rebuild (slim decoding, survivors decoded at the end, payloads read by a
child process) gives exactly what applying every decoded event gives."""

from __future__ import annotations

import random
import sqlite3
import zlib
from pathlib import Path

import pytest

import events.embedded as embedded
from events.codec import decode, encode
from events.embedded import EmbeddedLog
from events.log import LogCorruption
from events.schema import (
    Binding,
    BindingAdded,
    BindingExpired,
    BindingRefreshed,
    BindingRemoved,
    Event,
    Trunk,
    TrunkHeartbeat,
    TrunkRegistered,
)
from projections import registrar as reg
from projections import trunks as trk
from projections.runner import ProjectionRunner
from replay.source import EmbeddedSource
from replay.state import Target, rebuild

T0 = 1_700_000_000.0


@pytest.fixture(autouse=True)
def fast_path_for_small_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the fast path whatever the size (it is kept for long histories)."""
    monkeypatch.setattr(reg, "FAST_REBUILD_MIN", 0)


def history(n: int, seed: int = 3) -> list[Event]:
    """Adds, refreshes, removals, expiries (matching or stale) and trunk events."""
    rnd = random.Random(seed)
    live: dict[tuple[str, str], float] = {}
    out: list[Event] = []
    for i in range(n):
        t = T0 + i
        aor = f"sip:u{rnd.randrange(40)}@example.com"
        key = f"k{rnd.randrange(4)}"
        roll = rnd.random()
        if roll < 0.05:
            out.append(TrunkRegistered(ts=t, node="n1", trunk_id=f"t{i % 3}",
                                       trunk=Trunk(sip_uri="sip:gw@example.net"),
                                       lease_expires_at=t + 90))
            continue
        if roll < 0.08:
            out.append(TrunkHeartbeat(ts=t, node="n1", trunk_id=f"t{i % 3}",
                                      lease_expires_at=t + 120))
            continue
        if roll < 0.2 and (aor, key) in live:
            out.append(BindingRemoved(ts=t, node="n2", aor=aor, key=key, call_id="c"))
            del live[(aor, key)]
            continue
        if roll < 0.3:
            exp = live.get((aor, key), 1.0) if rnd.random() < 0.7 else 5.0
            out.append(BindingExpired(ts=t, node="n1", aor=aor, key=key, expires_at=exp))
            if live.get((aor, key)) == exp:
                del live[(aor, key)]
            continue
        params = ((("+sip.instance", f'"<urn:uuid:{i}>"'), ("reg-id", "1"))
                  if rnd.random() < 0.5 else ())
        b = Binding(key=key, uri=f"sip:u@10.0.0.{i % 250}:{5000 + i}", expires_at=t + 600,
                    q=rnd.choice([1.0, 0.5]), call_id=f"c{i}", cseq=i, source="10.0.0.1:5060",
                    transport=rnd.choice(["udp", "tcp"]), local="192.0.2.1:5060",
                    path=("<sip:edge;lr>",) if rnd.random() < 0.2 else (), params=params,
                    user_agent="UA/1.0", registered_at=t, node="n1")
        cls = BindingRefreshed if (aor, key) in live else BindingAdded
        out.append(cls(ts=t, node="n1", aor=aor, binding=b))
        live[(aor, key)] = b.expires_at
    return out


def classic(events: list[Event]) -> tuple[reg.RegistrarState, trk.TrunkState]:
    """Every event decoded from its stored form and applied one by one."""
    state, tstate = reg.RegistrarState(), trk.TrunkState()
    for i, ev in enumerate(events):
        ev = decode(encode(ev))
        if type(ev) in (TrunkRegistered, TrunkHeartbeat):
            trk.apply(tstate, ev)
        else:
            reg.apply(state, ev)
        state.position[0] = i + 1
    return state, tstate


def ordered(state: reg.RegistrarState) -> list[tuple[str, list[Binding]]]:
    return [(aor, list(bs.values())) for aor, bs in state.aors.items()]


async def write(path: Path, events: list[Event]) -> None:
    log = EmbeddedLog(path)
    await log.open()
    await log.append(events)
    await log.close()


async def runner_rebuild(path: Path) -> ProjectionRunner:
    log = EmbeddedLog(path)
    await log.open()
    try:
        runner = ProjectionRunner(log)
        await runner.rebuild()
        return runner
    finally:
        await log.close()


@pytest.mark.parametrize("child", [False, True])
async def test_runner_rebuild_equals_applying_every_event(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, child: bool) -> None:
    if child:
        monkeypatch.setattr(embedded, "CHILD_READER_MIN", 10)
    events = history(3000)
    path = tmp_path / "log.db"
    await write(path, events)
    runner = await runner_rebuild(path)
    state, tstate = classic(events)
    assert ordered(runner.state) == ordered(state)  # same AoR and binding order too
    assert runner.state.position == state.position == {0: 3000}
    assert runner.trunks == tstate
    assert runner.applied == 3000


async def test_bindings_are_kept_compact_and_shared(tmp_path: Path) -> None:
    events = history(2000)
    path = tmp_path / "log.db"
    await write(path, events)
    runner = await runner_rebuild(path)
    bindings = [b for bs in runner.state.aors.values() for b in bs.values()]
    assert bindings
    for b in bindings:
        assert type(b.path) is tuple and type(b.params) is tuple
    assert len({id(b.user_agent) for b in bindings}) == 1
    assert len({id(b.local) for b in bindings}) == 1
    # the same holds for bindings applied live, so both compare equal
    live, _ = classic(events)
    assert live.aors == runner.state.aors


async def test_snapshot_start_then_fast_tail(tmp_path: Path) -> None:
    events = history(2000)
    path = tmp_path / "log.db"
    await write(path, events)
    head, thead = classic(events[:1200])
    log = EmbeddedLog(path)
    await log.open()
    try:
        runner = ProjectionRunner(log)
        runner.restore(head, thead)
        assert await runner.rebuild() == 800
    finally:
        await log.close()
    state, tstate = classic(events)
    assert ordered(runner.state) == ordered(state)
    assert runner.trunks == tstate
    assert runner.trunks == tstate


def corrupt(path: Path, offset: int, payload: bytes) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute('UPDATE records SET payload = ?, crc = ? WHERE "offset" = ?',
                     (payload, zlib.crc32(payload), offset))
    conn.close()


@pytest.mark.parametrize("child", [False, True])
async def test_undecodable_record_stops_the_rebuild_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, child: bool) -> None:
    if child:
        monkeypatch.setattr(embedded, "CHILD_READER_MIN", 10)
    path = tmp_path / "log.db"
    await write(path, history(500))
    corrupt(path, 321, b'{"type":"binding.added.v1","ts":"not a number"}')
    with pytest.raises(LogCorruption) as info:
        await runner_rebuild(path)
    assert info.value.offset == 321 and "undecodable" in info.value.reason


@pytest.mark.parametrize("child", [False, True])
async def test_crc_mismatch_names_the_offset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             child: bool) -> None:
    if child:
        monkeypatch.setattr(embedded, "CHILD_READER_MIN", 10)
    path = tmp_path / "log.db"
    await write(path, history(500))
    with sqlite3.connect(path) as conn:
        conn.execute('UPDATE records SET crc = crc + 1 WHERE "offset" = 77')
    conn.close()
    with pytest.raises(LogCorruption) as info:
        await runner_rebuild(path)
    assert info.value.offset == 77 and "crc" in info.value.reason


async def test_a_surviving_record_that_only_slim_decodes_falls_back_to_full_replay(
        tmp_path: Path) -> None:
    """The slim pass does not look at every field: a live binding whose other fields
    are malformed is found when it is decoded at the end, and the rebuild is redone
    the classic way, which names the record."""
    events = history(300)
    events.append(BindingAdded(ts=T0 + 999, node="n1", aor="sip:last@example.com",
                               binding=Binding(key="z", uri="sip:z@h", expires_at=T0 + 9999)))
    path = tmp_path / "log.db"
    await write(path, events)
    bad = encode(events[-1]).replace(b'"uri":"sip:z@h"', b'"uri":7')
    corrupt(path, 300, bad)
    with pytest.raises(LogCorruption) as info:
        await runner_rebuild(path)
    assert info.value.offset == 300


async def test_superseded_record_with_malformed_fields_is_not_needed(tmp_path: Path) -> None:
    """Only what decides the state is decoded: a binding replaced later costs nothing
    more (the state equals the one built from the replacement)."""
    first = BindingAdded(ts=T0, node="n1", aor="sip:a@example.com",
                         binding=Binding(key="k", uri="sip:a@h", expires_at=T0 + 60))
    second = BindingRefreshed(ts=T0 + 1, node="n1", aor="sip:a@example.com",
                              binding=Binding(key="k", uri="sip:a@h2", expires_at=T0 + 90))
    path = tmp_path / "log.db"
    await write(path, [first, second])
    corrupt(path, 0, encode(first).replace(b'"uri":"sip:a@h"', b'"uri":7'))
    runner = await runner_rebuild(path)
    assert runner.state.aors == {"sip:a@example.com": {"k": reg.compact(second.binding)}}


@pytest.mark.parametrize("child", [False, True])
async def test_replay_state_fast_path_equals_classic(
        tmp_path: Path, child: bool) -> None:
    events = history(2500)
    path = tmp_path / "log.db"
    await write(path, events)
    source = EmbeddedSource(path, pipeline=child, batch_size=300)
    async with source:
        out = await rebuild(source, Target())
    state, tstate = classic(events)
    assert ordered(out.registrar) == ordered(state)
    assert out.trunks == tstate
    assert out.position == {0: 2500}
    assert out.applied == out.read == 2500
    assert out.last_ts == T0 + 2499


async def test_short_tail_on_a_big_state_is_applied_one_by_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = history(2000)
    path = tmp_path / "log.db"
    await write(path, events)
    head, thead = classic(events[:1990])
    log = EmbeddedLog(path)
    await log.open()
    try:
        runner = ProjectionRunner(log)
        runner.restore(head, thead)
        fed: list[int] = []
        monkeypatch.setattr(reg.Rebuild, "feed", lambda *a: fed.append(1))
        assert await runner.rebuild() == 10
        assert not fed  # 10 records on ~40 AoRs: not worth it
    finally:
        await log.close()
    state, tstate = classic(events)
    assert ordered(runner.state) == ordered(state)
    assert runner.trunks == tstate
