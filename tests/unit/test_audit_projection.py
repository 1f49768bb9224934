"""The audit projection agrees with the in-memory registrar projection, whatever the
batching; unknown records are kept; trunk leases."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from test_audit_support import (
    D0,
    H,
    append_raw,
    at,
    crafted_history,
    ingest,
    query,
    random_history,
    snapshot,
    write_log,
)

from events.embedded import EmbeddedLog
from projections import registrar as reg
from projections.duckdb import reports


@pytest.fixture(scope="module")
def history() -> list:
    return random_history(3000, seed=11)


async def test_registered_at_agrees_with_in_memory_projection(tmp_path: Path,
                                                              history: list) -> None:
    log_path, db = tmp_path / "events.db", tmp_path / "audit.duckdb"
    await write_log(log_path, history)
    assert await ingest(log_path, db, batch_size=700) == len(history)

    log = EmbeddedLog(log_path)
    await log.open()
    records = []
    async for batch in log.read():
        records.extend(batch)
    await log.close()
    end = records[-1].event.ts
    checked = live_seen = 0
    for i in range(1, 41):
        when = D0 + (end - D0) * i / 41 + 0.123  # never an event's own time
        state = reg.RegistrarState()
        for rec in records:
            if rec.event.ts > when:
                break
            reg.apply(state, rec.event)
        expected = []
        for aor in sorted(state.aors):
            expected += [(aor, b.key, b.uri, b.expires_at, b.q, b.node)
                         for b in reg.lookup(state, aor, when)]
        rows = query(db, reports.registered_at(round(when * 1e6)))
        got = [(r[0], r[1], r[2], r[3], r[7]) for r in rows]
        assert got == [(a, k, u, q, n) for a, k, u, _, q, n in expected], f"at {when}"
        for row, exp in zip(rows, expected, strict=True):
            assert abs(row[4].replace(tzinfo=UTC).timestamp() - exp[3]) < 1e-5
        checked += 1
        live_seen += len(expected)
    assert checked == 40 and live_seen > 100  # the comparison did look at bindings


async def test_batching_does_not_change_anything(tmp_path: Path, history: list) -> None:
    log_path = tmp_path / "events.db"
    await write_log(log_path, history[:300])
    snaps = []
    for size in (5, 16, 64, 100_000):
        # derived tables advanced in every batch's transaction, every few batches, or
        # once at the end of the sync
        for derive_every in (1, 50, 10**9):
            db = tmp_path / f"audit-{size}-{derive_every}.duckdb"
            assert await ingest(log_path, db, batch_size=size, derive_every=derive_every) == 300
            snaps.append(snapshot(db))
    assert all(s == snaps[-1] for s in snaps)
    # and a sync in two goes (the log grew in between) equals one sync of everything
    once, twice = tmp_path / "once.db", tmp_path / "twice.db"
    await write_log(once, history[:1200])
    await ingest(once, tmp_path / "audit-once.duckdb")
    db = tmp_path / "audit-two-goes.duckdb"
    await write_log(twice, history[:600])
    assert await ingest(twice, db) == 600
    await write_log(twice, history[600:1200])
    assert await ingest(twice, db, batch_size=333, derive_every=1) == 600
    a, b = snapshot(db), snapshot(tmp_path / "audit-once.duckdb")
    assert a == b


async def test_session_count_matches_added_events(tmp_path: Path, history: list) -> None:
    log_path, db = tmp_path / "events.db", tmp_path / "audit.duckdb"
    await write_log(log_path, history)
    await ingest(log_path, db, batch_size=500)
    # every Added starts a session; a Refreshed starts one only when nothing live is held
    ((sessions, by_added, by_refresh),) = query(db, """
        SELECT count(*), count(*) FILTER (WHERE started_by = 'added'),
               count(*) FILTER (WHERE started_by = 'refreshed') FROM binding_sessions""")
    assert by_added == sum(type(e).__name__ == "BindingAdded" for e in history)
    assert sessions == by_added + by_refresh
    # open sessions are exactly the bindings the in-memory projection still holds
    state = reg.RegistrarState()
    for e in history:
        reg.apply(state, e)
    held = sorted((aor, k) for aor, bs in state.aors.items() for k in bs)
    assert sorted(query(db, "SELECT aor, binding_key FROM binding_open")) == held


async def test_unknown_and_undecodable_records_are_kept(tmp_path: Path) -> None:
    log_path, db = tmp_path / "events.db", tmp_path / "audit.duckdb"
    await write_log(log_path, crafted_history()[:3])
    future = json.dumps({"type": "binding.added.v9", "ts": at(3), "node": "n9",
                         "aor": "sip:zed@example.com", "colour": "blue"}).encode()
    raw = [future, b"\xff\xfe not utf-8", b"not json at all", b'["a", "list"]',
           b'{"no": "type"}', b'{"type": "binding.added.v1", "ts": 5}',
           b'{"type":"binding.removed.v1",\n "ts": 1, "node": "x", "aor": "a", "key": "k"}']
    append_raw(log_path, raw)
    await write_log(log_path, crafted_history()[3:5])
    assert await ingest(log_path, db) == 3 + len(raw) + 2
    rows = query(db, "SELECT log_offset, type, known, error, json FROM events_raw "
                     "ORDER BY log_offset")
    assert [r[0] for r in rows] == list(range(12))
    odd = {r[0]: r[1:] for r in rows[3:10]}
    assert odd[3] == ("binding.added.v9", False, "unknown event type", future.decode())
    assert odd[4][1:3] == (False, "payload is not UTF-8") and odd[4][3] is None
    assert odd[5][1:] == (False, "payload is not a JSON object", "not json at all")
    assert odd[6][1:3] == (False, "payload is not a JSON object")
    assert odd[7][1:3] == (False, "no event type")
    assert odd[8][:3] == ("binding.added.v1", False,
                           "missing or mistyped fields for binding.added.v1")
    assert odd[9][:2] == ("binding.removed.v1", True)  # a newline inside is fine too
    assert query(db, "SELECT count(*) FROM unknown_events") == [(6,)]
    # and the known ones around them were derived as usual
    assert query(db, "SELECT count(*) FROM binding_sessions") == [(3,)]


async def test_trunk_leases_from_raw_trunk_events(tmp_path: Path) -> None:
    log_path, db = tmp_path / "events.db", tmp_path / "audit.duckdb"
    await write_log(log_path, crafted_history()[:1])

    def ev(kind: str, t_h: float, lease_h: float | None = None, tid: str = "t1") -> bytes:
        body: dict = {"type": f"trunk.{kind}.v1", "ts": at(t_h), "node": "n1", "trunk_id": tid}
        if lease_h is not None:
            body["lease_expires_at"] = at(lease_h)
        if kind == "registered":
            body["trunk"] = {"sip_uri": f"sip:{tid}.example.net", "transport": "tls"}
        return json.dumps(body).encode()

    append_raw(log_path, [
        ev("registered", 6, 7), ev("heartbeat", 6.5, 7.5), ev("heartbeat", 7.2, 8.2),
        ev("expired", 9, 8.2),                                  # lease ran out at 8.2h
        ev("registered", 10, 11), ev("deregistered", 10.5),
        ev("registered", 12, 13, tid="t2"), ev("heartbeat", 14, 15, tid="t2"),  # lapsed 13h
        ev("heartbeat", 20, 21, tid="t3"),                      # unknown trunk: no-op
    ])
    await ingest(log_path, db)
    leases = query(db, "SELECT trunk_id, started_at, effective_end, end_reason, heartbeats, "
                       "sip_uri FROM trunk_leases ORDER BY trunk_id, started_at")

    def h(hours: float) -> datetime:
        return datetime.fromtimestamp(at(hours), UTC).replace(tzinfo=None)

    assert leases == [
        ("t1", h(6), h(8.2), "expired", 2, "sip:t1.example.net"),
        ("t1", h(10), h(10.5), "deregistered", 0, "sip:t1.example.net"),
        ("t2", h(12), h(13), "expired", 0, "sip:t2.example.net"),
        ("t2", h(14), h(15), None, 1, "sip:t2.example.net"),
    ]
    up = query(db, reports.trunk_uptime(int(at(6) * 1e6), int(at(30) * 1e6)))
    assert up == [("t1", 9720.0, 11.25, 2, 2), ("t2", 7200.0, 8.333, 2, 1),
                  ("t3", 0.0, 0.0, 0, 1)]
    assert H == 3600.0


async def test_multi_partition_batches_and_source_binding(tmp_path: Path) -> None:
    """Batches as Kafka gives them (lists of partition/offset) give the same rows; a
    database stays bound to the log it was built from."""
    from events.codec import encode
    from projections.duckdb import AuditError, AuditProjector, RawBatch, connect, ensure_schema

    log_path = tmp_path / "events.db"
    events = crafted_history()
    await write_log(log_path, events)
    await ingest(log_path, tmp_path / "a.duckdb")
    con = connect(tmp_path / "b.duckdb")
    ensure_schema(con)
    projector = AuditProjector(con)
    projector.check_source(f"embedded:{log_path.absolute()}")
    projector.write(RawBatch([0] * 10, list(range(10)), [encode(e) for e in events[:10]]))
    with pytest.raises(AuditError, match=r"starts at offset 3 .* database is at 10"):
        projector.write(RawBatch([0], [3], [encode(events[3])]))
    projector.write(RawBatch([0] * 8, list(range(10, 18)), [encode(e) for e in events[10:]]))
    with pytest.raises(AuditError, match="was built from embedded:"):
        projector.check_source("kafka:broker:9092/siphon.events")
    con.close()
    assert snapshot(tmp_path / "a.duckdb") == snapshot(tmp_path / "b.duckdb")


def test_every_event_field_has_a_column() -> None:
    """The payload of a known event is stored only as typed columns: each field of each
    event struct must be parsed into one (else it would be lost)."""
    import msgspec

    from events.schema import EVENT_TYPES, Binding
    from projections.duckdb.projector import _STRUCT

    parsed = json.loads(_STRUCT)
    for cls in EVENT_TYPES:
        for f in msgspec.structs.fields(cls):
            assert f.encode_name in parsed, (cls.__name__, f.encode_name)
    for f in msgspec.structs.fields(Binding):
        assert f.encode_name in parsed["binding"], ("Binding", f.encode_name)
    assert parsed["trunk"] == "JSON"  # the trunk record is kept whole (free-form attributes)


async def test_known_events_round_trip_through_the_columns(tmp_path: Path) -> None:
    from events.schema import Binding, BindingAdded, BindingRemoved, Trunk, TrunkRegistered

    b = Binding(key="k1", uri="sip:a@192.0.2.9:5062;ob", expires_at=at(2), q=0.5, call_id="c1",
                cseq=7, source="198.51.100.1:5062", transport="tls", local="192.0.2.1:5061",
                conn_id="tls-9", instance="<urn:uuid:1>", reg_id=2,
                path=["<sip:edge;lr>", "<sip:edge2;lr>"], params=[("+sip.instance", '"x"'),
                                                                  ("ob", None)],
                user_agent="UA/1", registered_at=at(1), node="n7")
    events = [
        BindingAdded(ts=at(1), node="n1", aor="sip:a@example.com", binding=b),
        BindingRemoved(ts=at(1.5), node="n1", aor="sip:a@example.com", key="k1", reason="admin",
                       call_id="c2", cseq=8, source="198.51.100.2:5060", transport="tcp",
                       user_agent="UA/2"),
        TrunkRegistered(ts=at(1.6), node="n2", trunk_id="t1", lease_expires_at=at(1.7),
                        replaced=True, trunk=Trunk(sip_uri="sip:t1.example.net", transport="tls",
                                                   enabled=False,
                                                   attributes={"max_channels": 30})),
    ]
    log_path, db = tmp_path / "events.db", tmp_path / "audit.duckdb"
    await write_log(log_path, events)
    await ingest(log_path, db)
    rows = query(db, "SELECT * EXCLUDE (log_partition, log_offset, trunk) FROM events "
                     "ORDER BY log_offset")
    cols = [c[0] for c in query(db, "DESCRIBE SELECT * EXCLUDE (log_partition, log_offset, "
                                    "trunk) FROM events")]
    got = [{c: v for c, v in zip(cols, r, strict=True) if v is not None} for r in rows]
    assert got[0] == {
        "type": "binding.added.v1", "known": True, "ts": at(1), "node": "n1",
        "aor": "sip:a@example.com", "key": "k1", "uri": "sip:a@192.0.2.9:5062;ob",
        "expires_at": at(2), "q": 0.5, "call_id": "c1", "cseq": 7,
        "source": "198.51.100.1:5062", "transport": "tls", "local": "192.0.2.1:5061",
        "conn_id": "tls-9", "instance": "<urn:uuid:1>", "reg_id": 2,
        "path": ["<sip:edge;lr>", "<sip:edge2;lr>"],
        "params": [["+sip.instance", '"x"'], ["ob", None]], "user_agent": "UA/1",
        "registered_at": at(1), "binding_node": "n7"}
    assert got[1] == {
        "type": "binding.removed.v1", "known": True, "ts": at(1.5), "node": "n1",
        "aor": "sip:a@example.com", "key": "k1", "reason": "admin", "call_id": "c2",
        "cseq": 8, "source": "198.51.100.2:5060", "transport": "tcp", "user_agent": "UA/2"}
    assert got[2] == {"type": "trunk.registered.v1", "known": True, "ts": at(1.6),
                      "node": "n2", "trunk_id": "t1", "lease_expires_at": at(1.7),
                      "replaced": True}
    (trunk,) = query(db, "SELECT trunk FROM events WHERE trunk_id = 't1'")[0]
    assert json.loads(trunk) == {"sip_uri": "sip:t1.example.net", "transport": "tls",
                                 "enabled": False, "attributes": {"max_channels": 30}}
