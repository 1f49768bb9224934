"""``siphon replay verify``: damaged records, CSeq order, projection vs snapshot."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from events.embedded import EmbeddedLog
from events.schema import (
    Binding,
    BindingAdded,
    BindingExpired,
    BindingRefreshed,
    BindingRemoved,
    Event,
)
from replay import snapshot as snap
from replay.source import EmbeddedSource
from replay.state import Target, rebuild
from replay.verify import verify
from siphon.cli import main

T0 = 1_700_000_000.0
ALICE = "sip:alice@example.com"


def reg(t: float, key: str, call_id: str, cseq: int, *, aor: str = ALICE,
        refresh: bool = False) -> Event:
    b = Binding(key=key, uri=f"sip:{key}@10.0.0.1", expires_at=t + 60, call_id=call_id,
                cseq=cseq)
    return (BindingRefreshed if refresh else BindingAdded)(ts=t, node="n", aor=aor, binding=b)


async def write_log(path: Path, evs: list[Event]) -> None:
    log = EmbeddedLog(path)
    await log.open()
    await log.append(evs)
    await log.close()


def config(tmp_path: Path, log_path: Path) -> str:
    cfg = tmp_path / "siphon.yaml"
    cfg.write_text(f"listen: {{udp: ['127.0.0.1:15060']}}\ndomain: {{local: [example.com]}}\n"
                   f"registrar: {{path: '{log_path}'}}\nauth: {{nonce_secret: test}}\n")
    return str(cfg)


GOOD: list[Event] = [
    reg(T0, "k1", "c1", 1),
    reg(T0 + 1, "k1", "c1", 2, refresh=True),
    reg(T0 + 2, "k1", "c1", 2, refresh=True),         # equal CSeq: not a decrease
    reg(T0 + 3, "k1", "c9", 1, refresh=True),         # another Call-ID starts over
    BindingRemoved(ts=T0 + 4, node="n", aor=ALICE, key="k1", reason="admin"),  # no Call-ID
    reg(T0 + 5, "k2", "c2", 5),
    BindingExpired(ts=T0 + 70, node="n", aor=ALICE, key="k2", expires_at=T0 + 65),
    reg(T0 + 71, "k2", "c2", 1),                      # a new lifetime after the expiry
]


async def test_a_consistent_log_verifies(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    await write_log(path, GOOD)
    async with EmbeddedSource(path) as src:
        report = await verify(src)
    assert report.ok and report.records == len(GOOD) and report.problems == []


async def test_a_cseq_going_back_within_a_call_id_is_reported_with_both_offsets(
        tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    await write_log(path, [*GOOD, reg(T0 + 80, "k2", "c2", 4, refresh=True),
                           BindingRemoved(ts=T0 + 81, node="n", aor=ALICE, key="k2",
                                          call_id="c2", cseq=3)])
    async with EmbeddedSource(path) as src:
        report = await verify(src)
    assert not report.ok and report.counts == {"cseq": 1}
    (problem,) = report.problems
    assert (problem.partition, problem.offset) == (0, 9)
    assert "CSeq 3 after CSeq 4 (partition 0 offset 8) in Call-ID c2" in problem.message


async def test_every_damaged_record_is_named_and_reading_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    await write_log(path, [reg(T0 + i, f"k{i}", "c", i) for i in range(30)])
    with sqlite3.connect(path) as db:
        db.execute('UPDATE records SET crc = crc + 1 WHERE "offset" = 7')
        import zlib
        bad = b'{"type":"binding.added.v1","ts":1}'
        db.execute('UPDATE records SET payload = ?, crc = ? WHERE "offset" = 12',
                   (bad, zlib.crc32(bad)))
        db.execute('DELETE FROM records WHERE "offset" = 20')
    for pipeline in (False, True):
        async with EmbeddedSource(path, pipeline=pipeline, batch_size=8) as src:
            report = await verify(src)
        assert report.records == 27
        assert [(p.kind, p.offset) for p in report.problems] == [
            ("damaged", 7), ("damaged", 12), ("damaged", 20)]
        assert "crc mismatch" in report.problems[0].message
        assert "undecodable" in report.problems[1].message
        assert "missing" in report.problems[2].message


async def test_projection_is_compared_with_a_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    await write_log(path, [reg(T0 + i, f"k{i % 4}", "c", i, aor=f"sip:u{i % 5}@example.com")
                           for i in range(100)])
    good, bad = tmp_path / "good.snapshot", tmp_path / "bad.snapshot"
    async with EmbeddedSource(path) as src:
        out = await rebuild(src, Target())
        s = snap.capture(out.registrar, out.trunks, identity="embedded", partitions=1)
        s.anchors = await snap.anchors_at(src.read, s.position)
        snap.write(good, s)
        # a snapshot that lost one binding and changed another one's CSeq
        entry = next(e for e in s.aors if e.aor == "sip:u3@example.com")
        dropped = entry.bindings.pop()
        other = next(e for e in s.aors if e.aor == "sip:u4@example.com")
        b = other.bindings[0]
        other.bindings[0] = Binding(key=b.key, uri=b.uri, expires_at=b.expires_at,
                                    call_id=b.call_id, cseq=b.cseq + 100)
        snap.write(bad, s)
        assert (await verify(src, snapshot_file=str(good))).ok
        report = await verify(src, snapshot_file=str(bad))
    assert report.counts == {"state": 2}
    messages = sorted(p.message for p in report.problems)
    assert messages[0].startswith(f"sip:u3@example.com {dropped.uri}: in the log's projection, "
                                  "not in snapshot")
    assert "last event of the AoR at partition 0 offset 98" in messages[0]
    assert messages[1].startswith(f"sip:u4@example.com {b.uri}: differs in cseq")


def test_cli_verify_reports_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "log.db"
    asyncio.run(write_log(path, [*GOOD, reg(T0 + 80, "k2", "c2", 0, refresh=True)]))
    cfg = config(tmp_path, path)
    assert main(["replay", "verify", "-c", cfg]) == 1
    out = capsys.readouterr().out
    assert "FAILED: 1 cseq" in out and "[cseq] partition 0 offset 8:" in out
    assert main(["replay", "verify", "-c", cfg, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["problems"][0]["offset"] == 8
    assert main(["replay", "verify", "-c", cfg, "--against-snapshot",
                 str(tmp_path / "none")]) == 1
    assert "no snapshot there" in capsys.readouterr().err
