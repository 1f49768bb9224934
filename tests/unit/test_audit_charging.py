"""Charging and sessions on a crafted history, checked against hand-computed figures.

The history (test_audit_support.crafted_history, hours after 2026-01-01T00:00Z):

* alice: a1 added 5h (exp 7h), refreshed 6.5h (exp 8h), removed 7.5h; a2 added 7h
  (exp 9h, overlapping a1), refreshed 8.5h (exp 10h), a stale expiry at 8.6h (no-op),
  expired at 10h00m30s (lapsed at 10h).
* bob: b1 added 22h (exp 26h), added again 23h (registered over), removed by admin 26h;
  then an expiry of the removed binding and a removal of an unknown key (no-ops).
* carol: c1 added 20h and refreshed 20.5h (exp 21.5h) by node n2, which then stops;
  node n1 appends its expiry at 29h.
* dave: d1 added 28h, expires 40h (past the window).
* eve: e1 added 2h by n2, lapses 6.5h, never expired.
* frank: a refresh at 12h (exp 13h) of a binding never added.

Window [6h, 30h) = 2026-01-01 06:00 .. 2026-01-02 06:00.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from test_audit_support import D0, H, at, crafted_history, ingest, query, write_log

from projections.duckdb import reports

FROM_US = int((D0 + 6 * H) * 1e6)
TO_US = int((D0 + 30 * H) * 1e6)


@pytest.fixture
async def db(tmp_path: Path) -> Path:
    log = tmp_path / "events.db"
    await write_log(log, crafted_history())
    db = tmp_path / "audit.duckdb"
    assert await ingest(log, db) == len(crafted_history())
    return db


def ts(hours: float) -> datetime:
    return datetime.fromtimestamp(at(hours), UTC).replace(tzinfo=None)  # naive UTC, as DuckDB


async def test_sessions(db: Path) -> None:
    rows = query(db, """
        SELECT aor, binding_key, started_at, started_by, ended_at, end_reason, end_event_at,
               refresh_count, expires_at, effective_end
        FROM binding_sessions ORDER BY aor, started_at""")
    h = ts
    assert rows == [
        ("sip:alice@example.com", "a1", h(5), "added", h(7.5), "deregistered", h(7.5), 1, h(8),
         h(7.5)),
        ("sip:alice@example.com", "a2", h(7), "added", h(10), "expired", h(10 + 30 / 3600), 1,
         h(10), h(10)),
        ("sip:bob@example.com", "b1", h(22), "added", h(23), "registered-over", h(23), 0, h(26),
         h(23)),
        ("sip:bob@example.com", "b1", h(23), "added", h(26), "admin", h(26), 0, h(27), h(26)),
        ("sip:carol@example.com", "c1", h(20), "added", h(21.5), "expired", h(29), 1, h(21.5),
         h(21.5)),
        ("sip:dave@example.com", "d1", h(28), "added", None, None, None, 0, h(40), h(40)),
        ("sip:eve@example.com", "e1", h(2), "added", None, None, None, 0, h(6.5), h(6.5)),
        ("sip:frank@example.com", "f1", h(12), "refreshed", None, None, None, 0, h(13), h(13)),
    ]
    # session attributes come from the event that started the session
    assert query(db, "SELECT DISTINCT node FROM binding_sessions WHERE aor LIKE '%carol%'") \
        == [("n2",)]


async def test_charging_window(db: Path) -> None:
    rows = query(db, reports.charging(FROM_US, TO_US))
    got = {r[0]: (r[3], r[4], r[5]) for r in rows}  # aor: registered_s, binding_s, sessions
    assert got == {
        "sip:alice@example.com": (14400.0, 16200.0, 2),  # [6h,10h] once; 1.5h + 3h apart
        "sip:bob@example.com": (14400.0, 14400.0, 2),    # [22h,23h] + [23h,26h]
        "sip:carol@example.com": (5400.0, 5400.0, 1),   # [20h,21.5h]: not to the late expiry
        "sip:dave@example.com": (7200.0, 7200.0, 1),    # [28h,30h]: clipped at the window
        "sip:eve@example.com": (1800.0, 1800.0, 1),     # [6h,6.5h]: lapsed, never expired
        "sip:frank@example.com": (3600.0, 3600.0, 1),   # [12h,13h]
    }


async def test_charging_per_day_and_hour(db: Path) -> None:
    rows = query(db, reports.charging(FROM_US, TO_US, "day"))
    got = {(r[0][4:].split("@")[0], r[1].day): (r[2], r[3], r[4]) for r in rows}
    assert got == {
        ("alice", 1): (14400.0, 16200.0, 2),
        ("bob", 1): (7200.0, 7200.0, 2),   # [22h,23h] + [23h,24h)
        ("bob", 2): (7200.0, 7200.0, 1),   # [24h,26h]
        ("carol", 1): (5400.0, 5400.0, 1),
        ("dave", 2): (7200.0, 7200.0, 1),
        ("eve", 1): (1800.0, 1800.0, 1),
        ("frank", 1): (3600.0, 3600.0, 1),
    }
    hourly = query(db, reports.charging(FROM_US, TO_US, "hour", aor="sip:alice@example.com"))
    by_hour = {r[1].hour: (r[2], r[3]) for r in hourly}
    assert by_hour == {6: (3600.0, 3600.0), 7: (3600.0, 5400.0), 8: (3600.0, 3600.0),
                       9: (3600.0, 3600.0)}
    # the buckets add up to the window's figures
    total = query(db, f"SELECT sum(registered_s), sum(binding_s) FROM "
                      f"({reports.charging(FROM_US, TO_US, 'hour')})")
    assert total == [(46800.0, 48600.0)]


async def test_registered_at_crafted(db: Path) -> None:
    def who(hours: float) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in query(db, reports.registered_at(int(at(hours) * 1e6)))]

    assert who(6.25) == [("sip:alice@example.com", "a1"), ("sip:eve@example.com", "e1")]
    assert who(7.25) == [("sip:alice@example.com", "a2"), ("sip:alice@example.com", "a1")]
    assert who(9.5) == [("sip:alice@example.com", "a2")]  # refreshed at 8.5h to 10h
    assert who(10.005) == []                               # lapsed, expiry not yet logged
    assert who(21.7) == []                                 # carol lapsed: n2 stopped
    assert who(25) == [("sip:bob@example.com", "b1")]
    row = query(db, reports.registered_at(int(at(25) * 1e6)))[0]
    assert row[4] == ts(27) and row[-2] == ts(23)          # the version re-added at 23h


async def test_views(db: Path) -> None:
    counts = dict(query(db, "SELECT type, events FROM event_counts"))
    assert counts == {"binding.added.v1": 7, "binding.refreshed.v1": 4,
                      "binding.removed.v1": 3, "binding.expired.v1": 4}
    churn = query(db, reports.churn(None, None, "day"))
    assert [(r[0].day, *r[1:]) for r in churn] == [(1, 6, 4, 1, 2), (2, 1, 0, 2, 2)]
    assert query(db, "SELECT count(*) FROM lapsed_bindings") == [(3,)]  # dave, eve, frank
    assert query(db, "SELECT uri, source FROM events WHERE aor = 'sip:dave@example.com'") \
        == [("sip:d1@192.0.2.1:5060", "198.51.100.7:5060")]


def _reference_charging(from_us: int, to_us: int, width: int) -> str:
    """Charging computed the slow, obvious way (the union of each AoR's bindings per
    bucket by sorting them), to check the report's precomputed cover_from."""
    return f"""
WITH s AS (
    SELECT aor, greatest(epoch_us(started_at), {from_us}) AS a,
           least(epoch_us(effective_end), {to_us}) AS b
    FROM binding_sessions
    WHERE started_at < make_timestamp({to_us}) AND effective_end > make_timestamp({from_us})
), c AS (
    SELECT aor, k, greatest(a, k) AS a, least(b, k + {width}) AS b
    FROM (SELECT aor, a, b, unnest(range(a // {width} * {width}, b, {width})) AS k
          FROM s WHERE b > a)
), u AS (
    SELECT *, max(b) OVER (PARTITION BY aor, k ORDER BY a, b
                           ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS covered
    FROM c WHERE b > a
)
SELECT aor, make_timestamp(k),
       round(sum(greatest(0, b - greatest(a, COALESCE(covered, a)))) / 1e6, 6),
       round(sum(b - a) / 1e6, 6), count(*)
FROM u GROUP BY aor, k ORDER BY aor, k
"""


@pytest.mark.parametrize("derive_every", [1, 10**9])
async def test_charging_agrees_with_sorting_every_session(tmp_path: Path,
                                                          derive_every: int) -> None:
    """Random overlapping bindings, sessions derived batch by batch or at once: the
    report (cover_from, no sort) equals the union computed from scratch."""
    from test_audit_support import random_history

    history = random_history(4000, seed=5, aors=12)
    log, db = tmp_path / "events.db", tmp_path / "audit.duckdb"
    await write_log(log, history)
    assert await ingest(log, db, batch_size=97, derive_every=derive_every) == len(history)
    first, last = history[0].ts, history[-1].ts
    for lo, hi in ((first, last + 400), (first + 3000, first + 20_000)):
        f_us, t_us = int(lo * 1e6), int(hi * 1e6)
        for per, width in (("hour", 3_600_000_000), ("day", 86_400_000_000)):
            got = query(db, reports.charging(f_us, t_us, per))
            assert got == query(db, _reference_charging(f_us, t_us, width))
            assert sum(r[2] < r[3] for r in got) > 5  # overlapping bindings were seen
        whole = query(db, reports.charging(f_us, t_us))
        assert [r[3] for r in whole] == [r[2] for r in query(
            db, _reference_charging(f_us, t_us, t_us - f_us).replace(
                f"a // {t_us - f_us} * {t_us - f_us}", str(f_us)))]
