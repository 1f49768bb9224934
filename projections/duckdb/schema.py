"""Tables and views of the audit database (DuckDB).

``events_raw`` holds every record (unknown ones too), one typed column per event field
(the fields of every known event type: ``events.schema``), plus the stored payload
text for records the projector does not understand (unknown type, not JSON, missing
fields), so that nothing is lost. The payload of a known event is not stored as text:
its typed columns hold all of it (a released tag never changes its fields), and
storing ~600 bytes of JSON per record was most of the ingest cost. A field absent
from the payload (msgspec omits defaults) is NULL, as in the payload.

Times: ``events_raw`` keeps the log's own Unix-second DOUBLEs (``ts``, ``expires_at``...)
exactly as stored; the derived tables and every view use ``TIMESTAMP`` (UTC,
microseconds). ``log_partition``/``log_offset`` name a record in the log;
``pos = (log_partition << 48) + log_offset`` orders records of one key (an AoR
or a trunk lives in one partition) and identifies sessions.
"""

from __future__ import annotations

SCHEMA_VERSION = 2
"""Bumped on an incompatible change of the tables below (a rebuild is then needed)."""

BINDING_TYPES = ("binding.added.v1", "binding.refreshed.v1", "binding.removed.v1",
                 "binding.expired.v1")
TRUNK_TYPES = ("trunk.registered.v1", "trunk.heartbeat.v1", "trunk.deregistered.v1",
               "trunk.expired.v1")
KNOWN_TYPES = BINDING_TYPES + TRUNK_TYPES

_BINDING_COLUMNS = """
    session_id    BIGINT NOT NULL,   -- pos of the event that started the session
    aor           VARCHAR NOT NULL,
    aor_id        INTEGER NOT NULL,  -- audit_aors.aor_id (reports group by it: faster)
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
    expires_at    TIMESTAMP NOT NULL, -- expiry in force (after the last refresh)
    cover_from    TIMESTAMP NOT NULL  -- see below
"""

# cover_from: the part of a session not covered by the AoR's sessions before it (in
# order of started_at, effective_end, session_id) is [cover_from, effective_end) (empty
# if cover_from >= effective_end). These parts do not overlap and together cover the
# time the AoR had at least one binding: charging adds them up, clipped to the window
# and buckets, instead of sorting every session of every AoR at each report. The
# projector updates it when the sessions before one change (an open one ends or is
# refreshed).

TABLES = f"""
CREATE TABLE IF NOT EXISTS audit_meta (
    name  VARCHAR PRIMARY KEY,
    value VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_position (
    log_partition INTEGER PRIMARY KEY,
    next_offset   BIGINT NOT NULL    -- next log offset to ingest, committed with the rows
);
CREATE TABLE IF NOT EXISTS audit_aors (
    aor_id INTEGER NOT NULL,         -- 1, 2, ...: in order of the AoR's first binding event
    aor    VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_derived (
    log_partition INTEGER PRIMARY KEY,
    next_offset   BIGINT NOT NULL    -- next log offset the derived tables have to take in
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
    uri              VARCHAR,        -- binding.uri
    expires_at       DOUBLE,         -- binding.expires_at, or expires_at of binding.expired
    q                DOUBLE,         -- binding.q
    call_id          VARCHAR,        -- binding.call_id, or call_id of binding.removed
    cseq             BIGINT,         -- likewise
    source           VARCHAR,        -- likewise
    transport        VARCHAR,        -- likewise
    local            VARCHAR,        -- binding.local
    conn_id          VARCHAR,        -- binding.conn_id
    instance         VARCHAR,        -- binding.instance
    reg_id           BIGINT,         -- binding.reg_id
    path             VARCHAR[],      -- binding.path
    params           VARCHAR[][],    -- binding.params: [name, value or NULL] pairs
    user_agent       VARCHAR,        -- binding.user_agent, or user_agent of binding.removed
    registered_at    DOUBLE,         -- binding.registered_at
    binding_node     VARCHAR,        -- binding.node (the node holding the binding's flow)
    reason           VARCHAR,        -- binding.removed reason
    trunk_id         VARCHAR,
    lease_expires_at DOUBLE,
    trunk            JSON,           -- trunk.registered: the trunk record
    replaced         BOOLEAN,        -- trunk.registered
    json             VARCHAR,        -- the stored payload, for records not known (else NULL)
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
-- Every field of every record (events_raw under the name the issue gives it).
CREATE OR REPLACE VIEW events AS
SELECT log_partition, log_offset, type, known, ts, node, aor, key, uri, expires_at, q,
       call_id, cseq, source, transport, local, conn_id, instance, reg_id, path, params,
       user_agent, registered_at, binding_node, reason, trunk_id, lease_expires_at, trunk,
       replaced, json, error
FROM events_raw;

CREATE OR REPLACE VIEW binding_sessions AS
SELECT session_id, aor, binding_key, contact_uri, instance, source, transport, user_agent,
       node, started_at, started_by, ended_at, end_reason, end_event_at, refresh_count,
       expires_at, COALESCE(ended_at, expires_at) AS effective_end, aor_id,
       (epoch_us(COALESCE(ended_at, expires_at)) - epoch_us(started_at)) / 1e6 AS duration_s
FROM (
    SELECT session_id, aor, binding_key, contact_uri, instance, source, transport,
           user_agent, node, started_at, started_by, ended_at, end_reason, end_event_at,
           refresh_count, expires_at, aor_id
    FROM binding_sessions_closed
    UNION ALL
    SELECT session_id, aor, binding_key, contact_uri, instance, source, transport,
           user_agent, node, started_at, started_by, NULL, NULL, NULL, refresh_count,
           expires_at, aor_id
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
