"""Parsing a batch: without ``try()`` when every record parses, again with it when one
does not; straight into the insert with one DuckDB thread, through a temporary table
with several; every way the same rows, and nothing left behind by a failed batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_audit_support import (
    append_raw,
    crafted_history,
    ingest,
    query,
    random_history,
    snapshot,
    write_log,
)

from events.codec import encode
from projections.duckdb import AuditProjector, RawBatch, connect, ensure_schema

GARBAGE = [b"\xff\xfe not utf-8", b"not json at all", b'{"type": "binding.added.v1", "ts":']


THREADS = pytest.mark.parametrize("threads", [1, 2])


def _write(db: Path, payloads: list[bytes], *, derive_every: int = 0,
           threads: int = 2) -> None:
    con = connect(db)
    try:
        con.execute(f"SET threads = {threads}")
        ensure_schema(con)
        projector = AuditProjector(con, derive_every=derive_every)
        projector.write(RawBatch(0, range(len(payloads)), payloads))
    finally:
        con.close()


@THREADS
@pytest.mark.parametrize("bad", GARBAGE)
def test_one_bad_record_does_not_change_the_others(tmp_path: Path, bad: bytes,
                                                   threads: int) -> None:
    """A record that makes the fast parse fail sends the whole batch through the
    ``try()`` parse: its rows are those of the fast parse, plus the bad record kept."""
    good = [encode(e) for e in crafted_history()]
    _write(tmp_path / "fast.duckdb", good, threads=threads)
    _write(tmp_path / "slow.duckdb", [*good[:5], bad, *good[5:]], threads=threads)
    cols = "* EXCLUDE (log_offset)"
    fast = query(tmp_path / "fast.duckdb", f"SELECT {cols} FROM events_raw ORDER BY log_offset")
    slow = query(tmp_path / "slow.duckdb", f"SELECT {cols} FROM events_raw ORDER BY log_offset")
    assert len(slow) == len(fast) + 1
    assert slow[:5] + slow[6:] == fast
    (kept,) = query(tmp_path / "slow.duckdb",
                    "SELECT known, error, json IS NULL FROM events_raw WHERE log_offset = 5")
    assert kept[0] is False and kept[1].startswith("payload is not")
    # nor do the derived tables (session ids are positions: shifted by the bad record)
    sql = ("SELECT aor, binding_key, started_at, ended_at, end_reason, refresh_count "
           "FROM binding_sessions ORDER BY ALL")
    sessions = query(tmp_path / "fast.duckdb", sql)
    assert len(sessions) == 8 and sessions == query(tmp_path / "slow.duckdb", sql)


@THREADS
def test_a_failed_batch_leaves_nothing_and_the_next_one_goes_in(tmp_path: Path,
                                                                threads: int) -> None:
    """The parse runs before the batch's transaction (a failed statement would abort
    it): a batch that then fails leaves no rows, no position and no scratch table."""
    db = tmp_path / "audit.duckdb"
    events = [encode(e) for e in crafted_history()]
    con = connect(db)
    try:
        con.execute(f"SET threads = {threads}")
        ensure_schema(con)
        projector = AuditProjector(con)

        def boom() -> None:
            raise RuntimeError("boom")

        projector.fail_after_events = boom
        with pytest.raises(RuntimeError, match="boom"):
            projector.write(RawBatch(0, range(3), [events[0], GARBAGE[1], events[1]]))
        assert projector.position() == {}
        assert con.execute("SELECT count(*) FROM events_raw").fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM duckdb_tables() "
                           "WHERE table_name = '_raw'").fetchone() == (0,)
        projector.fail_after_events = None
        projector.write(RawBatch(0, range(len(events)), events))
        assert projector.position() == {0: len(events)}
    finally:
        con.close()
    rows = query(db, "SELECT count(*), count(*) FILTER (WHERE known) FROM events_raw")
    assert rows == [(len(events), len(events))]


@THREADS
def test_a_json_array_or_scalar_is_kept_like_before(tmp_path: Path, threads: int) -> None:
    """Valid JSON that is not an object does not fail the fast parse; it is kept with
    the same reason either way."""
    good = [encode(e) for e in crafted_history()[:3]]
    odd = [b'["a", "list"]', b"42", json.dumps({"no": "type"}).encode()]
    _write(tmp_path / "a.duckdb", good + odd, threads=threads)
    _write(tmp_path / "b.duckdb", good + odd + [GARBAGE[1]], threads=threads)
    sql = "SELECT log_offset, type, known, error, json FROM events_raw ORDER BY log_offset"
    a, b = query(tmp_path / "a.duckdb", sql), query(tmp_path / "b.duckdb", sql)
    assert a == b[:-1]
    assert [r[3] for r in a[3:]] == ["payload is not a JSON object",
                                     "payload is not a JSON object", "no event type"]


async def test_one_thread_or_several_give_the_same_database(tmp_path: Path) -> None:
    """One DuckDB thread: parsed straight into the insert; several: through a temporary
    table. Same rows, sessions and positions, whatever the batching."""
    history = random_history(1500, seed=5)
    log_path = tmp_path / "events.db"
    await write_log(log_path, history)
    append_raw(log_path, GARBAGE)  # the last batch goes the try() way
    await write_log(log_path, history[:10])
    snaps = []
    for threads in (1, 2):
        for size, derive_every in ((97, 1), (400, 10**9)):
            db = tmp_path / f"t{threads}-{size}.duckdb"
            n = await ingest(log_path, db, batch_size=size, derive_every=derive_every,
                             threads=threads)
            assert n == 1500 + len(GARBAGE) + 10
            snaps.append(snapshot(db))
    assert all(s == snaps[0] for s in snaps)
