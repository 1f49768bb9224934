"""Snapshots: format, atomic writes, rejection of damaged or foreign ones, warm boot."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from pathlib import Path

import pytest

from events.embedded import EmbeddedLog
from events.schema import Binding, BindingAdded, BindingRemoved, Event, Trunk, TrunkRegistered
from projections.runner import ProjectionRunner
from replay import snapshot as snap
from siphon.cli import main

T0 = 1_700_000_000.0


def events(n: int, start: int = 0, aors: int = 40) -> list[Event]:
    out: list[Event] = []
    for i in range(start, start + n):
        aor = f"sip:u{i % aors}@example.com"
        if i % 11 == 10:
            out.append(BindingRemoved(ts=T0 + i, node="n1", aor=aor, key=f"k{(i - 1) % 3}"))
        else:
            b = Binding(key=f"k{i % 3}", uri=f"sip:u@10.0.0.1:{5000 + i}",
                        expires_at=T0 + i + 3600, call_id="c", cseq=i,
                        params=[("+sip.instance", '"<urn:x>"'), ("ob", None)])
            out.append(BindingAdded(ts=T0 + i, node="n1", aor=aor, binding=b))
    out.append(TrunkRegistered(ts=T0 + start + n, node="n1", trunk_id=f"gw{start}",
                               trunk=Trunk(sip_uri="sip:gw", attributes={"max": 3}),
                               lease_expires_at=T0 + 90))
    return out


async def write_log(path: Path, evs: list[Event]) -> None:
    log = EmbeddedLog(path)
    await log.open()
    await log.append(evs)
    await log.close()


async def full_rebuild(path: Path) -> ProjectionRunner:
    log = EmbeddedLog(path)
    await log.open()
    runner = ProjectionRunner(log)
    await runner.rebuild()
    await log.close()
    return runner


async def boot(path: Path, snapshot_path: Path) -> tuple[ProjectionRunner, int, bool]:
    """What Node.start does: restore, then rebuild the tail. Returns the runner, the
    records the rebuild read and whether a snapshot was used."""
    log = EmbeddedLog(path)
    await log.open()
    try:
        runner = ProjectionRunner(log)
        s = snap.Snapshotter(runner, log, snapshot_path, identity="embedded")
        used = await s.restore() is not None
        count = await runner.rebuild()
        return runner, count, used
    finally:
        await log.close()


async def take(path: Path, snapshot_path: Path) -> None:
    log = EmbeddedLog(path)
    await log.open()
    try:
        runner = ProjectionRunner(log)
        await runner.rebuild()
        assert await snap.Snapshotter(runner, log, snapshot_path, identity="embedded").take()
    finally:
        await log.close()


def test_encode_decode_round_trip_keeps_order_and_values() -> None:
    runner = asyncio.run(_state_of(events(200)))
    s = snap.capture(runner.state, runner.trunks, identity="embedded", partitions=1,
                     node="n1", last_ts=T0 + 200)
    back = snap.decode(snap.encode(s))
    assert back == s
    state, trunks = snap.to_states(back)
    assert state.aors == runner.state.aors
    assert [list(b) for b in state.aors.values()] == [list(b) for b in runner.state.aors.values()]
    assert state.position == runner.state.position and trunks.trunks == runner.trunks.trunks


async def _state_of(evs: list[Event]) -> ProjectionRunner:
    from replay.state import Projection

    p = Projection()
    for i, ev in enumerate(evs):
        p.apply(ev)
        p.registrar.position[0] = i + 1

    class R:
        state = p.registrar
        trunks = p.trunks
    return R()  # type: ignore[return-value]


@pytest.mark.parametrize("damage,reason", [
    (lambda d: d[:-1], "truncated"),
    (lambda d: d[:40] + bytes([d[40] ^ 0xFF]) + d[41:], "checksum mismatch"),
    (lambda d: b"NOTASNAP" + d[8:], "bad magic"),
    (lambda d: d[:8] + struct.pack("<I", 99) + d[12:], "format version 99"),
    (lambda d: d[:10], "too short"),
])
def test_damaged_or_foreign_format_files_are_rejected(tmp_path: Path, damage, reason) -> None:
    s = snap.Snapshot(log="embedded", partitions=1, position={0: 1}, anchors=[], created_at=1.0)
    path = tmp_path / "s"
    path.write_bytes(damage(snap.encode(s)))
    with pytest.raises(snap.SnapshotError, match=reason):
        snap.read(path)


def test_write_is_atomic_and_keeps_the_previous_one(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "log.db.snapshot"
    first = snap.Snapshot(log="embedded", partitions=1, position={0: 1}, anchors=[],
                          created_at=1.0)
    second = snap.Snapshot(log="embedded", partitions=1, position={0: 2}, anchors=[],
                           created_at=2.0)
    snap.write(path, first)
    snap.write(path, second)
    assert snap.read(path).position == {0: 2}
    assert snap.read(snap.previous(path)).position == {0: 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["log.db.snapshot",
                                                             "log.db.snapshot.prev"]


async def test_warm_boot_replays_only_the_tail_and_equals_a_full_replay(tmp_path: Path) -> None:
    log_path, snap_path = tmp_path / "log.db", tmp_path / "log.db.snapshot"
    await write_log(log_path, events(500))
    await take(log_path, snap_path)
    log = EmbeddedLog(log_path)
    await log.open()
    await log.append(events(120, start=500))
    await log.close()

    runner, count, used = await boot(log_path, snap_path)
    reference = await full_rebuild(log_path)
    assert used and count == 121  # the tail only
    assert runner.state.aors == reference.state.aors
    assert runner.trunks.trunks == reference.trunks.trunks
    assert runner.position == reference.position == {0: 622}


async def test_a_corrupt_snapshot_is_logged_and_ignored(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    log_path, snap_path = tmp_path / "log.db", tmp_path / "log.db.snapshot"
    await write_log(log_path, events(300))
    await take(log_path, snap_path)
    data = bytearray(snap_path.read_bytes())
    data[-5] ^= 0x55
    snap_path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="siphon.snapshot"):
        runner, count, used = await boot(log_path, snap_path)
    assert not used and count == 301
    assert "ignoring snapshot" in caplog.text and "checksum mismatch" in caplog.text
    assert runner.state.aors == (await full_rebuild(log_path)).state.aors


async def test_the_previous_snapshot_is_used_when_the_newest_is_damaged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log_path, snap_path = tmp_path / "log.db", tmp_path / "log.db.snapshot"
    await write_log(log_path, events(200))
    await take(log_path, snap_path)
    log = EmbeddedLog(log_path)
    await log.open()
    await log.append(events(50, start=200))
    await log.close()
    await take(log_path, snap_path)
    snap_path.write_bytes(snap_path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="siphon.snapshot"):
        runner, count, used = await boot(log_path, snap_path)
    assert used and count == 51  # from the previous snapshot at offset 201
    assert "truncated" in caplog.text
    assert runner.state.aors == (await full_rebuild(log_path)).state.aors


async def test_a_snapshot_of_another_log_is_never_applied(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log_path, snap_path = tmp_path / "log.db", tmp_path / "log.db.snapshot"
    await write_log(log_path, events(200))
    await take(log_path, snap_path)
    # The log is replaced by another one, longer, with different records.
    log_path.unlink()
    await write_log(log_path, events(400, start=1000))
    with caplog.at_level(logging.WARNING, logger="siphon.snapshot"):
        _, count, used = await boot(log_path, snap_path)
    assert not used and count == 401
    assert "a snapshot of another log" in caplog.text
    # ... and a shorter one
    log_path.unlink()
    await write_log(log_path, events(20))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="siphon.snapshot"):
        _, count, used = await boot(log_path, snap_path)
    assert not used and count == 21 and "another or a truncated log" in caplog.text


async def test_snapshotter_skips_unchanged_state_and_writes_a_last_one_when_stopped(
        tmp_path: Path) -> None:
    log_path, snap_path = tmp_path / "log.db", tmp_path / "log.db.snapshot"
    await write_log(log_path, events(50))
    log = EmbeddedLog(log_path)
    await log.open()
    try:
        runner = ProjectionRunner(log)
        await runner.rebuild()
        s = snap.Snapshotter(runner, log, snap_path, identity="embedded", interval=3600)
        assert await s.take() and not await s.take()
        follow = asyncio.create_task(runner.run())
        task = asyncio.create_task(s.run())
        placed = await log.append(events(5, start=50))
        await runner.wait_applied(*placed[-1])
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        follow.cancel()
        assert snap.read(snap_path).position == {0: 57}
    finally:
        await log.close()


def test_cli_snapshot_and_state_from_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log_path = tmp_path / "log.db"
    asyncio.run(write_log(log_path, events(300)))
    cfg = tmp_path / "siphon.yaml"
    cfg.write_text(f"listen: {{udp: ['127.0.0.1:15060']}}\ndomain: {{local: [example.com]}}\n"
                   f"registrar: {{path: '{log_path}'}}\nauth: {{nonce_secret: test}}\n")
    assert main(["replay", "snapshot", "-c", str(cfg), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == f"{log_path}.snapshot" and info["position"] == {"0": 301}

    def state(*extra: str) -> list[dict]:
        assert main(["replay", "state", "-c", str(cfg), "--json", *extra]) == 0
        return [json.loads(x) for x in capsys.readouterr().out.splitlines()]

    at = f"@{T0 + 400}"
    warm, cold = state("--at", at), state("--at", at, "--no-snapshot")
    assert warm[-1]["snapshot"] == f"{log_path}.snapshot" and warm[-1]["records_read"] == 0
    assert cold[-1]["snapshot"] is None and cold[-1]["records_read"] == 301
    assert warm[:-1] == cold[:-1] and len(warm) > 30
    # a time before the snapshot's last event cannot start from it
    early = state("--at", f"@{T0 + 100}")
    assert early[-1]["snapshot"] is None and early[-1]["events_applied"] == 101
