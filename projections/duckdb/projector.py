"""The audit projector: log records -> DuckDB tables, exactly once.

Each batch is one DuckDB transaction that inserts the raw rows and stores the next
log position; the derived tables (binding sessions, trunk leases) advance in the
same transaction, or (while catching up) in one every few million records, each
storing the position it reached (see :class:`AuditProjector`). A crash or Ctrl-C
anywhere before COMMIT leaves the database as it was; the next run starts from the
stored positions. So no record is ever counted twice or skipped.

Ingestion is set-based: the batch's payloads go to DuckDB as a NumPy object array,
DuckDB parses them (``json_transform``, every field to a typed column; without
``try()`` unless a record needs it; into a temporary table, or with one DuckDB thread
straight into the insert), and the session state machine runs as NumPy
array operations over compact columns of the new binding events (position, kind,
``h``, times) plus the bindings open before them (``binding_open``); DuckDB joins the
sessions' attributes, computes ``cover_from`` and writes. Python never loops over
rows, except trunk events (rare: a few per trunk and minute), applied in Python.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from events.log import Position
from projections.duckdb.schema import (
    BINDING_TYPES,
    KNOWN_TYPES,
    SCHEMA_VERSION,
    TABLES,
    TRUNK_TYPES,
    VIEWS,
)
from projections.duckdb.source import RawBatch

log = logging.getLogger("siphon.audit")


class AuditError(Exception):
    """The audit database cannot be used as asked; ``str()`` is one clear line."""


class AuditLocked(AuditError):
    """Another process holds the audit database file."""


class _ParseFailed(Exception):
    """A batch's payloads made the parse (without ``try()``) fail."""


_LOCK_RE = re.compile(r"Conflicting lock is held in (?P<prog>.*?) \(PID (?P<pid>\d+)\)")


def connect(path: str | os.PathLike[str], *, read_only: bool = False,
            wait: float = 0.0) -> duckdb.DuckDBPyConnection:
    """Open the audit database (creating it unless ``read_only``), retrying for up to
    ``wait`` seconds while another process holds it; raises :class:`AuditError`."""
    path = Path(path)
    if read_only and not path.exists():
        raise AuditError(f"{path}: no audit database there (run `siphon audit sync` first)")
    deadline = time.monotonic() + wait
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.IOException as exc:
            text = str(exc)
            m = _LOCK_RE.search(text)
            if m is None and "Could not set lock" not in text:
                raise AuditError(f"{path}: cannot open audit database: {text}") from None
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            who = f" (PID {m.group('pid')}: {m.group('prog')})" if m else ""
            raise AuditLocked(
                f"{path}: the audit database is in use by another process{who}; DuckDB "
                "allows one writer or several readers at a time (`siphon audit follow` "
                "holds it only while it writes)") from None
        except duckdb.Error as exc:
            raise AuditError(f"{path}: cannot open audit database: {exc}") from None
    try:
        con.execute("SET TimeZone = 'UTC'")
    except duckdb.Error:  # pragma: no cover - ICU is built into the Python wheel
        pass
    return con


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """One DuckDB transaction: committed when the block ends, rolled back whole when
    it raises (the block's error is the one reported)."""
    con.execute("BEGIN")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create the tables and views if missing; refuse a database of another version."""
    with transaction(con):
        con.execute(TABLES)
        row = con.execute("SELECT value FROM audit_meta WHERE name = 'schema_version'").fetchone()
        if row is None:
            con.execute("INSERT INTO audit_meta VALUES ('schema_version', ?)",
                        [str(SCHEMA_VERSION)])
        elif row[0] != str(SCHEMA_VERSION):
            raise AuditError(f"audit database schema version {row[0]}, this siphon writes "
                             f"{SCHEMA_VERSION}: rebuild it (delete the file, sync again)")
        con.execute(VIEWS)


def _t(expr: str) -> str:
    """SQL: Unix seconds (DOUBLE) -> TIMESTAMP (UTC, microseconds)."""
    return f"make_timestamp(CAST(round(({expr}) * 1e6) AS BIGINT))"


_BINDING_STRUCT = (
    '{"key":"VARCHAR","uri":"VARCHAR","expires_at":"DOUBLE","q":"DOUBLE","call_id":"VARCHAR",'
    '"cseq":"BIGINT","source":"VARCHAR","transport":"VARCHAR","local":"VARCHAR",'
    '"conn_id":"VARCHAR","instance":"VARCHAR","reg_id":"BIGINT","path":["VARCHAR"],'
    '"params":[["VARCHAR"]],"user_agent":"VARCHAR","registered_at":"DOUBLE","node":"VARCHAR"}'
)
_STRUCT = (
    '{"type":"VARCHAR","ts":"DOUBLE","node":"VARCHAR","aor":"VARCHAR","key":"VARCHAR",'
    '"expires_at":"DOUBLE","reason":"VARCHAR","call_id":"VARCHAR","cseq":"BIGINT",'
    '"source":"VARCHAR","transport":"VARCHAR","user_agent":"VARCHAR","trunk_id":"VARCHAR",'
    '"lease_expires_at":"DOUBLE","trunk":"JSON","replaced":"BOOLEAN",'
    f'"binding":{_BINDING_STRUCT}}}'
)
"""Every field of every known event type (``events.schema``), as ``events_raw`` columns."""


def _known_expr() -> str:
    """SQL: the record is a known event type with the fields the derivations need."""
    return """COALESCE(x.ts IS NOT NULL AND CASE x.type
        WHEN 'binding.added.v1' THEN x.aor IS NOT NULL AND x.binding.key IS NOT NULL
                                     AND x.binding.expires_at IS NOT NULL
        WHEN 'binding.refreshed.v1' THEN x.aor IS NOT NULL AND x.binding.key IS NOT NULL
                                     AND x.binding.expires_at IS NOT NULL
        WHEN 'binding.removed.v1' THEN x.aor IS NOT NULL AND x.key IS NOT NULL
        WHEN 'binding.expired.v1' THEN x.aor IS NOT NULL AND x.key IS NOT NULL
                                       AND x.expires_at IS NOT NULL
        WHEN 'trunk.deregistered.v1' THEN x.trunk_id IS NOT NULL
        WHEN 'trunk.registered.v1' THEN x.trunk_id IS NOT NULL
                                        AND x.lease_expires_at IS NOT NULL
        WHEN 'trunk.heartbeat.v1' THEN x.trunk_id IS NOT NULL
                                       AND x.lease_expires_at IS NOT NULL
        WHEN 'trunk.expired.v1' THEN x.trunk_id IS NOT NULL
                                     AND x.lease_expires_at IS NOT NULL
        ELSE false END, false)"""


_KNOWN_LIST = ", ".join(f"'{t}'" for t in KNOWN_TYPES)

# _src(log_partition, log_offset, j, x): the payload text and its parse -> an events_raw row.
_ROW_SELECT = f"""
SELECT log_partition, log_offset, x.type, known, x.ts, x.node, x.aor,
       COALESCE(x.binding.key, x.key), x.binding.uri,
       COALESCE(x.binding.expires_at, x.expires_at), x.binding.q,
       COALESCE(x.binding.call_id, x.call_id), COALESCE(x.binding.cseq, x.cseq),
       COALESCE(x.binding.source, x.source), COALESCE(x.binding.transport, x.transport),
       x.binding.local, x.binding.conn_id, x.binding.instance, x.binding.reg_id,
       x.binding.path, x.binding.params, COALESCE(x.binding.user_agent, x.user_agent),
       x.binding.registered_at, x.binding.node, x.reason, x.trunk_id, x.lease_expires_at,
       x.trunk, x.replaced,
       CASE WHEN NOT known THEN j END,
       CASE WHEN known THEN NULL
            WHEN j IS NULL THEN 'payload is not UTF-8'
            WHEN x IS NULL THEN 'payload is not a JSON object'
            WHEN x.type IS NULL AND json_type(j) <> 'OBJECT' THEN 'payload is not a JSON object'
            WHEN x.type IS NULL THEN 'no event type'
            WHEN x.type NOT IN ({_KNOWN_LIST}) THEN 'unknown event type'
            ELSE 'missing or mistyped fields for ' || x.type
       END
FROM (SELECT *, {_known_expr()} AS known FROM _src)
"""


def _parse_sql(use_try: bool) -> str:
    """SQL: the rows of _audit_batch (log_partition, log_offset, b: the payload) parsed,
    with ``try()`` (any record) or without (fails on a record that is not UTF-8 or
    not JSON)."""
    t = "try" if use_try else ""
    return f"""
WITH _src AS (SELECT log_partition, log_offset, j, {t}(json_transform(j, '{_STRUCT}')) AS x
              FROM (SELECT *, {t}(decode(b)) AS j FROM _audit_batch))
{_ROW_SELECT}"""


_PARSE_FAST = "CREATE OR REPLACE TEMP TABLE _raw AS" + _parse_sql(False)
_PARSE_TRY = "CREATE OR REPLACE TEMP TABLE _raw AS" + _parse_sql(True)
_INSERT_FAST = "INSERT INTO events_raw" + _parse_sql(False)

_BINDING_LIST = ", ".join(f"'{t}'" for t in BINDING_TYPES)

# h (UHUGEINT) as two UBIGINT columns (NumPy has no 128-bit integers)
_H_SPLIT = ("CAST(({h}) >> 64 AS UBIGINT) AS h_hi, "
            "CAST(({h}) & 18446744073709551615 AS UBIGINT) AS h_lo")

# The registrar projection's apply() per (aor, key) (h = md5_number(aor, key)), over the
# binding held before the derivation ('C', carried, from binding_open) followed by the
# derivation's events in log order, as NumPy array operations (no Python per event).
# A "segment" starts at each Added/Refreshed (a put) and holds the removals after it;
# its first Removed, or Expired whose expires_at equals the put's, ends the binding
# (later ones are no-ops, like removals of a key not held). A put starts a session:
# Added always, Refreshed when nothing is held (first, or after a removal) or what was
# held had lapsed (its ts >= the expiry in force); a session ends with the removal
# that ends its last segment, or the put that starts the next session (Added:
# registered-over, Refreshed: expired). (As window functions over sorted segments the
# state machine cost ~4.5 us per event; fetching these columns and the array operations
# take ~1.2.)
_BINDING_EVENTS = f"""
SELECT pos, k, {_H_SPLIT.format(h="h")}, ts, expires_at, reason
FROM (SELECT (CAST(log_partition AS BIGINT) << 48) + log_offset AS pos,
             CAST(CASE type WHEN 'binding.added.v1' THEN 0 WHEN 'binding.refreshed.v1' THEN 1
                            WHEN 'binding.removed.v1' THEN 2 ELSE 3 END AS TINYINT) AS k,
             md5_number(aor || chr(0) || key) AS h, ts, expires_at,
             CASE WHEN type = 'binding.removed.v1' THEN COALESCE(reason, 'deregistered')
             END AS reason
      FROM events_raw WHERE ({{batch}}) AND known AND type IN ({_BINDING_LIST}))
"""
_CARRIED = f"SELECT {_H_SPLIT.format(h='h')}, put_ts, expires_epoch FROM binding_open"

_K_ADDED, _K_REFRESHED, _K_REMOVED, _K_EXPIRED, _K_CARRIED = 0, 1, 2, 3, 4


def _sessions(ev: dict[str, Any], held: dict[str, Any]) -> dict[str, Any]:
    """The state machine over the derivation's binding events ``ev`` (columns of
    ``_BINDING_EVENTS``) and the bindings ``held`` before them (``_CARRIED``): one row
    per session touched, as the columns ``_sess`` is built from (``first_k``: 'A',
    'R' or 'C' for a carried session; ``end_ts`` -1e300 and ``end_reason`` '' while it
    is still open)."""
    nh = len(held["h_hi"])
    k = np.concatenate([np.asarray(ev["k"], dtype=np.int8),
                        np.full(nh, _K_CARRIED, dtype=np.int8)])
    hi = np.concatenate([np.asarray(ev["h_hi"], np.uint64), np.asarray(held["h_hi"], np.uint64)])
    lo = np.concatenate([np.asarray(ev["h_lo"], np.uint64), np.asarray(held["h_lo"], np.uint64)])
    pos = np.concatenate([np.asarray(ev["pos"], np.int64), np.full(nh, -1, np.int64)])
    ts = np.concatenate([_floats(ev["ts"]), _floats(held["put_ts"])])
    exp = np.concatenate([_floats(ev["expires_at"]), _floats(held["expires_epoch"])])
    reason = np.concatenate([np.ma.getdata(ev["reason"]).astype(object),
                             np.full(nh, None, dtype=object)])
    order = np.lexsort((pos, lo, hi))  # per key (h), in log order, the carried one first
    k, hi, lo, pos, ts, exp, reason = (a[order] for a in (k, hi, lo, pos, ts, exp, reason))
    n = len(k)
    idx = np.arange(n)
    new_key = np.ones(n, dtype=bool)
    new_key[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    key_start = np.maximum.accumulate(np.where(new_key, idx, 0))
    is_put = (k <= _K_REFRESHED) | (k == _K_CARRIED)
    # the put whose segment each row is in (-1: none yet in this key: a no-op)
    last_put = np.maximum.accumulate(np.where(is_put, idx, -1))
    last_put[last_put < key_start] = -1
    # keys with only a carried binding (no event now) are not touched
    key_id = np.cumsum(new_key) - 1
    touched = np.zeros(key_id[-1] + 1 if n else 0, dtype=bool)
    touched[key_id[k != _K_CARRIED]] = True
    # the removal ending each segment: its first Removed, or Expired of its expiry
    valid = last_put >= 0
    seg_exp = exp[np.where(valid, last_put, 0)]
    cand = valid & ((k == _K_REMOVED) | ((k == _K_EXPIRED) & (exp == seg_exp)))
    ci = np.flatnonzero(cand)
    cp = last_put[ci]
    first = np.ones(len(ci), dtype=bool)
    first[1:] = cp[1:] != cp[:-1]
    rm_row = np.full(n, -1, dtype=np.int64)  # indexed by the segment's put row
    rm_row[cp[first]] = ci[first]
    # segments (one per put row of a touched key), in key and log order
    p = np.flatnonzero(is_put & touched[key_id])
    m = len(p)  # (0: nothing held, nothing put: no session touched)
    pk, pts, pexp, pkey = k[p], ts[p], exp[p], key_id[p]
    removed = rm_row[p] >= 0
    key_first = np.ones(m, dtype=bool)
    key_first[1:] = pkey[1:] != pkey[:-1]
    prev_removed = np.zeros(m, dtype=bool)
    prev_removed[1:] = removed[:-1]
    prev_exp = np.full(m, np.inf)
    prev_exp[1:] = pexp[:-1]
    starts = np.where(pk == _K_ADDED, True,
                      np.where(pk == _K_CARRIED, False,
                               key_first | prev_removed | (pts >= prev_exp)))
    new_sess = starts | key_first
    s_first = np.flatnonzero(new_sess)
    s_last = np.r_[s_first[1:] - 1, m - 1].astype(np.int64)[:len(s_first)]
    ns = len(s_first)
    refresh = ((pk == _K_REFRESHED) & ~starts).astype(np.int64)
    refreshes = np.add.reduceat(refresh, s_first) if ns else np.zeros(0, np.int64)
    # how each session ended: the removal ending its last segment, else the put that
    # starts the next session of the key, else it is still open
    last = s_last
    nxt = np.minimum(last + 1, m - 1)
    has_next = (last + 1 < m) & ~key_first[nxt] if m else np.zeros(0, dtype=bool)
    rm = rm_row[p[last]]
    end_ts = np.full(ns, -1e300)
    end_reason = np.full(ns, "", dtype=object)
    by_put = ~(rm >= 0) & has_next
    end_ts[by_put] = pts[nxt[by_put]]
    end_reason[by_put] = np.where(pk[nxt[by_put]] == _K_ADDED, "registered-over", "expired")
    by_rm = rm >= 0
    end_ts[by_rm] = ts[rm[by_rm]]
    end_reason[by_rm] = np.where(k[rm[by_rm]] == _K_REMOVED, reason[rm[by_rm]], "expired")
    fp, lp = p[s_first], p[last]
    return {
        "h_hi": hi[fp], "h_lo": lo[fp], "first_pos": pos[fp],
        "first_k": np.array(["A", "R", "", "", "C"], dtype=object)[k[fp]],
        "first_ts": ts[fp], "refreshes": refreshes, "last_pos": pos[lp],
        "last_ts": ts[lp], "last_exp": exp[lp], "end_ts": end_ts, "end_reason": end_reason,
    }


def _floats(a: Any) -> Any:
    """A DOUBLE column from fetchnumpy (masked where NULL) as float64, NULL -> NaN."""
    return np.ma.filled(np.ma.asarray(a, dtype=np.float64), np.nan)


# _sess: the state machine's sessions (_py) with their attributes: a carried session
# keeps its own (binding_open), a new one takes those of its first event.
_SESSIONS = f"""
CREATE OR REPLACE TEMP TABLE _sess AS
WITH s2 AS (
    SELECT (CAST(h_hi AS UHUGEINT) << 64) | h_lo AS h, first_pos, first_k, first_ts,
           refreshes, last_pos, last_ts, last_exp, end_ts, end_reason
    FROM _py
), fresh AS (  -- attributes of sessions started in this batch, from their first event
    SELECT (CAST(log_partition AS BIGINT) << 48) + log_offset AS pos, aor, key, uri,
           instance, source, transport, user_agent, binding_node, node
    FROM events_raw
    WHERE ({{batch}}) AND type IN ('binding.added.v1', 'binding.refreshed.v1')
          AND pos IN (SELECT first_pos FROM s2)
)
SELECT s2.*, COALESCE(c.session_id, s2.first_pos) AS session_id,
       COALESCE(c.aor, b.aor) AS aor, COALESCE(c.aor_id, ids.aor_id) AS aor_id,
       COALESCE(c.binding_key, b.key) AS key,
       COALESCE(c.contact_uri, b.uri) AS contact_uri,
       COALESCE(c.instance, b.instance, '') AS instance,
       COALESCE(c.source, b.source, '') AS source,
       COALESCE(c.transport, b.transport, 'udp') AS transport,
       COALESCE(c.user_agent, b.user_agent, '') AS user_agent,
       COALESCE(c.node, NULLIF(b.binding_node, ''), b.node) AS node,
       COALESCE(c.started_at, {_t('s2.first_ts')}) AS started_at,
       COALESCE(c.started_by, CASE s2.first_k WHEN 'A' THEN 'added' ELSE 'refreshed' END)
           AS started_by,
       COALESCE(c.refresh_count, 0) + s2.refreshes AS refresh_count
FROM s2
LEFT JOIN binding_open c ON s2.first_k = 'C' AND c.h = s2.h
LEFT JOIN fresh b ON s2.first_k <> 'C' AND b.pos = s2.first_pos
LEFT JOIN audit_aors ids ON ids.aor = b.aor
"""

# New AoRs get the next ids, in order of their first binding event (so the ids do not
# depend on how the log was cut into batches).
_NEW_AORS = """
INSERT INTO audit_aors
SELECT (SELECT COALESCE(max(aor_id), 0) FROM audit_aors) + row_number() OVER (ORDER BY first),
       aor
FROM (SELECT aor, min((CAST(log_partition AS BIGINT) << 48) + log_offset) AS first
      FROM events_raw
      WHERE ({batch}) AND known AND type IN ('binding.added.v1', 'binding.refreshed.v1')
      GROUP BY aor) n
WHERE NOT EXISTS (SELECT 1 FROM audit_aors a WHERE a.aor = n.aor)
"""

# cover_from (see schema) of the sessions written now and of those after them, per
# touched AoR: from t0 (the earliest start among the sessions written now) on, the
# sessions are ordered again and each one's cover_from is the running max of the ends
# before it (the sessions ending before t0 cannot reach a session starting at t0 or
# later; those straddling t0 seed the running max).
_COVER = """
CREATE OR REPLACE TEMP TABLE _cov AS
WITH w AS (
    SELECT aor_id, session_id, epoch_us(started_at) AS a,
           CAST(round(CASE WHEN end_ts > -1e300 THEN least(end_ts, last_exp)
                           ELSE last_exp END * 1e6) AS BIGINT) AS b,
           'w' AS src
    FROM _sess
), t0 AS (
    SELECT aor_id, min(a) AS t0 FROM w GROUP BY aor_id
), ex AS (  -- sessions already stored, of the touched AoRs, that may reach t0
    SELECT c.aor_id, c.session_id, epoch_us(c.started_at) AS a, epoch_us(c.ended_at) AS b,
           epoch_us(c.cover_from) AS old_cover, 'c' AS src, t0.t0
    FROM binding_sessions_closed c JOIN t0 USING (aor_id)
    WHERE c.ended_at >= make_timestamp((SELECT min(t0) FROM t0)) AND epoch_us(c.ended_at) >= t0.t0
    UNION ALL
    SELECT o.aor_id, o.session_id, epoch_us(o.started_at), epoch_us(o.expires_at),
           epoch_us(o.cover_from), 'o', t0.t0
    FROM binding_open o JOIN t0 USING (aor_id)
    WHERE o.h NOT IN (SELECT DISTINCT h FROM _seg) AND epoch_us(o.expires_at) >= t0.t0
), seed AS (
    SELECT aor_id, max(b) AS seed FROM ex WHERE a < t0 GROUP BY aor_id
), cand AS (
    SELECT aor_id, session_id, a, b, NULL::BIGINT AS old_cover, src FROM w
    UNION ALL
    SELECT aor_id, session_id, a, b, old_cover, src FROM ex WHERE a >= t0
)
SELECT session_id, src, old_cover,
       greatest(a, COALESCE(seed.seed, a),
                COALESCE(max(b) OVER (PARTITION BY aor_id ORDER BY a, b, session_id
                                      ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), a))
           AS cover
FROM cand LEFT JOIN seed USING (aor_id)
"""

# (the sessions with their cover_from are materialised first: inserted from a plain
# table scan, whole row groups are compressed and written by the insert itself)
_WRITE_SESSIONS = [
    """
CREATE OR REPLACE TEMP TABLE _sessc AS
SELECT s.*, v.cover FROM _sess s JOIN _cov v ON v.src = 'w' AND v.session_id = s.session_id
""",
    f"""
INSERT INTO binding_sessions_closed
SELECT session_id, aor, aor_id, key, contact_uri, instance, source, transport, user_agent,
       node, started_at, started_by, refresh_count, {_t('last_exp')}, make_timestamp(cover),
       {_t('least(end_ts, last_exp)')}, end_reason, {_t('end_ts')}
FROM _sessc WHERE end_ts > -1e300
""",
    """
UPDATE binding_sessions_closed c SET cover_from = make_timestamp(v.cover)
FROM _cov v WHERE v.src = 'c' AND v.session_id = c.session_id AND v.cover <> v.old_cover
""",
    """
UPDATE binding_open o SET cover_from = make_timestamp(v.cover)
FROM _cov v WHERE v.src = 'o' AND v.session_id = o.session_id AND v.cover <> v.old_cover
""",
    "DELETE FROM binding_open o USING (SELECT DISTINCT h FROM _seg) t WHERE o.h = t.h",
    f"""
INSERT INTO binding_open
SELECT session_id, aor, aor_id, key, contact_uri, instance, source, transport, user_agent,
       node, started_at, started_by, refresh_count, {_t('last_exp')}, make_timestamp(cover),
       h, last_pos, last_ts, last_exp
FROM _sessc WHERE end_ts = -1e300
""",
]

# With one DuckDB thread the closed sessions are compressed at commit whatever feeds
# the insert: no copy into _sessc then (~0.4 us/record less).
_WRITE_SESSIONS_ONE_THREAD = [
    sql.replace("FROM _sessc WHERE",
                "FROM _sess JOIN (SELECT session_id AS cov_id, cover FROM _cov WHERE src = 'w')"
                " ON cov_id = session_id WHERE")
    for sql in _WRITE_SESSIONS[1:]
]

_TRUNK_LIST = ", ".join(f"'{t}'" for t in TRUNK_TYPES)


def _drop(con: duckdb.DuckDBPyConnection, *tables: str) -> None:
    """Drop work tables; after a failed statement the transaction is aborted and its
    rollback removes them anyway (so an error here must not hide the first one)."""
    for table in tables:
        try:
            con.execute(f"DROP TABLE IF EXISTS {table}")
        except duckdb.Error:
            return


class AuditProjector:
    """Writes raw batches into an open audit database (one transaction per batch).

    The derived tables (sessions, leases) take in the new records in the same
    transaction as the raw rows (``derive_every = 0``, the default: what ``follow``
    does), or, while catching up, once at least ``derive_every`` records are waiting
    and at the end (:meth:`derive`): the set-based state machine costs much less per
    record over a few million records than over each batch. Either way each
    transaction stores the position it brought its tables to (``audit_position`` for
    ``events_raw``, ``audit_derived`` for the derived tables), so an interruption
    anywhere loses nothing and counts nothing twice; what was not derived yet is
    derived by the next run.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, *, derive_every: int = 0) -> None:
        self.con = con
        self.derive_every = derive_every
        self.fail_after_events: Callable[[], None] | None = None
        """Test hook: called inside the transaction after the raw rows are inserted."""
        self._lock = threading.Lock()

    # -- position and identity -----------------------------------------------------

    def position(self) -> Position:
        """Next offset to ingest per partition (empty: nothing ingested yet)."""
        rows = self.con.execute("SELECT log_partition, next_offset FROM audit_position").fetchall()
        return {int(p): int(o) for p, o in rows}

    def derived_position(self) -> Position:
        """Next offset the derived tables have to take in, per partition."""
        rows = self.con.execute("SELECT log_partition, next_offset FROM audit_derived").fetchall()
        return {int(p): int(o) for p, o in rows}

    def pending(self) -> int:
        """Records in ``events_raw`` not yet taken into the derived tables."""
        derived = self.derived_position()
        return sum(max(0, n - derived.get(p, 0)) for p, n in self.position().items())

    def check_source(self, identity: str) -> None:
        """Bind the database to one log; refuse to feed it from another."""
        row = self.con.execute("SELECT value FROM audit_meta WHERE name = 'source'").fetchone()
        if row is None:
            self.con.execute("INSERT INTO audit_meta VALUES ('source', ?)", [identity])
        elif row[0] != identity:
            raise AuditError(f"this audit database was built from {row[0]}, not {identity}; "
                             "use another --db file")

    def counts(self) -> dict[str, int]:
        """Row counts of the main tables (for progress lines and tests)."""
        out = {}
        for table in ("events_raw", "binding_sessions_closed", "binding_open",
                      "trunk_leases_closed", "trunk_open"):
            out[table] = int(self.con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        return out

    # -- one batch -------------------------------------------------------------------

    def write(self, batch: RawBatch) -> None:
        """Ingest ``batch`` and advance the stored position, atomically (and the derived
        tables, when ``derive_every`` records or more wait, or it is 0)."""
        if not len(batch):
            return
        with self._lock:
            self._check_continues(batch)  # (again in the transaction: that one counts)
            self._register(batch)
            try:
                use_try: bool | None = None
                if self._one_thread():
                    # parsed straight into the insert: with one DuckDB thread the rows
                    # are compressed at commit either way, a temporary table would
                    # only be a copy (~1.3 us/record)
                    try:
                        self._transaction(batch, _INSERT_FAST, parse=True)
                        return
                    except _ParseFailed:  # rolled back; parsed with try() below
                        use_try = True
                self._parse(use_try)
                try:
                    self._transaction(batch, "INSERT INTO events_raw SELECT * FROM _raw")
                finally:
                    _drop(self.con, "_raw")
            finally:
                with contextlib.suppress(duckdb.Error):
                    self.con.unregister("_audit_batch")

    def _transaction(self, batch: RawBatch, insert: str, *, parse: bool = False) -> None:
        """The batch's transaction: ``insert`` (its rows), the position, the derivation
        if due. If ``insert`` parses the payloads (``parse``) and fails, raises
        :class:`_ParseFailed` (rolled back)."""
        with transaction(self.con):
            self._check_continues(batch)
            try:
                self.con.execute(insert)
            except duckdb.InterruptException:
                raise
            except duckdb.Error as exc:
                if not parse:
                    raise
                raise _ParseFailed(str(exc)) from exc
            if self.fail_after_events is not None:
                self.fail_after_events()
            for part, nxt in batch.end().items():
                self.con.execute("INSERT OR REPLACE INTO audit_position VALUES (?, ?)",
                                 [part, nxt])
            if self.derive_every <= 0 or self.pending() >= self.derive_every:
                self._derive()

    def _one_thread(self) -> bool:
        """DuckDB runs this connection's queries in one thread (``SET threads = 1``)."""
        return self.con.execute("SELECT current_setting('threads')").fetchall() == [(1,)]

    def derive(self) -> int:
        """Bring the derived tables up to ``events_raw`` (one transaction); returns how
        many records they took in."""
        with self._lock, transaction(self.con):
            return self._derive()

    def _derive(self) -> int:
        """Sessions and leases from the records past ``audit_derived`` (in a transaction)."""
        con = self.con
        end, start = self.position(), self.derived_position()
        todo = {p: (start.get(p, 0), n) for p, n in end.items() if n > start.get(p, 0)}
        if not todo:
            return 0
        where = " OR ".join(
            f"(log_partition = {int(p)} AND log_offset BETWEEN {lo} AND {hi - 1})"
            for p, (lo, hi) in sorted(todo.items()))
        ev = con.execute(_BINDING_EVENTS.replace("{batch}", where)).fetchnumpy()
        held = con.execute(_CARRIED).fetchnumpy()
        con.register("_py", _sessions(ev, held))
        del ev, held
        try:
            con.execute(_NEW_AORS.replace("{batch}", where))
            con.execute(_SESSIONS.replace("{batch}", where))
            con.execute("CREATE OR REPLACE TEMP TABLE _seg AS SELECT DISTINCT h FROM _sess")
            con.execute(_COVER)
            for sql in _WRITE_SESSIONS_ONE_THREAD if self._one_thread() else _WRITE_SESSIONS:
                con.execute(sql)
        finally:
            with contextlib.suppress(duckdb.Error):  # aborted: the rollback dropped it
                con.unregister("_py")
            _drop(con, "_seg", "_sess", "_cov", "_sessc")
        self._trunks(where)
        for part, (_, nxt) in todo.items():
            con.execute("INSERT OR REPLACE INTO audit_derived VALUES (?, ?)", [part, nxt])
        return sum(hi - lo for lo, hi in todo.values())

    def _check_continues(self, batch: RawBatch) -> None:
        """Refuse a batch that does not start where the stored position is (a second
        ingester, or a caller bug): that would count records twice or skip some."""
        pos = self.position()
        if isinstance(batch.partitions, int):
            assert isinstance(batch.offsets, range)
            firsts = {batch.partitions: batch.offsets.start}
            exact = True
        else:
            firsts = {}
            for p, o in zip(batch.partitions, batch.offsets, strict=True):
                firsts.setdefault(p, o)
            exact = False  # Kafka offsets may have gaps (compaction, markers)
        for part, first in firsts.items():
            expected = pos.get(part, 0)
            if first < expected or (exact and first != expected):
                raise AuditError(
                    f"batch starts at offset {first} of partition {part} but the audit "
                    f"database is at {expected} (another process ingesting the same log?)")

    def _register(self, batch: RawBatch) -> None:
        """The batch as the view ``_audit_batch`` (log_partition, log_offset, b: the
        payload): NumPy arrays, the payloads as an object array (scanned without a copy
        per row in Python)."""
        n = len(batch)
        if isinstance(batch.partitions, int):
            assert isinstance(batch.offsets, range)
            parts = np.full(n, batch.partitions, dtype=np.int32)
            offsets = np.arange(batch.offsets.start, batch.offsets.stop, dtype=np.int64)
        else:
            parts = np.asarray(batch.partitions, dtype=np.int32)
            offsets = np.asarray(batch.offsets, dtype=np.int64)
        payloads = np.empty(n, dtype=object)
        payloads[:] = batch.payloads
        self.con.register("_audit_batch", {"log_partition": parts, "log_offset": offsets,
                                           "b": payloads})

    def _parse(self, use_try: bool | None) -> None:
        """Parse ``_audit_batch`` into ``events_raw`` rows, in the temporary table
        ``_raw`` (outside any transaction: it changes nothing in the database).

        DuckDB parses the payloads (``json_transform``). A payload that is not UTF-8 or
        not JSON is not an error: it is kept, with ``error`` saying why. Unless told
        (``use_try``), the parse is first tried without ``try()`` (which costs ~15 % of
        it even when nothing fails); if a record makes it fail, the batch is parsed
        again with ``try()``, which yields the same rows for the records that parse.
        (A failed statement aborts a DuckDB transaction: hence outside one. With
        several DuckDB threads the rows go to a table first so that the insert
        compresses and writes whole row groups: inserting straight from the scan
        leaves that to a checkpoint, which costs more.)
        """
        if use_try:
            self.con.execute(_PARSE_TRY)
            return
        try:
            self.con.execute(_PARSE_FAST)
        except duckdb.InterruptException:
            raise
        except duckdb.Error:  # a record that is not UTF-8 or not JSON
            self.con.execute(_PARSE_TRY)

    # -- trunks (rare events: applied in Python, like projections.trunks) -----------

    def _trunks(self, where: str) -> None:
        con = self.con
        rows = con.execute(f"""
            SELECT (CAST(log_partition AS BIGINT) << 48) + log_offset AS pos, type, ts,
                   trunk_id, lease_expires_at, node, json_extract_string(trunk, '$.sip_uri'),
                   json_extract_string(trunk, '$.transport')
            FROM events_raw WHERE ({where}) AND known AND type IN ({_TRUNK_LIST})
            ORDER BY pos""").fetchall()
        if not rows:
            return
        ids = sorted({r[3] for r in rows})
        state: dict[str, dict[str, Any]] = {}
        for r in con.execute(
                "SELECT lease_id, trunk_id, sip_uri, transport, node, epoch_us(started_at), "
                "registrations, heartbeats, epoch_us(last_heartbeat), lease_epoch "
                "FROM trunk_open WHERE list_contains(?, trunk_id)", [ids]).fetchall():
            state[r[1]] = {"lease_id": r[0], "sip_uri": r[2], "transport": r[3], "node": r[4],
                           "started": r[5] / 1e6, "registrations": r[6], "heartbeats": r[7],
                           "last_hb": None if r[8] is None else r[8] / 1e6, "lease": r[9]}
        closed: list[tuple[Any, ...]] = []

        def close(tid: str, end_ts: float, reason: str, event_ts: float | None) -> None:
            e = state.pop(tid)
            closed.append((e["lease_id"], tid, e["sip_uri"], e["transport"], e["node"],
                           e["started"], e["registrations"], e["heartbeats"], e["last_hb"],
                           e["lease"], min(end_ts, e["lease"]), reason, event_ts))

        for pos, typ, ts, tid, lease, node, uri, transport in rows:
            cur = state.get(tid)
            if cur is not None and typ in ("trunk.registered.v1", "trunk.heartbeat.v1") \
                    and ts >= cur["lease"]:
                close(tid, cur["lease"], "expired", None)  # lapsed before this renewal
                if typ == "trunk.heartbeat.v1":  # the projection still holds it: up again
                    state[tid] = {**cur, "lease_id": pos, "started": ts, "registrations": 0,
                                  "heartbeats": 1, "last_hb": ts, "lease": lease}
                    continue
                cur = None
            if typ == "trunk.registered.v1":
                if cur is None:
                    state[tid] = {"lease_id": pos, "sip_uri": uri, "transport": transport,
                                  "node": node, "started": ts, "registrations": 1,
                                  "heartbeats": 0, "last_hb": None, "lease": lease}
                else:
                    cur.update(sip_uri=uri, transport=transport, lease=lease,
                               registrations=cur["registrations"] + 1)
            elif typ == "trunk.heartbeat.v1":
                if cur is not None:
                    cur.update(lease=max(cur["lease"], lease), last_hb=ts,
                               heartbeats=cur["heartbeats"] + 1)
            elif typ == "trunk.deregistered.v1":
                if cur is not None:
                    close(tid, ts, "deregistered", ts)
            elif cur is not None and cur["lease"] == lease:  # trunk.expired.v1
                close(tid, ts, "expired", ts)
        con.execute("DELETE FROM trunk_open WHERE list_contains(?, trunk_id)", [ids])
        if closed:
            cols = list(zip(*closed, strict=True))
            con.execute(f"""
                INSERT INTO trunk_leases_closed
                SELECT l, t, u, tr, n, {_t('s')}, r, h, {_t('hb')}, {_t('le')}, {_t('e')},
                       reason, {_t('ev')}
                FROM (SELECT unnest(?::BIGINT[]) l, unnest(?::VARCHAR[]) t,
                             unnest(?::VARCHAR[]) u, unnest(?::VARCHAR[]) tr,
                             unnest(?::VARCHAR[]) n, unnest(?::DOUBLE[]) s,
                             unnest(?::INTEGER[]) r, unnest(?::INTEGER[]) h,
                             unnest(?::DOUBLE[]) hb, unnest(?::DOUBLE[]) le,
                             unnest(?::DOUBLE[]) e, unnest(?::VARCHAR[]) reason,
                             unnest(?::DOUBLE[]) ev)""", [list(c) for c in cols])
        if state:
            opened = [(e["lease_id"], tid, e["sip_uri"], e["transport"], e["node"],
                       e["started"], e["registrations"], e["heartbeats"], e["last_hb"],
                       e["lease"]) for tid, e in state.items()]
            cols = list(zip(*opened, strict=True))
            con.execute(f"""
                INSERT INTO trunk_open
                SELECT l, t, u, tr, n, {_t('s')}, r, h, {_t('hb')}, {_t('le')}, le
                FROM (SELECT unnest(?::BIGINT[]) l, unnest(?::VARCHAR[]) t,
                             unnest(?::VARCHAR[]) u, unnest(?::VARCHAR[]) tr,
                             unnest(?::VARCHAR[]) n, unnest(?::DOUBLE[]) s,
                             unnest(?::INTEGER[]) r, unnest(?::INTEGER[]) h,
                             unnest(?::DOUBLE[]) hb, unnest(?::DOUBLE[]) le)""",
                        [list(c) for c in cols])
