"""Tables and views of the audit database (DuckDB).

``events_raw`` holds every record (unknown ones too) with the columns the derivations
need plus the stored JSON; the ``events`` view adds every other field, parsed from
that JSON when read (the text is stored once: storing it is most of the ingest cost).

Times: ``events_raw`` keeps the log's own Unix-second DOUBLEs (``ts``, ``expires_at``...)
exactly as stored; the derived tables and every view use ``TIMESTAMP`` (UTC,
microseconds). ``log_partition``/``log_offset`` name a record in the log;
``pos = (log_partition << 48) + log_offset`` orders records of one key (an AoR
or a trunk lives in one partition) and identifies sessions.
"""

from __future__ import annotations

SCHEMA_VERSION = 1
"""Bumped on an incompatible change of the tables below (a rebuild is then needed)."""

BINDING_TYPES = ("binding.added.v1", "binding.refreshed.v1", "binding.removed.v1",
                 "binding.expired.v1")
TRUNK_TYPES = ("trunk.registered.v1", "trunk.heartbeat.v1", "trunk.deregistered.v1",
               "trunk.expired.v1")
KNOWN_TYPES = BINDING_TYPES + TRUNK_TYPES

_BINDING_COLUMNS = """
    session_id    BIGINT NOT NULL,   -- pos of the event that started the session
    aor           VARCHAR NOT NULL,
    binding_key   VARCHAR NOT NULL,
    contact_uri   VARCHAR,
    instance      VARCHAR,
    source        VARCHAR,           -- ip:port the REGISTER came from
    transport     VARCHAR,
    user_agent    VARCHAR,
    node          VARCHAR,           -- node that accepted the REGISTER
    started_at    TIMESTAMP NOT NULL,
    started_by    VARCHAR NOT NULL,  -- added | refreshed (a refresh of a binding not held)
    refresh_count INTEGER NOT NULL,
    expires_at    TIMESTAMP NOT NULL -- expiry in force (after the last refresh)
"""

TABLES = f"""
CREATE TABLE IF NOT EXISTS audit_meta (
    name  VARCHAR PRIMARY KEY,
    value VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_position (
    log_partition INTEGER PRIMARY KEY,
    next_offset   BIGINT NOT NULL    -- next log offset to ingest, committed with the rows
);
CREATE TABLE IF NOT EXISTS events_raw (
    log_partition    INTEGER NOT NULL,
    log_offset       BIGINT NOT NULL,
    type             VARCHAR,        -- the event's tag, e.g. binding.added.v1 (NULL: none)
    known            BOOLEAN NOT NULL, -- a type sessions/leases are derived from
    ts               DOUBLE,         -- Unix seconds, as in the log
    node             VARCHAR,        -- producer node
    aor              VARCHAR,
    key              VARCHAR,        -- binding key (binding.key, or key of removed/expired)
    expires_at       DOUBLE,         -- binding.expires_at, or expires_at of binding.expired
    trunk_id         VARCHAR,
    json             VARCHAR USING COMPRESSION zstd, -- the stored payload (NULL: not UTF-8)
    error            VARCHAR         -- why the record is not understood (NULL if known)
);
CREATE TABLE IF NOT EXISTS binding_sessions_closed (
{_BINDING_COLUMNS},
    ended_at      TIMESTAMP NOT NULL, -- when it stopped being registered: LEAST(end event, expiry)
    end_reason    VARCHAR NOT NULL,   -- registered-over | deregistered | admin | replaced | expired
    end_event_at  TIMESTAMP NOT NULL  -- ts of the event that ended it
);
CREATE TABLE IF NOT EXISTS binding_open (
{_BINDING_COLUMNS},
    h             UHUGEINT NOT NULL, -- md5_number(aor, key): the state machine's partition key
    put_pos       BIGINT NOT NULL,   -- pos of the Added/Refreshed now in force
    put_ts        DOUBLE NOT NULL,
    expires_epoch DOUBLE NOT NULL    -- exact expires_at (binding.expired must match it)
);
CREATE TABLE IF NOT EXISTS trunk_leases_closed (
    lease_id         BIGINT NOT NULL,  -- pos of the event that brought the trunk up
    trunk_id         VARCHAR NOT NULL,
    sip_uri          VARCHAR,
    transport        VARCHAR,
    node             VARCHAR,
    started_at       TIMESTAMP NOT NULL,
    registrations    INTEGER NOT NULL,
    heartbeats       INTEGER NOT NULL,
    last_heartbeat   TIMESTAMP,
    lease_expires_at TIMESTAMP NOT NULL,
    ended_at         TIMESTAMP NOT NULL, -- LEAST(end event, lease expiry)
    end_reason       VARCHAR NOT NULL,   -- deregistered | expired (lease ran out)
    end_event_at     TIMESTAMP
);
CREATE TABLE IF NOT EXISTS trunk_open (
    lease_id         BIGINT NOT NULL,
    trunk_id         VARCHAR NOT NULL,
    sip_uri          VARCHAR,
    transport        VARCHAR,
    node             VARCHAR,
    started_at       TIMESTAMP NOT NULL,
    registrations    INTEGER NOT NULL,
    heartbeats       INTEGER NOT NULL,
    last_heartbeat   TIMESTAMP,
    lease_expires_at TIMESTAMP NOT NULL,
    lease_epoch      DOUBLE NOT NULL
);
"""

VIEWS = """
-- Every field of every record: events_raw plus the rest of the binding/trunk fields,
-- parsed from the stored JSON when read (filters on the raw columns come first).
CREATE OR REPLACE VIEW events AS
SELECT log_partition, log_offset, type, known, ts, node, aor, key,
       json_extract_string(json, '$.binding.uri') AS uri,
       expires_at,
       CAST(json_extract(json, '$.binding.q') AS DOUBLE) AS q,
       COALESCE(json_extract_string(json, '$.binding.call_id'),
                json_extract_string(json, '$.call_id')) AS call_id,
       CAST(COALESCE(json_extract(json, '$.binding.cseq'), json_extract(json, '$.cseq'))
            AS BIGINT) AS cseq,
       COALESCE(json_extract_string(json, '$.binding.source'),
                json_extract_string(json, '$.source')) AS source,
       COALESCE(json_extract_string(json, '$.binding.transport'),
                json_extract_string(json, '$.transport')) AS transport,
       json_extract_string(json, '$.binding.local') AS local,
       json_extract_string(json, '$.binding.conn_id') AS conn_id,
       json_extract_string(json, '$.binding.instance') AS instance,
       CAST(json_extract(json, '$.binding.reg_id') AS BIGINT) AS reg_id,
       CAST(json_extract(json, '$.binding.path') AS VARCHAR[]) AS path,
       json_extract(json, '$.binding.params') AS params,
       COALESCE(json_extract_string(json, '$.binding.user_agent'),
                json_extract_string(json, '$.user_agent')) AS user_agent,
       CAST(json_extract(json, '$.binding.registered_at') AS DOUBLE) AS registered_at,
       json_extract_string(json, '$.binding.node') AS binding_node,
       json_extract_string(json, '$.reason') AS reason,
       trunk_id,
       CAST(json_extract(json, '$.lease_expires_at') AS DOUBLE) AS lease_expires_at,
       json_extract(json, '$.trunk') AS trunk,
       json, error
FROM events_raw;

CREATE OR REPLACE VIEW binding_sessions AS
SELECT session_id, aor, binding_key, contact_uri, instance, source, transport, user_agent,
       node, started_at, started_by, ended_at, end_reason, end_event_at, refresh_count,
       expires_at, COALESCE(ended_at, expires_at) AS effective_end,
       (epoch_us(COALESCE(ended_at, expires_at)) - epoch_us(started_at)) / 1e6 AS duration_s
FROM (
    SELECT session_id, aor, binding_key, contact_uri, instance, source, transport,
           user_agent, node, started_at, started_by, ended_at, end_reason, end_event_at,
           refresh_count, expires_at
    FROM binding_sessions_closed
    UNION ALL
    SELECT session_id, aor, binding_key, contact_uri, instance, source, transport,
           user_agent, node, started_at, started_by, NULL, NULL, NULL, refresh_count,
           expires_at
    FROM binding_open
);

CREATE OR REPLACE VIEW trunk_leases AS
SELECT lease_id, trunk_id, sip_uri, transport, node, started_at, registrations, heartbeats,
       last_heartbeat, lease_expires_at, ended_at, end_reason, end_event_at,
       COALESCE(ended_at, lease_expires_at) AS effective_end
FROM (
    SELECT lease_id, trunk_id, sip_uri, transport, node, started_at, registrations,
           heartbeats, last_heartbeat, lease_expires_at, ended_at, end_reason, end_event_at
    FROM trunk_leases_closed
    UNION ALL
    SELECT lease_id, trunk_id, sip_uri, transport, node, started_at, registrations,
           heartbeats, last_heartbeat, lease_expires_at, NULL, NULL, NULL
    FROM trunk_open
);

-- The log, readable: one row per record with timestamps.
CREATE OR REPLACE VIEW event_log AS
SELECT log_partition, log_offset, type, make_timestamp(CAST(round(ts * 1e6) AS BIGINT)) AS at,
       node, aor, key, make_timestamp(CAST(round(expires_at * 1e6) AS BIGINT)) AS expires,
       trunk_id, error
FROM events_raw;

-- Records this projection does not understand (kept, never dropped).
CREATE OR REPLACE VIEW unknown_events AS
SELECT log_partition, log_offset, type, error, json FROM events_raw WHERE NOT known;

-- Records per type, unknown ones included.
CREATE OR REPLACE VIEW event_counts AS
SELECT COALESCE(type, '(no type)') AS type, known, count(*) AS events,
       make_timestamp(CAST(round(min(ts) * 1e6) AS BIGINT)) AS first_at,
       make_timestamp(CAST(round(max(ts) * 1e6) AS BIGINT)) AS last_at
FROM events_raw GROUP BY ALL ORDER BY events DESC;

-- Bindings registered now (wall clock) according to the log.
CREATE OR REPLACE VIEW active_bindings AS
SELECT * FROM binding_sessions
WHERE ended_at IS NULL AND expires_at > CAST(now() AT TIME ZONE 'UTC' AS TIMESTAMP);

-- Bindings that lapsed without a binding.expired event yet (a node stopped sweeping).
CREATE OR REPLACE VIEW lapsed_bindings AS
SELECT * FROM binding_sessions
WHERE ended_at IS NULL AND expires_at <= CAST(now() AT TIME ZONE 'UTC' AS TIMESTAMP);

-- Registrations, refreshes, deregistrations and expiries per hour.
CREATE OR REPLACE VIEW churn_hourly AS
SELECT time_bucket(INTERVAL 1 HOUR, make_timestamp(CAST(round(ts * 1e6) AS BIGINT))) AS hour,
       count(*) FILTER (WHERE type = 'binding.added.v1') AS registrations,
       count(*) FILTER (WHERE type = 'binding.refreshed.v1') AS refreshes,
       count(*) FILTER (WHERE type = 'binding.removed.v1') AS deregistrations,
       count(*) FILTER (WHERE type = 'binding.expired.v1') AS expiries
FROM events_raw WHERE known AND type LIKE 'binding.%' GROUP BY ALL ORDER BY hour;

-- Registered seconds per AoR and session count, over each AoR's whole history.
CREATE OR REPLACE VIEW aor_totals AS
SELECT aor, count(*) AS sessions, sum(duration_s) AS binding_seconds,
       min(started_at) AS first_registered, max(effective_end) AS last_registered
FROM binding_sessions GROUP BY aor;
"""
