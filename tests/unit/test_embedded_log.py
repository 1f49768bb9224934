"""EmbeddedLog on real SQLite files: round trip, group commit, follow, corruption."""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import sqlite3
import sys
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from events.codec import encode
from events.embedded import FORMAT_VERSION, EmbeddedLog
from events.log import LogCorruption, LogError, Record
from events.schema import Binding, BindingAdded, BindingExpired, BindingRemoved, Event


def make_event(i: int) -> Event:
    """A distinct event per ``i`` (some kinds mixed in)."""
    aor = f"sip:user{i % 7}@example.com"
    if i % 5 == 3:
        return BindingRemoved(ts=1_000.0 + i, node="n1", aor=aor, key=f"k{i}")
    if i % 5 == 4:
        return BindingExpired(ts=1_000.0 + i, node="n1", aor=aor, key=f"k{i}", expires_at=5.0)
    binding = Binding(key=f"k{i}", uri=f"sip:user@10.0.0.1:{10_000 + i}", expires_at=2_000.0 + i)
    return BindingAdded(ts=1_000.0 + i, node="n1", aor=aor, binding=binding)


async def read_all(log: EmbeddedLog, **kwargs: object) -> list[Record]:
    out: list[Record] = []
    async for batch in log.read(**kwargs):  # type: ignore[arg-type]
        out.extend(batch)
    return out


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sub" / "dir" / "events.db"


@pytest.fixture
async def log(db_path: Path) -> AsyncIterator[EmbeddedLog]:
    log = EmbeddedLog(db_path)
    await log.open()
    yield log
    await log.close()


async def make_closed_log(path: Path, n: int) -> None:
    """Create a log at ``path`` holding events 0..n-1 and close it."""
    log = EmbeddedLog(path)
    await log.open()
    await log.append([make_event(i) for i in range(n)])
    await log.close()


async def test_round_trip_and_offsets(log: EmbeddedLog, db_path: Path) -> None:
    assert db_path.exists()
    assert not [p for p in db_path.parent.iterdir() if p.name.endswith(".init")]
    assert await log.end_position() == {0: 0}
    assert await read_all(log) == []
    first = [make_event(i) for i in range(3)]
    second = [make_event(i) for i in range(3, 5)]
    assert await log.append(first) == [(0, 0), (0, 1), (0, 2)]
    assert await log.append(second) == [(0, 3), (0, 4)]
    assert await log.append([]) == []
    assert await log.end_position() == {0: 5}
    records = await read_all(log)
    assert records == [Record(0, i, e) for i, e in enumerate(first + second)]
    assert gc.isenabled()  # the collector pause while decoding was undone


async def test_large_groups_span_several_insert_statements(db_path: Path) -> None:
    # A group larger than one INSERT statement's chunk, with appends of odd sizes
    # around it: every event lands at its offset, in order, intact after reopening.
    log = EmbeddedLog(db_path, group_commit_max=5_000)
    await log.open()
    sizes = [1, 1_203, 7, 499, 500, 501, 2]
    events = [make_event(i) for i in range(sum(sizes))]
    chunks, start = [], 0
    for n in sizes:
        chunks.append(events[start : start + n])
        start += n
    results = await asyncio.gather(*(log.append(c) for c in chunks))
    flat = [off for result in results for _, off in result]
    assert flat == list(range(len(events)))
    await log.close()
    log = EmbeddedLog(db_path)
    await log.open()
    try:
        assert await read_all(log) == [Record(0, i, e) for i, e in enumerate(events)]
    finally:
        await log.close()


async def test_rows_hold_codec_payload_and_crc(log: EmbeddedLog, db_path: Path) -> None:
    event = make_event(0)
    await log.append([event])
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute('SELECT "offset", ts, key, payload, crc FROM records').fetchall()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    payload = encode(event)
    assert rows == [(0, event.ts, event.aor, payload, zlib.crc32(payload))]
    assert version == FORMAT_VERSION
    assert mode == "wal"


async def test_append_rejects_non_events(log: EmbeddedLog) -> None:
    with pytest.raises(TypeError):
        await log.append([{"type": "binding.added.v1"}])  # type: ignore[list-item]
    assert await log.end_position() == {0: 0}


async def test_concurrent_appends_share_commits(log: EmbeddedLog) -> None:
    events = [make_event(i) for i in range(500)]
    results = await asyncio.gather(*(log.append([e]) for e in events))
    assert log.commits < 50, log.commits
    offsets = [r[0][1] for r in results]
    assert sorted(offsets) == list(range(500))
    by_offset = {r.offset: r.event for r in await read_all(log)}
    for event, offset in zip(events, offsets, strict=True):
        assert by_offset[offset] == event


async def test_group_commit_max_and_appends_never_split(db_path: Path) -> None:
    log = EmbeddedLog(db_path, group_commit_max=10)
    await log.open()
    try:
        batches = [[make_event(i * 4 + j) for j in range(4)] for i in range(25)]
        results = await asyncio.gather(*(log.append(b) for b in batches))
        # 100 events, at most 10 per commit, whole appends only (2 of 4 fit in 10).
        assert log.commits >= 13
        for result in results:
            offsets = [o for _, o in result]
            assert offsets == list(range(offsets[0], offsets[0] + 4))
        big = await log.append([make_event(i) for i in range(100, 150)])
        assert [o for _, o in big] == list(range(100, 150))
    finally:
        await log.close()


async def test_failed_commit_fails_whole_group(log: EmbeddedLog, db_path: Path) -> None:
    await log.append([make_event(0)])
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON records WHEN NEW.key = 'sip:bad@example.com' "
            "BEGIN SELECT RAISE(ABORT, 'refused by test trigger'); END"
        )
    conn.close()
    bad = BindingRemoved(ts=1.0, node="n1", aor="sip:bad@example.com", key="k")
    appends = [log.append([make_event(i)]) for i in range(1, 20)] + [log.append([bad])]
    results = await asyncio.gather(*appends, return_exceptions=True)
    assert all(isinstance(r, LogError) for r in results), results
    assert "refused by test trigger" in str(results[0])
    assert await log.end_position() == {0: 1}
    # The writer carries on; offsets stay consecutive.
    assert await log.append([make_event(1)]) == [(0, 1)]
    assert [r.offset for r in await read_all(log)] == [0, 1]


async def test_stalled_commit_fails_appends_after_append_timeout(db_path: Path) -> None:
    """A commit stuck in the writer thread (a hung disk) fails its appends and those
    queued behind it once ``append_timeout`` passes; what it wrote still counts."""
    import threading

    log = EmbeddedLog(db_path, append_timeout=0.2)
    await log.open()
    try:
        release = threading.Event()
        write = log._write_sync

        def stuck_once(rows):  # type: ignore[no-untyped-def]
            log._write_sync = write  # type: ignore[method-assign]
            release.wait(10)
            return write(rows)

        log._write_sync = stuck_once  # type: ignore[method-assign]
        started = time.monotonic()
        in_flight = asyncio.ensure_future(log.append([make_event(0)]))
        await asyncio.sleep(0.05)  # the writer has taken it
        queued = asyncio.ensure_future(log.append([make_event(1)]))
        results = await asyncio.gather(in_flight, queued, return_exceptions=True)
        waited = time.monotonic() - started
        assert [type(r) for r in results] == [LogError, LogError], results
        assert "within 0.2 s" in str(results[0]) and "outcome unknown" in str(results[0])
        assert "not appended" in str(results[1])
        assert 0.15 <= waited < 2, waited
        assert log.stalls == 1
        release.set()
        # The writer carries on: the stuck commit landed, the queued append did not.
        assert await log.append([make_event(2)]) == [(0, 1)]
        assert [r.event for r in await read_all(log)] == [make_event(0), make_event(2)]
    finally:
        release.set()
        await log.close()


async def test_durable_across_reopen(db_path: Path) -> None:
    events = [make_event(i) for i in range(50)]
    log = EmbeddedLog(db_path)
    await log.open()
    await log.append(events[:30])
    await log.append(events[30:])
    await log.close()

    log = EmbeddedLog(db_path)
    await log.open()
    try:
        assert await log.end_position() == {0: 50}
        assert [r.event for r in await read_all(log)] == events
        assert await log.append([make_event(50)]) == [(0, 50)]
        assert await log.verify() == 51
    finally:
        await log.close()


async def test_appends_survive_process_exit_without_close(db_path: Path) -> None:
    script = (
        "import asyncio, os, sys\n"
        "from events.embedded import EmbeddedLog\n"
        "from tests.unit.test_embedded_log import make_event\n"
        "async def main():\n"
        "    log = EmbeddedLog(sys.argv[1])\n"
        "    await log.open()\n"
        "    await asyncio.gather(*(log.append([make_event(i)]) for i in range(40)))\n"
        "    os._exit(0)  # no close(): no checkpoint, records only in the WAL\n"
        "asyncio.run(main())\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        str(db_path),
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert await proc.wait() == 0
    assert Path(f"{db_path}-wal").stat().st_size > 0
    log = EmbeddedLog(db_path)
    await log.open()
    try:
        records = await read_all(log)
        assert sorted(r.event.ts for r in records) == [make_event(i).ts for i in range(40)]
        assert [r.offset for r in records] == list(range(40))
    finally:
        await log.close()


async def test_read_start_end_and_batches(log: EmbeddedLog) -> None:
    events = [make_event(i) for i in range(100)]
    await log.append(events)
    batches = [b async for b in log.read({0: 10}, {0: 45}, batch_size=10)]
    assert [len(b) for b in batches] == [10, 10, 10, 5]
    assert [r.offset for b in batches for r in b] == list(range(10, 45))
    assert [r.event for b in batches for r in b] == events[10:45]
    assert await read_all(log, start={0: 100}) == []
    assert await read_all(log, start={0: 150}) == []
    assert [r.offset for r in await read_all(log, start={0: 95}, end={0: 1000})] == [
        95,
        96,
        97,
        98,
        99,
    ]
    with pytest.raises(ValueError):
        await read_all(log, start={1: 0})


async def test_read_default_end_is_fixed_when_reading_starts(log: EmbeddedLog) -> None:
    await log.append([make_event(i) for i in range(30)])
    seen: list[int] = []
    async for batch in log.read(batch_size=10):
        seen.extend(r.offset for r in batch)
        await log.append([make_event(100)])
    assert seen == list(range(30))
    assert await log.end_position() == {0: 33}


async def test_follow_sees_new_appends_promptly(log: EmbeddedLog) -> None:
    log.poll_interval = 30.0  # prove the wake-up comes from the commit, not polling
    await log.append([make_event(i) for i in range(3)])
    seen: list[Record] = []
    got_five = asyncio.Event()

    async def consume() -> None:
        async for batch in log.follow({0: 1}):
            seen.extend(batch)
            if len(seen) >= 5:
                got_five.set()

    task = asyncio.create_task(consume())
    try:
        await asyncio.sleep(0.05)
        assert [r.offset for r in seen] == [1, 2]
        started = time.monotonic()
        await log.append([make_event(3)])
        await log.append([make_event(4), make_event(5)])
        await asyncio.wait_for(got_five.wait(), 2.0)
        assert time.monotonic() - started < 1.0
        await asyncio.sleep(0.05)
        assert [r.offset for r in seen] == [1, 2, 3, 4, 5]
        assert [r.event for r in seen] == [make_event(i) for i in range(1, 6)]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_follow_sees_other_writer_by_polling(log: EmbeddedLog, db_path: Path) -> None:
    log.poll_interval = 0.1
    other = EmbeddedLog(db_path)  # stands for another process on the same file
    await other.open()
    seen: list[int] = []
    got = asyncio.Event()

    async def consume() -> None:
        async for batch in log.follow():
            seen.extend(r.offset for r in batch)
            got.set()

    task = asyncio.create_task(consume())
    try:
        await asyncio.sleep(0.05)
        assert await other.append([make_event(0), make_event(1)]) == [(0, 0), (0, 1)]
        await asyncio.wait_for(got.wait(), 2.0)
        assert seen == [0, 1]
        assert await log.append([make_event(2)]) == [(0, 2)]  # writers share the offsets
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await other.close()


async def test_follow_ends_with_error_when_closed(db_path: Path) -> None:
    log = EmbeddedLog(db_path)
    await log.open()
    log.poll_interval = 30.0

    async def consume() -> None:
        async for _ in log.follow():
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    await log.close()
    with pytest.raises(LogError):
        await asyncio.wait_for(task, 2.0)


async def test_close_flushes_pending_and_append_after_close_fails(db_path: Path) -> None:
    log = EmbeddedLog(db_path)
    await log.open()
    tasks = [asyncio.create_task(log.append([make_event(i)])) for i in range(20)]
    await asyncio.sleep(0)  # let them queue
    await log.close()
    offsets = sorted(t.result()[0][1] for t in tasks)
    assert offsets == list(range(20))
    with pytest.raises(LogError):
        await log.append([make_event(99)])
    with pytest.raises(LogError):
        await log.end_position()
    await log.close()  # idempotent

    log = EmbeddedLog(db_path)
    await log.open()
    try:
        assert await log.end_position() == {0: 20}
    finally:
        await log.close()


async def test_reader_cancelled_mid_fetch_then_close(db_path: Path) -> None:
    log = EmbeddedLog(db_path)
    await log.open()
    await log.append([make_event(i) for i in range(20_000)])

    async def consume() -> None:
        async for _ in log.read(batch_size=20_000):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.005)  # most likely inside the fetch thread now
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert len(await read_all(log, start={0: 19_990})) == 10
    await log.close()
    with pytest.raises(LogError):
        await read_all(log)


async def test_append_before_open_fails(db_path: Path) -> None:
    with pytest.raises(LogError):
        await EmbeddedLog(db_path).append([make_event(0)])


async def test_flipped_payload_bytes_name_offset(db_path: Path) -> None:
    await make_closed_log(db_path, 10)
    with sqlite3.connect(db_path) as conn:
        (payload,) = conn.execute('SELECT payload FROM records WHERE "offset" = 6').fetchone()
        damaged = bytearray(payload)
        damaged[20] ^= 0x01
        conn.execute('UPDATE records SET payload = ? WHERE "offset" = 6', (bytes(damaged),))
    conn.close()

    progress: list[tuple[int, int]] = []
    log = EmbeddedLog(db_path, on_progress=lambda done, total: progress.append((done, total)))
    await log.open()  # SQLite itself is sound: the damage is found by reading
    try:
        with pytest.raises(LogCorruption) as info:
            await read_all(log)
        assert info.value.partition == 0
        assert info.value.offset == 6
        assert "crc" in info.value.reason
        assert str(db_path) in str(info.value)
        with pytest.raises(LogCorruption) as info:
            await log.verify()
        assert info.value.offset == 6
        assert progress[0] == (0, 10)
        # Records before the damage are still readable.
        assert len(await read_all(log, end={0: 6})) == 6
    finally:
        await log.close()


async def test_flipped_byte_in_file_is_detected(db_path: Path) -> None:
    await make_closed_log(db_path, 10)
    data = bytearray(db_path.read_bytes())
    marker = b"10.0.0.1:10005"  # in the payload of offset 5 only
    index = data.find(marker)
    assert index > 0 and data.find(marker, index + 1) == -1
    data[index + len(marker) - 1] ^= 0x02
    db_path.write_bytes(bytes(data))

    log = EmbeddedLog(db_path)
    await log.open()
    try:
        with pytest.raises(LogCorruption) as info:
            await log.verify()
        assert info.value.offset == 5
    finally:
        await log.close()


async def test_undecodable_payload_with_valid_crc(db_path: Path) -> None:
    await make_closed_log(db_path, 5)
    bad = b'{"type":"no.such.event.v9","ts":1.0,"node":"n1"}'
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            'UPDATE records SET payload = ?, crc = ? WHERE "offset" = 2', (bad, zlib.crc32(bad))
        )
    conn.close()
    log = EmbeddedLog(db_path)
    await log.open()
    try:
        with pytest.raises(LogCorruption) as info:
            await read_all(log)
        assert info.value.offset == 2
        assert "undecodable" in info.value.reason
    finally:
        await log.close()


async def test_missing_record_is_corruption(db_path: Path) -> None:
    await make_closed_log(db_path, 10)
    with sqlite3.connect(db_path) as conn:
        conn.execute('DELETE FROM records WHERE "offset" IN (4, 5)')
    conn.close()
    log = EmbeddedLog(db_path)
    await log.open()
    try:
        with pytest.raises(LogCorruption) as info:
            await log.verify()
        assert info.value.offset == 4
        assert "missing" in info.value.reason
    finally:
        await log.close()


@pytest.mark.parametrize("keep", [0.5, 150, 50, 8, 0])
async def test_truncated_file_is_clear_log_error(db_path: Path, keep: float) -> None:
    await make_closed_log(db_path, 3000)
    size = db_path.stat().st_size
    assert not Path(f"{db_path}-wal").exists() or Path(f"{db_path}-wal").stat().st_size == 0
    with db_path.open("r+b") as f:
        f.truncate(int(size * keep) if keep < 1 else int(keep))
    log = EmbeddedLog(db_path)
    with pytest.raises(LogError) as info:
        await log.open()
    assert str(db_path) in str(info.value)
    with pytest.raises(LogError):
        await log.append([make_event(0)])


async def test_garbage_file_is_clear_log_error(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not a database, just some text\n" * 200)
    with pytest.raises(LogError) as info:
        await EmbeddedLog(db_path).open()
    assert str(db_path) in str(info.value)
    assert "not a SQLite database" in str(info.value)
    assert db_path.read_bytes().startswith(b"this is not")  # left untouched


async def test_other_sqlite_database_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as conn:
        conn.execute("CREATE TABLE something (x)")
    conn.close()
    with pytest.raises(LogError) as info:
        await EmbeddedLog(db_path).open()
    assert "not a siphon event log" in str(info.value)


async def test_future_format_version_is_refused(db_path: Path) -> None:
    await make_closed_log(db_path, 2)
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version={FORMAT_VERSION + 41}")
    conn.close()
    with pytest.raises(LogError) as info:
        await EmbeddedLog(db_path).open()
    message = str(info.value)
    assert str(db_path) in message
    assert str(FORMAT_VERSION + 41) in message


async def test_verify_reports_progress(db_path: Path) -> None:
    progress: list[tuple[int, int]] = []
    log = EmbeddedLog(db_path, on_progress=lambda done, total: progress.append((done, total)))
    await log.open()
    try:
        await log.append([make_event(i) for i in range(45_000)])
        assert await log.verify() == 45_000
    finally:
        await log.close()
    assert progress[0] == (0, 45_000)
    assert progress[-1] == (45_000, 45_000)
    assert len(progress) >= 3
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(progress))


async def test_owned_resumes_from_the_committed_position(tmp_path) -> None:
    from events.embedded import EmbeddedLog
    from events.schema import Binding, BindingAdded

    def ev(i: int) -> BindingAdded:
        return BindingAdded(ts=float(i), node="n1", aor=f"sip:u{i}@example.com",
                            binding=Binding(key="k", uri="sip:u@h", expires_at=1e10))

    path = tmp_path / "log.db"
    log = EmbeddedLog(path)
    await log.open()
    await log.append([ev(0), ev(1)])
    stream = log.owned("callbacks")
    pending = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0.05)
    assert not pending.done()  # a new group starts at the end: history is not replayed
    await log.append([ev(2), ev(3)])
    batch = await asyncio.wait_for(pending, 5)
    assert [r.offset for r in batch] == [2, 3]
    await log.commit("callbacks", {0: 3})  # handled offset 2 only, then "crashed"
    await stream.aclose()
    await log.close()
    log = EmbeddedLog(path)
    await log.open()
    batch = await asyncio.wait_for(log.owned("callbacks").__anext__(), 5)
    assert [r.offset for r in batch] == [3]
    assert log.owned_partitions("callbacks") == {0} and log.partition_for("x") == 0
    await log.close()
