"""The named reports: each is one SQL query over the audit database.

Every function returns SQL text with values inlined as literals (numbers, and strings
quoted by :func:`lit`), so that the same query can be shown, run, or wrapped in
``COPY (...) TO 'file.parquet'``. Times are UTC: ``TIMESTAMP`` values and
microsecond Unix times (``epoch_us``).
"""

from __future__ import annotations

from datetime import UTC, datetime

BUCKETS = {"hour": 3_600_000_000, "day": 86_400_000_000}
"""Bucket widths in microseconds (UTC hours and days)."""


def lit(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def to_us(when: datetime) -> int:
    """A datetime (naive = UTC) as Unix microseconds."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = when - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _ts(us: int) -> str:
    return f"make_timestamp({int(us)})"


def registered_at(at_us: int, aor: str | None = None) -> str:
    """Bindings registered (and not lapsed) at ``at_us``: what the in-memory registrar
    projection, fed with the events up to then, would answer with ``lookup`` then.

    A session present at that time (started, not yet ended by an event) is live when
    the binding version then in force (its last Added/Refreshed up to then) has not
    expired. Ordered like ``lookup``: q descending, most recently registered first.
    """
    at_s = at_us / 1e6
    aor_filter = f"AND aor = {lit(aor)}" if aor is not None else ""
    return f"""
WITH s AS (
    SELECT session_id, aor, binding_key, started_at
    FROM binding_sessions
    WHERE started_at <= {_ts(at_us)}
      AND (end_event_at IS NULL OR end_event_at > {_ts(at_us)}) {aor_filter}
), v AS (
    SELECT s.session_id, s.aor, s.binding_key, s.started_at,
           arg_max({{'uri': e.uri, 'q': e.q, 'expires': e.expires_at, 'source': e.source,
                     'transport': e.transport, 'node': e.binding_node,
                     'user_agent': e.user_agent, 'registered_at': e.registered_at}},
                   (CAST(e.log_partition AS BIGINT) << 48) + e.log_offset) AS b
    FROM s JOIN events_raw e ON e.aor = s.aor AND e.key = s.binding_key
    WHERE e.known AND e.type IN ('binding.added.v1', 'binding.refreshed.v1')
      AND e.ts <= {at_s!r} AND e.ts >= (SELECT epoch_us(min(started_at)) / 1e6 - 1 FROM s)
      AND (CAST(e.log_partition AS BIGINT) << 48) + e.log_offset >= s.session_id
    GROUP BY ALL
)
SELECT aor, binding_key, b.uri AS contact_uri, COALESCE(b.q, 1.0) AS q,
       make_timestamp(CAST(round(b.expires * 1e6) AS BIGINT)) AS expires_at,
       b.source AS source, COALESCE(b.transport, 'udp') AS transport, b.node AS node,
       b.user_agent AS user_agent,
       make_timestamp(CAST(round(COALESCE(b.registered_at, 0) * 1e6) AS BIGINT))
           AS registered_at,
       started_at AS session_started_at, session_id
FROM v
WHERE b.expires > {at_s!r}
ORDER BY aor, q DESC, registered_at DESC
"""


def charging(from_us: int, to_us_: int, per: str | None = None,
             aor: str | None = None) -> str:
    """Registered time per AoR in ``[from, to)``, per UTC day/hour bucket if ``per``.

    Each session counts from ``started_at`` to ``effective_end`` (its end, or its expiry
    while no event ended it), clipped to the window and to each bucket.
    ``registered_s`` is the time the AoR had at least one binding (overlapping
    bindings counted once); ``binding_s`` adds up every binding's time.

    One pass over the sessions tables, without sorting them: ``registered_s`` adds up
    the sessions' own parts ``[cover_from, effective_end)`` (which do not overlap, see
    the schema), clipped like the sessions. Grouped by ``aor_id`` (integers hash much
    faster than AoR strings; the names are joined to the result at the end).
    """
    width = BUCKETS[per] if per else None
    aor_filter = (f"AND aor_id = (SELECT aor_id FROM audit_aors WHERE aor = {lit(aor)})"
                  if aor is not None else "")
    if width is None:
        buckets = f"[{from_us}]"
        bucket_col = f"{_ts(from_us)} AS window_start, {_ts(to_us_)} AS window_end"
        clip = "a, b, p"
    else:
        w = width
        # nearly every session lies in one bucket: a one-element list, not a range()
        buckets = (f"CASE WHEN (b - 1) // {w} = a // {w} THEN [a // {w} * {w}] "
                   f"ELSE range(a // {w} * {w}, b, {w}) END")
        bucket_col = f"make_timestamp(k) AS {per}"
        clip = f"greatest(a, k) AS a, least(b, k + {w}) AS b, greatest(p, k) AS p"
    return f"""
WITH s AS (
    SELECT aor_id, greatest(epoch_us(started_at), {from_us}) AS a,
           least(epoch_us(ended_at), {to_us_}) AS b,
           greatest(epoch_us(cover_from), {from_us}) AS p
    FROM binding_sessions_closed
    WHERE started_at < {_ts(to_us_)} AND ended_at > {_ts(from_us)} {aor_filter}
    UNION ALL
    SELECT aor_id, greatest(epoch_us(started_at), {from_us}),
           least(epoch_us(expires_at), {to_us_}), greatest(epoch_us(cover_from), {from_us})
    FROM binding_open
    WHERE started_at < {_ts(to_us_)} AND expires_at > {_ts(from_us)} {aor_filter}
), c AS (
    SELECT aor_id, k, {clip}
    FROM (SELECT *, unnest({buckets}) AS k FROM s WHERE b > a)
), g AS (
    SELECT aor_id, k, sum(greatest(0, b - p)) AS reg_us, sum(b - a) AS bind_us,
           count(*) AS sessions
    FROM c WHERE b > a GROUP BY aor_id, k
)
SELECT n.aor, {bucket_col}, round(reg_us / 1e6, 6) AS registered_s,
       round(bind_us / 1e6, 6) AS binding_s, sessions
FROM g JOIN audit_aors n USING (aor_id)
ORDER BY n.aor, k
"""


def trunk_uptime(from_us: int, to_us_: int) -> str:
    """Per trunk: time up (lease live) in ``[from, to)``, share of the window, up
    intervals touching it, heartbeats recorded in it."""
    window_s = (to_us_ - from_us) / 1e6
    return f"""
WITH l AS (
    SELECT trunk_id, greatest(epoch_us(started_at), {from_us}) AS a,
           least(epoch_us(effective_end), {to_us_}) AS b
    FROM trunk_leases
    WHERE started_at < {_ts(to_us_)} AND effective_end > {_ts(from_us)}
), hb AS (
    SELECT trunk_id, count(*) AS heartbeats FROM events_raw
    WHERE known AND type = 'trunk.heartbeat.v1'
      AND ts >= {from_us / 1e6!r} AND ts < {to_us_ / 1e6!r}
    GROUP BY trunk_id
), ids AS (SELECT DISTINCT trunk_id FROM l UNION SELECT trunk_id FROM hb)
SELECT ids.trunk_id,
       round(COALESCE(sum(greatest(l.b - l.a, 0)), 0) / 1e6, 6) AS up_s,
       round(100 * COALESCE(sum(greatest(l.b - l.a, 0)), 0) / 1e6 / {window_s!r}, 3)
           AS uptime_pct,
       count(l.a) AS up_intervals,
       COALESCE(any_value(hb.heartbeats), 0) AS heartbeats
FROM ids LEFT JOIN l USING (trunk_id) LEFT JOIN hb USING (trunk_id)
GROUP BY ids.trunk_id ORDER BY ids.trunk_id
"""


def churn(from_us: int | None, to_us_: int | None, per: str = "hour") -> str:
    """Registrations, refreshes, deregistrations and expiries per UTC hour/day."""
    width = BUCKETS[per]
    cond = []
    if from_us is not None:
        cond.append(f"ts >= {from_us / 1e6!r}")
    if to_us_ is not None:
        cond.append(f"ts < {to_us_ / 1e6!r}")
    where = " AND ".join(["known", "type LIKE 'binding.%'", *cond])
    return f"""
SELECT make_timestamp(CAST(floor(ts * 1e6 / {width}) AS BIGINT) * {width}) AS {per},
       count(*) FILTER (WHERE type = 'binding.added.v1') AS registrations,
       count(*) FILTER (WHERE type = 'binding.refreshed.v1') AS refreshes,
       count(*) FILTER (WHERE type = 'binding.removed.v1') AS deregistrations,
       count(*) FILTER (WHERE type = 'binding.expired.v1') AS expiries
FROM events_raw WHERE {where}
GROUP BY 1 ORDER BY 1
"""


def history(aor: str) -> str:
    """Every record of one AoR, in log order, with the binding fields."""
    return f"""
SELECT log_partition, log_offset,
       make_timestamp(CAST(round(ts * 1e6) AS BIGINT)) AS at, type, key AS binding_key,
       uri AS contact_uri, make_timestamp(CAST(round(expires_at * 1e6) AS BIGINT)) AS expires,
       source, transport, user_agent, COALESCE(binding_node, node) AS node, reason, error
FROM events WHERE aor = {lit(aor)}
ORDER BY log_partition, log_offset
"""


def parse_time(text: str) -> datetime:
    """ISO 8601 (``2026-11-23``, ``2026-11-23T10:00``, with an offset or ``Z``; naive
    means UTC) or Unix seconds; raises ValueError with a clear message."""
    value = text.strip()
    try:
        return datetime.fromtimestamp(float(value), UTC)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time (e.g. 2026-11-23T10:00:00Z) "
                         "nor Unix seconds") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
