"""The session state machine (NumPy, over the derivation's events and the bindings held
before them): whatever the cut points between derivations, the same sessions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from test_audit_support import (
    added,
    append_raw,
    crafted_history,
    expired,
    ingest,
    query,
    refreshed,
    removed,
    snapshot,
    write_log,
)

from projections.duckdb.projector import _sessions

A = "sip:zoe@example.com"


def edge_history() -> list:
    """Carried bindings touched only by no-ops, removals before any put, refreshes of
    lapsed bindings, an expiry of an older expiry, several keys interleaved."""
    return [
        removed(A, "z1", 1),                 # nothing held: no-op
        expired(A, "z1", 1.1, 5),            # nothing held: no-op
        refreshed(A, "z1", 1.2, 2),          # starts a session (refreshed)
        added(A, "z2", 1.3, 9),
        expired(A, "z1", 1.4, 1.9),          # not the expiry in force: no-op
        refreshed(A, "z1", 1.5, 3),          # refresh
        refreshed(A, "z1", 3.5, 4),          # lapsed at 3h: expired, new session
        expired(A, "z2", 4, 8),              # not the expiry in force: no-op
        added(A, "z1", 4.5, 6),              # registered over
        removed(A, "z1", 5, reason="admin"),
        removed(A, "z1", 5.1),               # already gone: no-op
        expired(A, "z1", 6, 6),              # already gone: no-op
        refreshed(A, "z1", 6.5, 7),          # after a removal: new session
        expired(A, "z1", 7.5, 7),            # ends it
        refreshed(A, "z2", 8, 10),
        removed(A, "z3", 8.5),               # unknown key: no-op
    ]


async def test_any_cut_gives_the_same_sessions(tmp_path: Path) -> None:
    events = edge_history() + crafted_history()
    log_path = tmp_path / "events.db"
    await write_log(log_path, events)
    await ingest(log_path, tmp_path / "once.duckdb")
    once = snapshot(tmp_path / "once.duckdb")
    for size in (1, 2, 3, 7):
        db = tmp_path / f"cut-{size}.duckdb"
        await ingest(log_path, db, batch_size=size, derive_every=1)
        assert snapshot(db) == once, size
    rows = query(tmp_path / "once.duckdb", f"""
        SELECT binding_key, started_by, refresh_count, end_reason,
               epoch(started_at) - {edge_history()[0].ts},
               epoch(ended_at) - {edge_history()[0].ts}
        FROM binding_sessions WHERE aor = '{A}' ORDER BY started_at""")
    h = 3600.0
    assert [(k, by, n, r, round(s / h, 3), None if e is None else round(e / h, 3))
            for k, by, n, r, s, e in rows] == [
        ("z1", "refreshed", 1, "expired", 0.2, 2.0),         # lapsed at 3h (t=1h + 2)
        ("z2", "added", 1, None, 0.3, None),                 # refreshed at 8h, open
        ("z1", "refreshed", 0, "registered-over", 2.5, 3.0),  # expiry 4h, over at 4.5h
        ("z1", "added", 0, "admin", 3.5, 4.0),
        ("z1", "refreshed", 0, "expired", 5.5, 6.0),
    ]


def test_state_machine_on_empty_input() -> None:
    empty = {"pos": np.zeros(0, np.int64), "k": np.zeros(0, np.int8),
             "h_hi": np.zeros(0, np.uint64), "h_lo": np.zeros(0, np.uint64),
             "ts": np.zeros(0), "expires_at": np.zeros(0), "reason": np.zeros(0, object)}
    held = {"h_hi": np.array([1], np.uint64), "h_lo": np.array([2], np.uint64),
            "put_ts": np.array([1.0]), "expires_epoch": np.array([2.0])}
    out = _sessions(empty, held)  # a held binding without events is not touched
    assert all(len(col) == 0 for col in out.values())


async def test_a_derivation_without_binding_events(tmp_path: Path) -> None:
    """Bindings held, then records that are not binding events (a trunk event, garbage):
    the derivation takes them in and changes no session."""
    log_path, db = tmp_path / "events.db", tmp_path / "audit.duckdb"
    await write_log(log_path, crafted_history())
    await ingest(log_path, db)
    before = snapshot(db)
    trunk = {"type": "trunk.heartbeat.v1", "ts": crafted_history()[-1].ts + 1, "node": "n1",
             "trunk_id": "t9", "lease_expires_at": crafted_history()[-1].ts + 60}
    append_raw(log_path, [json.dumps(trunk).encode(), b"garbage"])
    assert await ingest(log_path, db, derive_every=1) == 2
    after = snapshot(db)
    assert after["audit_derived"] == [(0, len(crafted_history()) + 2)]
    for table in ("binding_sessions_closed", "binding_open", "audit_aors"):
        assert after[table] == before[table], table
