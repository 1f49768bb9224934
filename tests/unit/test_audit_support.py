"""Helpers of the audit tests (no tests here): event histories, raw records, ingesting."""

from __future__ import annotations

import random
import sqlite3
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import duckdb

from events.embedded import EmbeddedLog
from events.schema import Binding, BindingAdded, BindingExpired, BindingRefreshed, BindingRemoved
from projections.duckdb import AuditProjector, EmbeddedRawSource, catch_up, connect, ensure_schema
from projections.duckdb.runner import DERIVE_EVERY

D0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
H = 3600.0


def at(hours: float) -> float:
    return D0 + hours * H


def binding(key: str, expires_h: float, *, t_h: float, node: str = "n1",
            uri: str | None = None, q: float = 1.0) -> Binding:
    return Binding(key=key, uri=uri or f"sip:{key}@192.0.2.1:5060", expires_at=at(expires_h),
                   q=q, call_id=f"cid-{key}", cseq=1, source="198.51.100.7:5060",
                   user_agent="TestPhone/1.0", registered_at=at(t_h), node=node)


def added(aor: str, key: str, t_h: float, exp_h: float, node: str = "n1") -> BindingAdded:
    return BindingAdded(ts=at(t_h), node=node, aor=aor,
                        binding=binding(key, exp_h, t_h=t_h, node=node))


def refreshed(aor: str, key: str, t_h: float, exp_h: float,
              node: str = "n1") -> BindingRefreshed:
    return BindingRefreshed(ts=at(t_h), node=node, aor=aor,
                            binding=binding(key, exp_h, t_h=t_h, node=node))


def removed(aor: str, key: str, t_h: float, reason: str = "deregistered",
            node: str = "n1") -> BindingRemoved:
    return BindingRemoved(ts=at(t_h), node=node, aor=aor, key=key, reason=reason)


def expired(aor: str, key: str, t_h: float, exp_h: float, node: str = "n1") -> BindingExpired:
    return BindingExpired(ts=at(t_h), node=node, aor=aor, key=key, expires_at=at(exp_h))


def crafted_history() -> list[Any]:
    """The hand-checked history (see test_audit_charging.py for the expected figures)."""
    A, B, C = "sip:alice@example.com", "sip:bob@example.com", "sip:carol@example.com"
    D, E, F = "sip:dave@example.com", "sip:eve@example.com", "sip:frank@example.com"
    return [
        added(E, "e1", 2, 6.5, node="n2"),          # lapses at 6.5h, never expired
        added(A, "a1", 5, 7),
        refreshed(A, "a1", 6.5, 8),
        added(A, "a2", 7, 9),                        # overlaps a1
        removed(A, "a1", 7.5),
        refreshed(A, "a2", 8.5, 10),
        expired(A, "a2", 8.6, 9),                    # stale sweeper view: no-op
        expired(A, "a2", 10 + 30 / 3600, 10),        # lapsed at 10h
        refreshed(F, "f1", 12, 13),                  # refresh of a binding not held
        added(C, "c1", 20, 21, node="n2"),
        refreshed(C, "c1", 20.5, 21.5, node="n2"),   # then node n2 stops
        added(B, "b1", 22, 26),                      # crosses midnight
        added(B, "b1", 23, 27),                      # registered over
        removed(B, "b1", 26, reason="admin"),
        expired(B, "b1", 26.5, 27),                  # binding gone already: no-op
        removed(B, "bX", 27),                        # unknown key: no-op
        added(D, "d1", 28, 40),                      # open past the window
        expired(C, "c1", 29, 21.5),                  # another node sweeps n2's binding
    ]


async def write_log(path: Path, events: Sequence[Any], batch: int = 50_000) -> None:
    log = EmbeddedLog(path, group_commit_max=max(batch, 2000))
    await log.open()
    try:
        for i in range(0, len(events), batch):
            await log.append(list(events[i:i + batch]))
    finally:
        await log.close()


def append_raw(path: Path, payloads: Sequence[bytes]) -> None:
    """Append records with arbitrary payloads (unknown types, garbage) to an embedded log,
    as another writer could: straight into its SQLite table, with a valid crc."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        base = conn.execute('SELECT COALESCE(MAX("offset"), -1) + 1 FROM records').fetchone()[0]
        conn.executemany(
            'INSERT INTO records ("offset", ts, key, payload, crc) VALUES (?, ?, ?, ?, ?)',
            [(base + i, 0.0, "raw", p, zlib.crc32(p)) for i, p in enumerate(payloads)])
        conn.execute("COMMIT")
    finally:
        conn.close()


async def ingest(log_path: Path, db_path: Path, *, batch_size: int = 250_000,
                 fail: Callable[[], None] | None = None,
                 derive_every: int = DERIVE_EVERY, threads: int | None = None) -> int:
    con = connect(db_path)
    try:
        if threads is not None:
            con.execute(f"SET threads = {threads}")
        ensure_schema(con)
        projector = AuditProjector(con)
        projector.fail_after_events = fail
        source = EmbeddedRawSource(log_path)
        await source.open()
        try:
            return await catch_up(projector, source, batch_size=batch_size,
                                  derive_every=derive_every)
        finally:
            await source.close()
    finally:
        con.close()


def query(db_path: Path, sql: str) -> list[tuple[Any, ...]]:
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        con.execute("SET TimeZone = 'UTC'")
        return con.execute(sql).fetchall()
    finally:
        con.close()


def snapshot(db_path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows, sorted: equal snapshots = equal databases."""
    out = {}
    for table in ("events_raw", "binding_sessions_closed", "binding_open",
                  "trunk_leases_closed", "trunk_open", "audit_position", "audit_derived",
                  "audit_aors"):
        out[table] = sorted(query(db_path, f"SELECT * FROM {table}"), key=repr)
    return out


def random_history(n: int, seed: int = 7, aors: int = 40) -> list[Any]:
    """A plausible registrar history: refreshes of live bindings, re-registrations of
    lapsed ones, removals, a sweeper, a node that stops (its bindings expire much
    later), and some odd records (stale expiries, refreshes of unknown keys)."""
    rnd = random.Random(seed)
    t = D0
    held: dict[tuple[str, str], tuple[float, str]] = {}  # (aor, key) -> (expires, node)
    crash_at = D0 + n * 10.0 / 2
    out: list[Any] = []
    while len(out) < n:
        t += rnd.expovariate(1 / 20.0)
        # sweeper of node n1 (n2's sweeper stops when n2 crashes)
        for (aor, key), (exp, node) in sorted(held.items()):
            if exp <= t - 5 and (node == "n1" or t < crash_at) and rnd.random() < 0.5:
                out.append(BindingExpired(ts=t, node="n1", aor=aor, key=key, expires_at=exp))
                del held[(aor, key)]
        node = "n1" if t >= crash_at or rnd.random() < 0.5 else "n2"
        aor = f"sip:u{rnd.randrange(aors)}@example.com"
        key = f"k{rnd.randrange(3)}"
        cur = held.get((aor, key))
        r = rnd.random()
        exp = t + rnd.choice((60.0, 120.0, 300.0))
        b = Binding(key=key, uri=f"sip:{key}@{aor[4:]};n={len(out)}", expires_at=exp,
                    q=rnd.choice((1.0, 0.5)), registered_at=t, node=node,
                    source=f"192.0.2.{rnd.randrange(1, 200)}:5060")
        if r < 0.03:  # odd: a stale expiry
            out.append(BindingExpired(ts=t, node="n1", aor=aor, key=key, expires_at=t - 1))
            continue
        if r < 0.05:  # odd: a refresh whatever is held (racing node)
            out.append(BindingRefreshed(ts=t, node=node, aor=aor, binding=b))
            held[(aor, key)] = (exp, node)
            continue
        if cur is not None and cur[0] > t:  # live
            if r < 0.8:
                out.append(BindingRefreshed(ts=t, node=node, aor=aor, binding=b))
                held[(aor, key)] = (exp, node)
            else:
                out.append(BindingRemoved(ts=t, node=node, aor=aor, key=key,
                                          reason=rnd.choice(("deregistered", "admin"))))
                del held[(aor, key)]
        elif r < 0.9:
            out.append(BindingAdded(ts=t, node=node, aor=aor, binding=b))
            held[(aor, key)] = (exp, node)
        else:
            out.append(BindingRemoved(ts=t, node=node, aor=aor, key=key))
            held.pop((aor, key), None)
    return out[:n]
