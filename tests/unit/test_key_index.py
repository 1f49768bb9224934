"""The embedded log's key index: one key's records without a scan, same as a scan."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import zlib
from pathlib import Path

import pytest

from events.codec import encode
from events.embedded import KEY_INDEX, SELECT_KEY, EmbeddedLog
from events.log import EventLog, LogCorruption, Record
from events.schema import (
    Binding,
    BindingAdded,
    BindingExpired,
    BindingRemoved,
    Event,
    Trunk,
    TrunkRegistered,
    event_key,
)
from replay.source import EmbeddedSource
from siphon.cli import main

T0 = 1_700_000_000.0


def make_event(i: int) -> Event:
    """Event ``i``: AoRs of very different history lengths, and some trunk events."""
    if i % 11 == 10:
        return TrunkRegistered(ts=T0 + i, node="n1", trunk_id=f"gw{i % 2}",
                               trunk=Trunk(sip_uri=f"sip:gw{i % 2}.example.com"),
                               lease_expires_at=T0 + i + 90)
    aor = f"sip:user{(i * i) % 13}@example.com"
    if i % 5 == 3:
        return BindingRemoved(ts=T0 + i, node="n1", aor=aor, key=f"k{i % 3}")
    if i % 5 == 4:
        return BindingExpired(ts=T0 + i, node="n1", aor=aor, key=f"k{i % 3}",
                              expires_at=T0 + i)
    binding = Binding(key=f"k{i % 3}", uri=f"sip:u@10.0.0.1:{10_000 + i}",
                      expires_at=T0 + i + 3600, call_id=f"c{i % 3}", cseq=i,
                      registered_at=T0 + i)
    return BindingAdded(ts=T0 + i, node="n1", aor=aor, binding=binding)


EVENTS = [make_event(i) for i in range(400)]
KEYS = [*sorted({event_key(e) for e in EVENTS}), "sip:nobody@example.com"]


async def write_log(path: Path, events: list[Event], chunk: int = 37) -> None:
    log = EmbeddedLog(path)
    await log.open()
    for s in range(0, len(events), chunk):
        await log.append(events[s:s + chunk])
    await log.close()


def drop_index(path: Path) -> None:
    """Make ``path`` look like a log written before the key index existed."""
    conn = sqlite3.connect(path)
    conn.execute(f"DROP INDEX {KEY_INDEX}")
    conn.commit()
    conn.close()


def has_index(path: Path) -> bool:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?",
                            (KEY_INDEX,)).fetchone() is not None
    finally:
        conn.close()


async def scan(log: EmbeddedLog, key: str, lo: int = 0, hi: int | None = None) -> list[Record]:
    """The reference: every record read in full, kept when its event's key is ``key``."""
    out: list[Record] = []
    async for batch in log.read({0: lo}, None if hi is None else {0: hi}):
        out.extend(r for r in batch if event_key(r.event) == key)
    return out


async def by_key(log: EventLog, key: str, lo: int | None = None, hi: int | None = None,
                 batch_size: int = 10_000) -> list[Record]:
    out: list[Record] = []
    async for batch in log.read_key(key, None if lo is None else {0: lo},
                                    None if hi is None else {0: hi}, batch_size):
        assert batch
        out.extend(batch)
    return out


async def check_same_as_scan(log: EmbeddedLog) -> None:
    end = len(EVENTS)
    for key in KEYS:
        want = await scan(log, key)
        assert [r.event for r in want] == [e for e in EVENTS if event_key(e) == key]
        for batch_size in (1, 2, 3, 10_000):
            assert await by_key(log, key, batch_size=batch_size) == want, (key, batch_size)
        for lo, hi in ((0, end), (1, 17), (100, 101), (150, end), (end, end), (5, 5)):
            assert await by_key(log, key, lo, hi, 4) == await scan(log, key, lo, hi)
        # the interface's default (read + filter) agrees too
        assert [r async for b in EventLog.read_key(log, key) for r in b] == want


async def test_new_log_has_the_index_and_key_reads_equal_a_filtered_scan(
        tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    await write_log(path, EVENTS)
    assert has_index(path)
    log = EmbeddedLog(path)
    await log.open()
    try:
        await check_same_as_scan(log)
    finally:
        await log.close()


async def test_old_log_gains_the_index_at_open_and_reads_the_same(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "old.db"
    await write_log(path, EVENTS[:250])
    drop_index(path)
    # an older siphon goes on writing to it without the index
    conn = sqlite3.connect(path)
    conn.execute("BEGIN")
    for offset, event in enumerate(EVENTS[250:], 250):
        payload = encode(event)
        conn.execute('INSERT INTO records ("offset", ts, key, payload, crc) '
                     "VALUES (?, ?, ?, ?, ?)",
                     (offset, event.ts, event_key(event), payload, zlib.crc32(payload)))
    conn.execute("COMMIT")
    conn.close()
    assert not has_index(path)

    caplog.set_level(logging.INFO, logger="siphon.events.embedded")
    log = EmbeddedLog(path)
    await log.open()
    try:
        assert has_index(path)
        notes = [r.getMessage() for r in caplog.records if "key index" in r.getMessage()]
        assert any("building the key index on 400 records" in n for n in notes), notes
        assert any(re.search(r"key index built on 400 records in \d+\.\d\d s", n)
                   for n in notes), notes
        await check_same_as_scan(log)
        # appends after the build are found through the index as well
        extra = [make_event(i) for i in range(400, 460)]
        await log.append(extra)
        for key in KEYS:
            assert await by_key(log, key, batch_size=3) == await scan(log, key)
    finally:
        await log.close()
    caplog.clear()
    log = EmbeddedLog(path)  # already there: nothing built, nothing said
    await log.open()
    await log.close()
    assert not [r for r in caplog.records if "key index" in r.getMessage()]


async def test_the_key_query_uses_the_index_without_sorting(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    await write_log(path, EVENTS[:20])
    conn = sqlite3.connect(path)
    plan = " | ".join(row[-1] for row in conn.execute(
        "EXPLAIN QUERY PLAN " + SELECT_KEY, ("sip:user1@example.com", 0, 10, 5)))
    conn.close()
    assert f"USING INDEX {KEY_INDEX}" in plan or f"USING COVERING INDEX {KEY_INDEX}" in plan
    assert "TEMP B-TREE" not in plan and "SCAN" not in plan, plan


async def test_a_damaged_record_of_the_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    await write_log(path, EVENTS[:60])
    key = event_key(EVENTS[7])
    offsets = [i for i, e in enumerate(EVENTS[:60]) if event_key(e) == key]
    bad = offsets[1]
    conn = sqlite3.connect(path)
    conn.execute('UPDATE records SET crc = crc + 1 WHERE "offset" = ?', (bad,))
    conn.commit()
    conn.close()
    log = EmbeddedLog(path)
    await log.open()
    try:
        with pytest.raises(LogCorruption) as exc:
            await by_key(log, key)
        assert exc.value.offset == bad and "crc mismatch" in str(exc.value)
        # records before the damaged one still come out
        assert [r.offset for r in await by_key(log, key, hi=bad)] == offsets[:1]
    finally:
        await log.close()
    conn = sqlite3.connect(path)
    conn.execute('UPDATE records SET crc = crc - 1 WHERE "offset" = ?', (bad,))
    conn.execute('UPDATE records SET key = ? WHERE "offset" = ?',
                 (key, next(i for i, e in enumerate(EVENTS[:60]) if event_key(e) != key)))
    conn.commit()
    conn.close()
    log = EmbeddedLog(path)
    await log.open()
    try:
        with pytest.raises(LogCorruption, match="is not its event's"):
            await by_key(log, key)
    finally:
        await log.close()


def config(tmp_path: Path, log_path: Path) -> str:
    cfg = tmp_path / f"{log_path.stem}.yaml"
    cfg.write_text(f"listen: {{udp: ['127.0.0.1:15060']}}\ndomain: {{local: [example.com]}}\n"
                   f"registrar: {{path: '{log_path}'}}\nauth: {{nonce_secret: test}}\n")
    return str(cfg)


def _steady(text: str) -> str:
    """CLI output without what depends on the clock (elapsed time; "now")."""
    text = re.sub(r'"elapsed_s":\s*[0-9.]+', '"elapsed_s":0', text)
    text = re.sub(r'"at":"[^"]*","at_ts":[0-9.e+]+', '"at":"now"', text)
    text = re.sub(r"(?m)^(# \S+ at )\S+$", r"\1now", text)
    return re.sub(r"events in \d+\.\d\ds", "events in 0.00s", text)


async def index_seen(path: Path) -> bool:
    async with EmbeddedSource(path) as src:
        return src.key_index


def test_cli_aor_history_is_the_same_with_and_without_the_index(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    indexed, old = tmp_path / "indexed.db", tmp_path / "old.db"
    asyncio.run(write_log(indexed, EVENTS))
    asyncio.run(write_log(old, EVENTS))
    drop_index(old)
    assert asyncio.run(index_seen(indexed))
    assert not asyncio.run(index_seen(old))
    cases = [([], None, None), (["--at", f"@{T0 + 200.5}"], T0 + 200.5, None),
             (["--at", "123"], None, 123), (["--json"], None, None),
             (["--json", "--at", f"@{T0 + 77}"], T0 + 77, None),
             (["--json", "--at", "300"], None, 300)]
    for key in ("sip:user1@example.com", "sip:user4@example.com", "trunk:gw1"):
        for extra, until, upto in cases:
            outs = []
            for path in (indexed, old):
                code = main(["replay", "state", "-c", config(tmp_path, path),
                             "--aor", key, *extra])
                outs.append((code, _steady(capsys.readouterr().out)))
            assert outs[0] == outs[1], (key, extra)
            assert outs[0][0] == 0
            if "--json" in extra:
                lines = [json.loads(line) for line in outs[0][1].splitlines()]
                assert lines[-1]["kind"] == "state"
                want = [off for off, e in enumerate(EVENTS) if event_key(e) == key
                        and (until is None or e.ts <= until) and (upto is None or off <= upto)]
                assert [x["offset"] for x in lines if x["kind"] == "event"] == want
    assert not has_index(old)  # a replay never writes, not even the index
    for path in (indexed, old):  # an unknown AoR: same exit code and message
        assert main(["replay", "state", "-c", config(tmp_path, path),
                     "--aor", "sip:nobody@example.com"]) == 4
        assert "no event in embedded log" in capsys.readouterr().err
